//! End-to-end tests that mounts and containers survive `lazyd` being restarted, crashing and
//! being upgraded: a real `lazyd` (its supervisor and server), a real `docker-registry` behind
//! a slow link (a delaying, rate-limited proxy, so that chunks stay cold for the whole run), crun
//! and the Debian + python3 image.
//!
//! In each of the three tests a container (`reader`) reads and checksums files of its image for
//! [`READ_SECS`]: files it reads for the first time at a steady pace (cold chunks, fetched over
//! the link while the event happens), files it read before (cached chunks; the page cache is
//! dropped before each read, so every read reaches lazyd) and files it holds open from the
//! start (file handles that must outlive the server). Meanwhile the server is replaced three
//! times, by
//!
//! - (a) a planned restart through the supervisor (SIGHUP),
//! - (b) `kill -9` of the server (the supervisor starts another),
//! - (c) `lazyctl upgrade` to a copy of the binary (two copies, alternately),
//!
//! and each time new containers of the image start while the server is replaced (0 to 60 ms
//! into the event) and another after it; each checksums a file of the image. The reader must
//! end with 0 failed reads, every checksum right, and reads of cold and cached chunks completed
//! after every event; the status must show the same lower mount, its age still counting and
//! one more restart survived.
//!
//! A fourth test kills the whole agent (supervisor and server): its mounts are dead (listing
//! them fails with `ENOTCONN`); the next `lazyd` on the same state detaches each, saying so in
//! its log, and the paths mount again.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output};
use std::time::{Duration, Instant};

use lazy_tests::agent::{counter, lazyd_path, Lazyd};
use lazy_tests::mount::{is_fuse_mounted, mountpoint, parse_mountinfo, require_root_and_fuse};
use lazy_tests::proxy::DelayProxy;
use lazy_tests::registry::LocalRegistry;
use lazy_tests::{debian, reference, tree};
use serde_json::Value;

/// One at a time: each test measures reads against the clock on a small machine.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// No recording, no guesses and no whole-image prefetch, so that a chunk is fetched only when
/// a reader asks for it and the reader's first reads stay cold until it makes them; the lower
/// goes with its last container (the end of each test checks that nothing is left).
const AGENT_CONFIG: &str = "[profile]\nrecord = false\n[fetch]\nspeculate = false\n\
                            [background]\nwhole_image = \"never\"\n[mount]\nlower_linger = \"0s\"\n";

/// How long the reader container reads.
const READ_SECS: u64 = 30;
/// When the server is replaced, in seconds after the reader started: three times, each with
/// room for a container started during the event and one after it.
const EVENTS_AT: [f64; 3] = [6.0, 14.0, 22.0];
/// When containers start, after the event begins: lazyctl's requests reach the socket before
/// the signal, while no server answers (a crash is restarted in tens of milliseconds) and as
/// the new one starts.
const DURING_STARTS: [Duration; 4] = [
    Duration::ZERO,
    Duration::from_millis(20),
    Duration::from_millis(40),
    Duration::from_millis(60),
];
/// Files the reader opens at its start and reads through the same descriptor to its end.
const HELD_FILES: usize = 8;
/// The reader's first reads are of files about this far apart in the image's data (path
/// order), so that they touch new chunks (1 MiB) at a steady pace rather than all at once.
const PICK_SPACING: u64 = 384 << 10;
/// Only files up to this size are picked: one cold read fetches a chunk or two, not a burst.
const PICK_MAX_SIZE: u64 = 1 << 20;
/// After each event, the reader must complete cold and cached reads within this time.
const READS_RESUME_WITHIN: f64 = 5.0;
/// The longest the reader may wait between two completed reads. A lost request would hang it
/// for good and a failed resend would show as an error; the stall targets themselves (under
/// 2 s for a crash) are measured by bench/restart.sh on a quiet machine, not here, where
/// containers start beside the reader on two cores.
const LONGEST_GAP: f64 = 5.0;
/// The link to the registry: per request and bytes per second (a cold 1 MiB chunk, about
/// 400 KB stored, takes about 70 ms).
const LINK_DELAY: Duration = Duration::from_millis(20);
const LINK_RATE: u64 = 8_000_000;

/// The reader, run in the container as `python3 /check/reader.py SECONDS HELD`. `/check/files`
/// holds `SHA256 PATH` lines; the reader writes `/check/started` (its CLOCK_MONOTONIC start,
/// the same clock as the host's: containers get no time namespace) once running, and
/// `/check/result.json` at its end. Every read drops the file's page cache first
/// (POSIX_FADV_DONTNEED, which overlayfs passes to the lower file), so it reaches lazyd.
const READER: &str = r#"
import hashlib, json, os, sys, time

def now():
    return time.clock_gettime(time.CLOCK_MONOTONIC)

duration, held_count = float(sys.argv[1]), int(sys.argv[2])
files = []
with open('/check/files') as f:
    for line in f:
        digest, path = line.rstrip('\n').split(' ', 1)
        files.append((path, digest))

start = now()
counts = {'cold': 0, 'cached': 0, 'held': 0}
failures = []
cold_times = []
cached_per_100ms = []
last = start
longest = [0.0, 0.0]

def read_fd(fd):
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    parts, offset = [], 0
    while True:
        b = os.pread(fd, 1 << 20, offset)
        if not b:
            return b''.join(parts)
        parts.append(b)
        offset += len(b)

def check(kind, path, digest, fd=None):
    global last
    try:
        if fd is None:
            own = os.open(path, os.O_RDONLY)
            try:
                data = read_fd(own)
            finally:
                os.close(own)
        else:
            data = read_fd(fd)
        got = hashlib.sha256(data).hexdigest()
        error = None if got == digest else 'sha256 %s, expected %s' % (got, digest)
    except OSError as e:
        error = '%s: %s' % (e.__class__.__name__, e)
    t = now()
    if t - last > longest[0]:
        longest[:] = [t - last, t]
    last = t
    counts[kind] += 1
    if kind == 'cold':
        cold_times.append(t)
    else:
        bucket = int((t - start) * 10)
        cached_per_100ms.extend([0] * (bucket + 1 - len(cached_per_100ms)))
        cached_per_100ms[bucket] += 1
    if error:
        failures.append({'at': round(t - start, 3), 'kind': kind, 'path': path, 'error': error})

held = []
for path, digest in files[:held_count]:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError as e:
        failures.append({'at': round(now() - start, 3), 'kind': 'open', 'path': path, 'error': str(e)})
        continue
    check('cold', path, digest, fd)
    held.append((fd, path, digest))
with open('/check/started.tmp', 'w') as f:
    f.write(repr(start))
os.rename('/check/started.tmp', '/check/started')

pace = 0.85 * duration / max(1, len(files) - held_count)
next_cold, i = held_count, 0
while now() < start + duration:
    if next_cold < len(files) and now() >= start + (next_cold - held_count) * pace:
        check('cold', *files[next_cold])
        next_cold += 1
        continue
    if held and i % 4 == 0:
        fd, path, digest = held[(i // 4) % len(held)]
        check('held', path, digest, fd)
    else:
        check('cached', *files[i % next_cold])
    i += 1
    time.sleep(0.002)

result = {'start': start, 'counts': counts, 'failed': len(failures), 'failures': failures[:20],
          'cold_times': cold_times, 'cached_per_100ms': cached_per_100ms,
          'cold_left': len(files) - next_cold, 'longest_gap': longest[0],
          'longest_gap_ended_at': longest[1] - start}
with open('/check/result.json', 'w') as f:
    json.dump(result, f)
print('reads %s, %d failed, longest gap %.3f s' % (counts, len(failures), longest[0]))
"#;

/// A container's check of the image: the SHA-256 of the file named by its argument.
const CHECKSUM: &str =
    "import hashlib, sys; print(hashlib.sha256(open(sys.argv[1], 'rb').read()).hexdigest())";

/// What replaces the server.
#[derive(Clone, Copy, Debug)]
enum Event {
    /// (a) SIGHUP to the supervisor.
    Restart,
    /// (b) SIGKILL of the server.
    Crash,
    /// (c) `lazyctl upgrade --binary COPY`.
    Upgrade,
}

/// `CLOCK_MONOTONIC` in seconds: the clock the reader in its container reports times in.
fn monotonic_secs() -> f64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes the timespec we pass; CLOCK_MONOTONIC always exists.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as f64 + ts.tv_nsec as f64 * 1e-9
}

/// The Debian + python3 image in a registry reached through a slow link.
struct SlowImage {
    /// The lazy image's reference, through the proxy.
    image: String,
    /// The image's reference unpack.
    expected: PathBuf,
    _proxy: DelayProxy,
    _registry: LocalRegistry,
}

fn python_image_behind_a_slow_link() -> SlowImage {
    let registry = LocalRegistry::start().unwrap();
    let image = debian::python_image(&debian::default_python_cache_dir()).unwrap();
    let expected = reference::umoci_unpack_cached(&image).unwrap();
    let lazy = registry
        .push_and_convert(&image, "lazy/python:bookworm")
        .unwrap();
    let proxy = DelayProxy::start_shaped(&registry.host(), LINK_DELAY, LINK_RATE).unwrap();
    SlowImage {
        image: lazy.replace(&registry.host(), &proxy.host()),
        expected,
        _proxy: proxy,
        _registry: registry,
    }
}

/// Regular, world-readable files under `usr/` of the reference tree (nothing a runtime mounts
/// over), walked in path order, one about every [`PICK_SPACING`] bytes of file data and no
/// larger than [`PICK_MAX_SIZE`]: `(path in the image, SHA-256)`.
fn pick_files(root: &Path) -> Vec<(String, String)> {
    fn walk(dir: &Path, out: &mut Vec<(PathBuf, u64)>) {
        let mut entries: Vec<_> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap())
            .collect();
        entries.sort_by_key(|e| e.file_name());
        for e in entries {
            let meta = std::fs::symlink_metadata(e.path()).unwrap();
            if meta.is_dir() {
                walk(&e.path(), out);
            } else if meta.is_file() {
                use std::os::unix::fs::PermissionsExt;
                if meta.permissions().mode() & 0o004 != 0 {
                    out.push((e.path(), meta.len()));
                }
            }
        }
    }
    let mut all = Vec::new();
    walk(&root.join("usr"), &mut all);
    let mut picked = Vec::new();
    let mut data = 0u64;
    let mut next = 0u64;
    for (path, size) in all {
        data += size;
        if data >= next && size > 0 && size <= PICK_MAX_SIZE {
            let digest = tree::sha256_file_hex(&path).unwrap();
            let in_image = Path::new("/").join(path.strip_prefix(root).unwrap());
            picked.push((in_image.to_str().unwrap().to_string(), digest));
            next = data + PICK_SPACING;
        }
    }
    picked
}

/// `lazyctl --socket SOCKET run --runtime crun FLAGS... IMAGE -- CMD...`, output captured.
fn run_command(socket: &Path, flags: &[&str], image: &str, cmd: &[&str]) -> Command {
    lazy_tests::agent::run_command(socket, "crun", flags, image, cmd)
}

fn describe(out: &Output) -> String {
    format!(
        "{}\n--- stdout ---\n{}--- stderr ---\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Runs a container of `image` that checksums `file` (a path in the image); returns how it
/// went and how long it took.
fn checksum_in_a_container(socket: &Path, image: &str, file: &str) -> (Output, Duration) {
    let t = Instant::now();
    let out = run_command(socket, &[], image, &["python3", "-c", CHECKSUM, file])
        .output()
        .expect("cannot run lazyctl");
    (out, t.elapsed())
}

/// Asserts that a checksumming container exited 0 and printed `digest`.
fn assert_checksum(what: &str, out: &Output, digest: &str, agent: &Lazyd) {
    assert!(
        out.status.success() && String::from_utf8_lossy(&out.stdout).trim() == digest,
        "the container started {what} did not print {digest}: {}\n--- lazyd log ---\n{}",
        describe(out),
        agent.log()
    );
}

/// Sends SIGTERM to the `lazyctl run` children still running on drop (lazyctl passes it to
/// the container) and waits for them, so that a failing test leaves no container behind.
struct Containers(Vec<Child>);

impl Drop for Containers {
    fn drop(&mut self) {
        for child in &mut self.0 {
            if child.try_wait().ok().flatten().is_none() {
                // SAFETY: kill(2) on our own child, not yet reaped.
                unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
            }
            let _ = child.wait();
        }
    }
}

/// The entry of `status["mounts"]` at `mountpoint`.
fn mount_entry(status: &Value, mountpoint: &str) -> Value {
    status["mounts"]
        .as_array()
        .and_then(|m| m.iter().find(|m| m["mountpoint"] == mountpoint))
        .unwrap_or_else(|| panic!("no mount at {mountpoint} in {}", status["mounts"]))
        .clone()
}

fn number(value: &Value, key: &str) -> f64 {
    value[key]
        .as_f64()
        .unwrap_or_else(|| panic!("no number {key} in {value}"))
}

/// Chunk reads the server answered from its caches (memory or disk).
fn cached_chunk_reads(status: &Value) -> u64 {
    counter(status, "/metrics/chunks/memory_hits") + counter(status, "/metrics/chunks/disk_hits")
}

/// The canonical path of the binary process `pid` runs.
fn exe_of(pid: u32) -> PathBuf {
    std::fs::read_link(format!("/proc/{pid}/exe"))
        .unwrap_or_else(|e| panic!("/proc/{pid}/exe: {e}"))
}

fn canonical(path: &Path) -> PathBuf {
    path.canonicalize()
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// The host's mounts under `dir`.
fn mounts_under(dir: &Path) -> Vec<PathBuf> {
    let text = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    parse_mountinfo(&text)
        .into_iter()
        .filter(|m| m.mount_point.starts_with(dir) && m.mount_point != dir)
        .map(|m| m.mount_point)
        .collect()
}

/// The names in `dir`.
fn list(dir: &Path) -> std::io::Result<Vec<std::ffi::OsString>> {
    std::fs::read_dir(dir)?
        .map(|e| e.map(|e| e.file_name()))
        .collect()
}

/// One replacement of the server, as the test saw it.
struct Replaced {
    /// CLOCK_MONOTONIC when it began.
    at: f64,
    new_pid: u32,
}

fn containers_survive(event: Event) {
    require_root_and_fuse();
    lazy_tests::mount::require_runtime("crun");
    let _serial = serial();
    let slow = python_image_behind_a_slow_link();
    let image = slow.image.as_str();
    let files = pick_files(&slow.expected);
    assert!(
        files.len() > 200,
        "only {} files picked from the image",
        files.len()
    );
    let check = tempfile::tempdir().unwrap();
    let list: String = files.iter().map(|(p, d)| format!("{d} {p}\n")).collect();
    std::fs::write(check.path().join("files"), list).unwrap();
    std::fs::write(check.path().join("reader.py"), READER).unwrap();
    // What the other containers checksum: a file the reader reads too.
    let (probe_file, probe_digest) = files[files.len() / 2].clone();
    // Two copies of lazyd to upgrade to, alternately; they outlive the agent (dropped later).
    let binaries = tempfile::tempdir().unwrap();
    let copies: Vec<PathBuf> = ["lazyd-v2", "lazyd-v3"]
        .iter()
        .map(|name| {
            let copy = binaries.path().join(name);
            std::fs::copy(lazyd_path(), &copy).unwrap();
            canonical(&copy)
        })
        .collect();

    let mut agent = Lazyd::start(AGENT_CONFIG).unwrap();
    let status = agent.status();
    assert_eq!(status["holder"], "supervisor", "{status}");
    assert_eq!(status["supervisor_pid"], agent.pid(), "{status}");
    let first_server = agent.server_pid();
    assert_ne!(first_server, agent.pid(), "the server is the supervisor");

    let volume = format!("{}:/check", check.path().display());
    let held = HELD_FILES.to_string();
    let secs = READ_SECS.to_string();
    let reader = run_command(
        &agent.socket(),
        &["--name", "reader", "-v", &volume],
        image,
        &["python3", "/check/reader.py", &secs, &held],
    )
    .spawn()
    .unwrap();
    let mut containers = Containers(vec![reader]);
    let started = check.path().join("started");
    let t = Instant::now();
    while !started.exists() {
        if let Some(status) = containers.0[0].try_wait().unwrap() {
            let out = containers.0.pop().unwrap().wait_with_output().unwrap();
            panic!(
                "the reader ended with {status} before it started: {}",
                describe(&out)
            );
        }
        assert!(
            t.elapsed() < Duration::from_secs(60),
            "the reader did not start within 60 s\n--- lazyd log ---\n{}",
            agent.log()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let reader_start: f64 = std::fs::read_to_string(&started).unwrap().parse().unwrap();
    println!(
        "{event:?}: the reader started ({} files, {HELD_FILES} held open) {:.1} s after lazyctl run",
        files.len(),
        t.elapsed().as_secs_f64()
    );

    let status = agent.status();
    let lowers = status["mounts"].as_array().unwrap();
    assert_eq!(
        lowers.len(),
        1,
        "one lower mount expected: {}",
        status["mounts"]
    );
    let lower = lowers[0]["mountpoint"].as_str().unwrap().to_string();
    assert_eq!(lowers[0]["restarts_survived"], 0, "{}", lowers[0]);
    let mut age = (number(&lowers[0], "mounted_secs"), Instant::now());
    let mut restarts = counter(&status, "/restarts");
    let mut replaced = Vec::new();
    // The status right after the last server answered.
    let mut after_last = Value::Null;

    for (i, at) in EVENTS_AT.iter().enumerate() {
        let wait = reader_start + at - monotonic_secs();
        if wait > 0.0 {
            std::thread::sleep(Duration::from_secs_f64(wait));
        }
        // New containers start while the server is replaced (see DURING_STARTS).
        let during: Vec<_> = DURING_STARTS
            .iter()
            .map(|&delay| {
                let socket = agent.socket();
                let image = image.to_string();
                let file = probe_file.clone();
                std::thread::spawn(move || {
                    std::thread::sleep(delay);
                    checksum_in_a_container(&socket, &image, &file)
                })
            })
            .collect();
        let old = agent.server_pid();
        let t = monotonic_secs();
        let new_pid = match event {
            Event::Restart => agent.restart_server(),
            Event::Crash => agent.kill_server(),
            Event::Upgrade => agent.upgrade(&copies[i % copies.len()]),
        }
        .unwrap_or_else(|e| panic!("{event:?} {}: {e:#}", i + 1));
        println!(
            "{event:?} {}: server {old} -> {new_pid}, answering after {:.0} ms",
            i + 1,
            (monotonic_secs() - t) * 1e3
        );
        replaced.push(Replaced { at: t, new_pid });
        // The new server's counters as it starts serving, before the containers below.
        after_last = agent.status();
        for (thread, delay) in during.into_iter().zip(DURING_STARTS) {
            let (out, took) = thread.join().unwrap();
            let what = format!("{delay:?} into the event");
            assert_checksum(&what, &out, &probe_digest, &agent);
            println!("  a container started {what} ran in {took:.2?}");
        }
        let (out, took) = checksum_in_a_container(&agent.socket(), image, &probe_file);
        assert_checksum("after the event", &out, &probe_digest, &agent);
        println!("  a container started after it ran in {took:.2?}");

        // The new server runs the expected binary, under the same supervisor.
        let binary = match event {
            Event::Upgrade => copies[i % copies.len()].clone(),
            Event::Restart | Event::Crash => canonical(&lazyd_path()),
        };
        assert_eq!(exe_of(new_pid), binary, "the new server's binary");
        let status = agent.status();
        assert_eq!(status["pid"], new_pid, "{status}");
        assert_eq!(status["supervisor_pid"], agent.pid(), "{status}");
        assert_eq!(status["holder"], "supervisor", "{status}");
        assert_eq!(
            canonical(Path::new(status["binary"].as_str().unwrap())),
            binary,
            "{status}"
        );
        if let Event::Upgrade = event {
            assert_eq!(
                exe_of(agent.pid()),
                binary,
                "the supervisor was not upgraded"
            );
        }
        let now_restarts = counter(&status, "/restarts");
        assert!(
            now_restarts > restarts,
            "restarts did not go up: {restarts} -> {now_restarts}"
        );
        restarts = now_restarts;
        // The same lower, its age still counting, one more restart survived.
        let mount = mount_entry(&status, &lower);
        assert_eq!(status["mounts"].as_array().unwrap().len(), 1, "{status}");
        assert_eq!(mount["restarts_survived"], i + 1, "{mount}");
        let mounted = number(&mount, "mounted_secs");
        let expected = age.0 + age.1.elapsed().as_secs_f64();
        assert!(
            mounted + 1.5 >= expected,
            "the mount's age restarted: {mounted} s, expected about {expected:.1} s: {mount}"
        );
        age = (mounted, Instant::now());
        assert!(
            status["containers"]
                .as_array()
                .unwrap()
                .iter()
                .any(|c| c["name"] == "reader"),
            "the reader's container is gone from the status: {}",
            status["containers"]
        );
    }

    // The reader ends on its own after READ_SECS.
    let deadline = Instant::now() + Duration::from_secs(READ_SECS + 60);
    while containers.0[0].try_wait().unwrap().is_none() {
        assert!(
            Instant::now() < deadline,
            "the reader did not finish\n--- lazyd log ---\n{}",
            agent.log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let out = containers.0.pop().unwrap().wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "the reader failed: {}",
        describe(&out)
    );
    let text = std::fs::read_to_string(check.path().join("result.json")).unwrap();
    let result: Value = serde_json::from_str(&text).unwrap();
    println!(
        "{event:?}: reader: {}",
        String::from_utf8_lossy(&out.stdout).trim()
    );
    assert_eq!(
        result["failed"],
        0,
        "failed reads: {}\n--- lazyd log ---\n{}",
        result["failures"],
        agent.log()
    );
    assert_eq!(
        result["cold_left"], 0,
        "the reader did not get through its first reads: {}",
        result["counts"]
    );
    let longest = number(&result, "longest_gap");
    assert!(
        longest < LONGEST_GAP,
        "the reader waited {longest:.2} s between two reads (ending {:.1} s after its start)",
        number(&result, "longest_gap_ended_at")
    );
    // Cold and cached reads completed after each event.
    let cold_times: Vec<f64> = result["cold_times"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t.as_f64().unwrap())
        .collect();
    let cached: Vec<u64> = result["cached_per_100ms"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n.as_u64().unwrap())
        .collect();
    for (i, r) in replaced.iter().enumerate() {
        let window = r.at..r.at + READS_RESUME_WITHIN;
        let cold = cold_times.iter().filter(|t| window.contains(t)).count();
        let warm: u64 = cached
            .iter()
            .enumerate()
            .filter(|(b, _)| window.contains(&(reader_start + *b as f64 / 10.0)))
            .map(|(_, n)| n)
            .sum();
        println!(
            "{event:?} {} (server {}): {cold} cold and {warm} cached reads in the {READS_RESUME_WITHIN} s after it",
            i + 1,
            r.new_pid
        );
        assert!(
            cold > 0 && warm > 0,
            "after {event:?} {}: {cold} cold and {warm} cached reads completed within {READS_RESUME_WITHIN} s",
            i + 1
        );
    }
    // The last server fetched cold chunks and served cached ones for the reader (it answered
    // with 3 s of first reads left).
    let end = agent.status();
    let fetched = |s: &Value| counter(s, "/metrics/chunks/demand_fetches");
    assert!(
        fetched(&end) > fetched(&after_last),
        "the last server fetched no chunk for a reader after it answered: {} -> {}",
        fetched(&after_last),
        fetched(&end)
    );
    assert!(
        cached_chunk_reads(&end) > cached_chunk_reads(&after_last),
        "the last server served no cached chunk after it answered: {} -> {}",
        cached_chunk_reads(&after_last),
        cached_chunk_reads(&end)
    );
    println!(
        "{event:?}: longest gap between reads {:.0} ms; {} restarts; chunks {}",
        longest * 1e3,
        counter(&end, "/restarts"),
        end["metrics"]["chunks"]
    );

    // The containers the servers took over are released as usual: the lower goes with the
    // reader, nothing is left mounted.
    let t = Instant::now();
    loop {
        let status = agent.status();
        let left = status["containers"].as_array().unwrap().len()
            + status["mounts"].as_array().unwrap().len();
        if left == 0 {
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "left after the last container: {} {}",
            status["containers"],
            status["mounts"]
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let left = mounts_under(&agent.state_dir());
    assert!(left.is_empty(), "mounts left: {left:?}");
}

#[test]
fn containers_read_right_through_planned_restarts_of_the_server() {
    containers_survive(Event::Restart);
}

#[test]
fn containers_read_right_through_kill_9_of_the_server() {
    containers_survive(Event::Crash);
}

#[test]
fn containers_read_right_through_upgrades_to_another_binary() {
    containers_survive(Event::Upgrade);
}

#[test]
fn dead_mounts_are_detached_at_start_and_the_paths_mount_again() {
    require_root_and_fuse();
    let _serial = serial();
    let registry = LocalRegistry::start().unwrap();
    let image = debian::minbase_image(&debian::default_cache_dir()).unwrap();
    let expected = reference::umoci_unpack_cached(&image).unwrap();
    let lazy = registry
        .push_and_convert(&image, "lazy/debian:bookworm")
        .unwrap();
    let work = tempfile::tempdir().unwrap();
    let root = work.path().join("agent");
    let config = "[profile]\nrecord = false\n";
    let mnts: Vec<PathBuf> = ["mnt-a", "mnt-b"]
        .iter()
        .map(|name| canonical(&mountpoint(work.path(), name)))
        .collect();

    // Declared first, dropped last: its drop must not touch what the second agent mounts.
    let mut first = Lazyd::start_in(&root, config, &[]).unwrap();
    for mnt in &mnts {
        first.mount(&lazy, mnt);
        let version = std::fs::read_to_string(mnt.join("etc/debian_version")).unwrap();
        assert!(version.starts_with("12."), "{version}");
    }
    // A container's root filesystem too: an overlay over a lower mount of lazyd's.
    let rootfs = canonical(&mountpoint(work.path(), "rootfs"));
    first.ctl_ok([
        "mount",
        "--rootfs",
        "--name",
        "kept",
        lazy.as_str(),
        rootfs.to_str().unwrap(),
    ]);
    std::fs::write(rootfs.join("root/written"), "by the container\n").unwrap();
    let upper = root.join("state/containers/kept/upper");
    first.kill().unwrap();
    for mnt in &mnts {
        assert!(
            is_fuse_mounted(mnt).unwrap(),
            "{} went with lazyd",
            mnt.display()
        );
        // Listing asks the (gone) server; a stat would be answered from the kernel's
        // attribute cache (a day's TTL).
        let err = list(mnt).unwrap_err();
        assert_eq!(
            err.raw_os_error(),
            Some(libc::ENOTCONN),
            "listing {} after lazyd was killed: {err}",
            mnt.display()
        );
    }
    let logged = first.log().len();

    // Another lazyd, which never served these paths, refuses to mount on a dead mount and
    // says why.
    let other = Lazyd::start(config).unwrap();
    let out = other.ctl(["mount", lazy.as_str(), mnts[0].to_str().unwrap()]);
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && said.contains("is a dead FUSE mount"),
        "mounting on a dead mount: {out:?}"
    );
    drop(other);

    let mut second = Lazyd::start_in(&root, config, &[]).unwrap();
    let t = Instant::now();
    for mnt in &mnts {
        let path = mnt.display().to_string();
        loop {
            let log = second.log();
            let said = log[logged..]
                .lines()
                .any(|l| l.contains("detached") && l.contains(&path));
            if said && !is_fuse_mounted(mnt).unwrap() {
                break;
            }
            assert!(
                t.elapsed() < Duration::from_secs(10),
                "{path} was not detached with a log line naming it:\n{}",
                &log[logged..]
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        list(mnt).unwrap_or_else(|e| panic!("{path} after the cleanup: {e}"));
    }
    let line = second.log()[logged..]
        .lines()
        .find(|l| l.contains("detached"))
        .unwrap()
        .to_string();
    println!("the new lazyd said: {line}");
    // The container's overlay lost its lower: detached too, its writes kept in its upper dir.
    let overlays: Vec<String> =
        parse_mountinfo(&std::fs::read_to_string("/proc/self/mountinfo").unwrap())
            .into_iter()
            .filter(|m| m.mount_point == rootfs)
            .map(|m| m.fs_type)
            .collect();
    assert!(
        overlays.is_empty(),
        "{} still has {overlays:?}",
        rootfs.display()
    );
    let said = second.log()[logged..]
        .lines()
        .any(|l| l.contains("detached") && l.contains("container kept"));
    assert!(
        said,
        "no log line for the container's overlay:\n{}",
        &second.log()[logged..]
    );
    assert_eq!(
        std::fs::read_to_string(upper.join("root/written")).unwrap(),
        "by the container\n"
    );
    let status = second.status();
    assert!(status["mounts"].as_array().unwrap().is_empty(), "{status}");
    assert!(
        status["containers"].as_array().unwrap().is_empty(),
        "{status}"
    );

    // The paths mount again and read right.
    for mnt in &mnts {
        second.mount(&lazy, mnt);
    }
    let stats = tree::assert_trees_equal(&expected, &mnts[0]);
    println!("mounted again: tree equals umoci unpack: {stats}");
    let status = second.status();
    let mount = mount_entry(&status, mnts[1].to_str().unwrap());
    assert_eq!(mount["restarts_survived"], 0, "{mount}");
    let version = std::fs::read_to_string(mnts[1].join("etc/debian_version")).unwrap();
    assert!(version.starts_with("12."), "{version}");
    drop(second);
    for mnt in &mnts {
        assert!(
            !is_fuse_mounted(mnt).unwrap(),
            "{} left mounted",
            mnt.display()
        );
    }
}
