//! Synthetic HuggingFace-style model directories for the model-weight tests and benchmarks:
//! sharded `.safetensors` files with the companions a loader reads (`config.json`, the shard
//! index, tokenizer files), written from a seed, and a full check of a mounted copy.
//!
//! - [`write_model`] writes `model-0000K-of-0000N.safetensors` shards of about
//!   [`ModelSpec::shard_bytes`] each through the `safetensors` crate (so the files are what
//!   that library writes: header padded to 8 bytes, tensors sorted by dtype alignment then
//!   name). Tensors look like a Llama-style decoder: mostly BF16 projection weights, F32 norms,
//!   plus F16 scales, I64 position ids, U8 packed weights, a BOOL mask, a 0-d scalar and one
//!   empty tensor. Float values are drawn from a normal distribution (std 0.02 for weights,
//!   1 +- 0.02 for norms), so compressors see what they see on real weights (the exponent
//!   byte compresses, the mantissa does not). Every tensor has its own stream of values and
//!   nothing repeats, so a chunk served at the wrong offset, or deduplicated wrongly, shows.
//! - [`tensors`] / [`read_header`] read only a shard's header: each tensor's dtype, shape and
//!   absolute byte range in the file, sorted by offset.
//! - [`compare_model`] checks a mounted (or downloaded) copy against the source: every file
//!   byte for byte, then every tensor of every shard read through the `safetensors` crate from
//!   an mmap of the copy; a difference names the file, offset and tensor.
//!
//! Speed: values come from splitmix64, one 64-bit draw per 4 half-precision values looked up
//! in a 64 Ki-entry table of pre-drawn normals, and shards are written in parallel: a few
//! seconds per GiB on two cores with an optimised build (`bench_tools make-model`).

use std::borrow::Cow;
use std::collections::HashMap;
use std::fs::{self, File};
use std::io::{self, Read};
use std::ops::Range;
use std::os::unix::fs::{FileExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use safetensors::tensor::{Dtype, SafeTensors, View};
use serde_json::json;

/// Largest header a shard may declare: the `safetensors` crate's own limit (100 MB).
const MAX_HEADER: u64 = 100_000_000;
/// Entries of the tables of pre-drawn values: one 16-bit index per value.
const TABLE_LEN: usize = 1 << 16;
/// Block size of the byte-for-byte comparison.
const COMPARE_BLOCK: usize = 1 << 20;

/// What [`write_model`] writes.
#[derive(Clone, Debug)]
pub struct ModelSpec {
    /// Number of `.safetensors` shards (at least 1).
    pub shards: usize,
    /// Approximate size of each shard: shards hold whole layers, so each is up to one layer
    /// (about an eighth) smaller, and at least one layer whatever the size.
    pub shard_bytes: u64,
    /// Seed of every value: the same spec writes the same bytes.
    pub seed: u64,
}

/// What [`write_model`] wrote.
#[derive(Clone, Debug)]
pub struct ModelFiles {
    pub dir: PathBuf,
    /// The shards, in order.
    pub shards: Vec<PathBuf>,
    /// Every file written (shards and companions), sorted by name.
    pub files: Vec<PathBuf>,
    /// Bytes of all files together.
    pub total_bytes: u64,
    /// Tensors over all shards.
    pub tensors: usize,
}

/// One tensor of a shard, from its header.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TensorInfo {
    pub name: String,
    /// The dtype as the header spells it (`BF16`, `F32`, ...).
    pub dtype: String,
    pub shape: Vec<usize>,
    /// Absolute byte offsets in the file (header included).
    pub range: Range<u64>,
}

/// What [`compare_model`] checked.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ModelCheck {
    /// Files compared byte for byte (shards included).
    pub files: usize,
    pub shards: usize,
    /// Tensors compared through the `safetensors` crate.
    pub tensors: usize,
    /// Bytes compared byte for byte.
    pub bytes: u64,
}

/// `model-0000K-of-0000N.safetensors`, K from 1, as `transformers` names shards.
pub fn shard_name(index: usize, shards: usize) -> String {
    format!("model-{:05}-of-{:05}.safetensors", index + 1, shards)
}

/// Writes a model directory into `dir` (created if needed): see the module documentation.
pub fn write_model(dir: &Path, spec: &ModelSpec) -> io::Result<ModelFiles> {
    if spec.shards == 0 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "a model needs at least one shard",
        ));
    }
    fs::create_dir_all(dir)?;
    let dims = Dims::for_shard_bytes(spec.shard_bytes);
    let plan = Arc::new(plan_shards(spec, &dims));
    let tables = Arc::new(Tables::new(spec.seed));

    // Shards in parallel, one per core at most: generation is CPU-bound.
    let workers = std::thread::available_parallelism()
        .map_or(2, |n| n.get())
        .min(spec.shards);
    let next = AtomicUsize::new(0);
    std::thread::scope(|scope| -> io::Result<()> {
        let handles: Vec<_> = (0..workers)
            .map(|_| {
                scope.spawn(|| -> io::Result<()> {
                    loop {
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        let Some(shard) = plan.get(i) else {
                            return Ok(());
                        };
                        write_shard(dir, i, spec, shard, &tables)?;
                    }
                })
            })
            .collect();
        for h in handles {
            h.join().expect("shard writer panicked")?;
        }
        Ok(())
    })?;

    write_companions(dir, spec, &dims, &plan)?;

    let mut files: Vec<PathBuf> = fs::read_dir(dir)?
        .map(|e| e.map(|e| e.path()))
        .collect::<io::Result<_>>()?;
    files.sort();
    let mut total_bytes = 0;
    for f in &files {
        total_bytes += fs::metadata(f)?.len();
    }
    Ok(ModelFiles {
        dir: dir.to_path_buf(),
        shards: (0..spec.shards)
            .map(|i| dir.join(shard_name(i, spec.shards)))
            .collect(),
        files,
        total_bytes,
        tensors: plan.iter().map(Vec::len).sum(),
    })
}

/// The model directory `dir` as [`write_model`] describes what it wrote: for a model written
/// before (a cached fixture). Shards are the `.safetensors` files in name order.
pub fn open_model(dir: &Path) -> io::Result<ModelFiles> {
    let mut rel = Vec::new();
    list_files(dir, Path::new(""), &mut rel)?;
    let files: Vec<PathBuf> = rel.iter().map(|r| dir.join(r)).collect();
    let shards: Vec<PathBuf> = files
        .iter()
        .filter(|f| f.extension().is_some_and(|e| e == "safetensors"))
        .cloned()
        .collect();
    let mut total_bytes = 0;
    for f in &files {
        total_bytes += fs::metadata(f)?.len();
    }
    let mut count = 0;
    for shard in &shards {
        count += tensors(shard)?.len();
    }
    Ok(ModelFiles {
        dir: dir.to_path_buf(),
        shards,
        files,
        total_bytes,
        tensors: count,
    })
}

/// The tensors of the shard at `path`, from its header only, sorted by offset.
pub fn tensors(path: &Path) -> io::Result<Vec<TensorInfo>> {
    read_header(&File::open(path)?).map_err(|e| annotate(e, path))
}

/// The tensors of an open shard, from its header only (two reads), sorted by offset.
pub fn read_header(file: &File) -> io::Result<Vec<TensorInfo>> {
    let mut len = [0u8; 8];
    file.read_exact_at(&mut len, 0)?;
    let n = u64::from_le_bytes(len);
    if n > MAX_HEADER {
        return Err(invalid(format!(
            "safetensors header of {n} bytes is over the {MAX_HEADER}-byte limit"
        )));
    }
    let mut header = vec![0u8; n as usize];
    file.read_exact_at(&mut header, 8)?;
    parse_header(&header, 8 + n)
}

/// Reads tensor `t` of `file` into a new buffer (one `pread` loop).
pub fn read_tensor(file: &File, t: &TensorInfo) -> io::Result<Vec<u8>> {
    let mut buf = vec![0u8; (t.range.end - t.range.start) as usize];
    file.read_exact_at(&mut buf, t.range.start)?;
    Ok(buf)
}

/// Checks that `mounted` holds exactly the files of `source` (a model directory, subdirectories
/// included): every file byte for byte, and every tensor of every `.safetensors` file, read
/// from an mmap of the mounted file through the `safetensors` crate, equal to the source's in
/// dtype, shape and bytes. The error names the first file (and tensor) that differs.
pub fn compare_model(source: &Path, mounted: &Path) -> Result<ModelCheck, String> {
    let mut check = ModelCheck::default();
    let mut files = Vec::new();
    list_files(source, Path::new(""), &mut files).map_err(|e| e.to_string())?;
    let mut mounted_files = Vec::new();
    list_files(mounted, Path::new(""), &mut mounted_files).map_err(|e| e.to_string())?;
    if files != mounted_files {
        return Err(format!(
            "{} holds {mounted_files:?}, {} holds {files:?}",
            mounted.display(),
            source.display()
        ));
    }
    for rel in &files {
        let (src, dst) = (source.join(rel), mounted.join(rel));
        let is_shard = rel.extension().is_some_and(|e| e == "safetensors");
        if is_shard {
            check.tensors += compare_tensors(&src, &dst)?;
            check.shards += 1;
        }
        check.bytes += compare_bytes(&src, &dst, is_shard)?;
        check.files += 1;
    }
    Ok(check)
}

// --- comparison ---------------------------------------------------------------------------

fn list_files(root: &Path, rel: &Path, out: &mut Vec<PathBuf>) -> io::Result<()> {
    let mut entries: Vec<_> = fs::read_dir(root.join(rel))
        .map_err(|e| annotate(e, &root.join(rel)))?
        .collect::<io::Result<_>>()?;
    entries.sort_by_key(|e| e.file_name());
    for e in entries {
        let path = rel.join(e.file_name());
        if e.file_type()?.is_dir() {
            list_files(root, &path, out)?;
        } else {
            out.push(path);
        }
    }
    Ok(())
}

/// Compares every tensor of shard `src` with the same tensor read from an mmap of `dst`;
/// returns the number of tensors.
fn compare_tensors(src: &Path, dst: &Path) -> Result<usize, String> {
    let (src_map, dst_map) = (map(src)?, map(dst)?);
    let expected = SafeTensors::deserialize(&src_map)
        .map_err(|e| format!("{}: not a safetensors file: {e}", src.display()))?;
    let actual = SafeTensors::deserialize(&dst_map)
        .map_err(|e| format!("{}: not a safetensors file: {e}", dst.display()))?;
    if expected.len() != actual.len() {
        return Err(format!(
            "{}: {} tensors, expected {}",
            dst.display(),
            actual.len(),
            expected.len()
        ));
    }
    for (name, want) in expected.iter() {
        let got = actual
            .tensor(name)
            .map_err(|e| format!("{}: tensor {name}: {e}", dst.display()))?;
        if got.dtype() != want.dtype() || got.shape() != want.shape() {
            return Err(format!(
                "{}: tensor {name} is {:?} {:?}, expected {:?} {:?}",
                dst.display(),
                got.dtype(),
                got.shape(),
                want.dtype(),
                want.shape()
            ));
        }
        if got.data() != want.data() {
            let at = first_difference(got.data(), want.data());
            return Err(format!(
                "{}: tensor {name} differs at byte {at} of {}",
                dst.display(),
                want.data().len()
            ));
        }
    }
    Ok(expected.len())
}

fn map(path: &Path) -> Result<memmap2::Mmap, String> {
    let file = File::open(path).map_err(|e| format!("{}: {e}", path.display()))?;
    // SAFETY: the file is only read, and neither the tests nor the mount modify it while the
    // map lives (a FUSE mount of an image is read-only).
    unsafe { memmap2::Mmap::map(&file) }.map_err(|e| format!("{}: mmap: {e}", path.display()))
}

/// Compares two files block by block; returns their length. For a shard, a difference names
/// the tensor holding the offset.
fn compare_bytes(src: &Path, dst: &Path, is_shard: bool) -> Result<u64, String> {
    let open = |p: &Path| File::open(p).map_err(|e| format!("{}: {e}", p.display()));
    let (mut a, mut b) = (open(src)?, open(dst)?);
    let (len_a, len_b) = (
        a.metadata().map_err(|e| e.to_string())?.len(),
        b.metadata().map_err(|e| e.to_string())?.len(),
    );
    if len_a != len_b {
        return Err(format!(
            "{}: {len_b} bytes, expected {len_a}",
            dst.display()
        ));
    }
    let (mut buf_a, mut buf_b) = (vec![0u8; COMPARE_BLOCK], vec![0u8; COMPARE_BLOCK]);
    let mut offset = 0u64;
    loop {
        let n = read_full(&mut a, &mut buf_a).map_err(|e| format!("{}: {e}", src.display()))?;
        let m = read_full(&mut b, &mut buf_b).map_err(|e| format!("{}: {e}", dst.display()))?;
        if n != m {
            return Err(format!(
                "{}: ends at byte {}, expected {}",
                dst.display(),
                offset + m as u64,
                offset + n as u64
            ));
        }
        if n == 0 {
            return Ok(offset);
        }
        if buf_a[..n] != buf_b[..n] {
            let at = offset + first_difference(&buf_a[..n], &buf_b[..n]) as u64;
            let place = if is_shard {
                tensors(src)
                    .ok()
                    .and_then(|ts| ts.into_iter().find(|t| t.range.contains(&at)))
                    .map_or_else(
                        || " (in the header)".to_string(),
                        |t| format!(" (tensor {})", t.name),
                    )
            } else {
                String::new()
            };
            return Err(format!("{}: differs at byte {at}{place}", dst.display()));
        }
        offset += n as u64;
    }
}

/// Reads until `buf` is full or the file ends; returns the bytes read.
pub(crate) fn read_full(f: &mut File, buf: &mut [u8]) -> io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match f.read(&mut buf[n..])? {
            0 => break,
            k => n += k,
        }
    }
    Ok(n)
}

fn first_difference(a: &[u8], b: &[u8]) -> usize {
    a.iter()
        .zip(b)
        .position(|(x, y)| x != y)
        .unwrap_or(a.len().min(b.len()))
}

// --- the header -----------------------------------------------------------------------------

fn parse_header(header: &[u8], data_start: u64) -> io::Result<Vec<TensorInfo>> {
    let value: serde_json::Value = serde_json::from_slice(header)
        .map_err(|e| invalid(format!("safetensors header is not JSON: {e}")))?;
    let object = value
        .as_object()
        .ok_or_else(|| invalid("safetensors header is not a JSON object".into()))?;
    let mut out = Vec::with_capacity(object.len());
    for (name, entry) in object {
        if name == "__metadata__" {
            continue;
        }
        let bad = |what: &str| invalid(format!("tensor {name}: {what} in the header"));
        let dtype = entry["dtype"].as_str().ok_or_else(|| bad("no dtype"))?;
        let shape = entry["shape"]
            .as_array()
            .ok_or_else(|| bad("no shape"))?
            .iter()
            .map(|d| d.as_u64().map(|d| d as usize))
            .collect::<Option<Vec<_>>>()
            .ok_or_else(|| bad("a bad shape"))?;
        let offsets = entry["data_offsets"]
            .as_array()
            .filter(|o| o.len() == 2)
            .and_then(|o| Some((o[0].as_u64()?, o[1].as_u64()?)))
            .filter(|(a, b)| a <= b)
            .ok_or_else(|| bad("bad data_offsets"))?;
        out.push(TensorInfo {
            name: name.clone(),
            dtype: dtype.to_string(),
            shape,
            range: data_start + offsets.0..data_start + offsets.1,
        });
    }
    out.sort_by(|a, b| {
        (a.range.start, a.range.end, &a.name).cmp(&(b.range.start, b.range.end, &b.name))
    });
    Ok(out)
}

fn invalid(message: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, message)
}

fn annotate(e: io::Error, path: &Path) -> io::Error {
    io::Error::new(e.kind(), format!("{}: {e}", path.display()))
}

// --- what the model holds -------------------------------------------------------------------

/// Dimensions of the decoder, chosen from the shard size so that a shard holds about 8
/// layers (at 1 GiB shards: hidden 2304, so `q_proj` is 10 MiB and an MLP weight 28 MiB) and
/// the embedding and `lm_head` are about a quarter shard each.
#[derive(Clone, Copy, Debug)]
struct Dims {
    hidden: usize,
    intermediate: usize,
    vocab: usize,
    heads: usize,
}

/// Bytes of one layer in units of hidden^2: BF16 (2 bytes) x (4 attention projections + 3
/// MLP weights of 2.75 x hidden).
const LAYER_UNITS: f64 = 2.0 * (4.0 + 3.0 * 2.75);

impl Dims {
    fn for_shard_bytes(shard_bytes: u64) -> Dims {
        let hidden =
            ((shard_bytes as f64 / (8.0 * LAYER_UNITS)).sqrt() as usize / 64 * 64).clamp(64, 8192);
        let intermediate = (hidden * 11 / 4).div_ceil(64) * 64;
        let vocab = ((shard_bytes / 4) as usize / (2 * hidden)).max(256);
        Dims {
            hidden,
            intermediate,
            vocab,
            heads: (hidden / 64).max(1),
        }
    }

    fn layer_bytes(&self) -> u64 {
        let h = self.hidden as u64;
        2 * (4 * h * h + 3 * h * self.intermediate as u64)
    }
}

/// How a tensor's values are made.
#[derive(Clone, Copy, Debug)]
enum Fill {
    /// Weights: normal, std 0.02 (BF16 or F16).
    Weights,
    /// Norm weights: 1 + normal(std 0.02) (F32).
    Norm,
    /// 0, 1, 2, ... (I64 position ids).
    Arange,
    /// A lower-triangular causal mask over the last two dimensions (BOOL).
    CausalMask,
    /// Uniform random bytes (U8 packed weights).
    Bytes,
}

#[derive(Clone, Debug)]
struct PlannedTensor {
    name: String,
    dtype: Dtype,
    shape: Vec<usize>,
    fill: Fill,
    /// The tensor's own stream of values (from the model seed and the name).
    seed: u64,
}

impl PlannedTensor {
    fn new(name: String, dtype: Dtype, shape: &[usize], fill: Fill, model_seed: u64) -> Self {
        let seed = name
            .bytes()
            .fold(model_seed ^ 0xcbf2_9ce4_8422_2325, |h, b| {
                (h ^ b as u64).wrapping_mul(0x0000_0100_0000_01b3)
            });
        PlannedTensor {
            name,
            dtype,
            shape: shape.to_vec(),
            fill,
            seed,
        }
    }

    fn elements(&self) -> usize {
        self.shape.iter().product()
    }

    fn bytes(&self) -> u64 {
        (self.elements() * self.dtype.bitsize() / 8) as u64
    }
}

fn plan_shards(spec: &ModelSpec, dims: &Dims) -> Vec<Vec<PlannedTensor>> {
    let (h, seed) = (dims.hidden, spec.seed);
    let bf16 = |name: String, shape: &[usize]| {
        PlannedTensor::new(name, Dtype::BF16, shape, Fill::Weights, seed)
    };
    let norm = |name: String| PlannedTensor::new(name, Dtype::F32, &[h], Fill::Norm, seed);
    let mut layer = 0;
    let mut shards = Vec::with_capacity(spec.shards);
    for k in 0..spec.shards {
        let mut t = Vec::new();
        if k == 0 {
            t.push(bf16("model.embed_tokens.weight".into(), &[dims.vocab, h]));
            // An empty tensor: loaders must cope with a zero-length range.
            t.push(bf16("model.embed_tokens.lora_delta".into(), &[0, h]));
        }
        // Odd dtypes, once per shard, attached to its first layer.
        let p = format!("model.layers.{layer}");
        t.push(PlannedTensor::new(
            format!("{p}.self_attn.rotary_emb.position_ids"),
            Dtype::I64,
            &[1, 4096],
            Fill::Arange,
            seed,
        ));
        t.push(PlannedTensor::new(
            format!("{p}.self_attn.causal_mask"),
            Dtype::BOOL,
            &[1, 1, 256, 256],
            Fill::CausalMask,
            seed,
        ));
        t.push(PlannedTensor::new(
            format!("{p}.self_attn.q_proj.weight_packed"),
            Dtype::U8,
            &[h, h / 2],
            Fill::Bytes,
            seed,
        ));
        t.push(PlannedTensor::new(
            format!("{p}.self_attn.q_proj.scales"),
            Dtype::F16,
            &[h, (h / 128).max(1)],
            Fill::Weights,
            seed,
        ));
        t.push(PlannedTensor::new(
            format!("{p}.self_attn.logit_scale"),
            Dtype::F32,
            &[],
            Fill::Norm,
            seed,
        ));
        if k + 1 == spec.shards {
            t.push(norm("model.norm.weight".into()));
            t.push(bf16("lm_head.weight".into(), &[dims.vocab, h]));
        }
        let mut used: u64 = t.iter().map(PlannedTensor::bytes).sum();
        loop {
            let p = format!("model.layers.{layer}");
            for proj in ["q_proj", "k_proj", "v_proj", "o_proj"] {
                t.push(bf16(format!("{p}.self_attn.{proj}.weight"), &[h, h]));
            }
            let i = dims.intermediate;
            t.push(bf16(format!("{p}.mlp.gate_proj.weight"), &[i, h]));
            t.push(bf16(format!("{p}.mlp.up_proj.weight"), &[i, h]));
            t.push(bf16(format!("{p}.mlp.down_proj.weight"), &[h, i]));
            t.push(norm(format!("{p}.input_layernorm.weight")));
            t.push(norm(format!("{p}.post_attention_layernorm.weight")));
            layer += 1;
            used += dims.layer_bytes();
            if used + dims.layer_bytes() > spec.shard_bytes {
                break;
            }
        }
        shards.push(t);
    }
    shards
}

// --- values -----------------------------------------------------------------------------------

/// Pre-drawn values, indexed by 16 random bits.
struct Tables {
    bf16: Vec<u16>,
    f16: Vec<u16>,
    /// `1 + normal(0.02)` as f32 bits; the low 16 mantissa bits are replaced per value.
    norm: Vec<u32>,
}

impl Tables {
    fn new(seed: u64) -> Tables {
        let mut rng = SplitMix(seed ^ 0x5eed_7ab1e5);
        let mut normal = || {
            // Box-Muller: u1 in (0, 1], u2 in [0, 1).
            let u1 = ((rng.next() >> 11) + 1) as f64 / (1u64 << 53) as f64;
            let u2 = (rng.next() >> 11) as f64 / (1u64 << 53) as f64;
            (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
        };
        let mut bf16 = Vec::with_capacity(TABLE_LEN);
        let mut f16 = Vec::with_capacity(TABLE_LEN);
        let mut norm = Vec::with_capacity(TABLE_LEN);
        for _ in 0..TABLE_LEN {
            let w = (0.02 * normal()) as f32;
            bf16.push(f32_to_bf16(w));
            f16.push(f32_to_f16(w));
            norm.push((1.0 + 0.02 * normal() as f32).to_bits());
        }
        Tables { bf16, f16, norm }
    }

    fn fill(&self, t: &PlannedTensor) -> Vec<u8> {
        let len = t.bytes() as usize;
        let mut out = Vec::with_capacity(len + 8);
        let mut rng = SplitMix(t.seed);
        match (t.fill, t.dtype) {
            (Fill::Weights, Dtype::BF16 | Dtype::F16) => {
                let table = if t.dtype == Dtype::BF16 {
                    &self.bf16
                } else {
                    &self.f16
                };
                while out.len() < len {
                    let r = rng.next();
                    for i in 0..4 {
                        let v = table[(r >> (16 * i)) as usize & 0xffff];
                        out.extend_from_slice(&v.to_le_bytes());
                    }
                }
            }
            (Fill::Norm, Dtype::F32) => {
                while out.len() < len {
                    let r = rng.next();
                    for half in [r as u32, (r >> 32) as u32] {
                        let v = (self.norm[(half & 0xffff) as usize] & !0xffff) | (half >> 16);
                        out.extend_from_slice(&v.to_le_bytes());
                    }
                }
            }
            (Fill::Arange, Dtype::I64) => {
                for i in 0..t.elements() as i64 {
                    out.extend_from_slice(&i.to_le_bytes());
                }
            }
            (Fill::CausalMask, Dtype::BOOL) => {
                let cols = *t.shape.last().unwrap_or(&1);
                for i in 0..t.elements() {
                    let (row, col) = ((i / cols) % cols, i % cols);
                    out.push(u8::from(col <= row));
                }
            }
            (Fill::Bytes, _) => {
                while out.len() < len {
                    out.extend_from_slice(&rng.next().to_le_bytes());
                }
            }
            (fill, dtype) => unreachable!("no {fill:?} values for {dtype:?}"),
        }
        out.truncate(len);
        out
    }
}

struct SplitMix(u64);

impl SplitMix {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
}

/// Rounds to nearest even (values here are finite and small).
fn f32_to_bf16(x: f32) -> u16 {
    let bits = x.to_bits();
    let round = 0x7fff + ((bits >> 16) & 1);
    (bits.wrapping_add(round) >> 16) as u16
}

/// Truncating conversion for finite values below 65504 in magnitude; tiny values become
/// subnormals or zero.
fn f32_to_f16(x: f32) -> u16 {
    let bits = x.to_bits();
    let sign = ((bits >> 16) & 0x8000) as u16;
    let exp = ((bits >> 23) & 0xff) as i32 - 127 + 15;
    let mantissa = bits & 0x7f_ffff;
    if exp >= 31 {
        return sign | 0x7bff;
    }
    if exp <= 0 {
        let shift = 14 - exp;
        if shift >= 24 {
            return sign;
        }
        return sign | ((mantissa | 0x80_0000) >> shift) as u16;
    }
    sign | ((exp as u16) << 10) | (mantissa >> 13) as u16
}

// --- writing --------------------------------------------------------------------------------

/// A planned tensor as the `safetensors` serializer sees it: values are generated when the
/// serializer asks for them, one tensor in memory at a time.
struct Lazy<'a> {
    tensor: &'a PlannedTensor,
    tables: &'a Tables,
}

impl View for Lazy<'_> {
    fn dtype(&self) -> Dtype {
        self.tensor.dtype
    }
    fn shape(&self) -> &[usize] {
        &self.tensor.shape
    }
    fn data(&self) -> Cow<'_, [u8]> {
        Cow::Owned(self.tables.fill(self.tensor))
    }
    fn data_len(&self) -> usize {
        self.tensor.bytes() as usize
    }
}

fn write_shard(
    dir: &Path,
    index: usize,
    spec: &ModelSpec,
    tensors: &[PlannedTensor],
    tables: &Tables,
) -> io::Result<()> {
    // One entry only: the crate keeps `__metadata__` in a HashMap and writes its entries in a
    // random order, and the same seed must write the same bytes.
    let metadata = HashMap::from([("format".to_string(), "pt".to_string())]);
    let path = dir.join(shard_name(index, spec.shards));
    safetensors::tensor::serialize_to_file(
        tensors
            .iter()
            .map(|t| (t.name.clone(), Lazy { tensor: t, tables })),
        Some(metadata),
        &path,
    )
    .map_err(|e| io::Error::other(format!("{}: {e}", path.display())))?;
    // The crate writes through a temporary file, created 0600; downloaded models are 0644.
    fs::set_permissions(&path, fs::Permissions::from_mode(0o644))
}

fn write_companions(
    dir: &Path,
    spec: &ModelSpec,
    dims: &Dims,
    plan: &[Vec<PlannedTensor>],
) -> io::Result<()> {
    let mut weight_map = serde_json::Map::new();
    let mut total_size = 0;
    for (k, shard) in plan.iter().enumerate() {
        for t in shard {
            weight_map.insert(t.name.clone(), json!(shard_name(k, spec.shards)));
            total_size += t.bytes();
        }
    }
    let layers = plan
        .iter()
        .flatten()
        .filter(|t| t.name.ends_with(".input_layernorm.weight"))
        .count();
    let write = |name: &str, value: serde_json::Value| {
        let text = serde_json::to_string_pretty(&value).expect("JSON of plain values");
        fs::write(dir.join(name), text + "\n")
    };
    write(
        "model.safetensors.index.json",
        json!({"metadata": {"total_size": total_size}, "weight_map": weight_map}),
    )?;
    write(
        "config.json",
        json!({
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "hidden_size": dims.hidden,
            "intermediate_size": dims.intermediate,
            "num_hidden_layers": layers,
            "num_attention_heads": dims.heads,
            "num_key_value_heads": dims.heads,
            "vocab_size": dims.vocab,
            "max_position_embeddings": 4096,
            "rms_norm_eps": 1e-5,
            "rope_theta": 10000.0,
            "torch_dtype": "bfloat16",
            "tie_word_embeddings": false,
            "bos_token_id": 1,
            "eos_token_id": 2,
            "transformers_version": "4.44.0",
            "lazy_fixture": {"seed": spec.seed, "shards": spec.shards,
                             "shard_bytes": spec.shard_bytes},
        }),
    )?;
    write(
        "generation_config.json",
        json!({"bos_token_id": 1, "eos_token_id": 2, "do_sample": true, "temperature": 0.6,
               "top_p": 0.9, "transformers_version": "4.44.0"}),
    )?;
    write(
        "tokenizer_config.json",
        json!({"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
               "model_max_length": 4096, "tokenizer_class": "LlamaTokenizer",
               "add_bos_token": true, "add_eos_token": false}),
    )?;
    // A BPE tokenizer over the model's vocabulary: tokens from the seed, like real
    // tokenizer.json files a few MB of JSON.
    let mut rng = SplitMix(spec.seed ^ 0x70c3);
    let mut vocab = serde_json::Map::new();
    for special in ["<unk>", "<s>", "</s>"] {
        vocab.insert(special.into(), json!(vocab.len()));
    }
    while vocab.len() < dims.vocab {
        let r = rng.next();
        let len = 2 + (r % 7) as usize;
        let token: String = (0..len)
            .map(|i| (b'a' + ((r >> (8 + 5 * i)) % 26) as u8) as char)
            .collect();
        let token = if r & (1 << 60) != 0 {
            format!("\u{2581}{token}")
        } else {
            token
        };
        let id = vocab.len();
        vocab.entry(token).or_insert(json!(id));
    }
    write(
        "tokenizer.json",
        json!({
            "version": "1.0",
            "added_tokens": [
                {"id": 0, "content": "<unk>", "special": true},
                {"id": 1, "content": "<s>", "special": true},
                {"id": 2, "content": "</s>", "special": true},
            ],
            "normalizer": {"type": "Sequence", "normalizers": [
                {"type": "Prepend", "prepend": "\u{2581}"},
                {"type": "Replace", "pattern": {"String": " "}, "content": "\u{2581}"}]},
            "model": {"type": "BPE", "unk_token": "<unk>", "byte_fallback": true,
                      "vocab": vocab, "merges": []},
        }),
    )?;
    Ok(())
}

/// The model of `spec`, written once into the fixtures directory and opened from there.
pub fn cached_model(spec: &ModelSpec) -> ModelFiles {
    let dir = crate::fixtures_dir().join(format!(
        "model-{}x{}M-seed{}",
        spec.shards,
        spec.shard_bytes >> 20,
        spec.seed
    ));
    crate::cached_fixture(
        &dir,
        |dir| {
            let files = write_model(&dir.join("model"), spec)?;
            Ok(format!(
                "{} files, {} tensors, {} bytes",
                files.files.len(),
                files.tensors,
                files.total_bytes
            ))
        },
        |dir| Ok(open_model(&dir.join("model"))?),
    )
    .expect("model fixture")
}

/// Reads every tensor of a shard in `order` from the mounted copy and asserts it equals the
/// source; returns the bytes compared.
pub fn check_tensors(source: &Path, mounted: &Path, order: &[TensorInfo]) -> u64 {
    let src = File::open(source).unwrap();
    let mnt = File::open(mounted).unwrap();
    let mut bytes = 0;
    for t in order {
        let want = read_tensor(&src, t).unwrap();
        let got = read_tensor(&mnt, t)
            .unwrap_or_else(|e| panic!("reading tensor {} of {}: {e}", t.name, mounted.display()));
        assert!(
            want == got,
            "tensor {} ({} {:?}) of {} differs from the source",
            t.name,
            t.dtype,
            t.shape,
            mounted.display()
        );
        bytes += want.len() as u64;
    }
    bytes
}

#[cfg(test)]
mod tests {
    use super::*;

    fn small(seed: u64) -> ModelSpec {
        ModelSpec {
            shards: 2,
            shard_bytes: 40 << 20,
            seed,
        }
    }

    fn copy_dir(from: &Path, to: &Path) {
        fs::create_dir_all(to).unwrap();
        for e in fs::read_dir(from).unwrap() {
            let e = e.unwrap();
            fs::copy(e.path(), to.join(e.file_name())).unwrap();
        }
    }

    #[test]
    fn a_small_model_round_trips_and_has_every_kind_of_tensor() {
        let tmp = tempfile::tempdir().unwrap();
        let model = write_model(&tmp.path().join("src"), &small(1)).unwrap();
        assert_eq!(model.shards.len(), 2);
        assert_eq!(model.files.len(), 7);
        copy_dir(&model.dir, &tmp.path().join("copy"));
        let check = compare_model(&model.dir, &tmp.path().join("copy")).unwrap();
        assert_eq!(
            check,
            ModelCheck {
                files: 7,
                shards: 2,
                tensors: model.tensors,
                bytes: model.total_bytes
            }
        );

        let all: Vec<TensorInfo> = model
            .shards
            .iter()
            .flat_map(|s| tensors(s).unwrap())
            .collect();
        assert_eq!(all.len(), model.tensors);
        for dtype in ["BF16", "F16", "F32", "I64", "U8", "BOOL"] {
            assert!(all.iter().any(|t| t.dtype == dtype), "no {dtype} tensor");
        }
        assert!(all.iter().any(|t| t.shape.is_empty()), "no 0-d tensor");
        assert!(all.iter().any(|t| t.range.is_empty()), "no empty tensor");
        assert!(
            all.iter().any(|t| t.range.end - t.range.start > 8 << 20),
            "no tensor over 8 MiB"
        );
        let bf16 = all.iter().filter(|t| t.dtype == "BF16");
        let bf16_bytes: u64 = bf16.map(|t| t.range.end - t.range.start).sum();
        let shard_bytes: u64 = model
            .shards
            .iter()
            .map(|s| fs::metadata(s).unwrap().len())
            .sum();
        assert!(
            bf16_bytes * 10 > shard_bytes * 8,
            "BF16 is most of the bytes"
        );
        for s in &model.shards {
            let len = fs::metadata(s).unwrap().len();
            assert!(
                len > 30 << 20 && len < 60 << 20,
                "{}: {len} bytes",
                s.display()
            );
        }

        // The index maps every tensor to its shard.
        let index: serde_json::Value = serde_json::from_slice(
            &fs::read(model.dir.join("model.safetensors.index.json")).unwrap(),
        )
        .unwrap();
        assert_eq!(
            index["weight_map"].as_object().unwrap().len(),
            model.tensors
        );
    }

    #[test]
    fn tensors_are_in_offset_order_and_read_tensor_returns_what_safetensors_sees() {
        let tmp = tempfile::tempdir().unwrap();
        let spec = ModelSpec {
            shards: 1,
            shard_bytes: 4 << 20,
            seed: 3,
        };
        let model = write_model(tmp.path(), &spec).unwrap();
        let list = tensors(&model.shards[0]).unwrap();
        assert!(list.windows(2).all(|w| w[0].range.end <= w[1].range.start));
        let bytes = fs::read(&model.shards[0]).unwrap();
        assert_eq!(list.last().unwrap().range.end, bytes.len() as u64);
        let st = SafeTensors::deserialize(&bytes).unwrap();
        let file = File::open(&model.shards[0]).unwrap();
        for t in &list {
            let view = st.tensor(&t.name).unwrap();
            assert_eq!(view.shape(), &t.shape[..]);
            assert_eq!(view.dtype().to_string(), t.dtype);
            assert_eq!(read_tensor(&file, t).unwrap(), view.data());
        }
        let (_, header) = SafeTensors::read_metadata(&bytes).unwrap();
        let metadata = header.metadata().as_ref().unwrap();
        assert_eq!(metadata["format"], "pt");
    }

    #[test]
    fn the_same_seed_writes_the_same_bytes_and_tensors_differ() {
        let tmp = tempfile::tempdir().unwrap();
        let spec = ModelSpec {
            shards: 1,
            shard_bytes: 2 << 20,
            seed: 9,
        };
        let a = write_model(&tmp.path().join("a"), &spec).unwrap();
        let b = write_model(&tmp.path().join("b"), &spec).unwrap();
        compare_model(&a.dir, &b.dir).unwrap();
        let c = write_model(&tmp.path().join("c"), &ModelSpec { seed: 10, ..spec }).unwrap();
        assert!(compare_model(&a.dir, &c.dir).is_err());

        // No two weight tensors share a 4 KiB block at the same offset, and none repeats
        // within itself: a misplaced chunk would show.
        let file = File::open(&a.shards[0]).unwrap();
        let weights: Vec<Vec<u8>> = tensors(&a.shards[0])
            .unwrap()
            .iter()
            .filter(|t| t.dtype == "BF16" && t.range.end - t.range.start >= 8192)
            .map(|t| read_tensor(&file, t).unwrap())
            .collect();
        assert!(weights.len() > 4);
        let mut blocks = std::collections::HashSet::new();
        for w in &weights {
            for block in w.chunks_exact(4096) {
                assert!(blocks.insert(block.to_vec()), "a repeated 4 KiB block");
            }
        }
    }

    #[test]
    fn a_flipped_byte_in_a_tensor_is_reported_with_the_tensor_name() {
        let tmp = tempfile::tempdir().unwrap();
        let spec = ModelSpec {
            shards: 2,
            shard_bytes: 2 << 20,
            seed: 5,
        };
        let model = write_model(&tmp.path().join("src"), &spec).unwrap();
        let copy = tmp.path().join("copy");
        copy_dir(&model.dir, &copy);
        let shard = copy.join(shard_name(1, 2));
        let victim = tensors(&shard)
            .unwrap()
            .into_iter()
            .find(|t| t.name.ends_with("mlp.up_proj.weight"))
            .unwrap();
        let at = victim.range.start + (victim.range.end - victim.range.start) / 2;
        let mut bytes = fs::read(&shard).unwrap();
        bytes[at as usize] ^= 0x10;
        fs::write(&shard, bytes).unwrap();
        let err = compare_model(&model.dir, &copy).unwrap_err();
        assert!(err.contains(&victim.name), "{err}");
        assert!(err.contains(&shard_name(1, 2)), "{err}");

        // A companion file differing is named too.
        copy_dir(&model.dir, &copy);
        fs::write(copy.join("config.json"), "{}").unwrap();
        let err = compare_model(&model.dir, &copy).unwrap_err();
        assert!(err.contains("config.json"), "{err}");
    }

    #[test]
    fn half_precision_conversions_round_and_keep_small_values() {
        assert_eq!(f32_to_bf16(1.0), 0x3f80);
        assert_eq!(f32_to_bf16(-2.0), 0xc000);
        assert_eq!(f32_to_f16(1.0), 0x3c00);
        assert_eq!(f32_to_f16(-0.5), 0xb800);
        assert_eq!(f32_to_f16(0.0), 0);
        // 2^-20 is a f16 subnormal: 16 units of the smallest one, 2^-24.
        assert_eq!(f32_to_f16(2f32.powi(-20)), 16);
    }
}
