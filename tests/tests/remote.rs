//! End-to-end: lazy images pushed to a real registry (`docker-registry`) and to S3 (`moto`),
//! mounted with an empty chunk cache, compared with the reference unpack, and put through the
//! faults a remote backend brings: a registry that stops mid-read, a corrupted byte in a stored
//! blob, a damaged cache, concurrent readers of one cold file, a cache smaller than the image.

use std::ffi::OsString;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use lazy_tests::mount::{require_root_and_fuse, stored_bytes, Mounted};
use lazy_tests::proxy::DelayProxy;
use lazy_tests::registry::LocalRegistry;
use lazy_tests::s3::MotoServer;
use lazy_tests::{debian, reference, tree};
use serde_json::Value;

/// The Debian fixture pushed to `registry` as `lazy/debian:bookworm` and converted to
/// `lazy/debian:bookworm-lazy` with the source image as its subject. Returns the reference
/// unpack of the image.
fn push_debian(registry: &LocalRegistry) -> PathBuf {
    let image = debian::minbase_image(&debian::default_cache_dir()).unwrap();
    let expected = reference::umoci_unpack_cached(&image).unwrap();
    registry
        .push_and_convert(&image, "lazy/debian:bookworm")
        .unwrap();
    expected
}

/// Mount arguments for a remote image with its own cache directory and metrics file.
struct RemoteMount {
    image: String,
    cache: PathBuf,
    metrics: PathBuf,
    extra: Vec<String>,
}

impl RemoteMount {
    fn new(image: &str, work: &Path, name: &str) -> RemoteMount {
        RemoteMount {
            image: image.to_string(),
            cache: work.join(format!("{name}-cache")),
            metrics: work.join(format!("{name}-metrics.json")),
            extra: Vec::new(),
        }
    }

    fn arg(mut self, flag: &str, value: &str) -> RemoteMount {
        self.extra.push(flag.to_string());
        self.extra.push(value.to_string());
        self
    }

    fn mount(&self, mnt: &Path) -> Mounted {
        self.mount_with_env(mnt, &[])
    }

    fn mount_with_env(&self, mnt: &Path, env: &[(String, String)]) -> Mounted {
        std::fs::create_dir_all(mnt).unwrap();
        let mut args: Vec<OsString> = vec![
            "--cache-dir".into(),
            self.cache.clone().into(),
            "--metrics-json".into(),
            self.metrics.clone().into(),
        ];
        args.extend(self.extra.iter().map(OsString::from));
        args.push(self.image.clone().into());
        if env.is_empty() {
            return Mounted::with_args(&args, mnt).unwrap();
        }
        let mut command: Vec<OsString> = vec!["env".into()];
        command.extend(env.iter().map(|(k, v)| OsString::from(format!("{k}={v}"))));
        command.push(lazy_tests::mount::lazyctl_path().into());
        command.push("mount".into());
        command.push("--standalone".into());
        command.extend(args);
        Mounted::spawn(
            &command,
            &[lazy_tests::mount::lazyctl_path().into(), "umount".into()],
            mnt,
            Duration::from_secs(60),
        )
        .unwrap()
    }

    /// The counters the mount wrote when it ended.
    fn metrics(&self) -> Value {
        let bytes = std::fs::read(&self.metrics)
            .unwrap_or_else(|e| panic!("no metrics at {}: {e}", self.metrics.display()));
        serde_json::from_slice(&bytes).unwrap()
    }
}

fn counter(metrics: &Value, path: &str) -> u64 {
    metrics
        .pointer(path)
        .and_then(Value::as_u64)
        .unwrap_or_else(|| panic!("no {path} in {metrics}"))
}

fn bytes_fetched(metrics: &Value) -> u64 {
    metrics["backends"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["bytes"].as_u64().unwrap())
        .sum()
}

fn requests(metrics: &Value) -> u64 {
    metrics["backends"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["requests"].as_u64().unwrap())
        .sum()
}

fn chroot_echo_ok(root: &Path) {
    let out = Command::new("chroot")
        .arg(root)
        .args(["/bin/sh", "-c", "echo ok"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    assert_eq!(out.stdout, b"ok\n");
}

#[test]
fn debian_from_registry_starts_lazily_and_mounts_like_umoci_unpacks_it() {
    require_root_and_fuse();
    let work = tempfile::tempdir().unwrap();
    let registry = LocalRegistry::start().unwrap();
    let expected = push_debian(&registry);
    // The source image's name: the lazy image is found through its referrers.
    let image = format!("{}/lazy/debian:bookworm", registry.host());
    let total = stored_bytes(&format!("docker://{image}-lazy"), &[]);

    let remote = RemoteMount::new(&image, work.path(), "registry");
    let m = remote.mount(&work.path().join("mnt"));
    chroot_echo_ok(m.path());
    m.unmount().unwrap();
    let cold = remote.metrics();
    let fetched = bytes_fetched(&cold);
    println!(
        "laziness: `chroot MNT /bin/sh -c 'echo ok'` on a cold cache fetched {fetched} of {total} stored bytes ({:.1} %) in {} requests, for {} bytes read through the mount",
        fetched as f64 * 100.0 / total as f64,
        requests(&cold),
        counter(&cold, "/bytes_served")
    );
    assert!(fetched > 0);
    assert!(
        fetched * 5 < total,
        "a shell start fetched {fetched} of {total} bytes: not lazy"
    );

    // The same cache, mounted again: the whole tree equals the reference unpack, and what the
    // first mount fetched comes from the disk cache.
    let m = remote.mount(&work.path().join("mnt"));
    let stats = tree::assert_trees_equal(&expected, m.path());
    println!("registry: mounted tree equals umoci unpack: {stats}");
    m.unmount().unwrap();
    let warm = remote.metrics();
    assert!(counter(&warm, "/chunks/disk_hits") > 0, "{warm}");
    assert!(
        bytes_fetched(&warm) + fetched <= total + total / 100,
        "chunks fetched twice: {} + {fetched} of {total}",
        bytes_fetched(&warm)
    );
}

#[test]
fn debian_from_s3_mounts_like_umoci_unpacks_it() {
    require_root_and_fuse();
    let work = tempfile::tempdir().unwrap();
    let moto = MotoServer::start();
    moto.create_bucket("images");
    let env = moto.env();
    let image = debian::minbase_image(&debian::default_cache_dir()).unwrap();
    let expected = reference::umoci_unpack_cached(&image).unwrap();
    // Converted straight to S3, and converted locally then pushed: the same image.
    let lazyctl = |args: &[&str]| {
        let out = Command::new(lazy_tests::mount::lazyctl_path())
            .args(args)
            .envs(env.iter().map(|(k, v)| (k, v)))
            .output()
            .unwrap();
        assert!(out.status.success(), "lazyctl {args:?}: {out:?}");
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let direct = "s3://images/direct/debian";
    lazyctl(&["convert", "--no-progress", &image.oci_ref(), direct]);
    let store = format!("dir:{}", work.path().join("store").display());
    lazyctl(&["convert", "--no-progress", &image.oci_ref(), &store]);
    let dest = "s3://images/lazy/debian";
    let pushed = lazyctl(&["push", &store, dest]);
    println!("{pushed}");
    let index_line = |image: &str| {
        lazyctl(&["inspect", image])
            .lines()
            .find(|l| l.starts_with("index:"))
            .map(str::to_string)
            .unwrap()
    };
    assert_eq!(index_line(direct), index_line(dest));
    assert_eq!(index_line(&store), index_line(dest));
    let total = stored_bytes(dest, &env);

    let remote = RemoteMount::new(dest, work.path(), "s3");
    let m = remote.mount_with_env(&work.path().join("mnt"), &env);
    chroot_echo_ok(m.path());
    m.unmount().unwrap();
    let metrics = remote.metrics();
    let fetched = bytes_fetched(&metrics);
    println!(
        "laziness (s3): `echo ok` fetched {fetched} of {total} stored bytes ({:.1} %); {}",
        fetched as f64 * 100.0 / total as f64,
        metrics["chunks"]
    );
    assert!(fetched * 5 < total, "{fetched} of {total}");

    let remote = RemoteMount::new(dest, work.path(), "s3-full");
    let m = remote.mount_with_env(&work.path().join("mnt"), &env);
    let stats = tree::assert_trees_equal(&expected, m.path());
    println!("s3: mounted tree equals umoci unpack: {stats}");
    m.unmount().unwrap();
    let metrics = remote.metrics();
    assert_eq!(counter(&metrics, "/chunks/read_errors"), 0);
    assert_eq!(counter(&metrics, "/chunks/digest_mismatches"), 0);
}

/// Regular files under `root` larger than `min` bytes, largest first.
fn large_files(root: &Path, min: u64) -> Vec<(PathBuf, u64)> {
    let mut found = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let entry = entry.unwrap();
            let md = entry.path().symlink_metadata().unwrap();
            if md.is_dir() {
                stack.push(entry.path());
            } else if md.is_file() && md.len() > min {
                found.push((entry.path(), md.len()));
            }
        }
    }
    found.sort_by_key(|(p, len)| (std::cmp::Reverse(*len), p.clone()));
    found
}

#[test]
fn registry_stopped_mid_read_gives_eio_in_time_and_reads_recover_after_restart() {
    require_root_and_fuse();
    let work = tempfile::tempdir().unwrap();
    let mut registry = LocalRegistry::start().unwrap();
    let expected = push_debian(&registry);
    let image = format!("docker://{}/lazy/debian:bookworm-lazy", registry.host());
    let remote = RemoteMount::new(&image, work.path(), "stop")
        .arg("--read-timeout", "3")
        .arg("--request-timeout", "1")
        .arg("--connect-timeout", "1");
    let m = remote.mount(&work.path().join("mnt"));
    let files = large_files(&expected, 1 << 20);
    assert!(files.len() >= 3, "{files:?}");
    let relative = |p: &Path| p.strip_prefix(&expected).unwrap().to_path_buf();

    // First file read while the registry is up.
    let first = relative(&files[0].0);
    assert_eq!(
        std::fs::read(m.path().join(&first)).unwrap(),
        std::fs::read(&files[0].0).unwrap()
    );

    registry.stop();
    let second = relative(&files[1].0);
    let started = Instant::now();
    let err = std::fs::read(m.path().join(&second)).unwrap_err();
    let waited = started.elapsed();
    println!("read with the registry down failed after {waited:?}: {err}");
    assert_eq!(err.raw_os_error(), Some(libc::EIO), "{err}");
    assert!(waited < Duration::from_secs(8), "EIO took {waited:?}");
    // What was read before still reads (from the kernel page cache or the chunk cache).
    assert_eq!(
        std::fs::read(m.path().join(&first)).unwrap(),
        std::fs::read(&files[0].0).unwrap()
    );

    registry.restart().unwrap();
    assert_eq!(
        std::fs::read(m.path().join(&second)).unwrap(),
        std::fs::read(&files[1].0).unwrap(),
        "reads recover once the registry is back"
    );
    let output = m.output();
    m.unmount().unwrap();
    assert!(output.contains("chunk not served"), "{output}");
    let metrics = remote.metrics();
    assert!(counter(&metrics, "/chunks/read_errors") >= 1, "{metrics}");
}

#[test]
fn corrupted_byte_in_a_registry_blob_is_detected_and_never_served() {
    require_root_and_fuse();
    let work = tempfile::tempdir().unwrap();
    let registry = LocalRegistry::start().unwrap();
    let expected = push_debian(&registry);
    let image = format!("docker://{}/lazy/debian:bookworm-lazy", registry.host());

    // Flip one byte in the middle of the largest data blob, inside the registry's storage.
    let manifest = Command::new("skopeo")
        .args(["inspect", "--raw", "--tls-verify=false", &image])
        .output()
        .unwrap();
    assert!(manifest.status.success(), "{manifest:?}");
    let manifest: Value = serde_json::from_slice(&manifest.stdout).unwrap();
    let blob = manifest["layers"]
        .as_array()
        .unwrap()
        .iter()
        .skip(1)
        .max_by_key(|d| d["size"].as_u64().unwrap())
        .unwrap();
    let path = registry.blob_file(blob["digest"].as_str().unwrap());
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&path)
        .unwrap();
    let at = blob["size"].as_u64().unwrap() / 2;
    let mut byte = [0u8];
    file.read_exact_at(&mut byte, at).unwrap();
    file.write_all_at(&[byte[0] ^ 0x40], at).unwrap();

    let remote = RemoteMount::new(&image, work.path(), "corrupt");
    let m = remote.mount(&work.path().join("mnt"));
    let (equal, failed) = tree::read_all_files_compare(&expected, m.path());
    println!("with one corrupted byte: {equal} files read equal, {failed:?} failed");
    assert!(!failed.is_empty(), "the corrupted chunk was served");
    for (path, err) in &failed {
        assert_eq!(
            err.raw_os_error(),
            Some(libc::EIO),
            "{}: {err}",
            path.display()
        );
    }
    assert!(equal > 1000, "only {equal} files read");
    let output = m.output();
    m.unmount().unwrap();
    assert!(
        output.contains("fail verification"),
        "no log line names the mismatch:\n{output}"
    );
    let metrics = remote.metrics();
    assert!(
        counter(&metrics, "/chunks/digest_mismatches") >= 1,
        "{metrics}"
    );
}

#[test]
fn damaged_cache_segments_are_detected_and_refetched() {
    require_root_and_fuse();
    let work = tempfile::tempdir().unwrap();
    let registry = LocalRegistry::start().unwrap();
    let expected = push_debian(&registry);
    let image = format!("docker://{}/lazy/debian:bookworm-lazy", registry.host());
    let remote = RemoteMount::new(&image, work.path(), "damage");
    let m = remote.mount(&work.path().join("mnt"));
    tree::assert_trees_equal(&expected, m.path());
    m.unmount().unwrap();
    let first = bytes_fetched(&remote.metrics());

    // Flip a byte every 4 MiB of every segment, then cut the largest one in half.
    let segments: Vec<PathBuf> = std::fs::read_dir(remote.cache.join("chunks/segments"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert!(!segments.is_empty());
    for seg in &segments {
        lazy_tests::flip_bytes(seg, 4096, 4 << 20);
    }
    let largest = segments
        .iter()
        .max_by_key(|p| p.metadata().unwrap().len())
        .unwrap();
    let file = std::fs::OpenOptions::new()
        .write(true)
        .open(largest)
        .unwrap();
    file.set_len(file.metadata().unwrap().len() / 2).unwrap();

    let m = remote.mount(&work.path().join("mnt"));
    tree::assert_trees_equal(&expected, m.path());
    m.unmount().unwrap();
    let metrics = remote.metrics();
    let refetched = bytes_fetched(&metrics);
    println!(
        "damaged cache: {} corrupt entries dropped, {refetched} of {first} bytes fetched again",
        counter(&metrics, "/cache/corrupt_entries")
    );
    assert!(counter(&metrics, "/cache/corrupt_entries") > 0, "{metrics}");
    assert!(refetched > 0 && refetched < first, "{refetched} vs {first}");
    assert!(counter(&metrics, "/chunks/disk_hits") > 0);
}

#[test]
fn two_processes_reading_one_cold_file_fetch_it_once() {
    require_root_and_fuse();
    let work = tempfile::tempdir().unwrap();
    let registry = LocalRegistry::start().unwrap();
    let expected = push_debian(&registry);
    // 50 ms per request, so the two readers overlap for sure.
    let proxy = DelayProxy::start(&registry.host(), Duration::from_millis(50)).unwrap();
    let image = format!("docker://{}/lazy/debian:bookworm-lazy", proxy.host());
    let (file, len) = large_files(&expected, 1 << 20).remove(0);
    let relative = file.strip_prefix(&expected).unwrap().to_path_buf();
    let want = std::fs::read(&file).unwrap();

    let fetched_with = |readers: usize, name: &str| {
        let remote = RemoteMount::new(&image, work.path(), name);
        let m = remote.mount(&work.path().join(name));
        let target = m.path().join(&relative);
        std::thread::scope(|s| {
            let handles: Vec<_> = (0..readers)
                .map(|_| s.spawn(|| Command::new("cat").arg(&target).output().unwrap()))
                .collect();
            for h in handles {
                let out = h.join().unwrap();
                assert!(out.status.success());
                assert!(out.stdout == want, "a reader got wrong bytes");
            }
        });
        m.unmount().unwrap();
        remote.metrics()
    };
    let one = fetched_with(1, "one-reader");
    let two = fetched_with(2, "two-readers");
    println!(
        "one cold file of {len} bytes: 1 reader fetched {} bytes in {} requests, 2 readers {} bytes in {} requests ({} reads joined a fetch in flight)",
        bytes_fetched(&one),
        requests(&one),
        bytes_fetched(&two),
        requests(&two),
        counter(&two, "/chunks/joined")
    );
    // Every chunk of the file was fetched once either way (whether for a reader or by
    // read-ahead depends on timing; the total does not).
    let chunks = |m: &Value| counter(m, "/backends/0/chunks");
    assert_eq!(bytes_fetched(&two), bytes_fetched(&one));
    assert_eq!(chunks(&two), chunks(&one));
    assert!(
        counter(&two, "/chunks/joined") > 0,
        "the readers never overlapped: {two}"
    );
}

#[test]
fn cache_smaller_than_the_image_evicts_and_reads_stay_correct() {
    require_root_and_fuse();
    let work = tempfile::tempdir().unwrap();
    let registry = LocalRegistry::start().unwrap();
    let expected = push_debian(&registry);
    let image = format!("docker://{}/lazy/debian:bookworm-lazy", registry.host());
    let total = stored_bytes(&image, &[]);
    let budget = 8u64 << 20;
    assert!(
        total > 2 * budget,
        "image of {total} bytes is too small for this test"
    );
    let remote = RemoteMount::new(&image, work.path(), "small").arg("--cache-size", "8M");
    let m = remote.mount(&work.path().join("mnt"));
    tree::assert_trees_equal(&expected, m.path());
    m.unmount().unwrap();
    let metrics = remote.metrics();
    println!("8 MiB cache, {total}-byte image: {}", metrics["cache"]);
    assert!(
        counter(&metrics, "/cache/bytes_used") <= budget,
        "{metrics}"
    );
    assert!(
        counter(&metrics, "/cache/evicted_segments") > 0,
        "{metrics}"
    );
    let on_disk: u64 = std::fs::read_dir(remote.cache.join("chunks/segments"))
        .unwrap()
        .map(|e| e.unwrap().metadata().unwrap().len())
        .sum();
    assert!(on_disk <= budget, "{on_disk} bytes of segments on disk");
}

#[test]
fn full_cache_disk_serves_from_memory_and_says_so() {
    require_root_and_fuse();
    let work = tempfile::tempdir().unwrap();
    let registry = LocalRegistry::start().unwrap();
    let expected = push_debian(&registry);
    let image = format!("docker://{}/lazy/debian:bookworm-lazy", registry.host());
    // A 1 MiB file system under a 1 GiB budget: eviction cannot make room for the larger
    // chunks, which must then be served from memory.
    let cache = work.path().join("tmpfs-cache");
    std::fs::create_dir_all(&cache).unwrap();
    let tmpfs = lazy_tests::mount::TmpfsMount::new(&cache, "1m").unwrap();
    let remote = RemoteMount {
        cache: cache.clone(),
        ..RemoteMount::new(&image, work.path(), "full")
    }
    .arg("--cache-size", "1G");
    let m = remote.mount(&work.path().join("mnt"));
    tree::assert_trees_equal(&expected, m.path());
    let output = m.output();
    m.unmount().unwrap();
    let metrics = remote.metrics();
    println!("cache on a full 1 MiB disk: {}", metrics["chunks"]);
    assert!(
        counter(&metrics, "/chunks/served_uncached") > 0,
        "{metrics}"
    );
    assert_eq!(counter(&metrics, "/chunks/read_errors"), 0);
    assert!(
        output.contains("without caching"),
        "no log line says so:\n{output}"
    );

    // A disk full to the last byte, without the index kept: a new mount still works (the
    // verified index is served from memory) and says why it could not keep it.
    std::fs::remove_dir_all(cache.join("indexes")).unwrap();
    let mut ballast = std::fs::File::create(cache.join("ballast")).unwrap();
    let block = vec![0xa5u8; 4096];
    while std::io::Write::write_all(&mut ballast, &block).is_ok() {}
    let m = remote.mount(&work.path().join("mnt"));
    tree::assert_trees_equal(&expected, m.path());
    let output = m.output();
    m.unmount().unwrap();
    assert!(
        output.contains("cannot keep the index, holding it in memory"),
        "no log line says so:\n{output}"
    );
    drop(tmpfs);
}

#[test]
fn mount_of_an_image_without_a_lazy_version_fails_clearly() {
    require_root_and_fuse();
    let work = tempfile::tempdir().unwrap();
    let registry = LocalRegistry::start().unwrap();
    let image = debian::minbase_image(&debian::default_cache_dir()).unwrap();
    let source = format!("docker://{}/lazy/plain:v1", registry.host());
    reference::skopeo_copy(&image.oci_ref(), &source).unwrap();
    std::fs::create_dir_all(work.path().join("mnt")).unwrap();
    let out = Command::new(lazy_tests::mount::lazyctl_path())
        .args(["mount", "--standalone", "--cache-dir"])
        .arg(work.path().join("cache"))
        .arg(&source)
        .arg(work.path().join("mnt"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("has no lazy version") && stderr.contains("lazyctl convert"),
        "{stderr}"
    );
}
