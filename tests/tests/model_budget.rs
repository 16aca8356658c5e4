//! End-to-end test of a model larger than the agent's disk cache: a synthetic safetensors model
//! of about 256 MiB in four shards is uploaded to S3 (`moto`), converted to a lazy image, and
//! mounted cold through a `lazyd` whose chunk cache may use 64 MiB. Every shard is read at once
//! (one reader each, tensors in name order, as `load_file` reads them) and then every file and
//! tensor is compared with the source, while the cache's size is watched both in the agent's
//! status and on disk:
//!
//! - everything read through the mount equals the source bit for bit;
//! - the segment files never take more than the budget, and the cache really evicted;
//! - the agent counted no read error.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use lazy_tests::agent::{counter, Lazyd};
use lazy_tests::model::{self, ModelSpec};
use lazy_tests::mount::require_root_and_fuse;
use lazy_tests::s3::MotoServer;

/// Four shards of about 64 MiB: four times the cache budget, and small enough to write and
/// convert in seconds.
const SPEC: ModelSpec = ModelSpec {
    shards: 4,
    shard_bytes: 64 << 20,
    seed: 13,
};

/// The agent's `cache_size`: a quarter of the model.
const CACHE_BUDGET: u64 = 64 << 20;

const BUCKET: &str = "models";
const RAW: &str = "raw/llm/";

/// How often the cache's size is sampled while the readers run.
const SAMPLE_EVERY: Duration = Duration::from_millis(100);

/// Bytes of the cache's segment files on disk, whatever the agent reports.
fn segment_bytes(cache_dir: &Path) -> u64 {
    let segments = cache_dir.join("chunks").join("segments");
    let Ok(entries) = std::fs::read_dir(&segments) else {
        return 0;
    };
    entries
        .filter_map(Result::ok)
        .filter(|e| e.path().extension().is_some_and(|x| x == "seg"))
        // A segment evicted between the listing and the stat is gone: it counts nothing.
        .filter_map(|e| e.metadata().ok())
        .map(|m| m.len())
        .sum()
}

#[test]
fn model_four_times_the_cache_budget_reads_bit_exact_while_the_cache_evicts() {
    require_root_and_fuse();
    let model = model::cached_model(&SPEC);
    assert!(
        model.total_bytes > 3 * CACHE_BUDGET,
        "the model ({} bytes) must be several times the cache budget",
        model.total_bytes
    );
    let work = tempfile::tempdir().unwrap();
    let moto = MotoServer::start();
    moto.create_bucket(BUCKET);
    for file in &model.files {
        let key = format!("{RAW}{}", file.file_name().unwrap().to_str().unwrap());
        moto.put_object(BUCKET, &key, &std::fs::read(file).unwrap());
    }
    let image = format!("s3://{BUCKET}/lazy/llm");
    let out = std::process::Command::new(lazy_tests::mount::lazyctl_path())
        .args([
            "convert",
            &format!("s3://{BUCKET}/{RAW}"),
            &image,
            "--no-progress",
        ])
        .envs(moto.env())
        .output()
        .unwrap();
    assert!(out.status.success(), "lazyctl convert: {out:?}");

    let config = format!("cache_size = \"{}M\"\n", CACHE_BUDGET >> 20);
    let mut agent = Lazyd::start_with_env(&config, &moto.env()).unwrap();
    let mnt: PathBuf = work.path().join("mnt");
    std::fs::create_dir_all(&mnt).unwrap();
    agent.mount(&image, &mnt);
    let cache_dir = agent.cache_dir();

    // Every shard at once, tensors in name order, while a sampler watches the cache's size.
    let done = AtomicBool::new(false);
    let (compared, (most_reported, most_on_disk, samples)) = std::thread::scope(|scope| {
        let sampler = scope.spawn(|| {
            let (mut reported, mut on_disk, mut samples) = (0u64, 0u64, 0u32);
            while !done.load(Ordering::Relaxed) {
                let status = agent.status();
                reported = reported.max(counter(&status, "/metrics/cache/bytes_used"));
                on_disk = on_disk.max(segment_bytes(&cache_dir));
                samples += 1;
                std::thread::sleep(SAMPLE_EVERY);
            }
            (reported, on_disk, samples)
        });
        let readers: Vec<_> = model
            .shards
            .iter()
            .map(|shard| {
                let mnt = &mnt;
                scope.spawn(move || {
                    let mut order = model::tensors(shard).unwrap();
                    order.sort_by(|a, b| a.name.cmp(&b.name));
                    model::check_tensors(shard, &mnt.join(shard.file_name().unwrap()), &order)
                })
            })
            .collect();
        let compared: u64 = readers.into_iter().map(|r| r.join().unwrap()).sum();
        done.store(true, Ordering::Relaxed);
        (compared, sampler.join().unwrap())
    });
    assert!(
        compared > model.total_bytes / 2,
        "compared only {compared} bytes of {}",
        model.total_bytes
    );
    // Everything again, after the cache has turned over: files byte for byte, every tensor.
    let check = model::compare_model(&model.dir, &mnt).unwrap();
    assert_eq!(check.tensors, model.tensors);
    assert_eq!(check.files, model.files.len());

    let status = agent.status();
    let cache = &status["metrics"]["cache"];
    eprintln!(
        "model {} bytes, cache budget {CACHE_BUDGET}: at most {most_reported} bytes reported and \
         {most_on_disk} on disk over {samples} samples; cache at the end: {cache}",
        model.total_bytes
    );
    assert_eq!(
        counter(&status, "/metrics/cache/budget_bytes"),
        CACHE_BUDGET
    );
    assert!(samples > 0);
    for (what, bytes) in [
        ("reported while reading", most_reported),
        ("on disk while reading", most_on_disk),
        (
            "reported at the end",
            counter(&status, "/metrics/cache/bytes_used"),
        ),
        ("on disk at the end", segment_bytes(&cache_dir)),
    ] {
        assert!(
            bytes <= CACHE_BUDGET,
            "cache {what}: {bytes} bytes, over its budget of {CACHE_BUDGET}: {status}"
        );
    }
    assert!(
        counter(&status, "/metrics/cache/inserts") > 0,
        "nothing was cached: {status}"
    );
    assert!(
        counter(&status, "/metrics/cache/evicted_segments") > 0
            && counter(&status, "/metrics/cache/evicted_bytes") > 0,
        "a model four times the cache budget was read without an eviction: {status}"
    );
    assert_eq!(
        counter(&status, "/metrics/cache/corrupt_entries"),
        0,
        "{status}"
    );
    assert_eq!(
        counter(&status, "/metrics/chunks/read_errors"),
        0,
        "{status}"
    );
    assert_eq!(
        counter(&status, "/metrics/chunks/digest_mismatches"),
        0,
        "{status}"
    );
    agent.ctl_ok(["umount", mnt.to_str().unwrap()]);
    agent.stop().unwrap();
}
