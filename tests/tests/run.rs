//! End-to-end tests of `lazyctl run` and `lazyctl mount --rootfs`: real OCI runtimes (crun and
//! runc), a real `lazyd`, a real `docker-registry` on 127.0.0.1 and the Debian + python3 image
//! (debootstrap + apt, packed with umoci, pushed with skopeo, converted with `lazyctl convert`).
//!
//! - with each runtime: `python3 -c ...` prints what it should; exit codes, stdout and stderr come
//!   back through lazyctl; `--env`, `--workdir`, `--name` (the hostname) and `--volume` reach the
//!   container; a non-root `--user` meets the permissions the image declares (`/etc/shadow`,
//!   `/root`); a SIGTERM to lazyctl reaches the container; the overlay and the shared lower
//!   mount are gone afterwards;
//! - a container's writes land in its upper layer: the lower mount, the chunk cache, another
//!   container of the image and the next container see none of them;
//! - three containers of one image running at once share one lower mount and one cache (the
//!   registry sends about what one container's start needs);
//! - `lazyctl mount --rootfs IMAGE DIR` prepares a writable overlaid rootfs at DIR and
//!   `lazyctl umount DIR` removes it.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output};
use std::time::{Duration, Instant};

use lazy_tests::agent::Lazyd;
use lazy_tests::debian;
use lazy_tests::mount::{mounts_at, parse_mountinfo, require_root_and_fuse};
use lazy_tests::registry::LocalRegistry;
use serde_json::Value;

/// One at a time: the three-container test needs its containers to overlap and counts the bytes
/// the registry sends; on a small machine parallel tests would stretch both.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// The agent config of these tests: no profiles, so that no run prefetches what an earlier one
/// recorded and byte counts compare runs alone.
/// No recording, and a lower that goes with its last container (the tests below check that
/// nothing is left after each run; `the_lower_lingers_...` checks the lingering).
const AGENT_CONFIG: &str = "[profile]\nrecord = false\n[mount]\nlower_linger = \"0s\"\n";

/// A registry holding the Debian + python3 image and its lazy version; returns the lazy image's
/// reference.
fn python_image_in_registry() -> (LocalRegistry, String) {
    let registry = LocalRegistry::start().unwrap();
    let image = debian::python_image(&debian::default_python_cache_dir()).unwrap();
    let lazy = registry
        .push_and_convert(&image, "lazy/python:bookworm")
        .unwrap();
    (registry, lazy)
}

fn run_command(agent: &Lazyd, runtime: &str, flags: &[&str], image: &str, cmd: &[&str]) -> Command {
    lazy_tests::agent::run_command(&agent.socket(), runtime, flags, image, cmd)
}

/// Runs a container to its end.
fn run(agent: &Lazyd, runtime: &str, flags: &[&str], image: &str, cmd: &[&str]) -> Output {
    let t = Instant::now();
    let out = run_command(agent, runtime, flags, image, cmd)
        .output()
        .expect("cannot run lazyctl");
    println!(
        "lazyctl run {flags:?} -- {cmd:?}: {} in {:.2} s",
        out.status,
        t.elapsed().as_secs_f64()
    );
    out
}

/// Like [`run`], but the container must exit 0; returns its stdout.
fn run_ok(agent: &Lazyd, runtime: &str, flags: &[&str], image: &str, cmd: &[&str]) -> String {
    let out = run(agent, runtime, flags, image, cmd);
    assert!(
        out.status.success(),
        "lazyctl run {flags:?} {image} -- {cmd:?} failed with {}:\n{}",
        out.status,
        describe(&out)
    );
    stdout(&out)
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn describe(out: &Output) -> String {
    format!(
        "--- stdout ---\n{}--- stderr ---\n{}",
        stdout(out),
        stderr(out)
    )
}

fn counter(status: &Value, path: &str) -> u64 {
    status
        .pointer(path)
        .and_then(Value::as_u64)
        .unwrap_or_else(|| panic!("no {path} in {status}"))
}

/// Bytes the agent's backends have received so far.
fn backend_bytes(status: &Value) -> u64 {
    status["metrics"]["backends"]
        .as_array()
        .map_or(0, |b| b.iter().map(|b| b["bytes"].as_u64().unwrap()).sum())
}

fn array(status: &Value, key: &str) -> Vec<Value> {
    status[key]
        .as_array()
        .unwrap_or_else(|| panic!("no {key} array in {status}"))
        .clone()
}

/// The host's mounts under `dir` whose file system type starts with `fs_type`.
fn mounts_under(dir: &Path, fs_type: &str) -> Vec<PathBuf> {
    let text = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    parse_mountinfo(&text)
        .into_iter()
        .filter(|m| m.mount_point.starts_with(dir) && m.fs_type.starts_with(fs_type))
        .map(|m| m.mount_point)
        .collect()
}

/// Everything a run leaves behind is gone: no container in the status, no lower mount, no
/// overlay or FUSE mount under the state dir, no container directory.
fn assert_nothing_left(agent: &Lazyd) {
    let status = agent.status();
    assert!(
        array(&status, "containers").is_empty(),
        "containers left: {}",
        status["containers"]
    );
    assert!(
        array(&status, "mounts").is_empty(),
        "the lower mount was not unmounted after its last container: {}",
        status["mounts"]
    );
    let state = agent.state_dir();
    let left: Vec<_> = mounts_under(&state, "")
        .into_iter()
        .filter(|m| m != &state)
        .collect();
    assert!(
        left.is_empty(),
        "mounts left under {}: {left:?}",
        state.display()
    );
    let containers = state.join("containers");
    let dirs: Vec<_> = std::fs::read_dir(&containers)
        .map(|d| d.map(|e| e.unwrap().file_name()).collect())
        .unwrap_or_default();
    assert!(
        dirs.is_empty(),
        "container directories left in {}: {dirs:?}",
        containers.display()
    );
}

fn crun_or_runc_runs_python_propagates_exit_codes_and_keeps_image_permissions(runtime: &str) {
    require_root_and_fuse();
    lazy_tests::mount::require_runtime(runtime);
    let _serial = serial();
    let (_registry, image) = python_image_in_registry();
    let agent = Lazyd::start(AGENT_CONFIG).unwrap();

    // 1. python3 from the lazy image.
    let script = "import json, os, sys, email, http.client; \
                  print(json.dumps([sum(range(10)), os.getuid(), os.getcwd(), sys.version_info[0]]))";
    let out = run_ok(&agent, runtime, &[], &image, &["python3", "-c", script]);
    assert_eq!(out, "[45, 0, \"/\", 3]\n");
    let status = agent.status();
    println!(
        "python3 start: {} bytes fetched, {} demand fetches",
        backend_bytes(&status),
        counter(&status, "/metrics/chunks/demand_fetches")
    );

    // 2. Exit code, stdout and stderr come back through lazyctl.
    let out = run(
        &agent,
        runtime,
        &[],
        &image,
        &["sh", "-c", "echo out; echo err >&2; exit 7"],
    );
    assert_eq!(out.status.code(), Some(7), "{}", describe(&out));
    assert_eq!(stdout(&out), "out\n", "{}", describe(&out));
    assert!(stderr(&out).contains("err"), "{}", describe(&out));
    let out = run(&agent, runtime, &[], &image, &["false"]);
    assert_eq!(out.status.code(), Some(1), "{}", describe(&out));

    // The sandbox: a network namespace of its own (loopback only) unless --network host, no
    // raw sockets (no CAP_NET_RAW), the default seccomp filter unless unconfined.
    let probe = "import socket\n\
        links = sorted(l.split(':')[0].strip() for l in open('/proc/net/dev').readlines()[2:])\n\
        status = dict(l.split(':', 1) for l in open('/proc/self/status').read().splitlines())\n\
        try:\n    socket.socket(socket.AF_INET, socket.SOCK_RAW, 1); raw = 'raw'\n\
        except PermissionError:\n    raw = 'no-raw'\n\
        print(links == ['lo'], status['Seccomp'].strip(), raw)";
    let out = run_ok(&agent, runtime, &[], &image, &["python3", "-c", probe]);
    assert_eq!(out, "True 2 no-raw\n");
    let out = run_ok(
        &agent,
        runtime,
        &["--network", "host", "--security-opt", "seccomp=unconfined"],
        &image,
        &["python3", "-c", probe],
    );
    assert_eq!(out, "False 0 no-raw\n");

    // --env, --workdir, --name (the hostname); PATH and HOME filled in.
    let out = run_ok(
        &agent,
        runtime,
        &[
            "--name",
            "named-1",
            "-e",
            "GREETING=hello",
            "-w",
            "/usr/lib",
        ],
        &image,
        &[
            "sh",
            "-c",
            "echo $GREETING; pwd; cat /proc/sys/kernel/hostname; echo $HOME; echo $PATH",
        ],
    );
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(
        lines[..4],
        ["hello", "/usr/lib", "named-1", "/root"],
        "{out}"
    );
    assert!(
        lines[4].split(':').any(|d| d == "/usr/bin"),
        "PATH lacks /usr/bin: {out}"
    );

    // --volume, read-write and read-only.
    let host = tempfile::tempdir().unwrap();
    std::fs::write(host.path().join("in"), "from the host\n").unwrap();
    let rw = format!("{}:/data", host.path().display());
    let out = run_ok(
        &agent,
        runtime,
        &["-v", &rw],
        &image,
        &[
            "sh",
            "-c",
            "cat /data/in; echo from the container > /data/out",
        ],
    );
    assert_eq!(out, "from the host\n");
    assert_eq!(
        std::fs::read_to_string(host.path().join("out")).unwrap(),
        "from the container\n"
    );
    let ro = format!("{}:/data:ro", host.path().display());
    let out = run(
        &agent,
        runtime,
        &["-v", &ro],
        &image,
        &["sh", "-c", "cat /data/in && echo x > /data/in"],
    );
    assert!(
        !out.status.success(),
        "wrote to a read-only volume: {}",
        describe(&out)
    );
    assert_eq!(stdout(&out), "from the host\n", "{}", describe(&out));
    assert!(
        stderr(&out).contains("Read-only file system"),
        "{}",
        describe(&out)
    );
    assert_eq!(
        std::fs::read_to_string(host.path().join("in")).unwrap(),
        "from the host\n"
    );

    // 5. A non-root user meets the image's permissions: /etc/shadow is root:shadow 0640,
    // /root is 0700, /tmp is 1777.
    for user in ["nobody", "65534", "65534:65534"] {
        let out = run_ok(
            &agent,
            runtime,
            &["--user", user],
            &image,
            &["sh", "-c", "id -u; id -g; cat /etc/debian_version"],
        );
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(lines[..2], ["65534", "65534"], "--user {user}: {out}");
        assert!(lines[2].starts_with("12."), "--user {user}: {out}");
    }
    let out = run(
        &agent,
        runtime,
        &["--user", "nobody"],
        &image,
        &["cat", "/etc/shadow"],
    );
    assert!(
        !out.status.success(),
        "nobody read /etc/shadow: {}",
        describe(&out)
    );
    assert!(stdout(&out).is_empty(), "{}", describe(&out));
    assert!(
        stderr(&out).contains("Permission denied"),
        "{}",
        describe(&out)
    );
    let out = run(
        &agent,
        runtime,
        &["--user", "nobody"],
        &image,
        &["sh", "-c", "echo x > /root/x"],
    );
    assert!(
        !out.status.success(),
        "nobody wrote in /root: {}",
        describe(&out)
    );
    assert!(
        stderr(&out).contains("Permission denied"),
        "{}",
        describe(&out)
    );
    let out = run_ok(
        &agent,
        runtime,
        &["--user", "nobody"],
        &image,
        &[
            "sh",
            "-c",
            "echo hi > /tmp/t && cat /tmp/t && stat -c '%u %a' /tmp/t",
        ],
    );
    assert_eq!(out, "hi\n65534 644\n");
    // A SIGTERM to lazyctl reaches the container (through the runtime), which ends as it chooses.
    let marker = tempfile::tempdir().unwrap();
    let volume = format!("{}:/shared", marker.path().display());
    let child = run_command(
        &agent,
        runtime,
        &["-v", &volume],
        &image,
        &[
            "sh",
            "-c",
            "trap 'echo got TERM; exit 3' TERM; touch /shared/ready; \
             i=0; while [ $i -lt 600 ]; do sleep 0.1; i=$((i+1)); done",
        ],
    )
    .spawn()
    .unwrap();
    let mut children = Children(vec![("signalled".into(), child)]);
    let start = Instant::now();
    while !marker.path().join("ready").exists() {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "the container did not start"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let (_, child) = children.0.pop().unwrap();
    // SAFETY: kill(2) on our own child, not yet reaped.
    unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(3), "{}", describe(&out));
    assert_eq!(stdout(&out), "got TERM\n", "{}", describe(&out));

    // root reads /etc/shadow.
    let out = run_ok(
        &agent,
        runtime,
        &[],
        &image,
        &["head", "-c", "5", "/etc/shadow"],
    );
    assert_eq!(out, "root:");

    assert_nothing_left(&agent);
}

#[test]
fn crun_runs_python_propagates_exit_codes_and_keeps_image_permissions() {
    crun_or_runc_runs_python_propagates_exit_codes_and_keeps_image_permissions("crun");
}

#[test]
fn runc_runs_python_propagates_exit_codes_and_keeps_image_permissions() {
    crun_or_runc_runs_python_propagates_exit_codes_and_keeps_image_permissions("runc");
}

/// The writing container's script: a new file, a changed one, a deleted one and 8 MiB of
/// data.
const WRITES: &str = "echo new > /root/new.txt && echo changed > /etc/debian_version \
                      && rm /etc/issue.net && head -c 8388608 /dev/urandom > /var/tmp/big \
                      && echo written";

#[test]
fn container_writes_land_in_its_upper_layer_not_in_the_lower_or_the_cache() {
    require_root_and_fuse();
    let runtime = "crun";
    lazy_tests::mount::require_runtime(runtime);
    let _serial = serial();
    let (_registry, image) = python_image_in_registry();
    let agent = Lazyd::start(AGENT_CONFIG).unwrap();
    let work = tempfile::tempdir().unwrap();

    // Another container of the image, held for the whole test, keeps the lower mounted; the
    // warm puts the whole image in the cache, so nothing below has a reason to fetch.
    let held = work.path().join("held");
    std::fs::create_dir(&held).unwrap();
    agent.ctl_ok([
        OsString::from("mount"),
        "--rootfs".into(),
        "--name".into(),
        "held".into(),
        image.clone().into(),
        held.clone().into(),
    ]);
    agent.ctl_ok(["warm", "--no-progress", &image]);
    let before = agent.status();
    let containers = array(&before, "containers");
    assert_eq!(containers.len(), 1, "{}", before["containers"]);
    let lower = PathBuf::from(containers[0]["lower"].as_str().unwrap());
    let hex = containers[0]["manifest_digest"]
        .as_str()
        .unwrap()
        .trim_start_matches("sha256:")
        .to_string();
    assert_eq!(lower, agent.state_dir().join("lower").join(&hex));
    let original = std::fs::read_to_string(lower.join("etc/debian_version")).unwrap();
    assert!(original.starts_with("12."), "{original}");
    assert!(lower.join("etc/issue.net").exists());

    let out = run(
        &agent,
        runtime,
        &["--keep", "--name", "writer"],
        &image,
        &["sh", "-c", WRITES],
    );
    assert!(out.status.success(), "{}", describe(&out));
    assert_eq!(stdout(&out), "written\n");
    let dir = agent.state_dir().join("containers/writer");
    let upper = dir.join("upper");
    assert!(
        stderr(&out).contains(&upper.display().to_string()),
        "--keep did not name the upper layer {}: {}",
        upper.display(),
        describe(&out)
    );

    // The bundle's spec (with any --env values) and the container's directory are root's.
    use std::os::unix::fs::PermissionsExt;
    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&dir.join("bundle/config.json")), 0o600);
    assert_eq!(mode(&dir.join("bundle")), 0o700);
    assert_eq!(mode(&dir), 0o700);

    // The upper layer holds every write, the deletion as a whiteout (a 0:0 character device).
    assert_eq!(
        std::fs::read_to_string(upper.join("root/new.txt")).unwrap(),
        "new\n"
    );
    assert_eq!(
        std::fs::read_to_string(upper.join("etc/debian_version")).unwrap(),
        "changed\n"
    );
    assert_eq!(
        std::fs::metadata(upper.join("var/tmp/big")).unwrap().len(),
        8 << 20
    );
    {
        use std::os::unix::fs::{FileTypeExt, MetadataExt};
        let whiteout = std::fs::symlink_metadata(upper.join("etc/issue.net")).unwrap();
        assert!(
            whiteout.file_type().is_char_device() && whiteout.rdev() == 0,
            "etc/issue.net in the upper layer is not a whiteout: {whiteout:?}"
        );
    }

    // The lower mount shows the image as it was, and refuses writes.
    assert_eq!(
        std::fs::read_to_string(lower.join("etc/debian_version")).unwrap(),
        original
    );
    assert!(!lower.join("root/new.txt").exists());
    assert!(!lower.join("var/tmp/big").exists());
    assert!(lower.join("etc/issue.net").exists());
    let err = std::fs::write(lower.join("root/direct.txt"), "x").unwrap_err();
    println!("writing to the lower mount directly: {err}");
    // The held container sees none of it.
    assert_eq!(
        std::fs::read_to_string(held.join("etc/debian_version")).unwrap(),
        original
    );
    assert!(!held.join("root/new.txt").exists());
    assert!(held.join("etc/issue.net").exists());

    // The cache and the backend: not a byte more.
    let after = agent.status();
    for path in [
        "/metrics/cache/entries",
        "/metrics/cache/bytes_used",
        "/metrics/cache/inserts",
    ] {
        assert_eq!(
            counter(&after, path),
            counter(&before, path),
            "{path} changed while a container wrote 8 MiB"
        );
    }
    assert_eq!(backend_bytes(&after), backend_bytes(&before));
    println!(
        "cache: {} entries, {} bytes before and after the writes",
        counter(&after, "/metrics/cache/entries"),
        counter(&after, "/metrics/cache/bytes_used")
    );

    // The next container of the image starts from the image, not from the kept writes.
    let out = run_ok(
        &agent,
        runtime,
        &[],
        &image,
        &[
            "sh",
            "-c",
            "cat /etc/debian_version; test -e /root/new.txt && echo leaked || echo absent; \
             test -e /etc/issue.net && echo present",
        ],
    );
    assert_eq!(out, format!("{original}absent\npresent\n"));
    // The kept container's name stays taken while its directory is there.
    let out = run(&agent, runtime, &["--name", "writer"], &image, &["true"]);
    assert!(
        !out.status.success(),
        "a kept name was reused: {}",
        describe(&out)
    );
    println!("name of a kept container again: {}", stderr(&out).trim());
    assert!(
        upper.join("root/new.txt").exists(),
        "the kept upper layer was touched"
    );

    agent.ctl_ok([OsString::from("umount"), held.into()]);
    std::fs::remove_dir_all(&dir).unwrap();
    assert_nothing_left(&agent);
}

/// Waits for the children on drop, so that a failing test does not leave containers running
/// behind the agent's stop.
struct Children(Vec<(String, Child)>);

impl Drop for Children {
    fn drop(&mut self) {
        for (_, child) in &mut self.0 {
            let _ = child.wait();
        }
    }
}

/// Each container leaves a marker in the shared volume and waits (up to 60 s) until all three
/// are there, so that they run at the same time; then it reads the image.
fn overlapping_script(name: &str) -> String {
    format!(
        "touch /shared/{name}; i=0; \
         while [ $(ls /shared | wc -l) -lt 3 ] && [ $i -lt 600 ]; do sleep 0.1; i=$((i+1)); done; \
         ls /shared | wc -l; cat /etc/debian_version; python3 -c 'import json; print(json.dumps(1))'; \
         sleep 2"
    )
}

#[test]
fn three_containers_of_one_image_share_one_lower_mount_and_one_cache() {
    require_root_and_fuse();
    let runtime = "crun";
    lazy_tests::mount::require_runtime(runtime);
    let _serial = serial();
    let (_registry, image) = python_image_in_registry();

    // One container alone, on its own agent: the bytes one start fetches.
    let single = {
        let agent = Lazyd::start(AGENT_CONFIG).unwrap();
        let shared = tempfile::tempdir().unwrap();
        for name in ["a", "b"] {
            std::fs::write(shared.path().join(name), "").unwrap();
        }
        let volume = format!("{}:/shared", shared.path().display());
        let out = run_ok(
            &agent,
            runtime,
            &["-v", &volume],
            &image,
            &["sh", "-c", &overlapping_script("alone")],
        );
        assert!(out.starts_with("3\n12."), "{out}");
        backend_bytes(&agent.status())
    };

    let agent = Lazyd::start(AGENT_CONFIG).unwrap();
    let shared = tempfile::tempdir().unwrap();
    let volume = format!("{}:/shared", shared.path().display());
    let names = ["c1", "c2", "c3"];
    let mut children = Children(
        names
            .iter()
            .map(|name| {
                let script = overlapping_script(name);
                let child = run_command(
                    &agent,
                    runtime,
                    &["--name", name, "-v", &volume],
                    &image,
                    &["sh", "-c", &script],
                )
                .spawn()
                .unwrap();
                (name.to_string(), child)
            })
            .collect(),
    );

    // All three have started (their markers are there) and still run (they sleep 2 s).
    let start = Instant::now();
    while std::fs::read_dir(shared.path()).unwrap().count() < 3 {
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "the three containers did not all start: {:?}",
            std::fs::read_dir(shared.path())
                .unwrap()
                .collect::<Vec<_>>()
        );
        for (name, child) in &mut children.0 {
            if let Some(status) = child.try_wait().unwrap() {
                panic!("container {name} ended early with {status}");
            }
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let status = agent.status();
    let containers = array(&status, "containers");
    let mounts = array(&status, "mounts");
    let lower_mounts = mounts_under(&agent.state_dir().join("lower"), "fuse");
    let overlays = mounts_under(&agent.state_dir().join("containers"), "overlay");
    println!(
        "while three containers run: {} containers, {} agent mounts, lower FUSE mounts {lower_mounts:?}, overlays {overlays:?}",
        containers.len(),
        mounts.len()
    );
    assert_eq!(containers.len(), 3, "{}", status["containers"]);
    assert_eq!(
        mounts.len(),
        1,
        "one lower mount expected: {}",
        status["mounts"]
    );
    assert_eq!(lower_mounts.len(), 1, "{lower_mounts:?}");
    assert_eq!(overlays.len(), 3, "{overlays:?}");
    let lower = mounts[0]["mountpoint"].as_str().unwrap();
    assert_eq!(Path::new(lower), lower_mounts[0]);
    for c in &containers {
        assert_eq!(c["lower"].as_str(), Some(lower), "{c}");
    }

    for (name, child) in std::mem::take(&mut children.0) {
        let out = child.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "container {name} failed with {}:\n{}",
            out.status,
            describe(&out)
        );
        let text = stdout(&out);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 3, "{name}: {text}");
        assert_eq!(
            lines[0], "3",
            "{name} did not see the other two start: {text}"
        );
        assert!(lines[1].starts_with("12."), "{name}: {text}");
        assert_eq!(lines[2], "1", "{name}: {text}");
    }
    let three = backend_bytes(&agent.status());
    println!(
        "bytes from the registry: {single} for one container, {three} for three at once ({:.2}x)",
        three as f64 / single as f64
    );
    assert!(single > 0);
    // One cache: the three fetch about what one does, not three times that.
    assert!(
        three <= single + single / 4,
        "three containers fetched {three} bytes, one alone {single}: not one shared cache"
    );
    assert_nothing_left(&agent);
}

#[test]
fn mount_rootfs_prepares_a_writable_overlay_and_umount_removes_it() {
    require_root_and_fuse();
    let _serial = serial();
    let (_registry, image) = python_image_in_registry();
    let agent = Lazyd::start(AGENT_CONFIG).unwrap();
    let work = tempfile::tempdir().unwrap();
    let dir = work.path().join("rootfs");
    std::fs::create_dir(&dir).unwrap();

    let out = agent.ctl_ok([
        OsString::from("mount"),
        "--rootfs".into(),
        "--name".into(),
        "tools".into(),
        image.clone().into(),
        dir.clone().into(),
    ]);
    println!("{}", stdout(&out));
    let at = mounts_at(&dir).unwrap();
    assert!(
        at.iter().any(|m| m.fs_type == "overlay"),
        "no overlay at {}: {at:?}",
        dir.display()
    );
    let status = agent.status();
    let containers = array(&status, "containers");
    assert_eq!(containers.len(), 1, "{}", status["containers"]);
    assert_eq!(containers[0]["name"], "tools");
    assert_eq!(
        containers[0]["rootfs"].as_str(),
        Some(dir.to_str().unwrap())
    );
    let upper = PathBuf::from(containers[0]["upper"].as_str().unwrap());
    assert_eq!(upper, agent.state_dir().join("containers/tools/upper"));

    // Writable; the write lands in the upper layer.
    std::fs::write(dir.join("root/hello.txt"), "hello\n").unwrap();
    assert_eq!(
        std::fs::read_to_string(dir.join("root/hello.txt")).unwrap(),
        "hello\n"
    );
    assert_eq!(
        std::fs::read_to_string(upper.join("root/hello.txt")).unwrap(),
        "hello\n"
    );
    // A usable root: chroot runs the image's shell and python3, which see the write.
    let out = Command::new("chroot")
        .arg(&dir)
        .args([
            "/bin/sh",
            "-c",
            "echo ok; cat /root/hello.txt; python3 -c 'print(6 * 7)'",
        ])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", describe(&out));
    assert_eq!(stdout(&out), "ok\nhello\n42\n");

    agent.ctl_ok([OsString::from("umount"), dir.clone().into()]);
    assert!(
        mounts_at(&dir).unwrap().is_empty(),
        "{} still mounted",
        dir.display()
    );
    assert!(dir.is_dir(), "the caller's directory was removed");
    assert_eq!(
        std::fs::read_dir(&dir).unwrap().count(),
        0,
        "{} is not empty",
        dir.display()
    );
    assert!(!upper.exists(), "the upper layer was kept");
    assert_nothing_left(&agent);
}

#[test]
fn the_lower_lingers_after_its_last_container_serves_the_next_one_and_then_goes() {
    require_root_and_fuse();
    lazy_tests::mount::require_runtime("runc");
    let _serial = serial();
    let (_registry, image) = python_image_in_registry();
    let agent =
        Lazyd::start("[profile]\nrecord = false\n[mount]\nlower_linger = \"3s\"\n").unwrap();
    let script = "import json; print(json.dumps([1]))";
    assert_eq!(
        run_ok(&agent, "runc", &[], &image, &["python3", "-c", script]),
        "[1]\n"
    );
    // The container is gone; its lower stays, with its pages and entries in the kernel's caches.
    let status = agent.status();
    assert!(array(&status, "containers").is_empty());
    let mounts = array(&status, "mounts");
    assert_eq!(
        mounts.len(),
        1,
        "the lower went with its container: {mounts:?}"
    );
    let reads = counter(&status, "/metrics/chunks/reads");
    let lookups = |s: &Value| {
        s["metrics"]["fuse"]["ops"]
            .as_array()
            .and_then(|ops| ops.iter().find(|o| o["op"] == "lookup"))
            .map_or(0, |o| o["count"].as_u64().unwrap())
    };
    let looked_up = lookups(&status);
    // The next container of the image uses it: nothing is mounted again, and the files the
    // first one read come from the kernel's caches.
    assert_eq!(
        run_ok(&agent, "runc", &[], &image, &["python3", "-c", script]),
        "[1]\n"
    );
    let status = agent.status();
    assert_eq!(
        agent.log().matches("mounted in").count(),
        1,
        "the lower was mounted again"
    );
    assert_eq!(
        counter(&status, "/metrics/chunks/reads"),
        reads,
        "the second start read chunks again"
    );
    assert!(
        lookups(&status) < looked_up + 20,
        "the second start looked up {} names again",
        lookups(&status) - looked_up
    );
    // Then, with no container for the linger, it goes.
    let start = Instant::now();
    while !array(&agent.status(), "mounts").is_empty() {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "the lower did not go after its linger"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(agent
        .log()
        .contains("unmounting a lower no container or holder used"));
    assert_nothing_left(&agent);
}
