//! End-to-end tests of model weights: a synthetic multi-GB safetensors model (several shards,
//! mixed dtypes, header metadata, the companions a loader reads) is uploaded to S3 (`moto`) as
//! plain files, converted to lazy images both ways (copied with `--compression auto`, and by
//! `--reference` to the raw objects in place), and mounted cold through a real `lazyd`:
//!
//! - every file and every tensor read through the mount equals the source bit for bit;
//! - random tensor reads across all shards, and concurrent readers of every shard (each in
//!   name order, as `load_file` reads), are served right while the agent streams the shards;
//! - a reader that stops half-way through a shard and closes it makes the agent stop
//!   streaming: it fetched no more than the stream's bound beyond what was read, and nothing
//!   after the close.

use std::path::Path;
use std::time::{Duration, Instant};

use lazy_tests::agent::{backend_bytes, counter, Lazyd};
use lazy_tests::model::{self, ModelFiles, ModelSpec, TensorInfo};
use lazy_tests::mount::{mountpoint, require_root_and_fuse};
use lazy_tests::s3::{convert, MotoServer};

/// Four shards of about 512 MiB: a model of about 2 GiB, several times the agent's default
/// memory budget and large enough that streams run for seconds.
const SPEC: ModelSpec = ModelSpec {
    shards: 4,
    shard_bytes: 512 << 20,
    seed: 6,
};

const BUCKET: &str = "models";
const RAW: &str = "raw/llm/";

/// The stream bound of the agent that checks the half-way reader: small against a shard, so
/// that stopping half-way means something.
const MAX_AHEAD: u64 = 64 << 20;

/// A seeded shuffle (splitmix64 + Fisher-Yates), so a failure reproduces.
fn shuffle<T>(items: &mut [T], seed: u64) {
    let mut state = seed;
    for i in (1..items.len()).rev() {
        state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        let j = ((z ^ (z >> 31)) % (i as u64 + 1)) as usize;
        items.swap(i, j);
    }
}

/// Every shard read at once, one thread each, tensors in name order (as `load_file` walks
/// them), each checked against the source.
fn read_shards_concurrently(model: &ModelFiles, mnt: &Path) -> u64 {
    std::thread::scope(|scope| {
        let readers: Vec<_> = model
            .shards
            .iter()
            .map(|shard| {
                scope.spawn(move || {
                    let name = shard.file_name().unwrap();
                    let mut order = model::tensors(shard).unwrap();
                    order.sort_by(|a, b| a.name.cmp(&b.name));
                    model::check_tensors(shard, &mnt.join(name), &order)
                })
            })
            .collect();
        readers.into_iter().map(|r| r.join().unwrap()).sum()
    })
}

#[test]
fn model_converted_both_ways_reads_bit_exact_through_streaming_mounts() {
    require_root_and_fuse();
    let model = model::cached_model(&SPEC);
    assert!(model.total_bytes > 2_000_000_000 - (SPEC.shard_bytes / 4) * SPEC.shards as u64);
    let work = tempfile::tempdir().unwrap();
    let moto = MotoServer::start();
    moto.create_bucket(BUCKET);
    for file in &model.files {
        let key = format!("{RAW}{}", file.file_name().unwrap().to_str().unwrap());
        moto.put_object(BUCKET, &key, &std::fs::read(file).unwrap());
    }
    let raw = format!("s3://{BUCKET}/{RAW}");
    let copied = format!("s3://{BUCKET}/lazy/llm");
    let referenced = format!("s3://{BUCKET}/ref/llm");
    convert(&moto, &[&raw, &copied]);
    convert(&moto, &["--reference", &raw, &referenced]);

    // The copy, cold: random tensors first, then every shard at once, then everything.
    let mut agent = Lazyd::start_with_env("", &moto.env()).unwrap();
    let mnt = mountpoint(work.path(), "copied");
    agent.mount(&copied, &mnt);
    let mut sample: Vec<(usize, TensorInfo)> = model
        .shards
        .iter()
        .enumerate()
        .flat_map(|(i, s)| model::tensors(s).unwrap().into_iter().map(move |t| (i, t)))
        .collect();
    shuffle(&mut sample, 42);
    for (i, t) in sample.iter().take(48) {
        let shard = &model.shards[*i];
        model::check_tensors(
            shard,
            &mnt.join(shard.file_name().unwrap()),
            std::slice::from_ref(t),
        );
    }
    let compared = read_shards_concurrently(&model, &mnt);
    assert!(compared > model.total_bytes / 2);
    let check = model::compare_model(&model.dir, &mnt).unwrap();
    assert_eq!(check.tensors, model.tensors);
    assert_eq!(check.files, model.files.len());
    let status = agent.status();
    assert!(
        counter(&status, "/metrics/streams/started") >= SPEC.shards as u64,
        "every shard opened should have been streamed: {status}"
    );
    // The default config records a profile: the recorder wraps the mount's chunk source, and
    // the streams still hear of the reads that start them.
    assert!(
        counter(&status, "/metrics/streams/bytes") > 0,
        "the shards' streams fetched nothing: {status}"
    );
    let fetched = backend_bytes(&status);
    assert!(
        fetched < model.total_bytes + model.total_bytes / 20,
        "fetched {fetched} bytes for a {}-byte model: chunks fetched more than once",
        model.total_bytes
    );
    agent.ctl_ok(["umount", mnt.to_str().unwrap()]);
    agent.stop().unwrap();

    // The reference image, cold, with a small stream bound: a reader stops half-way.
    let config = format!("[stream]\nmax_ahead = \"{}M\"\n", MAX_AHEAD >> 20);
    let mut agent = Lazyd::start_with_env(&config, &moto.env()).unwrap();
    let mnt = mountpoint(work.path(), "referenced");
    agent.mount(&referenced, &mnt);
    let shard = &model.shards[0];
    let tensors = model::tensors(shard).unwrap();
    let size = std::fs::metadata(shard).unwrap().len();
    let half: Vec<TensorInfo> = tensors
        .iter()
        .take_while(|t| t.range.end <= size / 2)
        .cloned()
        .collect();
    let read = model::check_tensors(shard, &mnt.join(shard.file_name().unwrap()), &half);
    // Closed: the stream stops. Let requests in flight land, then nothing more may come.
    std::thread::sleep(Duration::from_secs(2));
    let status = agent.status();
    let after_close = backend_bytes(&status);
    assert!(
        counter(&status, "/metrics/streams/bytes") > 0,
        "the half-read shard was not streamed, so its bound says nothing: {status}"
    );
    let bound = half.last().unwrap().range.end + MAX_AHEAD + (16 << 20);
    assert!(
        after_close <= bound,
        "a reader that read {read} bytes (to offset {}) and closed the shard made the agent fetch {after_close} bytes (bound {bound})",
        half.last().unwrap().range.end
    );
    assert!(
        after_close < size,
        "the whole shard was fetched after a half read"
    );
    let quiet_since = Instant::now();
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(
        backend_bytes(&agent.status()),
        after_close,
        "the agent kept fetching {:?} after the reader closed the shard",
        quiet_since.elapsed()
    );
    // The rest reads right: every shard at once, then everything.
    read_shards_concurrently(&model, &mnt);
    let check = model::compare_model(&model.dir, &mnt).unwrap();
    assert_eq!(check.tensors, model.tensors);
    let status = agent.status();
    let fetched = backend_bytes(&status);
    assert!(
        fetched < model.total_bytes + model.total_bytes / 20,
        "fetched {fetched} bytes for a {}-byte model",
        model.total_bytes
    );
    assert_eq!(
        counter(&status, "/metrics/chunks/read_errors"),
        0,
        "{status}"
    );
    agent.ctl_ok(["umount", mnt.to_str().unwrap()]);
    agent.stop().unwrap();
}
