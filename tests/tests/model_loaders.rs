//! End-to-end tests of model loads with the loaders people use: the real Python `safetensors`
//! package run by `bench/model_loaders.py` (safe_open + get_tensor in name order as vLLM and
//! transformers read, `load_file`, a plain `cat` of every file, and two tensor-parallel
//! processes) over a small sharded model uploaded to S3 (`moto`), converted to a lazy image and
//! mounted cold through a fresh `lazyd` for each loader. Every tensor (every file, for `cat`)
//! the loader read must hash to what this test hashes from the source with its own header
//! parser, and the agent must have fetched the model about once.
//!
//! The loaders run with `$LAZY_VENV_PYTHON`, else `/opt/lazy-venv/bin/python3`, where
//! `scripts/setup.sh` installs safetensors, numpy and ml_dtypes.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use lazy_tests::agent::{backend_bytes, Lazyd};
use lazy_tests::model::{self, ModelFiles, ModelSpec};
use lazy_tests::mount::require_root_and_fuse;
use lazy_tests::s3::{convert, MotoServer};
use serde_json::Value;

/// Three shards of about 24 MiB: every dtype the model writer makes, several chunks per shard,
/// and a test that runs in seconds against moto.
const SPEC: ModelSpec = ModelSpec {
    shards: 3,
    shard_bytes: 24 << 20,
    seed: 13,
};

const BUCKET: &str = "models";
const RAW: &str = "raw/llm/";

/// Where `scripts/setup.sh` makes the virtualenv with the loaders' packages.
const DEFAULT_PYTHON: &str = "/opt/lazy-venv/bin/python3";
const LOADERS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../bench/model_loaders.py");

/// The Python with safetensors, numpy and ml_dtypes: `$LAZY_VENV_PYTHON`, else
/// [`DEFAULT_PYTHON`]. Panics, naming `scripts/setup.sh`, when it cannot import them.
fn loader_python() -> PathBuf {
    let python = std::env::var_os("LAZY_VENV_PYTHON")
        .map_or_else(|| PathBuf::from(DEFAULT_PYTHON), PathBuf::from);
    let imports = Command::new(&python)
        .args(["-c", "import safetensors, numpy, ml_dtypes"])
        .output();
    match imports {
        Ok(out) if out.status.success() => python,
        other => panic!(
            "{} cannot import safetensors, numpy and ml_dtypes ({other:?}): run \
             scripts/setup.sh as root, which installs them into /opt/lazy-venv, or point \
             LAZY_VENV_PYTHON at a Python that has them",
            python.display()
        ),
    }
}

fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(ring::digest::digest(&ring::digest::SHA256, bytes))
}

/// Tensor name -> sha256 of its bytes, over every shard of the source, from this crate's own
/// header parser (not the `safetensors` package the loaders use).
fn source_tensor_digests(model: &ModelFiles) -> BTreeMap<String, String> {
    let mut digests = BTreeMap::new();
    for shard in &model.shards {
        let file = std::fs::File::open(shard).unwrap();
        for t in model::read_header(&file).unwrap() {
            let bytes = model::read_tensor(&file, &t).unwrap();
            let name = t.name.clone();
            assert!(
                digests.insert(t.name, sha256_hex(&bytes)).is_none(),
                "tensor {name} is in two shards of the source"
            );
        }
    }
    digests
}

/// Path relative to the model directory -> sha256 of the file, for every file of the source.
fn source_file_digests(model: &ModelFiles) -> BTreeMap<String, String> {
    model
        .files
        .iter()
        .map(|f| {
            let rel = f
                .strip_prefix(&model.dir)
                .unwrap()
                .to_str()
                .unwrap()
                .to_owned();
            (rel, sha256_hex(&std::fs::read(f).unwrap()))
        })
        .collect()
}

/// Panics naming the first few names missing, extra or different in `got`.
fn assert_digests_equal(
    what: &str,
    want: &BTreeMap<String, String>,
    got: &BTreeMap<String, String>,
) {
    let mut problems = Vec::new();
    for (name, digest) in want {
        match got.get(name) {
            None => problems.push(format!("{name}: not read")),
            Some(d) if d != digest => problems.push(format!("{name}: sha256 {d}, source {digest}")),
            Some(_) => {}
        }
    }
    for name in got.keys().filter(|n| !want.contains_key(*n)) {
        problems.push(format!("{name}: not in the source"));
    }
    assert!(
        problems.is_empty(),
        "{what}: {} of {} differ from the source, first: {:?}",
        problems.len(),
        want.len(),
        &problems[..problems.len().min(5)]
    );
}

/// One run of `bench/model_loaders.py`: its mode and extra arguments.
struct Loader {
    mode: &'static str,
    args: &'static [&'static str],
}

const LOADER_RUNS: [Loader; 4] = [
    Loader {
        mode: "safe-open",
        args: &[],
    },
    Loader {
        mode: "load-file",
        args: &[],
    },
    Loader {
        mode: "cat",
        args: &[],
    },
    Loader {
        mode: "tp",
        args: &["--procs", "2"],
    },
];

/// Mounts `image` cold through a fresh agent, runs `loader` over the mount, and checks what it
/// read against the source digests and what the agent fetched against the model's size.
fn load_through_cold_mount(
    moto: &MotoServer,
    image: &str,
    loader: &Loader,
    model: &ModelFiles,
    tensors: &BTreeMap<String, String>,
    files: &BTreeMap<String, String>,
    work: &Path,
) {
    let what = format!("{} over {image}", loader.mode);
    let mut agent = Lazyd::start_with_env("", &moto.env()).unwrap();
    let mnt = work.join(format!("mnt-{}", loader.mode));
    std::fs::create_dir_all(&mnt).unwrap();
    agent.mount(image, &mnt);
    let digests_file = work.join(format!("{}.digests.json", loader.mode));
    let out = Command::new(loader_python())
        .arg(LOADERS)
        .arg(loader.mode)
        .arg(&mnt)
        .args(loader.args)
        .arg("--digests")
        .arg(&digests_file)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{what}: {}\n{}\nlazyd log:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr),
        agent.log()
    );
    let report: Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("{what}: a JSON line expected ({e}): {out:?}"));
    eprintln!("{what}: {report}");
    let got: BTreeMap<String, String> =
        serde_json::from_slice(&std::fs::read(&digests_file).unwrap()).unwrap();
    if loader.mode == "cat" {
        assert_digests_equal(&what, files, &got);
        assert_eq!(
            report["bytes"].as_u64(),
            Some(model.total_bytes),
            "{what}: {report}"
        );
    } else {
        assert_digests_equal(&what, tensors, &got);
        assert_eq!(
            report["tensors"].as_u64(),
            Some(model.tensors as u64),
            "{what}: {report}"
        );
    }
    let first = report["first_tensor_s"].as_f64().expect("a first tensor");
    let total = report["total_s"].as_f64().unwrap();
    assert!(
        first <= total,
        "{what}: first tensor after the end: {report}"
    );

    let status = agent.status();
    let fetched = backend_bytes(&status);
    assert!(
        fetched < model.total_bytes + model.total_bytes / 20,
        "{what}: fetched {fetched} bytes for a {}-byte model: chunks fetched more than once",
        model.total_bytes
    );
    agent.ctl_ok(["umount", mnt.to_str().unwrap()]);
    agent.stop().unwrap();
}

#[test]
fn every_loader_reads_the_model_bit_exact_through_a_cold_mount() {
    require_root_and_fuse();
    loader_python();
    let model = model::cached_model(&SPEC);
    let tensors = source_tensor_digests(&model);
    let files = source_file_digests(&model);
    assert_eq!(tensors.len(), model.tensors);

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

    for loader in &LOADER_RUNS {
        load_through_cold_mount(
            &moto,
            &copied,
            loader,
            &model,
            &tensors,
            &files,
            work.path(),
        );
    }
    // The reference image reads the raw objects in place: the loader the issue targets.
    let refs = work.path().join("ref");
    std::fs::create_dir_all(&refs).unwrap();
    load_through_cold_mount(
        &moto,
        &referenced,
        &LOADER_RUNS[0],
        &model,
        &tensors,
        &files,
        &refs,
    );
}
