//! Bad input through the real `lazyctl` binary: hostile tar entries, corrupt compression, a
//! layer that does not match its digest, a truncated or bit-flipped index, and a data blob
//! with a flipped byte. Each must fail with an error naming the problem (or EIO on read with
//! a log line), leave the store without a half-made image, and never panic.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use lazy_tests::mount::{require_root_and_fuse, Mounted};

use sha2::{Digest, Sha256};

fn lazyctl(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_lazyctl"))
        .args(args)
        .env("RUST_LOG", "info")
        .output()
        .expect("run lazyctl")
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn digest(bytes: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(bytes)))
}

/// One raw tar entry; names are written into the header as given, bypassing the `tar`
/// crate's path checks, so hostile names reach the converter exactly as an attacker wrote them.
struct Raw<'a> {
    name: &'a [u8],
    kind: tar::EntryType,
    link: &'a [u8],
    data: &'a [u8],
}

fn file<'a>(name: &'a str, data: &'a [u8]) -> Raw<'a> {
    Raw {
        name: name.as_bytes(),
        kind: tar::EntryType::Regular,
        link: b"",
        data,
    }
}

fn raw_tar(entries: &[Raw<'_>]) -> Vec<u8> {
    let mut out = Vec::new();
    for e in entries {
        let mut h = tar::Header::new_old();
        {
            let old = h.as_old_mut();
            old.name[..e.name.len()].copy_from_slice(e.name);
            old.linkname[..e.link.len()].copy_from_slice(e.link);
        }
        h.set_entry_type(e.kind);
        h.set_mode(0o644);
        h.set_uid(0);
        h.set_gid(0);
        h.set_size(e.data.len() as u64);
        h.set_mtime(1_700_000_000);
        h.set_cksum();
        out.extend_from_slice(h.as_bytes());
        out.extend_from_slice(e.data);
        out.resize(out.len().div_ceil(512) * 512, 0);
    }
    out.resize(out.len() + 1024, 0);
    out
}

fn gzip(bytes: &[u8]) -> Vec<u8> {
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    e.write_all(bytes).unwrap();
    e.finish().unwrap()
}

/// Writes a one-image OCI layout with the given layer blobs; `digests` overrides the digest
/// the manifest claims for a layer (None: the real one).
fn layout(dir: &Path, layers: &[Vec<u8>], claimed: &[Option<String>]) -> String {
    let blobs = dir.join("blobs/sha256");
    fs::create_dir_all(&blobs).unwrap();
    let put = |bytes: &[u8]| {
        let d = digest(bytes);
        fs::write(blobs.join(&d[7..]), bytes).unwrap();
        d
    };
    let config = br#"{"architecture":"amd64","os":"linux","config":{},"rootfs":{"type":"layers","diff_ids":[]}}"#;
    let config_digest = put(config);
    let layer_descs: Vec<String> = layers
        .iter()
        .enumerate()
        .map(|(i, l)| {
            let real = put(l);
            let d = claimed.get(i).cloned().flatten().unwrap_or(real);
            // The blob is found under the digest the manifest claims.
            fs::write(blobs.join(&d[7..]), l).unwrap();
            format!(
                r#"{{"mediaType":"application/vnd.oci.image.layer.v1.tar","digest":"{d}","size":{}}}"#,
                l.len()
            )
        })
        .collect();
    let manifest = format!(
        r#"{{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"{config_digest}","size":{}}},"layers":[{}]}}"#,
        config.len(),
        layer_descs.join(",")
    );
    let md = put(manifest.as_bytes());
    fs::write(dir.join("oci-layout"), r#"{"imageLayoutVersion":"1.0.0"}"#).unwrap();
    fs::write(
        dir.join("index.json"),
        format!(
            r#"{{"schemaVersion":2,"manifests":[{{"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"{md}","size":{},"annotations":{{"org.opencontainers.image.ref.name":"t"}}}}]}}"#,
            manifest.len()
        ),
    )
    .unwrap();
    format!("oci:{}:t", dir.display())
}

/// Converts and expects failure; checks the message and that no image was tagged.
fn refused(layers: &[Vec<u8>], claimed: &[Option<String>], expect: &[&str]) {
    let tmp = tempfile::tempdir().unwrap();
    let src = layout(&tmp.path().join("src"), layers, claimed);
    let store = tmp.path().join("store");
    let out = lazyctl(&[
        "convert",
        "--no-progress",
        &src,
        &format!("dir:{}", store.display()),
    ]);
    let err = stderr(&out);
    assert!(
        !out.status.success(),
        "conversion should fail; stderr:\n{err}"
    );
    for e in expect {
        assert!(err.contains(e), "stderr lacks {e:?}:\n{err}");
    }
    assert!(!err.contains("panicked"), "{err}");
    let index = fs::read_to_string(store.join("index.json")).unwrap();
    assert!(
        !index.contains("ref.name"),
        "a failed conversion tagged an image: {index}"
    );
    let inspect = lazyctl(&["inspect", &format!("dir:{}", store.display())]);
    assert!(!inspect.status.success());
    assert!(stderr(&inspect).contains("not found in store"));
}

#[test]
fn absolute_path_entry_is_refused() {
    let tar = raw_tar(&[file("ok", b"fine"), file("/etc/passwd", b"root::0:0")]);
    refused(&[tar], &[], &["\"/etc/passwd\"", "absolute path"]);
}

#[test]
fn dotdot_entry_is_refused() {
    let tar = raw_tar(&[file("a/../../escape", b"x")]);
    refused(&[tar], &[], &["a/../../escape", "escapes the image root"]);
}

#[test]
fn hardlink_out_of_tree_is_refused() {
    for target in [&b"../../etc/shadow"[..], b"/etc/shadow"] {
        let tar = raw_tar(&[Raw {
            name: b"link",
            kind: tar::EntryType::Link,
            link: target,
            data: b"",
        }]);
        refused(
            &[tar],
            &[],
            &["hardlink \"link\"", "points outside the image"],
        );
    }
}

#[test]
fn hardlink_to_missing_file_is_refused() {
    let tar = raw_tar(&[Raw {
        name: b"link",
        kind: tar::EntryType::Link,
        link: b"nowhere",
        data: b"",
    }]);
    refused(&[tar], &[], &["\"nowhere\" does not exist"]);
}

#[test]
fn write_through_symlink_is_refused() {
    let tar = raw_tar(&[
        Raw {
            name: b"etc",
            kind: tar::EntryType::Symlink,
            link: b"/host-etc",
            data: b"",
        },
        file("etc/passwd", b"x"),
    ]);
    refused(&[tar], &[], &["etc/passwd", "\"etc\" is not a directory"]);
}

#[test]
fn corrupted_gzip_is_refused() {
    let tar = raw_tar(&[file("big", &vec![7u8; 100_000]), file("small", b"x")]);
    let mut gz = gzip(&tar);
    let mid = gz.len() / 2;
    for b in &mut gz[mid..mid + 8] {
        *b ^= 0x5a;
    }
    refused(&[gz], &[], &["not a readable tar stream (gzip)"]);
}

#[test]
fn layer_digest_mismatch_is_refused() {
    let tar = raw_tar(&[file("f", b"the real content")]);
    let claimed = digest(b"something else");
    refused(
        std::slice::from_ref(&tar),
        &[Some(claimed.clone())],
        &["does not match its digest", &claimed],
    );
    // A flipped data byte that keeps the tar readable is caught by the digest, too.
    let mut flipped = tar.clone();
    let at = flipped.windows(4).position(|w| w == b"real").unwrap();
    flipped[at] = b'R';
    let tmp = tempfile::tempdir().unwrap();
    let src = layout(&tmp.path().join("src"), &[flipped], &[Some(digest(&tar))]);
    let out = lazyctl(&[
        "convert",
        "--no-progress",
        &src,
        &format!("dir:{}", tmp.path().join("s").display()),
    ]);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("does not match its digest"),
        "{}",
        stderr(&out)
    );
}

/// Converts a small valid image; returns (tempdir, store path, index blob path, data blob path).
fn converted(chunk_size: &str) -> (tempfile::TempDir, PathBuf, PathBuf, PathBuf) {
    let tmp = tempfile::tempdir().unwrap();
    let big: Vec<u8> = (0..40_000u32).map(|i| (i % 253) as u8).collect();
    let tar = raw_tar(&[file("big", &big), file("small", b"small file\n")]);
    let src = layout(&tmp.path().join("src"), &[tar], &[]);
    let store = tmp.path().join("store");
    let out = lazyctl(&[
        "convert",
        "--no-progress",
        "--chunk-size",
        chunk_size,
        &src,
        &format!("dir:{}", store.display()),
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let index_json: serde_json::Value =
        serde_json::from_slice(&fs::read(store.join("index.json")).unwrap()).unwrap();
    let md = index_json["manifests"][0]["digest"].as_str().unwrap();
    let manifest: serde_json::Value =
        serde_json::from_slice(&fs::read(store.join("blobs/sha256").join(&md[7..])).unwrap())
            .unwrap();
    let blob = |i: usize| {
        let d = manifest["layers"][i]["digest"].as_str().unwrap();
        store.join("blobs/sha256").join(&d[7..])
    };
    let (index, data) = (blob(0), blob(1));
    (tmp, store, index, data)
}

#[test]
fn truncated_index_is_refused() {
    let (_tmp, store, index, _) = converted("4K");
    let bytes = fs::read(&index).unwrap();
    fs::write(&index, &bytes[..bytes.len() / 2]).unwrap();
    let out = lazyctl(&["inspect", &format!("dir:{}", store.display())]);
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(
        err.contains(&format!(
            "image index is truncated at {} bytes (expected {})",
            bytes.len() / 2,
            bytes.len()
        )),
        "{err}"
    );
    assert!(!err.contains("panicked"));
}

#[test]
fn bit_flipped_index_is_refused() {
    let (_tmp, store, index, _) = converted("4K");
    let mut bytes = fs::read(&index).unwrap();
    let last = bytes.len() - 3;
    bytes[last] ^= 0x10;
    fs::write(&index, &bytes).unwrap();
    let out = lazyctl(&["inspect", &format!("dir:{}", store.display())]);
    assert!(!out.status.success());
    let err = stderr(&out);
    // The store checks the index against the digest its manifest names before anything else.
    assert!(
        err.contains(" is corrupt: its content hashes to sha256:"),
        "{err}"
    );
    assert!(!err.contains("panicked"));
}

#[test]
fn blob_with_flipped_byte_gives_eio_and_a_log_line() {
    require_root_and_fuse();
    let (tmp, store, _, data) = converted("4K");
    // Chunk 0 is the first 4 KiB of "big"; flip a byte inside it.
    let mut bytes = fs::read(&data).unwrap();
    bytes[10] ^= 0xff;
    fs::write(&data, &bytes).unwrap();
    let mnt = tmp.path().join("mnt");
    fs::create_dir_all(&mnt).unwrap();
    let m = Mounted::new(&store, &mnt).unwrap();
    let err = fs::read(mnt.join("big")).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EIO), "{err}");
    // Other chunks still serve: the small file and the tail of the big one.
    assert_eq!(fs::read(mnt.join("small")).unwrap(), b"small file\n");
    let f = fs::File::open(mnt.join("big")).unwrap();
    let mut tail = vec![0u8; 100];
    std::os::unix::fs::FileExt::read_exact_at(&f, &mut tail, 20_000).unwrap();
    let expected: Vec<u8> = (20_000..20_100u32).map(|i| (i % 253) as u8).collect();
    assert_eq!(tail, expected);
    drop(f);
    let log = m.output();
    let status = m.unmount().unwrap();
    assert!(status.success(), "mount exited with {status}: {log}");
    assert!(log.contains("chunk not served"), "{log}");
    assert!(log.contains("mismatch"), "{log}");
    assert!(log.contains("returning EIO"), "{log}");
    assert!(!log.contains("panicked"), "{log}");
}

#[test]
fn fifo_with_blank_device_fields_converts() {
    // Go's archive/tar leaves devmajor/devminor blank (NUL) for fifos; reading them as numbers
    // failed the whole layer.
    let mut h = tar::Header::new_gnu();
    h.set_path("pipe").unwrap();
    h.set_entry_type(tar::EntryType::Fifo);
    h.set_mode(0o600);
    h.set_uid(0);
    h.set_gid(0);
    h.set_size(0);
    h.set_mtime(1_700_000_000);
    let gnu = h.as_gnu_mut().unwrap();
    gnu.dev_major = [0; 8];
    gnu.dev_minor = [0; 8];
    h.set_cksum();
    let mut tar = h.as_bytes().to_vec();
    tar.resize(tar.len() + 1024, 0);
    let tmp = tempfile::tempdir().unwrap();
    let src = layout(&tmp.path().join("src"), &[tar], &[]);
    let store = format!("dir:{}", tmp.path().join("store").display());
    let out = lazyctl(&["convert", "--no-progress", &src, &store]);
    assert!(out.status.success(), "{}", stderr(&out));
    let out = lazyctl(&["inspect", &store]);
    assert!(String::from_utf8_lossy(&out.stdout).contains("inodes:     2"));
}
