//! lazyd under systemd's file descriptor store, with this test playing systemd: the service
//! manager's side of the protocol (a `NOTIFY_SOCKET` taking `FDSTORE=1`/`FDNAME=` with the
//! descriptor, `FDSTOREREMOVE=1`, `READY=1`; `$FDSTORE`; the stored descriptors handed to the
//! next start as `LISTEN_FDS`, `LISTEN_FDNAMES` and `LISTEN_PID`) as systemd.service(5) and
//! sd_notify(3) describe it. The machine these tests run on has no systemd as PID 1; lazyd's own
//! supervisor, which speaks the same protocol, is tested end to end in survive.rs.

use std::collections::BTreeMap;
use std::io::IoSliceMut;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::FileExt;
use std::os::unix::net::UnixDatagram;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use lazy_tests::agent::lazyd_path;
use lazy_tests::mount::{lazyctl_path, mountpoint, require_root_and_fuse};
use lazy_tests::random_files::RandomFiles;

/// The service manager's end of the notification socket, and its descriptor store.
struct Manager {
    socket: UnixDatagram,
    path: PathBuf,
    store: std::cell::RefCell<BTreeMap<String, OwnedFd>>,
}

/// One notification: its `KEY=VALUE` lines (its descriptors go to the store).
struct Notification {
    fields: BTreeMap<String, String>,
}

impl Manager {
    fn new(dir: &Path) -> Manager {
        let path = dir.join("notify.sock");
        let socket = UnixDatagram::bind(&path).unwrap();
        socket
            .set_read_timeout(Some(Duration::from_millis(200)))
            .unwrap();
        Manager {
            socket,
            path,
            store: Default::default(),
        }
    }

    fn receive(&self) -> Option<Notification> {
        let mut buf = vec![0u8; 16 * 1024];
        let mut iov = [IoSliceMut::new(&mut buf)];
        let mut space = nix::cmsg_space!([RawFd; 16]);
        let msg = nix::sys::socket::recvmsg::<nix::sys::socket::UnixAddr>(
            self.socket.as_raw_fd(),
            &mut iov,
            Some(&mut space),
            nix::sys::socket::MsgFlags::MSG_CMSG_CLOEXEC,
        )
        .ok()?;
        let mut fds = Vec::new();
        for cmsg in msg.cmsgs().unwrap() {
            if let nix::sys::socket::ControlMessageOwned::ScmRights(raw) = cmsg {
                // SAFETY: the kernel installed these descriptors for this process.
                fds.extend(
                    raw.into_iter()
                        .map(|fd| unsafe { OwnedFd::from_raw_fd(fd) }),
                );
            }
        }
        let len = msg.bytes;
        let fields: BTreeMap<String, String> = String::from_utf8_lossy(&buf[..len])
            .lines()
            .filter_map(|l| l.split_once('='))
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        // What the service manager does with its store.
        let is = |key: &str| fields.get(key).map(String::as_str) == Some("1");
        if let Some(name) = fields.get("FDNAME") {
            if is("FDSTORE") {
                assert_eq!(fds.len(), 1, "FDSTORE of {name} with {} fds", fds.len());
                let fd = fds.into_iter().next().expect("one descriptor");
                self.store.borrow_mut().insert(name.clone(), fd);
            } else if is("FDSTOREREMOVE") {
                self.store.borrow_mut().remove(name);
            }
        }
        Some(Notification { fields })
    }

    /// The names in the store.
    fn names(&self) -> Vec<String> {
        self.store.borrow().keys().cloned().collect()
    }

    /// Waits for a notification with `key=value` (every earlier one still updates the store).
    fn wait_for(&self, key: &str, value: &str) -> Notification {
        let start = Instant::now();
        loop {
            assert!(
                start.elapsed() < Duration::from_secs(60),
                "no {key}={value} from lazyd"
            );
            let Some(n) = self.receive() else { continue };
            if n.fields.get(key).map(String::as_str) == Some(value) {
                return n;
            }
        }
    }
}

/// Starts lazyd as systemd would: with the notification socket, `$FDSTORE`, and the store's
/// descriptors as 3.. named by `LISTEN_FDNAMES`, `LISTEN_PID` being lazyd's own pid.
fn start(root: &Path, manager: &Manager) -> Child {
    let store = manager.store.borrow();
    let names: Vec<&str> = store.keys().map(String::as_str).collect();
    let raw: Vec<RawFd> = store.values().map(|fd| fd.as_raw_fd()).collect();
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(root.join("lazyd.log"))
        .unwrap();
    let mut command = Command::new("sh");
    // `exec` keeps the shell's pid, so $$ is lazyd's pid.
    command
        .arg("-c")
        .arg(r#"LISTEN_PID=$$ exec "$0" --config "$1""#)
        .arg(lazyd_path())
        .arg(root.join("config.toml"))
        .env("NOTIFY_SOCKET", &manager.path)
        .env("FDSTORE", "16")
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log);
    if !raw.is_empty() {
        command
            .env("LISTEN_FDS", raw.len().to_string())
            .env("LISTEN_FDNAMES", names.join(":"));
    }
    // SAFETY: only dup2 and fcntl, which are async-signal-safe, run between fork and exec.
    unsafe {
        command.pre_exec(move || {
            let base = 3 + raw.len() as RawFd + 16;
            let moved: Vec<RawFd> = raw
                .iter()
                .map(|&fd| libc::fcntl(fd, libc::F_DUPFD, base))
                .collect();
            for (i, &fd) in moved.iter().enumerate() {
                if fd < 0 || libc::dup2(fd, 3 + i as RawFd) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
    command.spawn().unwrap()
}

fn ctl(root: &Path, args: &[&str]) -> String {
    let out = Command::new(lazyctl_path())
        .arg("--socket")
        .arg(root.join("lazyd.sock"))
        .args(args)
        .output()
        .unwrap();
    assert!(out.status.success(), "lazyctl {args:?}: {out:?}");
    String::from_utf8(out.stdout).unwrap()
}

fn status(root: &Path) -> serde_json::Value {
    serde_json::from_str(&ctl(root, &["status", "--json"])).unwrap()
}

/// Reads 64 KiB at ever-changing offsets of every file, checks the bytes, and drops the pages
/// again so that the next read of them reaches lazyd; counts reads and failures, and the
/// longest wait for one read.
fn reader(
    files: Arc<RandomFiles>,
    mnt: PathBuf,
    stop: Arc<AtomicBool>,
    counters: Arc<[AtomicU64; 3]>,
) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        let expected: Vec<Vec<u8>> = (0..files.count()).map(|i| files.bytes(i)).collect();
        let mut n = 0usize;
        while !stop.load(Ordering::Relaxed) {
            let i = n % files.count();
            let offset = (n * 7919 * 4096) % (files.size() - 65536);
            let started = Instant::now();
            let result = std::fs::File::open(mnt.join(RandomFiles::name(i))).and_then(|f| {
                let mut buf = vec![0u8; 65536];
                f.read_exact_at(&mut buf, offset as u64)?;
                // SAFETY: fadvise on an open descriptor.
                unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
                Ok(buf)
            });
            let waited = started.elapsed().as_micros() as u64;
            counters[2].fetch_max(waited, Ordering::Relaxed);
            match result {
                Ok(buf) if buf[..] == expected[i][offset..offset + 65536] => {
                    counters[0].fetch_add(1, Ordering::Relaxed);
                }
                Ok(_) => panic!("wrong bytes from blob{i} at {offset}"),
                Err(e) => {
                    eprintln!("read of blob{i} at {offset} failed: {e}");
                    counters[1].fetch_add(1, Ordering::Relaxed);
                }
            }
            n += 1;
        }
    })
}

#[test]
fn mounts_survive_a_kill_through_systemds_descriptor_store() {
    require_root_and_fuse();
    let work = tempfile::tempdir().unwrap();
    let files = Arc::new(RandomFiles::write(work.path(), "files", 16, 4 << 20));
    let store = work.path().join("store");
    files.convert(&format!("dir:{}:v1", store.display()), &[]);
    let root = work.path().join("agent");
    std::fs::create_dir_all(&root).unwrap();
    std::fs::write(
        root.join("config.toml"),
        format!(
            "socket = {:?}\nstate_dir = {:?}\ncache_dir = {:?}\n",
            root.join("lazyd.sock"),
            root.join("state"),
            root.join("cache")
        ),
    )
    .unwrap();
    let manager = Manager::new(work.path());
    let mut lazyd = start(&root, &manager);
    manager.wait_for("READY", "1");
    assert_eq!(status(&root)["holder"], "systemd");
    // The control socket is stored too: connections made during a restart wait in its queue.
    assert_eq!(manager.names(), ["lazyd-api"]);

    let mnt = mountpoint(work.path(), "mnt");
    ctl(
        &root,
        &[
            "mount",
            &format!("dir:{}:v1", store.display()),
            mnt.to_str().unwrap(),
        ],
    );
    let stored = manager.wait_for("FDSTORE", "1");
    let name = stored.fields["FDNAME"].clone();
    assert!(name.starts_with("lazyd-mount-"), "{name}");

    // Held open across the restarts: the kernel keeps asking with the inode number (and file
    // handle) the first lazyd gave it, which must mean the same file to the next ones.
    let held_file = std::fs::File::open(mnt.join(RandomFiles::name(3))).unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let counters: Arc<[AtomicU64; 3]> = Arc::new(Default::default());
    let reading = reader(files.clone(), mnt.clone(), stop.clone(), counters.clone());
    std::thread::sleep(Duration::from_secs(1));
    for round in 1..=3 {
        // A crash: the service manager keeps the store and starts the unit again.
        lazyd.kill().unwrap();
        lazyd.wait().unwrap();
        let before = counters[0].load(Ordering::Relaxed);
        lazyd = start(&root, &manager);
        manager.wait_for("READY", "1");
        std::thread::sleep(Duration::from_millis(700));
        assert!(
            counters[0].load(Ordering::Relaxed) > before,
            "no read completed after restart {round}"
        );
        // SAFETY: fadvise on an open descriptor; the next read then reaches lazyd.
        unsafe { libc::posix_fadvise(held_file.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
        let mut buf = vec![0u8; 1 << 20];
        let offset = round << 20;
        held_file.read_exact_at(&mut buf, offset as u64).unwrap();
        assert!(
            buf == files.bytes(3)[offset..offset + (1 << 20)],
            "a file opened before restart {round} reads wrong bytes after it"
        );
        let s = status(&root);
        assert_eq!(s["restarts"], round, "{s}");
        assert_eq!(s["mounts"][0]["restarts_survived"], round, "{s}");
    }
    stop.store(true, Ordering::Relaxed);
    reading.join().unwrap();
    drop(held_file);
    let (reads, failed, longest) = (
        counters[0].load(Ordering::Relaxed),
        counters[1].load(Ordering::Relaxed),
        counters[2].load(Ordering::Relaxed),
    );
    eprintln!("{reads} reads, {failed} failed, longest {longest} us");
    assert_eq!(failed, 0, "reads failed across the kills");
    assert!(reads > 100, "only {reads} reads");

    // A gentle stop: the mount is unmounted and its descriptor dropped from the store.
    // SAFETY: kill has no memory effects.
    unsafe { libc::kill(lazyd.id() as libc::pid_t, libc::SIGUSR1) };
    manager.wait_for("X_LAZYD_EXIT", "1");
    assert!(lazyd.wait().unwrap().success());
    while manager.receive().is_some() {}
    assert!(
        manager.names().is_empty(),
        "left in the store: {:?}",
        manager.names()
    );
    assert!(!lazy_tests::mount::is_fuse_mounted(&mnt).unwrap());
}
