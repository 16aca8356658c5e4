//! Pieces of the test harness for the shaped-link benchmarks (`bench/remote.sh`,
//! `bench/agent.sh`, `bench/containers.sh`):
//!
//! - `bench_tools debian-layout`: builds (or reuses) the Debian minbase fixture and prints
//!   `LAYOUT_DIR TAG`;
//! - `bench_tools python-layout`: the same for the Debian + python3 fixture;
//! - `bench_tools python-packages-layout`: the same for the Debian + python3 + scientific
//!   Python packages fixture (three layers, over 500 MB unpacked; `bench/containers.sh`);
//! - `bench_tools proxy UPSTREAM DELAY_MS`: runs the delaying TCP proxy in front of UPSTREAM
//!   (`HOST:PORT`), prints its `HOST:PORT` on stdout, and serves until killed;
//! - `bench_tools make-model DIR --shards N --shard-mb M [--seed S]`: writes a synthetic
//!   sharded safetensors model into DIR (`lazy_tests::model`; `bench/models.sh`) and prints
//!   one JSON line (files, shards, tensors, bytes, seconds);
//! - `bench_tools model-load DIR [--parallel P] [--since-epoch-ns T]`: loads every
//!   `.safetensors` file of DIR as a loader would (below) and prints one JSON line;
//! - `bench_tools compare-model SOURCE COPY`: checks COPY against SOURCE file by file and
//!   tensor by tensor (`lazy_tests::model::compare_model`), prints one JSON line.
//!
//! `model-load` is `safetensors.load_file` over a directory without the GPU: up to P shards at
//! once (default 8), each opened, its header read, then every tensor read in offset order
//! into memory (a copy, as an upload to a GPU takes one). It reports the time to the first
//! (non-empty) tensor in memory and the total time, both from T (nanoseconds since the epoch,
//! e.g. taken just before `lazyctl mount`) if given, else from its own start; and bytes and
//! GiB/s over the total.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context, Result};
use lazy_tests::proxy::DelayProxy;
use lazy_tests::{debian, model};
use serde_json::json;

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args
        .iter()
        .map(String::as_str)
        .collect::<Vec<_>>()
        .as_slice()
    {
        ["debian-layout"] => {
            let image = debian::minbase_image(&debian::default_cache_dir())?;
            println!("{} {}", image.dir.display(), image.tag);
            Ok(())
        }
        ["python-layout"] => {
            let image = debian::python_image(&debian::default_python_cache_dir())?;
            println!("{} {}", image.dir.display(), image.tag);
            Ok(())
        }
        ["python-packages-layout"] => {
            let image =
                debian::python_packages_image(&debian::default_python_packages_cache_dir())?;
            println!("{} {}", image.dir.display(), image.tag);
            Ok(())
        }
        ["proxy", upstream, delay_ms] => {
            let delay = Duration::from_millis(delay_ms.parse().context("DELAY_MS")?);
            let proxy = DelayProxy::start(upstream, delay)?;
            println!("{}", proxy.host());
            loop {
                std::thread::park();
            }
        }
        ["make-model", dir, options @ ..] => {
            let options = Options::parse(options, &["--shards", "--shard-mb", "--seed"])?;
            let spec = model::ModelSpec {
                shards: options.get("--shards")?.unwrap_or(4) as usize,
                shard_bytes: options.get("--shard-mb")?.unwrap_or(1024) << 20,
                seed: options.get("--seed")?.unwrap_or(1),
            };
            let start = Instant::now();
            let files = model::write_model(Path::new(dir), &spec)?;
            let line = json!({
                "dir": dir,
                "files": files.files.len(),
                "shards": files.shards.len(),
                "tensors": files.tensors,
                "bytes": files.total_bytes,
                "seconds": start.elapsed().as_secs_f64(),
            });
            println!("{line}");
            Ok(())
        }
        ["model-load", dir, options @ ..] => {
            let options = Options::parse(options, &["--parallel", "--since-epoch-ns"])?;
            let parallel = options.get("--parallel")?.unwrap_or(8).max(1) as usize;
            let line = model_load(Path::new(dir), parallel, options.get("--since-epoch-ns")?)?;
            println!("{line}");
            Ok(())
        }
        ["compare-model", source, copy] => {
            let start = Instant::now();
            let check = model::compare_model(Path::new(source), Path::new(copy))
                .map_err(|e| anyhow::anyhow!(e))?;
            let line = json!({
                "files": check.files,
                "shards": check.shards,
                "tensors": check.tensors,
                "bytes": check.bytes,
                "seconds": start.elapsed().as_secs_f64(),
            });
            println!("{line}");
            Ok(())
        }
        _ => bail!(
            "usage: bench_tools debian-layout | python-layout | python-packages-layout | \
             proxy UPSTREAM DELAY_MS | make-model DIR [--shards N] [--shard-mb M] [--seed S] | \
             model-load DIR [--parallel P] [--since-epoch-ns T] | compare-model SOURCE COPY"
        ),
    }
}

/// `--name VALUE` pairs, each name one of a known list.
struct Options(Vec<(String, String)>);

impl Options {
    fn parse(args: &[&str], known: &[&str]) -> Result<Options> {
        let mut pairs = Vec::new();
        let mut rest = args.iter();
        while let Some(name) = rest.next() {
            if !known.contains(name) {
                bail!("unknown option {name} (known: {known:?})");
            }
            let value = rest
                .next()
                .with_context(|| format!("{name} needs a value"))?;
            pairs.push((name.to_string(), value.to_string()));
        }
        Ok(Options(pairs))
    }

    fn get(&self, name: &str) -> Result<Option<u64>> {
        self.0
            .iter()
            .rev()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.parse().with_context(|| format!("{name} {v}")))
            .transpose()
    }
}

fn epoch_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970")
        .as_nanos() as u64
}

/// Loads every shard of `dir` (see the module documentation); returns the JSON report.
fn model_load(dir: &Path, parallel: usize, since_ns: Option<u64>) -> Result<serde_json::Value> {
    let start_ns = since_ns.unwrap_or_else(epoch_ns);
    let loader_start = Instant::now();
    let mut shards: Vec<PathBuf> = std::fs::read_dir(dir)
        .with_context(|| format!("listing {}", dir.display()))?
        .map(|e| e.map(|e| e.path()))
        .collect::<std::io::Result<_>>()?;
    shards.retain(|p| p.extension().is_some_and(|e| e == "safetensors"));
    shards.sort();
    if shards.is_empty() {
        bail!("no .safetensors files in {}", dir.display());
    }
    let first_ns = AtomicU64::new(u64::MAX);
    let bytes = AtomicU64::new(0);
    let tensors = AtomicUsize::new(0);
    let next = AtomicUsize::new(0);
    std::thread::scope(|scope| -> Result<()> {
        let workers: Vec<_> = (0..parallel.min(shards.len()))
            .map(|_| {
                scope.spawn(|| -> Result<()> {
                    // One buffer per worker, grown to its largest tensor: the copy a GPU upload
                    // takes, without page-faulting a fresh allocation per tensor.
                    let mut buf = Vec::new();
                    while let Some(path) = shards.get(next.fetch_add(1, Ordering::Relaxed)) {
                        let file = File::open(path)
                            .with_context(|| format!("opening {}", path.display()))?;
                        let list = model::read_header(&file)
                            .with_context(|| format!("reading {}", path.display()))?;
                        for t in &list {
                            let len = (t.range.end - t.range.start) as usize;
                            buf.resize(len, 0);
                            file.read_exact_at(&mut buf, t.range.start)
                                .with_context(|| {
                                    format!("reading tensor {} of {}", t.name, path.display())
                                })?;
                            if len > 0 {
                                first_ns.fetch_min(epoch_ns(), Ordering::Relaxed);
                            }
                            bytes.fetch_add(len as u64, Ordering::Relaxed);
                        }
                        tensors.fetch_add(list.len(), Ordering::Relaxed);
                    }
                    Ok(())
                })
            })
            .collect();
        for w in workers {
            w.join().expect("loader thread panicked")?;
        }
        Ok(())
    })?;
    let end_ns = epoch_ns();
    let total_s = end_ns.saturating_sub(start_ns) as f64 / 1e9;
    let bytes = bytes.load(Ordering::Relaxed);
    let first = first_ns.load(Ordering::Relaxed);
    Ok(json!({
        "dir": dir,
        "shards": shards.len(),
        "parallel": parallel.min(shards.len()),
        "tensors": tensors.load(Ordering::Relaxed),
        "bytes": bytes,
        "from": if since_ns.is_some() { "since-epoch-ns" } else { "loader start" },
        "first_tensor_s": (first != u64::MAX).then(|| first.saturating_sub(start_ns) as f64 / 1e9),
        "total_s": total_s,
        "loader_s": loader_start.elapsed().as_secs_f64(),
        "gib_per_s": bytes as f64 / total_s.max(1e-9) / (1u64 << 30) as f64,
    }))
}
