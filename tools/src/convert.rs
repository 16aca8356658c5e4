//! `lazyctl convert`: source image (or directory) -> lazy image in a local store.
//!
//! Layers are converted in order. Each becomes one data blob (its chunks, written by the
//! packer) while its entries are merged into one tree; a layer's blob is moved into the store
//! only after the layer's digest checked out. Then the tree becomes the index, and the
//! manifest naming config, index and blobs is stored and tagged. Nothing is tagged unless
//! every step succeeded, so a failed conversion leaves the store as it was (plus, at most,
//! complete blobs no manifest names yet).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use agent::store::LocalStore;
use fusefs::format::BlobRecord;
use fusefs::manifest::{
    Descriptor, LazyManifest, ANNOTATION_SOURCE, ANNOTATION_SOURCE_LAYER, MEDIA_TYPE_BLOB,
    MEDIA_TYPE_INDEX, MEDIA_TYPE_OCI_CONFIG,
};
use fusefs::writer::IndexWriter;
use tracing::info;

use crate::error::ConvertError;
use crate::layer::{apply_tar, decompress, open_blob, HashingReader};
use crate::packer::{ChunkTable, FinishedBlob, LayerPacker};
use crate::progress::Progress;
use crate::reference::{SourceRef, StoreRef};
use crate::source::{self, Expected, SourceLayer};
use crate::tree::Tree;

/// Knobs of a conversion.
#[derive(Debug, Clone)]
pub struct ConvertOptions {
    /// Uncompressed chunk size in bytes.
    pub chunk_size: u32,
    /// zstd level.
    pub level: i32,
    /// Compression threads.
    pub jobs: usize,
    /// Show a progress bar on a terminal.
    pub progress: bool,
}

impl Default for ConvertOptions {
    fn default() -> Self {
        ConvertOptions {
            chunk_size: fusefs::format::DEFAULT_CHUNK_SIZE,
            level: fusefs::chunk::DEFAULT_ZSTD_LEVEL,
            jobs: std::thread::available_parallelism().map_or(2, |n| n.get()),
            progress: true,
        }
    }
}

/// What a conversion produced.
#[derive(Debug, Clone)]
pub struct ConvertReport {
    pub manifest_digest: String,
    pub layers: usize,
    pub entries: usize,
    pub inodes: usize,
    /// Uncompressed file bytes read.
    pub input_bytes: u64,
    /// Bytes of all data blobs.
    pub stored_bytes: u64,
    pub index_bytes: u64,
    pub chunks: usize,
    pub deduplicated_chunks: u64,
    pub seconds: f64,
}

impl ConvertReport {
    pub fn summary(&self) -> String {
        format!(
            "converted {} layer(s), {} entries, {:.1} MiB of file data -> {:.1} MiB in {} chunks ({} deduplicated) + {:.1} KiB index in {:.2} s ({:.0} MB/s); manifest {}",
            self.layers,
            self.entries,
            self.input_bytes as f64 / (1 << 20) as f64,
            self.stored_bytes as f64 / (1 << 20) as f64,
            self.chunks,
            self.deduplicated_chunks,
            self.index_bytes as f64 / 1024.0,
            self.seconds,
            self.input_bytes as f64 / 1e6 / self.seconds.max(1e-9),
            self.manifest_digest
        )
    }
}

fn validate(opts: &ConvertOptions) -> Result<(), ConvertError> {
    use fusefs::format::{MAX_CHUNK_SIZE, MIN_CHUNK_SIZE};
    if !(MIN_CHUNK_SIZE..=MAX_CHUNK_SIZE).contains(&opts.chunk_size) {
        return Err(ConvertError::Source(format!(
            "chunk size {} is outside {MIN_CHUNK_SIZE}..={MAX_CHUNK_SIZE} bytes",
            opts.chunk_size
        )));
    }
    Ok(())
}

/// Converts `src` into the store `dst`.
pub fn convert(
    src: &SourceRef,
    dst: &StoreRef,
    opts: &ConvertOptions,
) -> Result<ConvertReport, ConvertError> {
    validate(opts)?;
    let started = Instant::now();
    let store = LocalStore::create(&dst.path)?;
    let input = Arc::new(AtomicU64::new(0));
    let mut tree = Tree::new();
    let mut table = ChunkTable::default();
    let mut blobs: Vec<(Descriptor, BlobRecord)> = Vec::new();

    let (config, source_name) = match src {
        SourceRef::Path { dir } => {
            let _progress = Progress::start(opts.progress, "converting", 0, input.clone());
            let packer = start_packer(&store, table, 0, opts, &input)?;
            let (packer, result) = run(packer, |p| crate::dirsource::apply_dir(dir, &mut tree, p));
            result?;
            let (t, blob) = packer.finish()?;
            table = t;
            blobs.push(commit(&store, blob, None)?);
            (directory_config(), format!("path:{}", dir.display()))
        }
        other => {
            let image = source::open(other)?;
            let total: u64 = image.layers.iter().map(|l| l.size).sum();
            let read = Arc::new(AtomicU64::new(0));
            let _progress = Progress::start(opts.progress, "converting", total, read.clone());
            for (i, layer) in image.layers.iter().enumerate() {
                let packer = start_packer(&store, table, i as u32, opts, &input)?;
                let (t, blob) = convert_layer(layer, i as u32, &mut tree, packer, &read)?;
                table = t;
                let source_digest = match &layer.expected {
                    Expected::Blob(d) | Expected::Uncompressed(d) => d.clone(),
                };
                blobs.push(commit(&store, blob, Some(source_digest))?);
            }
            (image.config, source_name(other))
        }
    };

    let mut writer = IndexWriter::new(opts.chunk_size);
    for (_, record) in &blobs {
        writer.add_blob(*record);
    }
    for record in &table.records {
        writer.add_chunk(*record);
    }
    tree.write_index(&mut writer, &|p| table.resolve(p))?;
    let inodes = writer.inode_count();
    let index = writer.finish()?;
    let index_digest = store.put_blob(&index)?;
    let config_digest = store.put_blob(&config)?;
    let mut manifest = LazyManifest::new(
        Descriptor {
            media_type: MEDIA_TYPE_OCI_CONFIG.to_string(),
            digest: config_digest,
            size: config.len() as u64,
            annotations: None,
        },
        Descriptor {
            media_type: MEDIA_TYPE_INDEX.to_string(),
            digest: index_digest,
            size: index.len() as u64,
            annotations: None,
        },
        blobs.iter().map(|(d, _)| d.clone()).collect(),
    );
    manifest.annotations = Some(BTreeMap::from([(
        ANNOTATION_SOURCE.to_string(),
        source_name,
    )]));
    let manifest_digest = store.put_manifest(&dst.tag, &manifest)?;
    let report = ConvertReport {
        manifest_digest,
        layers: blobs.len(),
        entries: tree.entry_count(),
        inodes,
        input_bytes: input.load(Ordering::Relaxed),
        stored_bytes: blobs.iter().map(|(d, _)| d.size).sum(),
        index_bytes: index.len() as u64,
        chunks: table.records.len(),
        deduplicated_chunks: table.deduplicated,
        seconds: started.elapsed().as_secs_f64(),
    };
    tracing::debug!("{}", report.summary());
    Ok(report)
}

fn source_name(src: &SourceRef) -> String {
    match src {
        SourceRef::Oci { path, tag } => match tag {
            Some(t) => format!("oci:{}:{t}", path.display()),
            None => format!("oci:{}", path.display()),
        },
        SourceRef::OciArchive { path } => format!("oci-archive:{}", path.display()),
        SourceRef::DockerArchive { path } => format!("docker-archive:{}", path.display()),
        SourceRef::Docker { reference } => format!("docker://{reference}"),
        SourceRef::Path { dir } => format!("path:{}", dir.display()),
    }
}

/// Runs `f` with the packer; if `f` fails, the packer is still shut down cleanly.
fn run<T>(
    mut packer: LayerPacker,
    f: impl FnOnce(&mut LayerPacker) -> Result<T, ConvertError>,
) -> (LayerPacker, Result<T, ConvertError>) {
    let r = f(&mut packer);
    (packer, r)
}

fn start_packer(
    store: &LocalStore,
    table: ChunkTable,
    blob_index: u32,
    opts: &ConvertOptions,
    input: &Arc<AtomicU64>,
) -> Result<LayerPacker, ConvertError> {
    Ok(LayerPacker::start(
        table,
        blob_index,
        store.temp_file()?,
        opts.chunk_size,
        opts.level,
        opts.jobs,
        input.clone(),
    ))
}

/// Counts bytes read from a layer blob for the progress bar.
struct Counting<R> {
    inner: R,
    counter: Arc<AtomicU64>,
}

impl<R: std::io::Read> std::io::Read for Counting<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.counter.fetch_add(n as u64, Ordering::Relaxed);
        Ok(n)
    }
}

fn convert_layer(
    layer: &SourceLayer,
    index: u32,
    tree: &mut Tree,
    packer: LayerPacker,
    read: &Arc<AtomicU64>,
) -> Result<(ChunkTable, FinishedBlob), ConvertError> {
    let label = match &layer.expected {
        Expected::Blob(d) | Expected::Uncompressed(d) => d.clone(),
    };
    let file = open_blob(&layer.path)?;
    let counted = Counting {
        inner: file,
        counter: read.clone(),
    };
    // One digest is checked: of the blob as stored, or (docker-archive) of the tar inside.
    let uncompressed = matches!(layer.expected, Expected::Uncompressed(_));
    let mut raw = HashingReader::with_hash(
        std::io::BufReader::with_capacity(1 << 20, counted),
        !uncompressed,
    );
    let (packer, result) = run(packer, |packer| {
        let (compression, stream) = decompress(std::io::BufReader::new(&mut raw), &label)?;
        let mut plain = HashingReader::with_hash(stream, uncompressed);
        let stats = apply_tar(&mut plain, index, &label, compression, tree, packer)?;
        let plain_digest = plain.finish().map_err(|e| ConvertError::CorruptLayer {
            layer: label.clone(),
            compression: compression.name(),
            reason: e.to_string(),
        })?;
        Ok((stats, plain_digest))
    });
    let finished = packer.finish();
    let (stats, plain_digest) = result?;
    let blob_digest = raw
        .finish()
        .map_err(ConvertError::io(format!("reading layer {label}")))?;
    let (expected, actual) = match &layer.expected {
        Expected::Blob(d) => (d, blob_digest),
        Expected::Uncompressed(d) => (d, plain_digest),
    };
    let actual = actual.unwrap_or_default();
    if *expected != actual {
        return Err(ConvertError::LayerDigest {
            layer: label,
            expected: expected.clone(),
            actual,
        });
    }
    info!(
        layer = %label,
        entries = stats.entries,
        whiteouts = stats.whiteouts,
        "layer converted"
    );
    finished
}

fn commit(
    store: &LocalStore,
    blob: FinishedBlob,
    source_layer: Option<String>,
) -> Result<(Descriptor, BlobRecord), ConvertError> {
    let digest = blob.digest.clone();
    let size = blob.size;
    store.commit_blob(blob.file, &digest)?;
    let mut sha256 = [0u8; 32];
    hex::decode_to_slice(&digest[7..], &mut sha256)
        .map_err(|e| ConvertError::Source(format!("bad blob digest {digest}: {e}")))?;
    Ok((
        Descriptor {
            media_type: MEDIA_TYPE_BLOB.to_string(),
            digest,
            size,
            annotations: source_layer
                .map(|s| BTreeMap::from([(ANNOTATION_SOURCE_LAYER.to_string(), s)])),
        },
        BlobRecord { sha256, size },
    ))
}

/// The image config of a directory source: a minimal OCI config for this host's platform.
fn directory_config() -> Vec<u8> {
    let (os, arch) = source::host_platform();
    serde_json::to_vec(&serde_json::json!({
        "architecture": arch,
        "os": os,
        "config": {},
        "rootfs": {"type": "layers", "diff_ids": []},
    }))
    .expect("static json")
}
