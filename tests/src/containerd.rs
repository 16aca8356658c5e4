//! A private containerd for a test, and the `lazy-snapshotter` it uses as a proxy plugin.
//!
//! [`Containerd::start`] runs Debian's `/usr/bin/containerd` (1.6) as a child with a config
//! (version 2) written here: its root, state, gRPC and ttrpc sockets all inside one temporary
//! directory, the CRI plugin disabled unless [`ContainerdOptions::cri`] asks for it, and, when
//! [`ContainerdOptions::snapshotter`] names a socket, `[proxy_plugins.lazyimg]`: the remote
//! snapshotter that `ctr ... --snapshotter lazyimg` and the CRI plugin then use. `ctr` and
//! `ctr-remote` run against it with `--address` and a namespace of the test's
//! ([`Containerd::ctr`], [`Containerd::ctr_ok`], [`Containerd::ctr_remote_ok`]). Its log is
//! shown when it fails to start, when a `*_ok` command fails and when a test panics.
//!
//! Dropping a [`Containerd`] kills its tasks, stops it (SIGTERM, then SIGKILL), kills the shims
//! it left (`containerd-shim-runc-v2 ... -address SOCKET`), unmounts what is still mounted under
//! its directory (container rootfs overlays, snapshot views) and removes the directory, so a
//! failing test leaves no process or mount behind.
//!
//! [`LazySnapshotter`] runs `lazy-snapshotter --root DIR --address SOCKET --lazyd-socket
//! LAZYD_SOCKET`: the binary is `$LAZY_SNAPSHOTTER`, else `lazy-snapshotter` beside `lazyctl`
//! (`cargo build -p lazy-snapshotter`). Its root and socket live in a temporary directory that
//! outlives [`LazySnapshotter::kill`] and [`LazySnapshotter::restart`], so a test can restart it
//! on the same state.

use std::ffi::{OsStr, OsString};
use std::fs;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::thread::sleep;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::mount::{lazyctl_path, parse_mountinfo};

/// The proxy plugin's name: what `--snapshotter` says to use lazy-snapshotter.
pub const SNAPSHOTTER: &str = "lazyimg";
/// The start of the containerd namespace a test's images, containers and snapshots live in;
/// each containerd has its own (the name of its directory follows), as runc's state
/// (`/run/containerd/runc/NAMESPACE/ID`) and the containers' cgroups are shared by every
/// containerd on the host, so two tests' containers of the same id must not meet.
const NAMESPACE_PREFIX: &str = "lazy-tests-";
/// How long containerd, or the snapshotter, may take to answer after it starts.
const START_TIMEOUT: Duration = Duration::from_secs(30);
/// How long either may take to exit after SIGTERM before it is killed.
const STOP_TIMEOUT: Duration = Duration::from_secs(10);
const POLL: Duration = Duration::from_millis(50);
/// Lines of containerd's log shown with a failing command.
const LOG_TAIL_LINES: usize = 60;

/// What the private containerd runs with.
#[derive(Clone, Debug, Default)]
pub struct ContainerdOptions {
    /// The socket of a snapshotter to register as the proxy plugin [`SNAPSHOTTER`].
    pub snapshotter: Option<PathBuf>,
    /// Load the CRI plugin, with [`SNAPSHOTTER`] as its snapshotter and snapshot annotations
    /// on (the labels a remote snapshotter needs); off by default, as it wants CNI and more.
    pub cri: bool,
    /// Registries (`HOST:PORT`) the CRI plugin reaches over plain HTTP (a mirror entry each).
    pub plain_http: Vec<String>,
}

/// The config file of a private containerd whose files all live in `dir`.
pub fn config_toml(dir: &Path, options: &ContainerdOptions) -> String {
    let mut text = format!(
        "version = 2\nroot = {:?}\nstate = {:?}\n",
        dir.join("root"),
        dir.join("state"),
    );
    if !options.cri {
        text.push_str("disabled_plugins = [\"io.containerd.grpc.v1.cri\"]\n");
    }
    text.push_str(&format!(
        "\n[grpc]\n  address = {:?}\n\n[ttrpc]\n  address = {:?}\n",
        grpc_socket(dir),
        dir.join("containerd.sock.ttrpc"),
    ));
    if let Some(socket) = &options.snapshotter {
        text.push_str(&format!(
            "\n[proxy_plugins.{SNAPSHOTTER}]\n  type = \"snapshot\"\n  address = {socket:?}\n"
        ));
    }
    if options.cri {
        // Keys of containerd 1.6's pkg/cri/config (`containerd config default` shows them).
        text.push_str(&format!(
            "\n[plugins.\"io.containerd.grpc.v1.cri\".containerd]\n  snapshotter = \"{SNAPSHOTTER}\"\n  \
             disable_snapshot_annotations = false\n"
        ));
        for host in &options.plain_http {
            text.push_str(&format!(
                "\n[plugins.\"io.containerd.grpc.v1.cri\".registry.mirrors.\"{host}\"]\n  \
                 endpoint = [\"http://{host}\"]\n"
            ));
        }
    }
    text
}

fn grpc_socket(dir: &Path) -> PathBuf {
    dir.join("containerd.sock")
}

/// A running private containerd.
pub struct Containerd {
    child: Option<Child>,
    namespace: String,
    dir: tempfile::TempDir,
}

impl Containerd {
    /// Writes the config, starts containerd and waits until `ctr version` answers.
    pub fn start(options: &ContainerdOptions) -> Result<Containerd> {
        let dir = tempfile::Builder::new().prefix("containerd-").tempdir()?;
        let config = dir.path().join("config.toml");
        fs::write(&config, config_toml(dir.path(), options))?;
        let log = fs::File::create(dir.path().join("containerd.log"))?;
        let child = Command::new("containerd")
            .arg("--config")
            .arg(&config)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("containerd not found in PATH; apt-get install -y containerd")?;
        let suffix = dir
            .path()
            .file_name()
            .and_then(|n| n.to_str()?.strip_prefix("containerd-"))
            .context("a containerd- temporary directory")?;
        let mut containerd = Containerd {
            child: Some(child),
            namespace: format!("{NAMESPACE_PREFIX}{suffix}"),
            dir,
        };
        let start = Instant::now();
        loop {
            if let Some(status) = containerd.child.as_mut().unwrap().try_wait()? {
                containerd.child = None;
                bail!(
                    "containerd exited with {status} at start; its log:\n{}",
                    containerd.log()
                );
            }
            if containerd.ctr(["version"]).status.success() {
                return Ok(containerd);
            }
            if start.elapsed() > START_TIMEOUT {
                bail!(
                    "containerd did not answer within {START_TIMEOUT:?}; its log:\n{}",
                    containerd.log()
                );
            }
            sleep(POLL);
        }
    }

    /// The directory holding its config, log, sockets, root and state.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The namespace `ctr` and `ctr-remote` run in here (`--namespace`).
    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    /// Its gRPC socket (`ctr --address`).
    pub fn address(&self) -> PathBuf {
        grpc_socket(self.dir.path())
    }

    /// Its root (content store, metadata, the built-in snapshotters' files).
    pub fn root(&self) -> PathBuf {
        self.dir.path().join("root")
    }

    /// Its state (task bundles and their rootfs mounts).
    pub fn state(&self) -> PathBuf {
        self.dir.path().join("state")
    }

    /// What it has logged so far.
    pub fn log(&self) -> String {
        fs::read(self.dir.path().join("containerd.log"))
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default()
    }

    /// The last [`LOG_TAIL_LINES`] lines of its log.
    pub fn log_tail(&self) -> String {
        let log = self.log();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(LOG_TAIL_LINES)..].join("\n")
    }

    /// `PROGRAM --address SOCKET --namespace NAMESPACE ARGS...`, stdin null.
    fn client(&self, program: &str, args: &[OsString]) -> Output {
        Command::new(program)
            .arg("--address")
            .arg(self.address())
            .args(["--namespace", &self.namespace])
            .args(args)
            .stdin(Stdio::null())
            .output()
            .unwrap_or_else(|e| panic!("cannot run {program}: {e}"))
    }

    fn client_ok(&self, program: &str, args: &[OsString]) -> String {
        let out = self.client(program, args);
        assert!(
            out.status.success(),
            "{program} {args:?} failed with {}:\n--- stdout ---\n{}--- stderr ---\n{}--- containerd log (tail) ---\n{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            self.log_tail()
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Runs `ctr` against this containerd.
    pub fn ctr<I, S>(&self, args: I) -> Output
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        self.client("ctr", &os_args(args))
    }

    /// Runs `ctr` against this containerd; panics with its output and containerd's log tail
    /// unless it succeeded; returns its stdout.
    pub fn ctr_ok<I, S>(&self, args: I) -> String
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        self.client_ok("ctr", &os_args(args))
    }

    /// Runs `ctr-remote` (stargz-snapshotter's ctr, whose `image rpull` pulls with the labels
    /// a remote snapshotter reads) against this containerd.
    pub fn ctr_remote<I, S>(&self, args: I) -> Output
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        self.client("ctr-remote", &os_args(args))
    }

    /// Like [`Containerd::ctr_ok`], with `ctr-remote`.
    pub fn ctr_remote_ok<I, S>(&self, args: I) -> String
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        self.client_ok("ctr-remote", &os_args(args))
    }

    /// The pids of the runc shims this containerd started (their command line names its
    /// socket with `-address`, and its namespace), whether or not containerd still runs.
    pub fn shims(&self) -> Vec<u32> {
        let address = self.address().into_os_string();
        let Ok(procs) = fs::read_dir("/proc") else {
            return Vec::new();
        };
        procs
            .flatten()
            .filter_map(|p| p.file_name().to_str()?.parse::<u32>().ok())
            .filter(|pid| {
                let Ok(cmdline) = fs::read(format!("/proc/{pid}/cmdline")) else {
                    return false;
                };
                let args: Vec<&[u8]> = cmdline.split(|&b| b == 0).collect();
                let is_shim = args
                    .first()
                    .is_some_and(|a| a.ends_with(b"containerd-shim-runc-v2"));
                let has = |flag: &[u8], value: &[u8]| {
                    args.windows(2).any(|w| w[0] == flag && w[1] == value)
                };
                is_shim
                    && has(b"-address", address.as_encoded_bytes())
                    && has(b"-namespace", self.namespace.as_bytes())
            })
            .collect()
    }

    /// Kills and deletes every task, so no container outlives the test.
    fn kill_tasks(&self) {
        let out = self.ctr(["tasks", "ls", "-q"]);
        for id in String::from_utf8_lossy(&out.stdout).split_whitespace() {
            let _ = self.ctr(["tasks", "kill", "-a", "-s", "SIGKILL", id]);
            let _ = self.ctr(["tasks", "delete", "-f", id]);
        }
    }

    fn stop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        // SAFETY: kill(2) of our own child, not yet reaped.
        unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
        let start = Instant::now();
        while child.try_wait().ok().flatten().is_none() {
            if start.elapsed() > STOP_TIMEOUT {
                let _ = child.kill();
                let _ = child.wait();
                break;
            }
            sleep(POLL);
        }
    }
}

impl Drop for Containerd {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "--- containerd log ({}) ---\n{}",
                self.dir.path().display(),
                self.log()
            );
        }
        if self.child.is_some() {
            self.kill_tasks();
        }
        self.stop();
        for pid in self.shims() {
            eprintln!("containerd: killing the shim {pid} it left");
            // SAFETY: kill(2) of a shim whose command line names this containerd's socket.
            unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
        }
        unmount_under(self.dir.path());
    }
}

/// Detaches every mount at or under `dir`, deepest (newest) first.
pub fn unmount_under(dir: &Path) {
    let dir = fs::canonicalize(dir).unwrap_or_else(|_| dir.to_path_buf());
    let text = fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    for m in parse_mountinfo(&text).iter().rev() {
        if m.mount_point.starts_with(&dir) {
            let _ = Command::new("umount")
                .arg("-l")
                .arg(&m.mount_point)
                .status();
        }
    }
}

fn os_args<I, S>(args: I) -> Vec<OsString>
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    args.into_iter()
        .map(|a| a.as_ref().to_os_string())
        .collect()
}

/// The `lazy-snapshotter` binary under test: `$LAZY_SNAPSHOTTER`, else beside `lazyctl`.
pub fn lazy_snapshotter_path() -> PathBuf {
    if let Some(p) = std::env::var_os("LAZY_SNAPSHOTTER") {
        return PathBuf::from(p);
    }
    let path = lazyctl_path().with_file_name("lazy-snapshotter");
    assert!(
        path.is_file(),
        "lazy-snapshotter not found at {}: build it with `cargo build -p lazy-snapshotter` or set \
         LAZY_SNAPSHOTTER",
        path.display()
    );
    path
}

/// A running `lazy-snapshotter`.
pub struct LazySnapshotter {
    child: Option<Child>,
    lazyd_socket: PathBuf,
    /// Where it serves its Prometheus metrics (`--metrics-address`), the same across restarts.
    metrics: std::net::SocketAddr,
    dir: tempfile::TempDir,
}

impl LazySnapshotter {
    /// Starts one against the lazyd at `lazyd_socket`, in a new temporary directory; waits
    /// until its socket accepts connections.
    pub fn start(lazyd_socket: &Path) -> Result<LazySnapshotter> {
        let dir = tempfile::Builder::new()
            .prefix("lazy-snapshotter-")
            .tempdir()?;
        let metrics = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?;
        let mut snapshotter = LazySnapshotter {
            child: None,
            lazyd_socket: lazyd_socket.to_path_buf(),
            metrics,
            dir,
        };
        snapshotter.spawn()?;
        Ok(snapshotter)
    }

    fn spawn(&mut self) -> Result<()> {
        fs::create_dir_all(self.root())?;
        // Appended to across restarts, so a failing test shows the whole history.
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())?;
        let child = Command::new(lazy_snapshotter_path())
            .arg("--root")
            .arg(self.root())
            .arg("--address")
            .arg(self.socket())
            .arg("--lazyd-socket")
            .arg(&self.lazyd_socket)
            .arg("--metrics-address")
            .arg(self.metrics.to_string())
            .env(
                "RUST_LOG",
                std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()),
            )
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("starting lazy-snapshotter")?;
        self.child = Some(child);
        let socket = self.socket();
        let start = Instant::now();
        loop {
            if let Some(status) = self.child.as_mut().unwrap().try_wait()? {
                self.child = None;
                bail!(
                    "lazy-snapshotter exited with {status} at start; its log:\n{}",
                    self.log()
                );
            }
            // A socket left by a killed one refuses connections until the new one binds.
            if UnixStream::connect(&socket).is_ok() {
                return Ok(());
            }
            if start.elapsed() > START_TIMEOUT {
                bail!(
                    "lazy-snapshotter did not listen on {} within {START_TIMEOUT:?}; its log:\n{}",
                    socket.display(),
                    self.log()
                );
            }
            sleep(POLL);
        }
    }

    /// Its state directory (`--root`): snapshots, their upper layers.
    pub fn root(&self) -> PathBuf {
        self.dir.path().join("root")
    }

    /// The gRPC socket containerd's proxy plugin dials (`--address`).
    pub fn socket(&self) -> PathBuf {
        self.dir.path().join("lazy-snapshotter.sock")
    }

    /// Its pid (0 when not running).
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("lazy-snapshotter.log")
    }

    /// What it has logged so far (all runs).
    pub fn log(&self) -> String {
        fs::read(self.log_path())
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default()
    }

    /// Kills it with SIGKILL, as a crash would, and waits for it to exit.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Kills it (if running) and starts it again on the same root and socket; returns once
    /// the new one listens.
    /// Its Prometheus metrics (`GET /metrics`).
    pub fn metrics(&self) -> Result<String> {
        use std::io::{Read, Write};
        let mut stream = std::net::TcpStream::connect(self.metrics)?;
        stream.write_all(b"GET /metrics HTTP/1.0\r\nHost: snapshotter\r\n\r\n")?;
        let mut text = String::new();
        stream.read_to_string(&mut text)?;
        let (head, body) = text
            .split_once("\r\n\r\n")
            .context("no end of headers in the metrics answer")?;
        if !head.starts_with("HTTP/1.0 200") && !head.starts_with("HTTP/1.1 200") {
            bail!("GET /metrics: {head}");
        }
        Ok(body.to_string())
    }

    pub fn restart(&mut self) -> Result<()> {
        self.kill();
        self.spawn()
    }
}

impl Drop for LazySnapshotter {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "--- lazy-snapshotter log ({}) ---\n{}",
                self.dir.path().display(),
                self.log()
            );
        }
        if let Some(child) = &self.child {
            // SAFETY: kill(2) of our own child, not yet reaped.
            unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
            let start = Instant::now();
            while self
                .child
                .as_mut()
                .is_some_and(|c| c.try_wait().ok().flatten().is_none())
            {
                if start.elapsed() > STOP_TIMEOUT {
                    break;
                }
                sleep(POLL);
            }
            self.kill();
        }
        unmount_under(self.dir.path());
    }
}

/// The chain ID of a stack of layers (`sha256:...` diff IDs, lowest first): the key containerd
/// commits the top layer's snapshot under. `chain(L0) = L0`, `chain(L0..n) =
/// sha256(chain(L0..n-1) + " " + Ln)`.
pub fn chain_id(diff_ids: &[String]) -> String {
    let mut ids = diff_ids.iter();
    let mut chain = ids.next().expect("an image has a layer").clone();
    for id in ids {
        let digest =
            ring::digest::digest(&ring::digest::SHA256, format!("{chain} {id}").as_bytes());
        chain = format!("sha256:{}", hex::encode(digest.as_ref()));
    }
    chain
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_has_private_paths_and_the_proxy_plugin_only_when_asked() {
        let dir = Path::new("/tmp/c");
        let plain = config_toml(dir, &ContainerdOptions::default());
        assert!(
            plain.starts_with("version = 2\nroot = \"/tmp/c/root\"\nstate = \"/tmp/c/state\"\n")
        );
        assert!(plain.contains("disabled_plugins = [\"io.containerd.grpc.v1.cri\"]"));
        assert!(plain.contains("[grpc]\n  address = \"/tmp/c/containerd.sock\""));
        assert!(plain.contains("[ttrpc]\n  address = \"/tmp/c/containerd.sock.ttrpc\""));
        assert!(!plain.contains("proxy_plugins"));

        let options = ContainerdOptions {
            snapshotter: Some(PathBuf::from("/tmp/s.sock")),
            cri: true,
            plain_http: vec!["127.0.0.1:5000".into()],
        };
        let full = config_toml(dir, &options);
        assert!(!full.contains("disabled_plugins"));
        assert!(full.contains(
            "[proxy_plugins.lazyimg]\n  type = \"snapshot\"\n  address = \"/tmp/s.sock\"\n"
        ));
        assert!(full.contains("snapshotter = \"lazyimg\"\n  disable_snapshot_annotations = false"));
        assert!(full.contains(
            "[plugins.\"io.containerd.grpc.v1.cri\".registry.mirrors.\"127.0.0.1:5000\"]\n  \
             endpoint = [\"http://127.0.0.1:5000\"]"
        ));
    }

    #[test]
    fn chain_id_of_one_layer_is_its_diff_id_and_of_more_chains_them() {
        let a = format!("sha256:{}", "a".repeat(64));
        let b = format!("sha256:{}", "b".repeat(64));
        assert_eq!(chain_id(std::slice::from_ref(&a)), a);
        let digest = ring::digest::digest(&ring::digest::SHA256, format!("{a} {b}").as_bytes());
        assert_eq!(
            chain_id(&[a, b]),
            format!("sha256:{}", hex::encode(digest.as_ref()))
        );
    }
}
