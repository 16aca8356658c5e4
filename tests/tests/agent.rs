//! End-to-end tests of the host agent: a real `lazyd` driven through `lazyctl`, real FUSE
//! mounts, a real `docker-registry` and S3 (`moto`) on loopback ports, and a rate-limited
//! proxy standing in for a slow link.
//!
//! - warm fills the cache so the image reads with its backend stopped; a second warm fetches
//!   nothing; an interrupted warm continues; `gc` frees what nothing references;
//! - the agent starts with the registry down and mounts once it is back; SIGTERM unmounts idle
//!   mounts and keeps serving busy ones until they are released;
//! - a recorded hot-chunk profile, pushed beside the image, cuts a cold start's demand misses on
//!   another host;
//! - a demand read during a large warm on a rate-limited link is served next, not after the
//!   warm's queue.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use lazy_tests::agent::{backend_bytes, counter, Lazyd};
use lazy_tests::mount::{
    is_fuse_mounted, lazyctl, lazyctl_path, mountpoint, require_root_and_fuse, stored_bytes,
    Mounted,
};
use lazy_tests::proxy::DelayProxy;
use lazy_tests::random_files::{file_bytes, RandomFiles};
use lazy_tests::registry::LocalRegistry;
use lazy_tests::s3::MotoServer;
use lazy_tests::{debian, reference, tree};
use serde_json::Value;

/// The tests here measure latencies and rates: one at a time, so that they do not measure each
/// other.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn backend_requests(status: &Value) -> u64 {
    status["metrics"]["backends"].as_array().map_or(0, |b| {
        b.iter().map(|b| b["requests"].as_u64().unwrap()).sum()
    })
}

fn stdout(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn chroot(root: &Path, script: &str) -> String {
    let out = Command::new("chroot")
        .arg(root)
        .args(["/bin/sh", "-c", script])
        .output()
        .unwrap();
    assert!(out.status.success(), "chroot {script:?}: {out:?}");
    stdout(&out)
}

#[test]
fn warmed_image_reads_every_file_with_the_registry_stopped() {
    require_root_and_fuse();
    let _serial = serial();
    let work = tempfile::tempdir().unwrap();
    let mut registry = LocalRegistry::start().unwrap();
    let image = debian::minbase_image(&debian::default_cache_dir()).unwrap();
    let expected = reference::umoci_unpack_cached(&image).unwrap();
    let lazy = registry
        .push_and_convert(&image, "lazy/debian:bookworm")
        .unwrap();
    let total = stored_bytes(&lazy, &[]);
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut agent = Lazyd::start(&format!("metrics_listen = \"127.0.0.1:{port}\"")).unwrap();

    let out = agent.ctl_ok(["warm", "--no-progress", &lazy]);
    println!("{}", stdout(&out));
    let first = backend_bytes(&agent.status());
    println!("warm fetched {first} bytes for an image of {total} stored bytes");
    // The whole image, once (the index is fetched with the manifest, on top).
    assert!(
        first >= total && first <= total + total / 50,
        "{first} vs {total}"
    );

    let out = agent.ctl_ok(["warm", "--no-progress", &lazy]);
    println!("second warm: {}", stdout(&out));
    assert_eq!(
        backend_bytes(&agent.status()),
        first,
        "a second warm fetched data"
    );
    assert!(stdout(&out).contains(" 0 B fetched"), "{}", stdout(&out));

    registry.stop();
    let requests = backend_requests(&agent.status());
    let mnt = mountpoint(work.path(), "mnt");
    agent.mount(&lazy, &mnt);
    let stats = tree::assert_trees_equal(&expected, &mnt);
    println!("registry stopped: mounted tree equals umoci unpack: {stats}");
    assert_eq!(chroot(&mnt, "echo ok"), "ok\n");
    let status = agent.status();
    assert_eq!(
        backend_requests(&status),
        requests,
        "reads went to the stopped registry"
    );
    assert_eq!(counter(&status, "/metrics/chunks/read_errors"), 0);
    assert_eq!(status["mounts"].as_array().unwrap().len(), 1);

    // The Prometheus endpoint, as curl --unix-socket would read it.
    let (code, text) = agent.http_get("/metrics").unwrap();
    assert_eq!(code, 200);
    assert!(text.contains("lazyd_mounts 1"), "{text}");
    assert!(text.contains("lazy_backend_bytes_total"), "{text}");
    // ... and on the TCP listener, for Prometheus.
    let mut tcp = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    std::io::Write::write_all(&mut tcp, b"GET /metrics HTTP/1.0\r\nHost: x\r\n\r\n").unwrap();
    let mut text = String::new();
    std::io::Read::read_to_string(&mut tcp, &mut text).unwrap();
    assert!(
        text.lines().next().is_some_and(|l| l.contains(" 200 ")),
        "{text}"
    );
    assert!(text.contains("lazyd_mounts 1"), "{text}");

    agent.ctl_ok([OsArg::from("umount"), mnt.clone().into()]);
    assert!(!is_fuse_mounted(&mnt).unwrap());

    // gc keeps what a remembered image uses; forgetting unused images frees the cache.
    let before = counter(&agent.status(), "/metrics/cache/bytes_used");
    let out = agent.ctl_ok(["gc", "--json"]);
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["cache"]["removed_chunks"], 0, "{report}");
    let out = agent.ctl_ok(["gc", "--unused-for", "0s", "--json"]);
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    println!("gc --unused-for 0s: {report}");
    assert_eq!(report["forgotten_images"].as_array().unwrap().len(), 1);
    assert_eq!(report["cache"]["kept_chunks"], 0, "{report}");
    let after = counter(&agent.status(), "/metrics/cache/bytes_used");
    assert!(
        after < before / 10,
        "gc freed too little: {before} -> {after}"
    );
}

type OsArg = std::ffi::OsString;

#[test]
fn warmed_s3_image_reads_every_file_with_s3_stopped() {
    require_root_and_fuse();
    let _serial = serial();
    let work = tempfile::tempdir().unwrap();
    let mut moto = MotoServer::start();
    moto.create_bucket("images");
    let env = moto.env();
    let image = debian::minbase_image(&debian::default_cache_dir()).unwrap();
    let expected = reference::umoci_unpack_cached(&image).unwrap();
    let dest = "s3://images/lazy/debian";
    let out = Command::new(lazyctl_path())
        .args(["convert", "--no-progress", &image.oci_ref(), dest])
        .envs(env.iter().map(|(k, v)| (k, v)))
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let total = stored_bytes(dest, &env);
    let mut agent = Lazyd::start_with_env("", &env).unwrap();
    println!("{}", stdout(&agent.ctl_ok(["warm", "--no-progress", dest])));
    let fetched = backend_bytes(&agent.status());
    assert!(
        fetched >= total && fetched <= total + total / 50,
        "{fetched} vs {total}"
    );

    moto.stop();
    let mnt = mountpoint(work.path(), "mnt");
    agent.mount(dest, &mnt);
    let stats = tree::assert_trees_equal(&expected, &mnt);
    println!("s3 stopped: mounted tree equals umoci unpack: {stats}");
    assert_eq!(backend_bytes(&agent.status()), fetched);
}

/// A directory of `files` incompressible files of `size` bytes (`blob0`, `blob1`, ...: file `i`
/// holds `file_bytes(i, size)`), converted to `repo_tag` in `registry`. Returns the lazy image
/// reference.
fn random_image(
    registry: &LocalRegistry,
    work: &Path,
    repo_tag: &str,
    files: usize,
    size: usize,
) -> String {
    let name = format!("src-{}", repo_tag.replace(['/', ':'], "-"));
    let lazy = format!("docker://{}/{repo_tag}", registry.host());
    RandomFiles::write(work, &name, files, size).convert(&lazy, &[]);
    lazy
}

#[test]
fn interrupted_warm_continues_and_fetches_the_image_about_once() {
    require_root_and_fuse();
    let _serial = serial();
    let work = tempfile::tempdir().unwrap();
    let registry = LocalRegistry::start().unwrap();
    let lazy = random_image(&registry, work.path(), "lazy/big:v1", 8, 32 << 20);
    let total = stored_bytes(&lazy, &[]);
    // 40 MB/s: the warm takes about 7 s, long enough to interrupt it early.
    let proxy =
        DelayProxy::start_shaped(&registry.host(), Duration::from_millis(2), 40_000_000).unwrap();
    let image = lazy.replace(&registry.host(), &proxy.host());
    let agent = Lazyd::start("").unwrap();

    let mut warm = agent.spawn_warm(&image);
    let start = Instant::now();
    loop {
        if agent.warm_fetched_bytes() > total / 4 {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "warm made no progress: {}",
            agent.status()
        );
        assert!(
            warm.try_wait().unwrap().is_none(),
            "warm ended before it was interrupted"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    warm.kill().unwrap();
    let _ = warm.wait();
    // The agent notices the client is gone and stops the warm.
    let start = Instant::now();
    while !agent.status()["warms"].as_array().unwrap().is_empty() {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "the warm did not stop"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let interrupted = backend_bytes(&agent.status());
    assert!(
        interrupted < total,
        "{interrupted} of {total}: not interrupted"
    );

    let out = agent.ctl_ok(["warm", "--no-progress", &image]);
    println!("{}", stdout(&out));
    let fetched = backend_bytes(&agent.status());
    println!(
        "interrupted warm: {interrupted} bytes, then the rest: {} bytes; {fetched} in all for an image of {total}",
        fetched - interrupted
    );
    assert!(fetched >= total, "{fetched} < {total}");
    assert!(
        fetched <= total + total / 20,
        "fetched {fetched} for {total}: chunks fetched twice"
    );
    let again = agent.ctl_ok(["warm", "--no-progress", &image]);
    assert!(
        stdout(&again).contains(" 0 B fetched"),
        "{}",
        stdout(&again)
    );
}

#[test]
fn agent_starts_with_the_registry_down_and_drains_busy_mounts_on_sigterm() {
    require_root_and_fuse();
    let _serial = serial();
    let work = tempfile::tempdir().unwrap();
    let mut registry = LocalRegistry::start().unwrap();
    let image = debian::minbase_image(&debian::default_cache_dir()).unwrap();
    let lazy = registry
        .push_and_convert(&image, "lazy/debian:bookworm")
        .unwrap();
    registry.stop();

    let agent =
        Lazyd::start("[fetch]\nconnect_timeout = \"1s\"\nrequest_timeout = \"2s\"\n").unwrap();
    let status = agent.status();
    assert!(status["mounts"].as_array().unwrap().is_empty());
    let mnt = mountpoint(work.path(), "mnt");
    let out = agent.ctl([
        OsArg::from("mount"),
        lazy.clone().into(),
        mnt.clone().into(),
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    println!("mount with the registry down: {err}");
    assert!(!out.status.success());
    assert!(err.contains("cannot open"), "{err}");
    assert!(!is_fuse_mounted(&mnt).unwrap());

    registry.restart().unwrap();
    let mut agent = agent;
    agent.mount(&lazy, &mnt);
    assert_eq!(chroot(&mnt, "echo ok"), "ok\n");
    let idle = mountpoint(work.path(), "idle");
    agent.mount(&lazy, &idle);

    // A file held open keeps `mnt` busy: SIGTERM unmounts `idle`, keeps serving `mnt`.
    let held = File::open(mnt.join("etc/debian_version")).unwrap();
    agent.signal(libc::SIGTERM);
    let start = Instant::now();
    while is_fuse_mounted(&idle).unwrap() {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "idle mount not unmounted"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_millis(500));
    assert!(
        is_fuse_mounted(&mnt).unwrap(),
        "a busy mount was taken down"
    );
    let version = std::fs::read_to_string(mnt.join("etc/debian_version")).unwrap();
    assert!(version.starts_with("12."), "{version}");
    let status = agent.status();
    assert_eq!(status["shutting_down"], true);
    let refused = agent.ctl([
        OsArg::from("mount"),
        lazy.clone().into(),
        idle.clone().into(),
    ]);
    assert!(!refused.status.success());
    assert!(String::from_utf8_lossy(&refused.stderr).contains("shutting down"));

    drop(held);
    let exit = agent.wait(Duration::from_secs(15)).unwrap();
    assert!(exit.success(), "lazyd exited with {exit}");
    assert!(!is_fuse_mounted(&mnt).unwrap());
    println!("log:\n{}", agent.log());
    assert!(agent
        .log()
        .contains("still serving them until they are released"));
}

/// Demand fetches (chunks a reader waited for) and chunks prefetched (the profile's) while
/// `script` runs in a chroot of a fresh mount of `image` on a new agent with an empty cache.
fn cold_start(
    image: &str,
    work: &Path,
    name: &str,
    script: &str,
    expected: &Path,
) -> (u64, u64, String) {
    // The recording window covers the start, then ends (merging the run into the profile and
    // pushing it beside the image) before the whole tree is read below. No guesses and no
    // whole-image prefetch: what is measured is the profile's effect alone.
    let mut agent = Lazyd::start(
        "[profile]\npush = true\nwindow = \"8s\"\n\
         [fetch]\nspeculate = false\n[background]\nwhole_image = \"never\"\n",
    )
    .unwrap();
    let mnt = mountpoint(work, name);
    agent.mount(image, &mnt);
    let output = chroot(&mnt, script);
    let status = agent.status();
    assert_eq!(
        status["mounts"][0]["profile"]["recording"], true,
        "the start outlasted the window"
    );
    let demand = counter(&status, "/metrics/chunks/demand_fetches");
    let prefetched = counter(&status, "/metrics/chunks/prefetch_fetches");
    println!(
        "{name}: {demand} demand fetches, {prefetched} prefetched, profile {}",
        status["mounts"][0]["profile"]
    );
    let start = Instant::now();
    while agent.status()["mounts"][0]["profile"]["recording"] == true {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "the recording did not end"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    // Pushed when the window ended.
    let start = Instant::now();
    while !agent.log().contains("pushed the profile") {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "the profile was not pushed:\n{}",
            agent.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    // Every byte read stays right.
    let (equal, failed) = tree::read_all_files_compare(expected, &mnt);
    assert!(failed.is_empty(), "{failed:?}");
    assert!(equal > 1000);
    agent.ctl_ok([OsArg::from("umount"), mnt.into()]);
    (demand, prefetched, output)
}

/// The Debian + python3 fixture in `registry` and its lazy version: the image, its reference
/// unpack and the lazy image's reference.
fn python_in(registry: &LocalRegistry) -> (lazy_tests::oci::LayoutInfo, PathBuf, String) {
    let image = debian::python_image(&debian::default_python_cache_dir()).unwrap();
    let expected = reference::umoci_unpack_cached(&image).unwrap();
    let lazy = registry
        .push_and_convert(&image, "lazy/python:bookworm")
        .unwrap();
    (image, expected, lazy)
}

#[test]
fn recorded_profile_cuts_demand_misses_of_a_cold_start_elsewhere() {
    require_root_and_fuse();
    let _serial = serial();
    let work = tempfile::tempdir().unwrap();
    let registry = LocalRegistry::start().unwrap();
    let (image, expected, lazy) = python_in(&registry);
    let script = "python3 -c 'import json, email, http.client, decimal; print(json.dumps([42]))'";

    // Host A: no profile yet; the start records one and pushes it beside the image.
    let (without, _, out) = cold_start(&lazy, work.path(), "host-a", script, &expected);
    assert_eq!(out, "[42]\n");

    // Host B: empty cache, the pushed profile is prefetched right after the mount.
    let (with, prefetched, out) = cold_start(&lazy, work.path(), "host-b", script, &expected);
    assert_eq!(out, "[42]\n");
    println!(
        "cold start of `{script}`: {without} demand misses without a profile, {with} with one ({prefetched} chunks prefetched)"
    );
    assert!(prefetched > 0, "nothing was prefetched");
    assert!(
        with * 4 <= without,
        "demand misses did not drop: {without} -> {with}"
    );

    // The profile beside the image merges both runs (lazyctl finds the agent through
    // LAZYD_SOCKET here).
    let mut agent = Lazyd::start("").unwrap();
    let out = Command::new(lazyctl_path())
        .args(["profile", "show", "--json", &lazy])
        .env("LAZYD_SOCKET", agent.socket())
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["remote"]["runs"], 2, "{report}");
    let hot = report["hot_bytes"].as_u64().unwrap();
    assert!(hot > 0);

    // warm --hot fetches the hot set: what the profile names, not the image.
    let out = agent.ctl_ok(["warm", "--hot", "--no-progress", &lazy]);
    println!("{}", stdout(&out));
    let fetched = backend_bytes(&agent.status());
    let total = stored_bytes(&lazy, &[]);
    assert_eq!(
        fetched, hot,
        "warm --hot fetched {fetched}, the hot set is {hot}"
    );
    assert!(fetched < total / 2, "{fetched} of {total}");

    // `profile record` restarts a live mount's recording.
    let mnt = mountpoint(work.path(), "record");
    agent.mount(&lazy, &mnt);
    agent.ctl_ok([
        OsArg::from("profile"),
        "record".into(),
        "--window".into(),
        "1s".into(),
        mnt.clone().into(),
    ]);
    assert_eq!(agent.status()["mounts"][0]["profile"]["recording"], true);
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(agent.status()["mounts"][0]["profile"]["recording"], false);
    agent.ctl_ok([OsArg::from("umount"), mnt.into()]);

    // The profile lays out a new conversion in access order; the tree is the same.
    let file = work.path().join("profile.json");
    agent.ctl_ok([
        OsArg::from("profile"),
        "show".into(),
        "--output".into(),
        file.clone().into(),
        lazy.clone().into(),
    ]);
    let store = work.path().join("store");
    let out = lazyctl([
        OsArg::from("convert"),
        "--no-progress".into(),
        "--profile".into(),
        file.into(),
        image.oci_ref().into(),
        format!("dir:{}", store.display()).into(),
    ]);
    assert!(out.status.success(), "{out:?}");
    let m = Mounted::new(&store, &mountpoint(work.path(), "laid-out")).unwrap();
    let stats = tree::assert_trees_equal(&expected, m.path());
    println!("converted with the profile: tree equals umoci unpack: {stats}");
    m.unmount().unwrap();
}

#[test]
fn demand_read_during_a_large_warm_is_served_next() {
    require_root_and_fuse();
    let _serial = serial();
    let work = tempfile::tempdir().unwrap();
    let registry = LocalRegistry::start().unwrap();
    let big = random_image(&registry, work.path(), "lazy/big:v1", 8, 32 << 20);
    // Files of one chunk each: every read below is one request.
    let small = random_image(&registry, work.path(), "lazy/small:v1", 12, 1 << 20);
    // A 50 MB/s link with 20 ms per request: the warm of 256 MiB needs about 5 s.
    let proxy =
        DelayProxy::start_shaped(&registry.host(), Duration::from_millis(20), 50_000_000).unwrap();
    let big = big.replace(&registry.host(), &proxy.host());
    let small = small.replace(&registry.host(), &proxy.host());
    let mut agent = Lazyd::start("[profile]\nrecord = false\n").unwrap();
    let mnt = mountpoint(work.path(), "mnt");
    agent.mount(&small, &mnt);

    // One cold one-chunk file: one request's latency on an idle link.
    let read = |i: usize| {
        let t = Instant::now();
        let bytes = std::fs::read(mnt.join(format!("blob{i}"))).unwrap();
        let elapsed = t.elapsed();
        assert!(bytes == file_bytes(i, 1 << 20), "blob{i} read wrong bytes");
        elapsed
    };
    let mut idle: Vec<Duration> = (0..3).map(read).collect();
    idle.sort();

    let warm = agent.spawn_warm(&big);
    let start = Instant::now();
    while backend_bytes(&agent.status()) < 32 << 20 {
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "the warm did not start"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let mut busy = Vec::new();
    for i in 3..9 {
        busy.push(read(i));
        std::thread::sleep(Duration::from_millis(150));
    }
    let still_warming = !agent.status()["warms"].as_array().unwrap().is_empty();
    let out = warm.wait_with_output().unwrap();
    busy.sort();
    assert!(out.status.success(), "{out:?}");
    let idle_median = idle[1];
    let busy_median = busy[busy.len() / 2];
    println!(
        "demand read of a cold file: {:.1} ms on an idle link, {:.1} ms (median of {}; max {:.1} ms) during a warm of the link; warm: {}",
        idle_median.as_secs_f64() * 1e3,
        busy_median.as_secs_f64() * 1e3,
        busy.len(),
        busy[busy.len() - 1].as_secs_f64() * 1e3,
        stdout(&out).trim()
    );
    assert!(
        still_warming,
        "the warm ended before the demand reads were measured"
    );
    // Served next: a few request latencies at most, not the seconds the warm's queue holds.
    assert!(
        busy_median < idle_median * 4 + Duration::from_millis(40),
        "demand reads waited behind the warm: {busy_median:?} vs {idle_median:?} idle"
    );
}

/// The FUSE requests of `op` the agent answered so far.
fn fuse_ops(status: &Value, op: &str) -> u64 {
    status["metrics"]["fuse"]["ops"]
        .as_array()
        .and_then(|ops| ops.iter().find(|o| o["op"] == op))
        .map_or(0, |o| o["count"].as_u64().unwrap())
}

#[test]
fn cold_start_through_a_slow_link_fetches_fewer_round_trips_than_files_it_opens() {
    require_root_and_fuse();
    let _serial = serial();
    let work = tempfile::tempdir().unwrap();
    let registry = LocalRegistry::start().unwrap();
    let (_, expected, lazy) = python_in(&registry);
    // 20 ms per request, 1 Gbit/s: a start that waited for one request per file it opens
    // would take seconds.
    let proxy =
        DelayProxy::start_shaped(&registry.host(), Duration::from_millis(20), 125_000_000).unwrap();
    let lazy = lazy.replace(&registry.host(), &proxy.host());
    // Defaults (speculation, the whole image in the background) but no recording: the image
    // has no profile, and this start must not make one.
    let mut agent = Lazyd::start("[profile]\nrecord = false\n").unwrap();
    let mnt = mountpoint(work.path(), "mnt");
    agent.mount(&lazy, &mnt);
    let before = agent.status();
    // Python opens a file for each module it imports (and more: its shared libraries).
    let script = "python3 -c 'import json, email, http.client, decimal, asyncio, sys; \
        print(sum(1 for m in sys.modules.values() if getattr(m, \"__file__\", None)))'";
    let modules: u64 = chroot(&mnt, script).trim().parse().unwrap();
    let after = agent.status();
    let waited = counter(&after, "/metrics/chunks/demand_waits")
        - counter(&before, "/metrics/chunks/demand_waits");
    let requests = backend_requests(&after) - backend_requests(&before);
    let reads = fuse_ops(&after, "read") - fuse_ops(&before, "read");
    println!(
        "cold start: {modules} modules from files, {reads} FUSE reads, {requests} requests \
         (whole image and guesses included), readers waited for {waited} of them; {}",
        after["metrics"]["chunks"]
    );
    assert!(modules > 50, "the script imports little: {modules}");
    // What the start read came in fewer round trips than the files it read, let alone one per
    // file, and readers waited for fewer still.
    assert!(waited * 2 < modules, "{waited} waits for {modules} modules");
    assert!(
        counter(&after, "/metrics/chunks/speculative_used_bytes")
            + counter(&after, "/metrics/chunks/background_used_bytes")
            > 0,
        "nothing fetched ahead was used"
    );
    // Nothing fetched twice, and every byte right.
    let (equal, failed) = tree::read_all_files_compare(&expected, &mnt);
    assert!(failed.is_empty(), "{failed:?}");
    assert!(equal > 1000);
    let fetched = backend_bytes(&agent.status());
    let total = stored_bytes(&lazy, &[]);
    assert!(
        fetched <= total,
        "fetched {fetched} of a {total}-byte image"
    );
    agent.ctl_ok([OsArg::from("umount"), mnt.into()]);
}

#[test]
fn kernel_answers_repeated_lookups_of_missing_names_opens_and_closes_itself() {
    require_root_and_fuse();
    let _serial = serial();
    let work = tempfile::tempdir().unwrap();
    let registry = LocalRegistry::start().unwrap();
    let image = debian::minbase_image(&debian::default_cache_dir()).unwrap();
    let lazy = registry.push_and_convert(&image, "lazy/min:v1").unwrap();
    let mut agent = Lazyd::start("[profile]\nrecord = false\n").unwrap();
    let mnt = mountpoint(work.path(), "mnt");
    agent.mount(&lazy, &mnt);
    let status = |agent: &Lazyd| {
        let s = agent.status();
        [
            "lookup",
            "lookup_missing",
            "open",
            "release",
            "flush",
            "getxattr",
        ]
        .map(|op| fuse_ops(&s, op))
    };
    let missing = mnt.join("etc/no-such-file");
    assert!(std::fs::metadata(&missing).is_err());
    let [lookups, missing_lookups, ..] = status(&agent);
    assert!(missing_lookups >= 1);
    // The negative entry answers the same lookup again without the daemon.
    for _ in 0..5 {
        assert_eq!(
            std::fs::metadata(&missing).unwrap_err().kind(),
            std::io::ErrorKind::NotFound
        );
    }
    let [lookups2, missing_lookups2, ..] = status(&agent);
    assert_eq!(
        (lookups2, missing_lookups2),
        (lookups, missing_lookups),
        "repeated lookups of a missing name reached the daemon"
    );
    // Opening and closing many files: at most the first open and flush reach the daemon (it
    // answers ENOSYS: the kernel does it alone from then on), and no release.
    let [.., opens, releases, flushes, _] = status(&agent);
    for entry in std::fs::read_dir(mnt.join("etc")).unwrap() {
        let path = entry.unwrap().path();
        if path.is_file() {
            let mut f = File::open(&path).unwrap();
            let mut buf = Vec::new();
            std::io::Read::read_to_end(&mut f, &mut buf).unwrap();
        }
    }
    let [.., opens2, releases2, flushes2, xattrs] = status(&agent);
    assert!(
        opens2 <= opens.max(1),
        "opens reached the daemon: {opens} -> {opens2}"
    );
    assert!(
        flushes2 <= flushes.max(1),
        "flushes: {flushes} -> {flushes2}"
    );
    assert_eq!(releases2, releases, "releases reached the daemon");
    // An image without extended attributes answers none after the first question.
    for _ in 0..3 {
        let _ = xattr::get(mnt.join("etc/passwd"), "user.nothing");
    }
    let [.., xattrs2] = status(&agent);
    assert!(xattrs2 <= xattrs.max(1), "getxattr: {xattrs} -> {xattrs2}");
    agent.ctl_ok([OsArg::from("umount"), mnt.into()]);
}

#[test]
fn whole_image_prefetch_stays_under_half_the_cache_and_stops_at_unmount() {
    require_root_and_fuse();
    let _serial = serial();
    let work = tempfile::tempdir().unwrap();
    let registry = LocalRegistry::start().unwrap();
    // 8 files of 4 MiB of random bytes: 32 MiB stored.
    let lazy = random_image(&registry, work.path(), "lazy/whole:v1", 8, 4 << 20);
    let total = stored_bytes(&lazy, &[]);

    // A 20 MiB cache: the prefetch takes at most 10 MiB of it (in layout order), and reads
    // still work.
    let mut agent = Lazyd::start("cache_size = \"20M\"\n[profile]\nrecord = false\n").unwrap();
    let mnt = mountpoint(work.path(), "small-cache");
    agent.mount(&lazy, &mnt);
    let start = Instant::now();
    while agent.log().matches("prefetched the whole image").count() == 0 {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "the prefetch did not end:\n{}",
            agent.log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let status = agent.status();
    let fetched = backend_bytes(&status);
    assert!(
        fetched <= 10 << 20,
        "fetched {fetched} bytes with a 20 MiB cache"
    );
    assert_eq!(
        status["mounts"][0]["profile"]["whole_image_chunks"], 10,
        "ten 1 MiB chunks fit under half of 20 MiB: {status}"
    );
    assert_eq!(
        std::fs::read(mnt.join("blob7")).unwrap(),
        file_bytes(7, 4 << 20)
    );
    agent.ctl_ok([OsArg::from("umount"), mnt.into()]);
    drop(agent);

    // On a slow link (2 MB/s: the image takes 16 s), unmounting stops the prefetch.
    let proxy =
        DelayProxy::start_shaped(&registry.host(), Duration::from_millis(20), 2_000_000).unwrap();
    let lazy = lazy.replace(&registry.host(), &proxy.host());
    // One background request of 1 MiB at a time: what is in flight at the unmount is small.
    let mut agent = Lazyd::start(
        "[profile]\nrecord = false\n[background]\nmax_requests = 1\nmax_request_size = \"1M\"\n",
    )
    .unwrap();
    let mnt = mountpoint(work.path(), "slow");
    agent.mount(&lazy, &mnt);
    let start = Instant::now();
    while backend_bytes(&agent.status()) == 0 {
        assert!(start.elapsed() < Duration::from_secs(30), "no prefetch");
        std::thread::sleep(Duration::from_millis(20));
    }
    agent.ctl_ok([OsArg::from("umount"), mnt.into()]);
    let at_unmount = backend_bytes(&agent.status());
    // Requests in flight finish (at most a background window's worth); nothing new starts.
    std::thread::sleep(Duration::from_secs(4));
    let later = backend_bytes(&agent.status());
    println!("whole-image prefetch: {at_unmount} bytes at unmount, {later} 4 s later, of {total}");
    assert!(
        later < total / 2,
        "the prefetch went on after the unmount: {later} of {total}"
    );
}
