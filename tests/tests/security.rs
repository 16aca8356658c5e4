//! End-to-end tests of what lazyd, running as root, lets other local users do (docs/SECURITY.md):
//!
//! - plain mounts are `nosuid,nodev`: an image's setuid-root binary runs as its caller and an
//!   image's device node does not open; `--suid` opts back in (which shows the test can fail);
//! - lazyd's state and cache directories, the containers' directories and their writable layers
//!   are root's alone: another user reaches none of them, whatever a container wrote there;
//! - two mounts at one path at once: one is refused, nothing stacks;
//! - a slow registry does not hold up other containers' create and remove, and an image that
//!   cannot be opened within `mount.open_timeout` fails with a message saying so.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use lazy_tests::agent::Lazyd;
use lazy_tests::mount::{lazyctl_ok, mountpoint, mounts_at, require_root_and_fuse};
use lazy_tests::proxy::DelayProxy;
use lazy_tests::registry::LocalRegistry;

/// `nobody`: a local user with no rights to anything of lazyd's.
const NOBODY: &str = "65534";

/// Runs `program args` as `nobody` (no supplementary groups).
fn as_nobody(program: &Path, args: &[&str]) -> Output {
    Command::new("setpriv")
        .args(["--reuid", NOBODY, "--regid", NOBODY, "--clear-groups"])
        .arg(program)
        .args(args)
        .output()
        .expect("setpriv runs")
}

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path).unwrap().permissions().mode() & 0o7777
}

/// A directory tree with a setuid-root copy of `id`, a character device (`null`) anyone may
/// open, and a plain file, converted to the local store `work/store`; returns the image.
fn hostile_image(work: &Path) -> String {
    let src = work.join("src");
    std::fs::create_dir_all(src.join("bin")).unwrap();
    std::fs::create_dir_all(src.join("dev")).unwrap();
    let id = src.join("bin/id");
    std::fs::copy("/usr/bin/id", &id).unwrap();
    std::os::unix::fs::chown(&id, Some(0), Some(0)).unwrap();
    std::fs::set_permissions(&id, std::fs::Permissions::from_mode(0o4755)).unwrap();
    let null = std::ffi::CString::new(src.join("dev/null").to_str().unwrap()).unwrap();
    // SAFETY: a valid NUL-terminated path; makedev(1, 3) is the host's /dev/null.
    let made = unsafe { libc::mknod(null.as_ptr(), libc::S_IFCHR | 0o666, libc::makedev(1, 3)) };
    assert_eq!(made, 0, "mknod: {}", std::io::Error::last_os_error());
    std::fs::write(src.join("hello"), "hello\n").unwrap();
    let store = work.join("store");
    lazyctl_ok([
        "convert",
        "--no-progress",
        &format!("path:{}", src.display()),
        &format!("dir:{}:v1", store.display()),
    ]);
    format!("dir:{}:v1", store.display())
}

#[test]
fn plain_mounts_are_nosuid_and_nodev_unless_asked() {
    require_root_and_fuse();
    let work = tempfile::tempdir().unwrap();
    let image = hostile_image(work.path());
    let mut agent = Lazyd::start("").unwrap();

    let mnt = mountpoint(work.path(), "mnt");
    agent.mount(&image, &mnt);
    let options = &mounts_at(&mnt).unwrap()[0].options;
    assert!(
        options.split(',').any(|o| o == "nosuid") && options.split(',').any(|o| o == "nodev"),
        "mount options {options}"
    );
    // Other users may use the mount (allow_other) ...
    let out = as_nobody(
        Path::new("/bin/cat"),
        &[mnt.join("hello").to_str().unwrap()],
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout), "hello\n", "{out:?}");
    // ... but the image's setuid-root binary runs as them, not as root.
    let out = as_nobody(&mnt.join("bin/id"), &["-u"]);
    assert_eq!(String::from_utf8_lossy(&out.stdout), "65534\n", "{out:?}");
    // And its device node does not open, even for root.
    let err = std::fs::File::open(mnt.join("dev/null")).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EACCES), "{err}");

    // `--suid`: the operator asks for the image's setuid bits (a runtime's rootfs).
    let suid = mountpoint(work.path(), "suid");
    agent.ctl_ok(["mount", "--suid", &image, suid.to_str().unwrap()]);
    let options = &mounts_at(&suid).unwrap()[0].options;
    assert!(!options.split(',').any(|o| o == "nosuid"), "{options}");
    let out = as_nobody(&suid.join("bin/id"), &["-u"]);
    assert_eq!(String::from_utf8_lossy(&out.stdout), "0\n", "{out:?}");
    agent.ctl_ok(["umount", suid.to_str().unwrap()]);
}

#[test]
fn state_cache_and_container_layers_are_unreachable_by_other_users() {
    require_root_and_fuse();
    let work = tempfile::tempdir().unwrap();
    let image = hostile_image(work.path());
    let agent = Lazyd::start("[mount]\nlower_linger = \"0s\"\n").unwrap();
    let rootfs = mountpoint(work.path(), "rootfs");
    agent.ctl_ok([
        "mount",
        "--rootfs",
        "--name",
        "sec-1",
        &image,
        rootfs.to_str().unwrap(),
    ]);
    // What a container's root could do: a setuid-root shell in its upper layer.
    let shell = rootfs.join("bin/sh-root");
    std::fs::copy("/bin/sh", &shell).unwrap();
    std::fs::set_permissions(&shell, std::fs::Permissions::from_mode(0o4755)).unwrap();

    let state = agent.state_dir();
    let container = state.join("containers/sec-1");
    let upper_shell = container.join("upper/bin/sh-root");
    assert!(upper_shell.exists(), "the write landed in the upper layer");
    for dir in [
        state.clone(),
        agent.cache_dir(),
        state.join("containers"),
        container.clone(),
        state.join("lower"),
    ] {
        assert_eq!(mode(&dir), 0o700, "{}", dir.display());
    }
    for path in [&upper_shell, &container.join("upper"), &state.join("lower")] {
        let out = as_nobody(Path::new("/usr/bin/stat"), &[path.to_str().unwrap()]);
        assert!(
            !out.status.success()
                && String::from_utf8_lossy(&out.stderr).contains("Permission denied"),
            "{} reachable: {out:?}",
            path.display()
        );
    }
    agent.ctl_ok(["umount", rootfs.to_str().unwrap()]);
}

#[test]
fn two_mounts_at_one_path_at_once_do_not_stack() {
    require_root_and_fuse();
    let work = tempfile::tempdir().unwrap();
    let registry = LocalRegistry::start().unwrap();
    let image = hostile_image(work.path());
    let remote = format!("docker://{}/sec/two:v1", registry.host());
    lazyctl_ok(["push", &image, &remote]);
    // Each request takes 300 ms: both mounts are being made at the same time.
    let proxy = DelayProxy::start(&registry.host(), Duration::from_millis(300)).unwrap();
    let slow = format!("docker://{}/sec/two:v1", proxy.host());
    let agent = Lazyd::start("").unwrap();
    let mnt = mountpoint(work.path(), "mnt");
    let outs: Vec<Output> = std::thread::scope(|s| {
        let both: Vec<_> = (0..2)
            .map(|_| s.spawn(|| agent.ctl(["mount", &slow, mnt.to_str().unwrap()])))
            .collect();
        both.into_iter().map(|t| t.join().unwrap()).collect()
    });
    let mounted = outs.iter().filter(|o| o.status.success()).count();
    assert_eq!(mounted, 1, "{outs:?}");
    let refused = outs.iter().find(|o| !o.status.success()).unwrap();
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("being made already"),
        "{refused:?}"
    );
    assert_eq!(mounts_at(&mnt).unwrap().len(), 1, "one mount at the path");
    agent.ctl_ok(["umount", mnt.to_str().unwrap()]);
    assert!(mounts_at(&mnt).unwrap().is_empty());
}

#[test]
fn a_slow_registry_holds_up_no_other_container_and_times_out_clearly() {
    require_root_and_fuse();
    let work = tempfile::tempdir().unwrap();
    let registry = LocalRegistry::start().unwrap();
    let image = hostile_image(work.path());
    let remote = format!("docker://{}/sec/slow:v1", registry.host());
    lazyctl_ok(["push", &image, &remote]);
    // Every request waits 2 s: opening the image (manifest, referrers, index) takes seconds.
    let proxy = DelayProxy::start(&registry.host(), Duration::from_secs(2)).unwrap();
    let slow = format!("docker://{}/sec/slow:v1", proxy.host());
    let agent = Lazyd::start("[mount]\nlower_linger = \"0s\"\n").unwrap();

    let slow_root = mountpoint(work.path(), "slow");
    let fast_root = mountpoint(work.path(), "fast");
    let (slow_out, fast_took, slow_took) = std::thread::scope(|s| {
        let started = Instant::now();
        let (agent, slow, slow_root) = (&agent, &slow, &slow_root);
        let slow_create = s.spawn(move || {
            let out = agent.ctl(["mount", "--rootfs", slow, slow_root.to_str().unwrap()]);
            (out, started.elapsed())
        });
        std::thread::sleep(Duration::from_millis(300));
        // Another container of a local image, created and removed while the slow one opens.
        let fast = Instant::now();
        agent.ctl_ok(["mount", "--rootfs", &image, fast_root.to_str().unwrap()]);
        agent.ctl_ok(["umount", fast_root.to_str().unwrap()]);
        let fast_took = fast.elapsed();
        let (out, slow_took) = slow_create.join().unwrap();
        (out, fast_took, slow_took)
    });
    assert!(slow_out.status.success(), "{slow_out:?}");
    assert!(
        fast_took + Duration::from_millis(300) < slow_took,
        "the local container ({fast_took:?}) waited for the slow one ({slow_took:?})"
    );
    agent.ctl_ok(["umount", slow_root.to_str().unwrap()]);
    drop(agent);

    // With a deadline shorter than the registry's answers: a clear error, in time.
    let agent =
        Lazyd::start("[mount]\nopen_timeout = \"1s\"\n[fetch]\nresolve_ttl = \"0s\"\n").unwrap();
    let started = Instant::now();
    let out = agent.ctl(["mount", "--rootfs", &slow, slow_root.to_str().unwrap()]);
    let took = started.elapsed();
    assert!(!out.status.success(), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("open_timeout"),
        "{out:?}"
    );
    assert!(took < Duration::from_secs(10), "refused after {took:?}");
}

#[test]
fn a_store_truncated_under_a_mount_gives_eio_not_sigbus() {
    require_root_and_fuse();
    let work = tempfile::tempdir().unwrap();
    let src = work.path().join("src");
    std::fs::create_dir_all(&src).unwrap();
    let files: Vec<(String, Vec<u8>)> = (0..40)
        .map(|i| {
            (
                format!("f{i:02}"),
                lazy_tests::pseudo_random_bytes(i, 300_000),
            )
        })
        .collect();
    for (name, bytes) in &files {
        std::fs::write(src.join(name), bytes).unwrap();
    }
    let store = work.path().join("store");
    lazyctl_ok([
        "convert",
        "--no-progress",
        &format!("path:{}", src.display()),
        &format!("dir:{}:v1", store.display()),
    ]);
    let mut agent = Lazyd::start("").unwrap();
    let mnt = mountpoint(work.path(), "mnt");
    agent.mount(&format!("dir:{}:v1", store.display()), &mnt);
    assert_eq!(std::fs::read(mnt.join("f00")).unwrap(), files[0].1);

    // Whoever can write the store truncates every blob in it (the index and the data).
    for blob in std::fs::read_dir(store.join("blobs/sha256")).unwrap() {
        let blob = blob.unwrap().path();
        std::fs::OpenOptions::new()
            .write(true)
            .open(&blob)
            .unwrap()
            .set_len(0)
            .unwrap();
    }
    let mut eio = 0;
    for (name, bytes) in &files[1..] {
        // Metadata comes from the index lazyd holds; data from the blobs, now gone.
        assert_eq!(
            std::fs::metadata(mnt.join(name)).unwrap().len(),
            bytes.len() as u64
        );
        match std::fs::read(mnt.join(name)) {
            Ok(read) => assert_eq!(&read, bytes, "{name}: served from a cache, unchanged"),
            Err(e) => {
                assert_eq!(e.raw_os_error(), Some(libc::EIO), "{name}: {e}");
                eio += 1;
            }
        }
    }
    assert!(eio > 0, "the truncated blobs were read");
    // lazyd is alive and answers.
    agent.status();
}
