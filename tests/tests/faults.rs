//! End-to-end: the fault matrix (docs/BENCHMARKS.md, "Fault matrix"). A real `lazyd` reads
//! images from a real registry and S3 (moto) through an HTTP proxy that misbehaves on purpose
//! (`lazy_tests::fault_proxy`), over a chunk cache that is damaged, filled or turned read-only
//! under it, with a thousand readers and fifty mounts, killed during a warm, and under a wall
//! clock that jumps. Each test asserts what the matrix promises: every byte read equals the
//! source, a read that cannot be served fails with EIO within the read timeout (plus slack for a
//! loaded machine), reads recover without a remount once the fault ends, and a restarted agent
//! finds no corrupt cache entry.
//!
//! Faults that older tests cover are not repeated here: the registry stopped mid-read, a byte
//! corrupted in the registry's storage, cache segments damaged between mounts and a full cache
//! disk are in `remote.rs`; an interrupted warm and the registry down at start in `agent.rs`.
//!
//! Every test prints its measured figures on lines starting with `fault-matrix:`; the table in
//! docs/BENCHMARKS.md comes from
//! `cargo test -p lazy-tests --test faults -- --test-threads=1 --nocapture 2>&1 | grep fault-matrix:`.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Barrier;
use std::time::{Duration, Instant, SystemTime};

use lazy_tests::agent::{backend_bytes, counter, Lazyd};
use lazy_tests::fault_proxy::{FaultProxy, HttpFault};
use lazy_tests::flip_bytes;
use lazy_tests::mount::{lazyctl_path, mountpoint, require_root_and_fuse, Ext4Loop, TmpfsMount};
use lazy_tests::proxy::DelayProxy;
use lazy_tests::random_files::RandomFiles;
use lazy_tests::registry::LocalRegistry;
use lazy_tests::s3::MotoServer;

/// Read timeout of the agents here: short, so that a fault costs seconds.
const READ_TIMEOUT: Duration = Duration::from_secs(3);
/// What a loaded two-core machine may add to the read timeout before EIO: scheduling, a read
/// whose first chunk came before the one that failed. Less than a second read timeout, so that
/// a reader waiting twice (the kernel retries a page whose read-ahead failed) fails the test.
const SLACK: Duration = Duration::from_secs(2);
/// How long reads may keep failing after a fault ends: the request in flight when it ended
/// runs out its attempts (4 of at most 2 s, or a `Retry-After` capped at the read timeout).
const RECOVERY_LIMIT: Duration = Duration::from_secs(30);

/// Timeouts to match [`READ_TIMEOUT`]: a request that gets no answer outlives a reader's wait
/// (4 attempts of 2 s), as with the defaults (4 of 10 s against 30 s), so a reader that waited
/// for it twice would show. No guesses, whole-image prefetch or recording, so that only the
/// reads of a test make requests, each for its own file.
const QUIET_AGENT: &str = "[fetch]
read_timeout = \"3s\"
request_timeout = \"2s\"
connect_timeout = \"1s\"
speculate = false
resolve_ttl = \"0s\"
[background]
whole_image = \"never\"
[profile]
record = false
";

/// The tests that measure time or memory run one at a time, so that they do not measure each
/// other.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Prints one measured figure for the table.
fn figure(row: &str, text: &str) {
    eprintln!("fault-matrix: {row} | {text}");
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / f64::from(1 << 20)
}

/// `count` random files of `size` bytes, written under `work/NAME` and converted to
/// `docker://REGISTRY/faults/NAME:v1`; returns them and that image.
fn in_registry(
    registry: &LocalRegistry,
    work: &Path,
    name: &str,
    count: usize,
    size: usize,
) -> (RandomFiles, String) {
    let files = RandomFiles::write(work, name, count, size);
    let image = format!("docker://{}/faults/{name}:v1", registry.host());
    files.convert(&image, &[]);
    (files, image)
}

/// An agent's directory under `work` and its cache directory in it (created, for a test to
/// mount a small disk on).
fn agent_dirs(work: &Path) -> (PathBuf, PathBuf) {
    let root = work.join("agent");
    let cache = root.join("cache");
    std::fs::create_dir_all(&cache).unwrap();
    (root, cache)
}

/// Drops the kernel's cached pages of `path` (a file in a mount), so the next read reaches
/// the agent.
fn forget_pages(path: &Path) {
    let file = File::open(path).unwrap();
    // SAFETY: posix_fadvise on a descriptor we own; it only drops clean cached pages.
    let rc = unsafe { libc::posix_fadvise(file.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
    assert_eq!(rc, 0, "posix_fadvise({})", path.display());
}

/// Reads `path` until it reads `want`, at most `limit`; every failure must be EIO and every
/// success right. Returns the time it took and the failed reads.
fn read_until_right(path: &Path, want: &[u8], limit: Duration) -> (Duration, u32) {
    let started = Instant::now();
    let mut failed = 0;
    loop {
        match std::fs::read(path) {
            Ok(bytes) => {
                assert!(bytes == want, "{}: wrong bytes served", path.display());
                return (started.elapsed(), failed);
            }
            Err(e) => {
                assert_eq!(e.raw_os_error(), Some(libc::EIO), "{}: {e}", path.display());
                failed += 1;
                assert!(
                    started.elapsed() < limit,
                    "{}: reads still fail {limit:?} after the fault ended: {e}",
                    path.display()
                );
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }
}

// --- Backend faults at the HTTP level -------------------------------------------------------

/// What a fault must lead to for a reader of a cold file.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Expect {
    /// The right bytes (the fetcher's retries absorb the fault), after at least this long.
    Bytes { after: Duration },
    /// EIO, within the read timeout plus slack.
    Eio,
}

struct Case {
    label: &'static str,
    fault: HttpFault,
    /// Ranged GETs it damages (`u64::MAX`: until the fault ends).
    times: u64,
    expect: Expect,
}

/// The HTTP faults and what each must do, for the registry and S3 alike.
fn http_cases() -> Vec<Case> {
    let always = u64::MAX;
    let eio = |label, fault| Case {
        label,
        fault,
        times: always,
        expect: Expect::Eio,
    };
    vec![
        eio(
            "slow: body at 1 byte/s",
            HttpFault::Trickle { bytes_per_sec: 1 },
        ),
        eio("connection reset mid-body", HttpFault::ResetMidBody),
        eio("body truncated (clean close)", HttpFault::Truncate),
        eio("connection closed, no answer", HttpFault::NoAnswer),
        eio("one byte flipped in the body", HttpFault::FlipByte),
        eio("other bytes, honest Content-Range", HttpFault::ShiftedRange),
        eio(
            "right bytes, wrong Content-Range",
            HttpFault::WrongContentRange,
        ),
        Case {
            label: "3 x 503, then healthy",
            fault: HttpFault::Status {
                status: 503,
                retry_after: None,
            },
            times: 3,
            expect: Expect::Bytes {
                after: Duration::ZERO,
            },
        },
        eio(
            "503 until the fault ends",
            HttpFault::Status {
                status: 503,
                retry_after: None,
            },
        ),
        Case {
            label: "2 x 429 with Retry-After: 1",
            fault: HttpFault::Status {
                status: 429,
                retry_after: Some(1),
            },
            times: 2,
            // Honoured: at least one wait of 1 s (the backoff alone is 100 + 200 ms).
            expect: Expect::Bytes {
                after: Duration::from_millis(950),
            },
        },
        eio(
            "429 with Retry-After: 60 until the fault ends",
            HttpFault::Status {
                status: 429,
                retry_after: Some(60),
            },
        ),
    ]
}

/// Mounts `image` on `agent` and reads file `i` of `files` cold under case `i` of
/// [`http_cases`], then again until it reads right once the fault ended.
fn http_fault_matrix(
    backend: &str,
    agent: &mut Lazyd,
    image: &str,
    proxy: &FaultProxy,
    files: &RandomFiles,
    mnt: &Path,
) {
    let cases = http_cases();
    assert!(files.count() >= cases.len());
    agent.mount(image, mnt);
    let mut eio = 0;
    for (i, case) in cases.iter().enumerate() {
        let path = mnt.join(RandomFiles::name(i));
        let want = files.bytes(i);
        let injected = proxy.faults_injected();
        proxy.inject(case.fault, case.times);
        let started = Instant::now();
        let outcome = std::fs::read(&path);
        let took = started.elapsed();
        proxy.heal();
        assert!(
            proxy.faults_injected() > injected,
            "{backend}, {}: the fault was never applied",
            case.label
        );
        let what = match (outcome, case.expect) {
            (Ok(bytes), Expect::Bytes { after }) => {
                assert!(bytes == want, "{backend}, {}: wrong bytes", case.label);
                assert!(
                    took >= after,
                    "{backend}, {}: right bytes after {took:?}, expected no sooner than {after:?}",
                    case.label
                );
                format!("right bytes after {:.2} s", took.as_secs_f64())
            }
            (Err(e), Expect::Eio) => {
                assert_eq!(
                    e.raw_os_error(),
                    Some(libc::EIO),
                    "{backend}, {}",
                    case.label
                );
                assert!(
                    took <= READ_TIMEOUT + SLACK,
                    "{backend}, {}: EIO after {took:?}",
                    case.label
                );
                eio += 1;
                format!("EIO after {:.2} s", took.as_secs_f64())
            }
            (Ok(bytes), Expect::Eio) => panic!(
                "{backend}, {}: expected EIO, read {} bytes ({})",
                case.label,
                bytes.len(),
                if bytes == want { "right" } else { "WRONG" }
            ),
            (Err(e), Expect::Bytes { .. }) => {
                panic!(
                    "{backend}, {}: expected the right bytes, got {e}",
                    case.label
                )
            }
        };
        let (recovered, failed) = read_until_right(&path, &want, RECOVERY_LIMIT);
        figure(
            &format!("{backend} | {}", case.label),
            &format!(
                "{what} | right bytes {:.2} s after the fault ended ({failed} failed reads meanwhile) | 0 wrong bytes",
                recovered.as_secs_f64()
            ),
        );
    }
    let status = agent.status();
    assert!(
        counter(&status, "/metrics/chunks/read_errors") >= eio,
        "{status}"
    );
    assert!(
        counter(&status, "/metrics/chunks/digest_mismatches") >= 1,
        "the flipped byte was not caught by a checksum: {status}"
    );
    assert!(agent.log().contains("chunk not served"), "{}", agent.log());
}

#[test]
fn registry_http_faults_give_right_bytes_or_eio_in_time_and_reads_recover() {
    require_root_and_fuse();
    let _serial = serial();
    let work = tempfile::tempdir().unwrap();
    let registry = LocalRegistry::start().unwrap();
    // Two chunks per file: a fault may hit a reader's first chunk or its second.
    let (files, image) = in_registry(&registry, work.path(), "http", http_cases().len(), 2 << 20);
    let proxy = FaultProxy::start(&registry.host()).unwrap();
    let mut agent = Lazyd::start(QUIET_AGENT).unwrap();
    http_fault_matrix(
        "registry",
        &mut agent,
        &image.replace(&registry.host(), &proxy.host()),
        &proxy,
        &files,
        &mountpoint(work.path(), "mnt"),
    );
}

#[test]
fn s3_http_faults_give_right_bytes_or_eio_in_time_and_reads_recover() {
    require_root_and_fuse();
    let _serial = serial();
    let work = tempfile::tempdir().unwrap();
    let moto = MotoServer::start();
    moto.create_bucket("faults");
    // One file per case, and one for the server stopped at the end.
    let files = RandomFiles::write(work.path(), "src", http_cases().len() + 1, 2 << 20);
    files.convert("s3://faults/http", &moto.env());
    let proxy = FaultProxy::start(&format!("127.0.0.1:{}", moto.port())).unwrap();
    let env: Vec<(String, String)> = moto
        .env()
        .into_iter()
        .map(|(k, v)| match k.as_str() {
            "AWS_ENDPOINT_URL" => (k, format!("http://{}", proxy.host())),
            _ => (k, v),
        })
        .collect();
    let mut agent = Lazyd::start_with_env(QUIET_AGENT, &env).unwrap();
    let mnt = mountpoint(work.path(), "mnt");
    http_fault_matrix("s3", &mut agent, "s3://faults/http", &proxy, &files, &mnt);

    // The server stopped (SIGSTOP): connections are accepted, nothing answers. (The registry
    // stopped outright is `remote.rs`'s registry_stopped_mid_read_gives_eio_in_time_...)
    let last = files.count() - 1;
    let path = mnt.join(RandomFiles::name(last));
    moto.pause();
    let started = Instant::now();
    let outcome = std::fs::read(&path);
    let took = started.elapsed();
    moto.resume();
    let err = outcome.expect_err("read with the server stopped");
    assert_eq!(err.raw_os_error(), Some(libc::EIO), "{err}");
    assert!(took <= READ_TIMEOUT + SLACK, "EIO after {took:?}");
    let (recovered, failed) = read_until_right(&path, &files.bytes(last), RECOVERY_LIMIT);
    figure(
        "s3 | server stopped (SIGSTOP), then continued",
        &format!(
            "EIO after {:.2} s | right bytes {:.2} s after it continued ({failed} failed reads meanwhile) | 0 wrong bytes",
            took.as_secs_f64(),
            recovered.as_secs_f64()
        ),
    );
}

// --- The chunk cache ------------------------------------------------------------------------

/// The segment files of the cache in `cache_dir`, oldest first.
fn segments(cache_dir: &Path) -> Vec<PathBuf> {
    let mut found: Vec<PathBuf> = std::fs::read_dir(cache_dir.join("chunks/segments"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "seg"))
        .collect();
    found.sort();
    found
}

/// Agent settings for the cache tests: a small memory cache, so re-reads come from the disk
/// cache, and 4 MiB segments (a 64 MiB budget), so an image of a few MiB spans several.
const DISK_CACHE_AGENT: &str = "cache_size = \"64M\"
[fetch]
memory_cache = \"1M\"
speculate = false
[background]
whole_image = \"never\"
[profile]
record = false
";

#[test]
fn cache_segments_truncated_flipped_or_deleted_while_mounted_are_dropped_and_refetched() {
    require_root_and_fuse();
    let work = tempfile::tempdir().unwrap();
    let registry = LocalRegistry::start().unwrap();
    let (files, image) = in_registry(&registry, work.path(), "cache", 12, 2 << 20);
    let (root, _) = agent_dirs(work.path());
    let mut agent = Lazyd::start_in(&root, DISK_CACHE_AGENT, &[]).unwrap();
    let mnt = mountpoint(work.path(), "mnt");
    agent.mount(&image, &mnt);
    let total = files.assert_equal(&mnt);
    let first = backend_bytes(&agent.status());

    // While mounted: one segment cut in half, one with a byte flipped every 64 KiB, one deleted.
    let segs = segments(&agent.cache_dir());
    assert!(segs.len() >= 4, "{segs:?}");
    let cut = std::fs::OpenOptions::new()
        .write(true)
        .open(&segs[0])
        .unwrap();
    cut.set_len(cut.metadata().unwrap().len() / 2).unwrap();
    let flipped = flip_bytes(&segs[1], 4096, 64 << 10);
    std::fs::remove_file(&segs[2]).unwrap();

    for i in 0..files.count() {
        forget_pages(&mnt.join(RandomFiles::name(i)));
    }
    let before = agent.status();
    let started = Instant::now();
    files.assert_equal(&mnt);
    let took = started.elapsed();
    let after = agent.status();
    let reads =
        counter(&after, "/metrics/chunks/reads") - counter(&before, "/metrics/chunks/reads");
    assert!(
        reads >= (total >> 20),
        "the second read did not reach lazyd ({reads} chunk reads)"
    );
    let refetched = backend_bytes(&after) - backend_bytes(&before);
    let corrupt = counter(&after, "/metrics/cache/corrupt_entries");
    assert!(corrupt > 0, "no flipped entry was caught: {after}");
    assert!(refetched > 0 && refetched < first, "{refetched} of {first}");
    assert_eq!(counter(&after, "/metrics/chunks/read_errors"), 0);
    figure(
        "cache segment truncated + bit-flipped + deleted while mounted",
        &format!(
            "right bytes: {:.0} MiB re-read in {:.2} s; {corrupt} corrupt entries dropped ({flipped} bytes flipped), {:.1} of {:.1} MiB refetched (the deleted segment still reads through lazyd's open descriptor) | 0 wrong bytes, no SIGBUS",
            mib(total),
            took.as_secs_f64(),
            mib(refetched),
            mib(first)
        ),
    );

    // A restart drops what the deleted segment held; whatever is left reads right, with no
    // corrupt entry left behind.
    agent.stop().unwrap();
    let mut agent = Lazyd::start_in(&root, DISK_CACHE_AGENT, &[]).unwrap();
    agent.mount(&image, &mnt);
    files.assert_equal(&mnt);
    let status = agent.status();
    assert_eq!(
        counter(&status, "/metrics/cache/corrupt_entries"),
        0,
        "{status}"
    );
    assert_eq!(counter(&status, "/metrics/chunks/read_errors"), 0);
    figure(
        "cache segment truncated + bit-flipped + deleted, then restart",
        &format!(
            "right bytes; 0 corrupt entries; {:.1} MiB refetched (the deleted segment)",
            mib(backend_bytes(&status))
        ),
    );
}

#[test]
fn cache_disk_turning_read_only_serves_reads_uncached() {
    require_root_and_fuse();
    let work = tempfile::tempdir().unwrap();
    let registry = LocalRegistry::start().unwrap();
    let (files, image) = in_registry(&registry, work.path(), "ro", 8, 2 << 20);
    let (other, other_image) = in_registry(&registry, work.path(), "ro-other", 2, 1 << 20);
    let (root, cache) = agent_dirs(work.path());
    let disk = Ext4Loop::new(&work.path().join("cache.ext4"), &cache, 256 << 20).unwrap();
    let mut agent = Lazyd::start_in(&root, DISK_CACHE_AGENT, &[]).unwrap();
    let mnt = mountpoint(work.path(), "mnt");
    agent.mount(&image, &mnt);
    let half = files.count() / 2;
    for i in 0..half {
        assert!(std::fs::read(mnt.join(RandomFiles::name(i))).unwrap() == files.bytes(i));
    }

    disk.fail().unwrap();
    let started = Instant::now();
    for i in 0..files.count() {
        let path = mnt.join(RandomFiles::name(i));
        forget_pages(&path);
        let bytes = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        assert!(
            bytes == files.bytes(i),
            "{} read wrong bytes",
            path.display()
        );
    }
    let took = started.elapsed();
    let status = agent.status();
    let uncached = counter(&status, "/metrics/chunks/served_uncached");
    assert!(uncached > 0, "{status}");
    assert!(
        counter(&status, "/metrics/chunks/disk_hits") > 0,
        "{status}"
    );
    assert_eq!(counter(&status, "/metrics/chunks/read_errors"), 0);
    assert_eq!(
        agent.log().matches("without caching").count(),
        1,
        "one log line says so, not one per chunk:\n{}",
        agent.log()
    );
    // An image first mounted now: its index cannot be kept on the disk, and is held in memory.
    let other_mnt = mountpoint(work.path(), "other");
    agent.mount(&other_image, &other_mnt);
    other.assert_equal(&other_mnt);
    assert!(
        agent
            .log()
            .contains("cannot keep the index, holding it in memory"),
        "{}",
        agent.log()
    );
    figure(
        "cache disk turns read-only while mounted (ext4 errors=remount-ro)",
        &format!(
            "right bytes: {:.0} MiB read in {:.2} s, the cached half from the read-only disk, {uncached} chunks served uncached, one log line `serving chunks from memory without caching them`; a new image mounts with its index held in memory | 0 wrong bytes",
            mib(files.assert_equal(&mnt)),
            took.as_secs_f64()
        ),
    );
    agent.stop().unwrap();

    // A restart on the read-only disk: lazyd starts, says so, serves the chunks the disk holds
    // (the first half of the files was cached before the disk failed) and the rest uncached.
    let mut agent = Lazyd::start_in(&root, DISK_CACHE_AGENT, &[]).unwrap();
    assert!(
        agent.log().contains("the cache directory is read-only"),
        "{}",
        agent.log()
    );
    agent.mount(&image, &mnt);
    let started = Instant::now();
    let read = files.assert_equal(&mnt);
    let took = started.elapsed();
    let status = agent.status();
    assert!(
        counter(&status, "/metrics/chunks/disk_hits") > 0,
        "{status}"
    );
    assert!(
        counter(&status, "/metrics/chunks/served_uncached") > 0,
        "{status}"
    );
    assert_eq!(counter(&status, "/metrics/chunks/read_errors"), 0);
    figure(
        "cache disk read-only at lazyd start",
        &format!(
            "lazyd starts (one warning), right bytes: {:.0} MiB in {:.2} s, {} chunks from the read-only disk, {} served uncached | 0 wrong bytes",
            mib(read),
            took.as_secs_f64(),
            counter(&status, "/metrics/chunks/disk_hits"),
            counter(&status, "/metrics/chunks/served_uncached")
        ),
    );
    agent.ctl_ok([std::ffi::OsStr::new("umount"), mnt.as_os_str()]);
    agent.stop().unwrap();
    drop(disk);
}

/// The last non-empty line of `text`.
fn last_line(text: &str) -> &str {
    text.lines().rfind(|l| !l.trim().is_empty()).unwrap_or("")
}

// --- Indexes and manifests replaced ------------------------------------------------------------

/// `(manifest digest, index digest)` of `image`, from `lazyctl inspect`.
fn digests(image: &str, env: &[(String, String)]) -> (String, String) {
    let out = Command::new(lazyctl_path())
        .args(["inspect", image])
        .envs(env.iter().map(|(k, v)| (k, v)))
        .output()
        .unwrap();
    assert!(out.status.success(), "lazyctl inspect {image}: {out:?}");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let field = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|rest| rest.split_whitespace().next())
            .unwrap_or_else(|| panic!("no {name} in {text}"))
            .to_string()
    };
    (field("manifest:"), field("index:"))
}

/// Replaces `path` with `bytes` the way a tool would: a new file renamed over it.
fn replace_file(path: &Path, bytes: &[u8]) {
    let tmp = path.with_extension("replacing");
    std::fs::write(&tmp, bytes).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

/// `lazyctl mount IMAGE MNT` through `agent`, which must fail; returns lazyctl's stderr.
fn refused_mount(agent: &Lazyd, image: &str, mnt: &Path) -> String {
    let out = agent.ctl([
        std::ffi::OsStr::new("mount"),
        image.as_ref(),
        mnt.as_os_str(),
    ]);
    assert!(!out.status.success(), "mounting {image} succeeded");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Asserts that mounting `image` through `agent` is refused, and that the refusal and the
/// agent's log both name `digest`; prints the refusal as the figure of `row`.
fn assert_refused(agent: &Lazyd, image: &str, mnt: &Path, digest: &str, row: &str) {
    let stderr = refused_mount(agent, image, mnt);
    assert!(
        stderr.contains(digest),
        "lazyctl does not name {digest}: {stderr}"
    );
    let line = agent
        .log()
        .lines()
        .rfind(|l| l.contains("cannot open the image"))
        .map(str::to_string)
        .unwrap_or_else(|| panic!("lazyd logged no refusal:\n{}", agent.log()));
    assert!(
        line.contains(digest),
        "the log line does not name {digest}: {line}"
    );
    figure(row, &format!("mount refused: {}", last_line(&stderr)));
}

/// `manifest` with one space turned into a tab (or the reverse) in its middle: the same JSON,
/// other bytes.
fn respaced(manifest: &[u8]) -> Vec<u8> {
    let mut edited = manifest.to_vec();
    let at = edited.len() / 2;
    edited[at] = if edited[at] == b' ' { b'\t' } else { b' ' };
    edited
}

#[test]
fn index_or_manifest_replaced_in_a_dir_store_or_the_cache_is_refused_by_digest() {
    require_root_and_fuse();
    let work = tempfile::tempdir().unwrap();
    let files = RandomFiles::write(work.path(), "src", 4, 1 << 20);
    let store = work.path().join("store");
    let image = format!("dir:{}:v1", store.display());
    files.convert(&image, &[]);
    let other = RandomFiles::write(work.path(), "other", 4, 1 << 19);
    let other_store = work.path().join("other-store");
    other.convert(&format!("dir:{}:v1", other_store.display()), &[]);
    let (manifest, index) = digests(&image, &[]);
    let (_, other_index) = digests(&format!("dir:{}:v1", other_store.display()), &[]);
    let blob = |store: &Path, digest: &str| {
        store
            .join("blobs/sha256")
            .join(digest.trim_start_matches("sha256:"))
    };
    let good_index = std::fs::read(blob(&store, &index)).unwrap();
    let good_manifest = std::fs::read(blob(&store, &manifest)).unwrap();
    let mut agent = Lazyd::start(QUIET_AGENT).unwrap();
    let mnt = mountpoint(work.path(), "mnt");

    // Another image's index in place of this one's: refused, naming the index.
    replace_file(
        &blob(&store, &index),
        &std::fs::read(blob(&other_store, &other_index)).unwrap(),
    );
    assert_refused(
        &agent,
        &image,
        &mnt,
        &index,
        "dir: store, index blob replaced",
    );

    // The manifest replaced: refused, naming the manifest.
    replace_file(&blob(&store, &index), &good_index);
    replace_file(&blob(&store, &manifest), &respaced(&good_manifest));
    assert_refused(
        &agent,
        &image,
        &mnt,
        &manifest,
        "dir: store, manifest blob replaced",
    );

    // Replaced while mounted: the mount keeps reading the index it verified.
    replace_file(&blob(&store, &manifest), &good_manifest);
    agent.mount(&image, &mnt);
    replace_file(
        &blob(&store, &index),
        &std::fs::read(blob(&other_store, &other_index)).unwrap(),
    );
    files.assert_equal(&mnt);
    figure(
        "dir: store, index replaced (renamed over) while mounted",
        "the mount keeps serving the index it verified: right bytes",
    );
    agent.ctl_ok([std::ffi::OsStr::new("umount"), mnt.as_os_str()]);
    drop(agent);

    // lazyd's own copy of a remote image's index (CACHE/indexes) replaced: dropped with a
    // warning naming the file, fetched again, and the image reads right.
    let registry = LocalRegistry::start().unwrap();
    let remote = format!("docker://{}/faults/index:v1", registry.host());
    files.convert(&remote, &[]);
    let mut agent = Lazyd::start(QUIET_AGENT).unwrap();
    agent.mount(&remote, &mnt);
    agent.ctl_ok([std::ffi::OsStr::new("umount"), mnt.as_os_str()]);
    let kept = agent
        .cache_dir()
        .join("indexes")
        .join(index.replace(':', "-"));
    replace_file(&kept, &good_index[..good_index.len() / 2]);
    agent.mount(&remote, &mnt);
    files.assert_equal(&mnt);
    let log = agent.log();
    let line = log
        .lines()
        .find(|l| l.contains("kept index is unusable"))
        .unwrap_or_else(|| panic!("no warning about the kept index:\n{log}"));
    assert!(line.contains(&index.replace(':', "-")), "{line}");
    figure(
        "lazyd's kept index (CACHE/indexes) replaced",
        "dropped with a warning `kept index is unusable, fetching it again` naming the file; refetched, right bytes",
    );
}

#[test]
fn index_or_manifest_replaced_in_a_registry_or_s3_is_refused_by_digest() {
    require_root_and_fuse();
    let work = tempfile::tempdir().unwrap();
    let mnt = mountpoint(work.path(), "mnt");
    let registry = LocalRegistry::start().unwrap();
    let (files, image) = in_registry(&registry, work.path(), "replaced", 4, 1 << 20);
    let (_, other_image) = in_registry(&registry, work.path(), "other", 4, 1 << 19);
    let (manifest, index) = digests(&image, &[]);
    let (_, other_index) = digests(&other_image, &[]);
    let other_index_bytes = std::fs::read(registry.blob_file(&other_index)).unwrap();
    replace_file(&registry.blob_file(&index), &other_index_bytes);
    let agent = Lazyd::start(QUIET_AGENT).unwrap();
    assert_refused(
        &agent,
        &image,
        &mnt,
        &index,
        "registry: index blob replaced in its storage",
    );
    let manifest_file = registry.blob_file(&manifest);
    replace_file(
        &manifest_file,
        &respaced(&std::fs::read(&manifest_file).unwrap()),
    );
    assert_refused(
        &agent,
        &image,
        &mnt,
        &manifest,
        "registry: manifest blob replaced in its storage",
    );
    drop(agent);

    let moto = MotoServer::start();
    moto.create_bucket("faults");
    let env = moto.env();
    files.convert("s3://faults/replaced", &env);
    let (_, index) = digests("s3://faults/replaced", &env);
    let key = format!(
        "replaced/blobs/sha256/{}",
        index.trim_start_matches("sha256:")
    );
    moto.put_object("faults", &key, &other_index_bytes);
    let agent = Lazyd::start_with_env(QUIET_AGENT, &env).unwrap();
    assert_refused(
        &agent,
        "s3://faults/replaced",
        &mnt,
        &index,
        "s3: index object replaced",
    );
}

// --- Many readers, many mounts ----------------------------------------------------------------

/// `n` threads started together, each running `read(i)` and returning how long it took from
/// the common start; panics if any fails.
fn run_together(n: usize, read: impl Fn(usize) + Sync) -> Vec<Duration> {
    let barrier = Barrier::new(n);
    let start = std::sync::OnceLock::new();
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..n)
            .map(|i| {
                let (barrier, start, read) = (&barrier, &start, &read);
                std::thread::Builder::new()
                    .stack_size(256 << 10)
                    .spawn_scoped(s, move || {
                        barrier.wait();
                        let t0 = *start.get_or_init(Instant::now);
                        read(i);
                        t0.elapsed()
                    })
                    .unwrap()
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    })
}

/// Median and slowest of `times`; panics, naming `what`, unless the slowest finished within
/// four medians and a second (no reader starved while the others went on).
fn fair(what: &str, times: &[Duration]) -> (Duration, Duration) {
    let mut sorted = times.to_vec();
    sorted.sort();
    let (median, slowest) = (sorted[sorted.len() / 2], sorted[sorted.len() - 1]);
    assert!(
        slowest <= median * 4 + Duration::from_secs(1),
        "{what}: the slowest took {slowest:?}, the median {median:?}"
    );
    (median, slowest)
}

#[test]
fn a_thousand_concurrent_readers_on_one_mount_finish_fairly_in_bounded_memory() {
    require_root_and_fuse();
    let _serial = serial();
    const READERS: usize = 1000;
    const SLICE: usize = 128 << 10;
    const SLICES_PER_FILE: usize = (1 << 20) / SLICE;
    // 125 files of 1 MiB: each reader reads its own 128 KiB, eight readers share each chunk.
    let work = tempfile::tempdir().unwrap();
    let registry = LocalRegistry::start().unwrap();
    let (files, image) = in_registry(
        &registry,
        work.path(),
        "readers",
        READERS / SLICES_PER_FILE,
        1 << 20,
    );
    let mut agent = Lazyd::start("[profile]\nrecord = false\n").unwrap();
    let idle = agent.memory();
    let mnt = mountpoint(work.path(), "mnt");
    let read = |i: usize| {
        let (file, slice) = (i / SLICES_PER_FILE, i % SLICES_PER_FILE);
        let path = mnt.join(RandomFiles::name(file));
        let f = File::open(&path).unwrap();
        let mut got = vec![0u8; SLICE];
        f.read_exact_at(&mut got, (slice * SLICE) as u64)
            .unwrap_or_else(|e| panic!("reader {i}: {}: {e}", path.display()));
        let want = &files.bytes(file)[slice * SLICE..][..SLICE];
        assert!(got == want, "reader {i} got wrong bytes");
    };
    for (round, label) in ["cold, from the registry", "from the disk cache"]
        .iter()
        .enumerate()
    {
        // A fresh mount each round: the kernel's page cache of the last one is not used.
        agent.mount(&image, &mnt);
        agent.reset_peak_memory();
        let started = Instant::now();
        let times = run_together(READERS, read);
        let wall = started.elapsed();
        let memory = agent.memory();
        let (median, slowest) = fair(label, &times);
        assert!(
            wall < Duration::from_secs(120),
            "{READERS} readers took {wall:?}"
        );
        // The bound: the decoded-chunk cache (64 MiB), demand requests in flight (64 MiB),
        // prefetch and background requests (16 x 8 MiB), and per read worker a chunk and a
        // reply (16 x 2 MiB): 288 MiB above the idle agent.
        let bound = idle.rss + (288 << 20);
        assert!(
            memory.peak_rss < bound,
            "peak RSS {} MiB over the bound of {} MiB",
            mib(memory.peak_rss),
            mib(bound)
        );
        figure(
            &format!("{READERS} concurrent readers, one mount, {label}"),
            &format!(
                "all right bytes; all done in {:.2} s; median reader {:.2} s, slowest {:.2} s; lazyd peak RSS {:.0} MiB (idle {:.0} MiB, bound {:.0} MiB), {} threads",
                wall.as_secs_f64(),
                median.as_secs_f64(),
                slowest.as_secs_f64(),
                mib(memory.peak_rss),
                mib(idle.rss),
                mib(bound),
                memory.threads
            ),
        );
        agent.ctl_ok([std::ffi::OsStr::new("umount"), mnt.as_os_str()]);
        if round == 0 {
            assert!(backend_bytes(&agent.status()) > 0);
        }
    }
}

#[test]
fn fifty_mounts_at_once_read_right_in_bounded_memory() {
    require_root_and_fuse();
    let _serial = serial();
    const MOUNTS: usize = 50;
    let work = tempfile::tempdir().unwrap();
    let registry = LocalRegistry::start().unwrap();
    let (files, image) = in_registry(&registry, work.path(), "mounts", 4, 1 << 20);
    let mut agent = Lazyd::start("[profile]\nrecord = false\n").unwrap();
    let idle = agent.memory();
    let mnts: Vec<PathBuf> = (0..MOUNTS)
        .map(|i| mountpoint(work.path(), &format!("mnt{i}")))
        .collect();
    let started = Instant::now();
    for mnt in &mnts {
        agent.mount(&image, mnt);
    }
    let mount_time = started.elapsed();
    let mounted = agent.memory();
    // Per mount: its 21 threads' stacks, the pages its FUSE sessions' buffers touched, its
    // index and recorder. Before lazyd fixed its mmap threshold, 20 MiB each.
    assert!(
        mounted.rss - idle.rss < MOUNTS as u64 * (2 << 20),
        "{MOUNTS} mounts took {} MiB",
        mib(mounted.rss - idle.rss)
    );
    agent.reset_peak_memory();
    let started = Instant::now();
    let times = run_together(MOUNTS, |i| {
        files.assert_equal(&mnts[i]);
    });
    let wall = started.elapsed();
    let reading = agent.memory();
    let (median, slowest) = fair("mounts read at once", &times);
    assert!(wall < Duration::from_secs(60), "{wall:?}");
    let status = agent.status();
    assert_eq!(status["mounts"].as_array().unwrap().len(), MOUNTS);
    // Reading adds what one mount's reads would: the decoded-chunk cache (64 MiB) at most.
    let bound = mounted.rss + (64 << 20);
    assert!(
        reading.peak_rss < bound,
        "peak RSS {} MiB with {MOUNTS} mounts, over {} MiB",
        mib(reading.peak_rss),
        mib(bound)
    );
    for mnt in &mnts {
        agent.ctl_ok([std::ffi::OsStr::new("umount"), mnt.as_os_str()]);
    }
    let after = agent.memory();
    figure(
        &format!("{MOUNTS} mounts of one image on one lazyd"),
        &format!(
            "all right bytes; {MOUNTS} mounts in {:.1} s; reading all through each at once: {:.2} s (median mount {:.2} s, slowest {:.2} s); lazyd RSS idle {:.0} MiB, mounted {:.0} MiB ({:.2} MiB and {:.0} threads per mount), peak while reading {:.0} MiB (bound {:.0} MiB), {:.0} MiB after unmounting",
            mount_time.as_secs_f64(),
            wall.as_secs_f64(),
            median.as_secs_f64(),
            slowest.as_secs_f64(),
            mib(idle.rss),
            mib(mounted.rss),
            mib(mounted.rss.saturating_sub(idle.rss)) / MOUNTS as f64,
            (mounted.threads - idle.threads) as f64 / MOUNTS as f64,
            mib(reading.peak_rss),
            mib(bound),
            mib(after.rss)
        ),
    );
}

/// A safetensors file of one 4 KiB tensor whose header is padded with spaces to `header` bytes
/// (valid JSON: every header lazyd reads is one it would stream).
fn padded_safetensors(seed: u64, header: usize) -> Vec<u8> {
    let json = br#"{"t":{"dtype":"U8","shape":[4096],"data_offsets":[0,4096]}}"#;
    let mut file = (header as u64).to_le_bytes().to_vec();
    file.extend_from_slice(json);
    file.resize(8 + header, b' ');
    file.extend_from_slice(&lazy_tests::pseudo_random_bytes(seed, 4096));
    file
}

#[test]
fn ten_thousand_opens_of_safetensors_files_keep_lazyd_bounded() {
    require_root_and_fuse();
    let _serial = serial();
    const FILES: usize = 500;
    const ROUNDS: usize = 20;
    const HEADER: usize = 256 << 10;
    let work = tempfile::tempdir().unwrap();
    let src = work.path().join("weights");
    std::fs::create_dir_all(&src).unwrap();
    let files: Vec<Vec<u8>> = (0..FILES)
        .map(|i| padded_safetensors(i as u64, HEADER))
        .collect();
    for (i, bytes) in files.iter().enumerate() {
        std::fs::write(src.join(format!("m{i:03}.safetensors")), bytes).unwrap();
    }
    let moto = MotoServer::start();
    moto.create_bucket("opens");
    lazy_tests::s3::convert(
        &moto,
        &[&format!("path:{}", src.display()), "s3://opens/lazy/many"],
    );
    // The decoded-chunk cache is a budget of its own (`fetch.memory_cache`, 64 MiB by default),
    // which the 500 headers' ~125 chunks can fill whenever many streams overlap: at the default
    // it alone could reach the bound below, and whether it did depended on timing. A small one
    // leaves the bound to what the opens add.
    let config = "[profile]\nrecord = false\n[fetch]\nmemory_cache = \"8M\"\n";
    let mut agent = Lazyd::start_with_env(config, &moto.env()).unwrap();
    let mnt = mountpoint(work.path(), "mnt");
    agent.mount("s3://opens/lazy/many", &mnt);
    let idle = agent.memory();
    agent.reset_peak_memory();
    let started = Instant::now();
    let mut most_threads = idle.threads;
    for _ in 0..ROUNDS {
        // Every file opened at once (each a first open: a stream each, were it not bounded),
        // then all closed.
        let open: Vec<File> = (0..FILES)
            .map(|i| File::open(mnt.join(format!("m{i:03}.safetensors"))).unwrap())
            .collect();
        most_threads = most_threads.max(agent.memory().threads);
        drop(open);
    }
    let took = started.elapsed();
    let after = agent.memory();
    most_threads = most_threads.max(after.threads);
    for (i, bytes) in files.iter().enumerate().step_by(50) {
        let read = std::fs::read(mnt.join(format!("m{i:03}.safetensors"))).unwrap();
        assert!(
            read == *bytes,
            "m{i:03}.safetensors differs from its source"
        );
    }
    let status = agent.status();
    let skipped = counter(&status, "/metrics/streams/skipped");
    assert!(
        skipped > 0,
        "no file was past the streams' bounds: {status}"
    );
    // The streams' threads (agent::stream::MAX_STREAM_FILES, 64) and their headers (4 read
    // at once) are all the opens add, besides what any first reads start: the mount's 16 read
    // workers and up to 16 threads of the runtime's and fetcher's pools.
    let thread_bound = idle.threads + 64 + 16 + 16;
    assert!(
        most_threads <= thread_bound,
        "{most_threads} threads (bound {thread_bound})"
    );
    let rss_bound = idle.rss + (64 << 20);
    assert!(
        after.peak_rss < rss_bound,
        "peak RSS {} MiB, over {} MiB",
        mib(after.peak_rss),
        mib(rss_bound)
    );
    figure(
        &format!("{} opens of safetensors files", FILES * ROUNDS),
        &format!(
            "{FILES} files with {} KiB headers opened and closed {ROUNDS} times in {:.1} s; {skipped} opens past the streams' bounds; lazyd threads {} idle, at most {most_threads} (bound {thread_bound}); RSS {:.0} MiB idle, peak {:.0} MiB (bound {:.0} MiB)",
            HEADER >> 10,
            took.as_secs_f64(),
            idle.threads,
            mib(idle.rss),
            mib(after.peak_rss),
            mib(rss_bound)
        ),
    );
}

// --- Crashes, full disks, clocks --------------------------------------------------------------

/// Waits until the agent's warm has fetched more than `bytes`.
fn wait_for_warm(agent: &Lazyd, bytes: u64) {
    let started = Instant::now();
    while agent.warm_fetched_bytes() <= bytes {
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "the warm made no progress: {}",
            agent.status()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// After a restart: mounts `image` on `agent`, reads every file right, and checks the cache
/// held no corrupt entry. Returns the cache's entries at start and the bytes refetched.
fn reads_right_after_restart(
    agent: &mut Lazyd,
    image: &str,
    files: &RandomFiles,
    mnt: &Path,
) -> (u64, u64) {
    let entries = counter(&agent.status(), "/metrics/cache/entries");
    agent.mount(image, mnt);
    files.assert_equal(mnt);
    let status = agent.status();
    assert_eq!(
        counter(&status, "/metrics/cache/corrupt_entries"),
        0,
        "{status}"
    );
    assert_eq!(counter(&status, "/metrics/chunks/digest_mismatches"), 0);
    assert_eq!(counter(&status, "/metrics/chunks/read_errors"), 0);
    (entries, backend_bytes(&status))
}

#[test]
fn lazyd_killed_during_a_warm_restarts_on_a_cache_that_reads_right() {
    require_root_and_fuse();
    let work = tempfile::tempdir().unwrap();
    let registry = LocalRegistry::start().unwrap();
    let (files, image) = in_registry(&registry, work.path(), "kill", 8, 8 << 20);
    // 20 MB/s: the warm of 64 MiB takes about 3 s.
    let proxy = DelayProxy::start_shaped(&registry.host(), Duration::ZERO, 20_000_000).unwrap();
    let image = image.replace(&registry.host(), &proxy.host());
    let (root, _) = agent_dirs(work.path());
    let mut agent = Lazyd::start_in(&root, QUIET_AGENT, &[]).unwrap();
    let mut warm = agent.spawn_warm(&image);
    wait_for_warm(&agent, 24 << 20);
    agent.kill().unwrap();
    let _ = warm.wait();

    let mut agent = Lazyd::start_in(&root, QUIET_AGENT, &[]).unwrap();
    let mnt = mountpoint(work.path(), "mnt");
    let (entries, refetched) = reads_right_after_restart(&mut agent, &image, &files, &mnt);
    assert!(entries > 0, "nothing the warm fetched survived the kill");
    let total = (files.count() * files.size()) as u64;
    assert!(refetched < total, "{refetched} of {total} refetched");
    figure(
        "lazyd SIGKILLed during a warm, restarted, mounted again",
        &format!(
            "right bytes; {entries} cache entries survived the kill, 0 corrupt, 0 digest mismatches; {:.1} of {:.0} MiB fetched again",
            mib(refetched),
            mib(total)
        ),
    );
}

#[test]
fn disk_full_during_a_warm_leaves_a_cache_that_reads_right_after_restart() {
    require_root_and_fuse();
    let work = tempfile::tempdir().unwrap();
    let registry = LocalRegistry::start().unwrap();
    let (files, image) = in_registry(&registry, work.path(), "full", 8, 8 << 20);
    let (root, cache) = agent_dirs(work.path());
    // A 24 MiB disk under a 1 GiB budget, for an image of 64 MiB.
    let disk = TmpfsMount::new(&cache, "24m").unwrap();
    let config = format!("cache_size = \"1G\"\n{QUIET_AGENT}");
    let agent = Lazyd::start_in(&root, &config, &[]).unwrap();
    let warm = agent.spawn_warm(&image).wait_with_output().unwrap();
    assert!(
        agent.log().contains("disk full"),
        "the disk never filled:\n{}",
        agent.log()
    );
    // The cache took every chunk by evicting earlier ones: the warm must not claim success.
    let said = String::from_utf8_lossy(&warm.stderr).trim().to_string();
    assert!(
        !warm.status.success() && said.contains("kept only"),
        "warm: {warm:?}"
    );
    agent.stop().unwrap();
    let on_disk: u64 = segments(&cache)
        .iter()
        .map(|p| p.metadata().unwrap().len())
        .sum();

    let mut agent = Lazyd::start_in(&root, &config, &[]).unwrap();
    let mnt = mountpoint(work.path(), "mnt");
    let (entries, refetched) = reads_right_after_restart(&mut agent, &image, &files, &mnt);
    figure(
        "disk full during a warm (24 MiB tmpfs, 64 MiB image), restarted, mounted again",
        &format!(
            "warm fails: {}; {:.1} MiB of segments left on disk, {entries} entries after restart, 0 corrupt; right bytes, {:.1} MiB fetched again",
            last_line(&said),
            mib(on_disk),
            mib(refetched)
        ),
    );
    drop(agent);
    drop(disk);
}

/// Where Debian's `faketime` package puts the multi-threaded libfaketime.
const LIBFAKETIME: &str = "/usr/lib/x86_64-linux-gnu/faketime/libfaketimeMT.so.1";

#[test]
fn wall_clock_jumps_under_lazyd_change_no_byte_and_lose_no_cache_entry() {
    require_root_and_fuse();
    assert!(
        Path::new(LIBFAKETIME).is_file(),
        "{LIBFAKETIME} missing: apt-get install faketime (scripts/setup.sh does)"
    );
    let work = tempfile::tempdir().unwrap();
    let registry = LocalRegistry::start().unwrap();
    let (files, image) = in_registry(&registry, work.path(), "clock", 8, 4 << 20);
    let proxy = DelayProxy::start_shaped(&registry.host(), Duration::ZERO, 10_000_000).unwrap();
    let image = image.replace(&registry.host(), &proxy.host());
    let (root, _) = agent_dirs(work.path());
    let clock = work.path().join("faketime.rc");
    std::fs::write(&clock, "+0\n").unwrap();
    // The wall clock only: a clock step (NTP, an operator) moves CLOCK_REALTIME, never
    // CLOCK_MONOTONIC, which timeouts run on.
    let env: Vec<(String, String)> = [
        ("LD_PRELOAD", LIBFAKETIME.to_string()),
        ("FAKETIME_TIMESTAMP_FILE", clock.display().to_string()),
        ("FAKETIME_CACHE_DURATION", "1".to_string()),
        ("FAKETIME_DONT_FAKE_MONOTONIC", "1".to_string()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    let mut agent = Lazyd::start_in(&root, QUIET_AGENT, &env).unwrap();
    let mnt = mountpoint(work.path(), "mnt");

    // A day forward during a warm (32 MiB at 10 MB/s), a day back during reads.
    let warm = agent.spawn_warm(&image);
    wait_for_warm(&agent, 4 << 20);
    std::fs::write(&clock, "+1d\n").unwrap();
    std::thread::sleep(Duration::from_millis(1500));
    agent.mount(&image, &mnt);
    let warm = warm.wait_with_output().unwrap();
    assert!(warm.status.success(), "warm failed: {warm:?}");
    let real_now = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let last_used = |agent: &Lazyd| {
        agent.status()["images"]
            .as_array()
            .unwrap()
            .iter()
            .map(|i| i["last_used"].as_u64().unwrap())
            .max()
            .unwrap()
    };
    let ahead = last_used(&agent).saturating_sub(real_now);
    assert!(
        ahead > 80_000,
        "lazyd's clock did not jump: last use {ahead} s ahead"
    );
    std::fs::write(&clock, "-1d\n").unwrap();
    std::thread::sleep(Duration::from_millis(1500));
    files.assert_equal(&mnt);
    agent.ctl_ok([std::ffi::OsStr::new("umount"), mnt.as_os_str()]);
    let behind = real_now.saturating_sub(last_used(&agent));
    let status = agent.status();
    assert_eq!(counter(&status, "/metrics/chunks/read_errors"), 0);
    let fetched = backend_bytes(&status);
    agent.stop().unwrap();

    // Restarted with the real clock: the whole image reads from the cache, none of it refetched.
    let mut agent = Lazyd::start_in(&root, QUIET_AGENT, &[]).unwrap();
    let (entries, refetched) = reads_right_after_restart(&mut agent, &image, &files, &mnt);
    assert_eq!(refetched, 0, "cache entries were lost across the restart");
    figure(
        "wall clock +1 day during a warm, -1 day during reads (libfaketime), restarted",
        &format!(
            "right bytes; warm succeeded; last-use stamps {ahead} s ahead, then {behind} s behind; {:.0} MiB fetched once, {entries} entries after restart, 0 corrupt, 0 refetched",
            mib(fetched)
        ),
    );
}
