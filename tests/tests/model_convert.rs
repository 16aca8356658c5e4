//! End-to-end tests of model images made from an S3 prefix of plain files (`lazyctl convert
//! s3://BUCKET/PREFIX/ DST`): a small model directory (weights over several chunks, one with an
//! all-zero chunk and one sharing a chunk with another, a nested directory, a zero-byte file,
//! text files) is uploaded to a real S3 API (moto), converted with `--compression zstd`,
//! `none`, `auto` and with `--reference`, each to an S3 lazy image, and mounted through a real
//! `lazyd`; every mounted tree must equal the source directory byte for byte. Reference images
//! store nothing but their index, config and manifest, read the data from the original objects,
//! and fail reads (EIO, with a log line saying why) of objects changed or deleted since.

use std::path::Path;
use std::process::{Command, Output};

use lazy_tests::agent::Lazyd;
use lazy_tests::mount::{lazyctl_path, require_root_and_fuse, Mounted};
use lazy_tests::registry::LocalRegistry;
use lazy_tests::s3::MotoServer;
use lazy_tests::{pseudo_random_bytes, tree};
use serde_json::Value;

const MIB: usize = 1 << 20;
const SOURCE_PREFIX: &str = "raw/model";

/// Bytes that zstd halves: pseudo-random nibbles.
fn compressible(seed: u64, len: usize) -> Vec<u8> {
    pseudo_random_bytes(seed, len)
        .into_iter()
        .map(|b| b & 0x0f)
        .collect()
}

/// The model directory: `(relative path, content)` of every file, and the directory itself.
fn model_files() -> Vec<(&'static str, Vec<u8>)> {
    let shard1 = compressible(1, 5 * MIB / 2);
    // An all-zero first chunk (a hole), then the second chunk of shard 1 again (a chunk
    // deduplicated across objects), then a tail of its own.
    let mut shard2 = vec![0u8; MIB];
    shard2.extend_from_slice(&shard1[MIB..2 * MIB]);
    shard2.extend_from_slice(&compressible(2, MIB / 2 + 123));
    let text = |seed: u64, len: usize| -> Vec<u8> {
        let words = [
            "the",
            "model",
            "token",
            "weight",
            "layer",
            "attention",
            "head",
        ];
        let mut out = Vec::new();
        let mut i = seed;
        while out.len() < len {
            i = i
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            out.extend_from_slice(words[(i >> 33) as usize % words.len()].as_bytes());
            out.push(if (i >> 20).is_multiple_of(9) {
                b'\n'
            } else {
                b' '
            });
        }
        out.truncate(len);
        out
    };
    vec![
        (
            "config.json",
            br#"{"architectures":["TinyLM"],"hidden_size":64}"#.to_vec(),
        ),
        ("empty.txt", Vec::new()),
        ("nested/deep/vocab.txt", text(3, 50_000)),
        ("small.bin", compressible(4, 10_000)),
        ("tokenizer.json", text(5, 300_000)),
        ("weights/model-00001-of-00002.safetensors", shard1),
        ("weights/model-00002-of-00002.safetensors", shard2),
    ]
}

fn write_model(dir: &Path) {
    for (path, bytes) in model_files() {
        let path = dir.join(path);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, bytes).unwrap();
    }
}

fn upload_model(moto: &MotoServer) {
    moto.create_bucket("models");
    for (path, bytes) in model_files() {
        moto.put_object("models", &format!("{SOURCE_PREFIX}/{path}"), &bytes);
    }
}

fn lazyctl_env(moto: &MotoServer, args: &[&str]) -> Output {
    Command::new(lazyctl_path())
        .args(args)
        .envs(moto.env())
        .output()
        .unwrap()
}

/// Checks that the mounted tree at `mnt` is the model directory (mtimes aside: S3 objects
/// carry their upload time).
fn assert_same_tree(model: &Path, mnt: &Path, what: &str) {
    let differences = tree::compare_trees_with(
        model,
        mnt,
        &tree::CompareOptions {
            mtime: false,
            ..tree::CompareOptions::default()
        },
    );
    assert!(
        differences.is_empty(),
        "{what}: the mounted tree differs from the model directory:\n{}",
        differences.join("\n")
    );
}

fn convert(moto: &MotoServer, flags: &[&str], src: &str, dst: &str) {
    let mut args = vec!["convert", "--no-progress"];
    args.extend_from_slice(flags);
    args.extend_from_slice(&[src, dst]);
    let out = lazyctl_env(moto, &args);
    assert!(out.status.success(), "lazyctl {args:?}: {out:?}");
    println!("{flags:?}: {}", String::from_utf8_lossy(&out.stdout).trim());
}

/// `(raw bytes, stored bytes)` of an image's chunks, from `lazyctl inspect`.
fn raw_and_stored(moto: &MotoServer, image: &str) -> (u64, u64) {
    let out = lazyctl_env(moto, &["inspect", image]);
    assert!(out.status.success(), "inspect {image}: {out:?}");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    // chunks:     N (R bytes raw, S stored)
    let line = text
        .lines()
        .find_map(|l| l.strip_prefix("chunks:"))
        .unwrap_or_else(|| panic!("no chunks line in:\n{text}"));
    let numbers: Vec<u64> = line
        .split(|c: char| !c.is_ascii_digit())
        .filter_map(|n| n.parse().ok())
        .collect();
    (numbers[1], numbers[2])
}

fn manifest(moto: &MotoServer, prefix: &str) -> Value {
    let bytes = moto
        .get_object("lazy", &format!("{prefix}/manifest.json"))
        .expect("manifest.json was written");
    serde_json::from_slice(&bytes).unwrap()
}

fn eio(result: std::io::Result<Vec<u8>>, what: &str) {
    match result {
        Err(e) => assert_eq!(e.raw_os_error(), Some(libc::EIO), "{what}: {e}"),
        Ok(bytes) => panic!("{what}: read {} bytes, expected EIO", bytes.len()),
    }
}

/// lazyd's config for images whose blobs are the objects of bucket `models`.
const ALLOW_MODELS: &str = "[fetch]\nexternal_buckets = [\"models\"]\n";

#[test]
fn model_prefix_converts_with_each_compression_and_by_reference_and_mounts_byte_for_byte() {
    require_root_and_fuse();
    let work = tempfile::tempdir().unwrap();
    let model = work.path().join("model");
    write_model(&model);
    let moto = MotoServer::start();
    upload_model(&moto);
    moto.create_bucket("lazy");
    let src = format!("s3://models/{SOURCE_PREFIX}/");
    let path_src = format!("path:{}", model.display());
    let cases: [(&str, &[&str], &str); 5] = [
        ("zstd", &["--compression", "zstd"], &src),
        ("none", &["--compression", "none"], &src),
        ("auto", &[], &src),
        ("reference", &["--reference"], &src),
        ("path", &[], &path_src),
    ];
    // The reference images live in bucket `lazy`, their data in `models`.
    let mut agent = Lazyd::start_with_env(ALLOW_MODELS, &moto.env()).unwrap();
    let mut sizes = std::collections::HashMap::new();
    for (name, flags, source) in cases {
        let image = format!("s3://lazy/{name}");
        convert(&moto, flags, source, &image);
        sizes.insert(name, raw_and_stored(&moto, &image));
        if name == "reference" {
            // Warm works on chunk refs: it fetches the referenced objects' ranges.
            let warmed = agent.ctl_ok(["warm", "--no-progress", &image]);
            println!("warm: {}", String::from_utf8_lossy(&warmed.stdout).trim());
        }
        let mnt = work.path().join(format!("mnt-{name}"));
        std::fs::create_dir_all(&mnt).unwrap();
        agent.mount(&image, &mnt);
        assert_same_tree(&model, &mnt, name);
    }
    println!("(raw, stored) bytes per image: {sizes:?}");

    // Without `models` allowed, an image in `lazy` cannot point lazyd's credentials there.
    let strict = Lazyd::start_with_env("", &moto.env()).unwrap();
    let mnt = work.path().join("mnt-strict");
    std::fs::create_dir_all(&mnt).unwrap();
    let refused = strict.ctl(["mount", "s3://lazy/reference", mnt.to_str().unwrap()]);
    assert!(
        !refused.status.success()
            && String::from_utf8_lossy(&refused.stderr).contains("fetch.external_buckets"),
        "{refused:?}"
    );
    drop(strict);

    // A reference image in a registry (an OCI artifact whose data blobs have `urls`, which
    // docker-registry accepts): only its index and config are pushed; lazyd reads the objects.
    let registry = LocalRegistry::start().unwrap();
    let registry_image = format!("docker://{}/models/llm:ref", registry.host());
    convert(&moto, &["--reference"], &src, &registry_image);
    let mnt = work.path().join("mnt-registry-reference");
    std::fs::create_dir_all(&mnt).unwrap();
    agent.mount(&registry_image, &mnt);
    assert_same_tree(&model, &mnt, "reference image in a registry");
    agent.ctl_ok(["umount", mnt.to_str().unwrap()]);

    // A reference image in a local store: its data is still the S3 objects, read through the
    // fetcher both by lazyd and by a standalone mount.
    let store = work.path().join("store");
    let local_image = format!("dir:{}:reference", store.display());
    convert(&moto, &["--reference"], &src, &local_image);
    let mnt = work.path().join("mnt-dir-reference");
    std::fs::create_dir_all(&mnt).unwrap();
    agent.mount(&local_image, &mnt);
    assert_same_tree(&model, &mnt, "dir: reference image through lazyd");
    agent.ctl_ok(["umount", mnt.to_str().unwrap()]);
    let mut standalone: Vec<std::ffi::OsString> = vec!["env".into()];
    standalone.extend(moto.env().iter().map(|(k, v)| format!("{k}={v}").into()));
    standalone.extend([
        lazyctl_path().into_os_string(),
        "mount".into(),
        "--standalone".into(),
        "--cache-dir".into(),
        work.path().join("standalone-cache").into_os_string(),
        local_image.clone().into(),
    ]);
    let mounted = Mounted::spawn(
        &standalone,
        &[lazyctl_path().into_os_string(), "umount".into()],
        &mnt,
        std::time::Duration::from_secs(30),
    )
    .unwrap();
    assert_same_tree(&model, &mnt, "dir: reference image, standalone mount");
    mounted.unmount().unwrap();

    // `none` stores every chunk as it is; `zstd` compresses the weights too, `auto` does not.
    let (none_raw, none_stored) = sizes["none"];
    assert_eq!(
        none_raw, none_stored,
        "--compression none compressed a chunk"
    );
    let (_, zstd_stored) = sizes["zstd"];
    let (auto_raw, auto_stored) = sizes["auto"];
    assert_eq!(auto_raw, none_raw);
    assert!(
        zstd_stored < auto_stored && auto_stored < none_stored,
        "zstd {zstd_stored} < auto {auto_stored} < none {none_stored}"
    );
    // The weights (3 MiB of distinct chunks after the hole and the shared chunk, nibbles that
    // zstd halves) are what auto leaves raw.
    assert!(auto_stored - zstd_stored > MIB as u64, "{sizes:?}");

    // A reference image stores only its index, config and manifest; its data blobs are the
    // source objects, named by url, with their ETag.
    let stored: Vec<String> = moto.list_keys("lazy", "reference/");
    assert_eq!(stored.len(), 3, "{stored:?}");
    assert!(stored.contains(&"reference/manifest.json".to_string()));
    let m = manifest(&moto, "reference");
    let layers = m["layers"].as_array().unwrap();
    let external: Vec<&Value> = layers
        .iter()
        .filter(|l| l["mediaType"] == "application/vnd.lazyimg.blob.external.v1")
        .collect();
    // Every non-empty object has a chunk of its own (shard 2's second chunk is shard 1's, but
    // its tail is new); empty.txt has none.
    assert_eq!(external.len(), 6, "{m:#}");
    assert_eq!(layers.len(), 7, "the index and the six objects: {m:#}");
    for l in &external {
        let url = l["urls"][0].as_str().unwrap();
        assert!(url.starts_with(&src), "{url}");
        let key = url.strip_prefix("s3://models/").unwrap();
        let object = moto.get_object("models", key).unwrap();
        assert_eq!(l["size"].as_u64(), Some(object.len() as u64), "{url}");
        assert!(l["annotations"]["dev.lazyimg.etag"].is_string(), "{l}");
        assert_eq!(
            l["annotations"]["dev.lazyimg.object-size"].as_str(),
            Some(object.len().to_string().as_str())
        );
    }

    // Change one object and delete another: a fresh agent (nothing cached) refuses their data
    // with EIO and says why; the other files still read correctly.
    let mut changed = model_files()[4].1.clone();
    assert_eq!(model_files()[4].0, "tokenizer.json");
    changed[1000] ^= 0xff;
    moto.put_object(
        "models",
        &format!("{SOURCE_PREFIX}/tokenizer.json"),
        &changed,
    );
    moto.delete_object("models", &format!("{SOURCE_PREFIX}/config.json"));
    drop(agent);
    let mut fresh = Lazyd::start_with_env(ALLOW_MODELS, &moto.env()).unwrap();
    let mnt = work.path().join("mnt-changed");
    std::fs::create_dir_all(&mnt).unwrap();
    fresh.mount("s3://lazy/reference", &mnt);
    eio(
        std::fs::read(mnt.join("tokenizer.json")),
        "changed tokenizer.json",
    );
    eio(
        std::fs::read(mnt.join("config.json")),
        "deleted config.json",
    );
    for (path, bytes) in model_files() {
        if path == "tokenizer.json" || path == "config.json" {
            continue;
        }
        assert!(
            std::fs::read(mnt.join(path)).unwrap() == bytes,
            "{path} differs from the source"
        );
    }
    let log = fresh.log();
    assert!(
        log.contains("tokenizer.json changed since it was indexed"),
        "no log line about the changed object:\n{log}"
    );
    assert!(
        log.contains("config.json is gone"),
        "no log line about the deleted object:\n{log}"
    );
}

#[test]
fn hostile_keys_and_contradictory_flags_are_refused() {
    let moto = MotoServer::start();
    moto.create_bucket("models");
    moto.create_bucket("lazy");
    moto.put_object("models", "raw/evil/ok.txt", b"fine");
    moto.put_object("models", "raw/evil/a/../b", b"escape");
    let out = lazyctl_env(
        &moto,
        &[
            "convert",
            "--no-progress",
            "s3://models/raw/evil/",
            "s3://lazy/evil",
        ],
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{out:?}");
    assert!(
        stderr.contains("\"raw/evil/a/../b\"") && stderr.contains("`..`"),
        "the error does not name the key: {stderr}"
    );
    assert!(
        moto.list_keys("lazy", "evil").is_empty(),
        "something was written"
    );

    let work = tempfile::tempdir().unwrap();
    let dir_src = format!("path:{}", work.path().display());
    let out = lazyctl_env(&moto, &["convert", "--reference", &dir_src, "s3://lazy/x"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && stderr.contains("s3://BUCKET/PREFIX/"),
        "{stderr}"
    );
    let out = lazyctl_env(
        &moto,
        &[
            "convert",
            "--reference",
            "--compression",
            "zstd",
            "s3://models/raw/evil/",
            "s3://lazy/x",
        ],
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && stderr.contains("--compression none"),
        "{stderr}"
    );
}
