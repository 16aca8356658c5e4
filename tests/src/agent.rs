//! A real `lazyd` for a test: its own socket, cache and state directories under one temporary
//! directory, a config file written from the test, and logs in a file that is shown when the
//! agent fails to start or a test panics while it runs.
//!
//! The binary is `$LAZYD` or `lazyd` beside `lazyctl` (`cargo build -p lazyd --bin lazyd`).
//! Dropping a [`Lazyd`] stops it with SIGTERM (which unmounts its mounts), then SIGKILL and
//! `umount -l` for anything left, so a failing test leaves no mount behind.
//!
//! Started this way (no `NOTIFY_SOCKET`), `lazyd` is a supervisor: the process spawned here
//! holds the FUSE connections and runs the serving `lazyd` as its child, restarting it when it
//! ends. [`Lazyd::pid`] is the supervisor; [`Lazyd::server_pid`] the server, which
//! [`Lazyd::kill_server`], [`Lazyd::restart_server`] and [`Lazyd::upgrade`] replace, each
//! returning once a new server answers on the socket.

use std::ffi::OsStr;
use std::fs::{self, File};
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::thread::sleep;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::mount::{is_fuse_mounted, lazyctl_path};

/// How long the agent may take to answer on its socket after it starts.
const START_TIMEOUT: Duration = Duration::from_secs(20);
/// How long it may take to exit after SIGTERM.
const STOP_TIMEOUT: Duration = Duration::from_secs(20);
/// How long a new server may take to answer after the old one ended (a crash is restarted
/// within about 100 ms; an upgrade execs a new binary, which then adopts every mount).
const RESTART_TIMEOUT: Duration = Duration::from_secs(20);
/// How long one status request may take while a server is being replaced: a connection the
/// supervisor queues for the next server is answered once that one is up.
const STATUS_TIMEOUT: Duration = Duration::from_secs(5);
const POLL: Duration = Duration::from_millis(20);

/// The `lazyd` binary under test.
pub fn lazyd_path() -> PathBuf {
    if let Some(p) = std::env::var_os("LAZYD") {
        return PathBuf::from(p);
    }
    let path = lazyctl_path().with_file_name("lazyd");
    assert!(
        path.is_file(),
        "lazyd not found at {}: build it with `cargo build -p lazyd --bin lazyd` or set LAZYD",
        path.display()
    );
    path
}

/// `lazyctl --socket SOCKET run --runtime RUNTIME FLAGS... IMAGE -- CMD...` as a command (stdin
/// null, stdout and stderr captured).
pub fn run_command(
    socket: &Path,
    runtime: &str,
    flags: &[&str],
    image: &str,
    cmd: &[&str],
) -> Command {
    let mut command = Command::new(lazyctl_path());
    command
        .arg("--socket")
        .arg(socket)
        .args(["run", "--runtime", runtime])
        .args(flags)
        .arg(image)
        .arg("--")
        .args(cmd)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    command
}

/// A running agent.
pub struct Lazyd {
    child: Option<Child>,
    root: PathBuf,
    /// Keeps `root` alive when the agent made it.
    _tmp: Option<tempfile::TempDir>,
    mounts: Vec<PathBuf>,
    /// The server's pid as last seen (0: not yet asked): [`Lazyd::memory`] samples it in
    /// loops, where a status request each time would slow what is measured.
    server: AtomicU32,
}

impl Lazyd {
    /// Starts an agent in a new temporary directory; `config` is appended to the generated
    /// config file (top-level keys first, then sections).
    pub fn start(config: &str) -> Result<Lazyd> {
        Lazyd::start_with_env(config, &[])
    }

    /// Like [`Lazyd::start`], with extra environment (e.g. an S3 endpoint and credentials).
    pub fn start_with_env(config: &str, env: &[(String, String)]) -> Result<Lazyd> {
        let tmp = tempfile::Builder::new().prefix("lazyd-").tempdir()?;
        let mut agent = Lazyd::start_in(tmp.path(), config, env)?;
        agent._tmp = Some(tmp);
        Ok(agent)
    }

    /// Starts an agent whose socket, config, log, cache and state live in `root` (kept across
    /// agents, to test restarts).
    pub fn start_in(root: &Path, config: &str, env: &[(String, String)]) -> Result<Lazyd> {
        fs::create_dir_all(root)?;
        let text = format!(
            "socket = {:?}\nstate_dir = {:?}\ncache_dir = {:?}\n{config}\n",
            root.join("lazyd.sock"),
            root.join("state"),
            root.join("cache"),
        );
        fs::write(root.join("config.toml"), text)?;
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(root.join("lazyd.log"))?;
        let child = Command::new(lazyd_path())
            .arg("--config")
            .arg(root.join("config.toml"))
            // Not systemd's: this lazyd is its own supervisor, whatever runs the tests.
            .env_remove("NOTIFY_SOCKET")
            .env_remove("LISTEN_FDS")
            .env_remove("LISTEN_PID")
            .env_remove("LISTEN_FDNAMES")
            .env(
                "RUST_LOG",
                std::env::var("RUST_LOG").unwrap_or_else(|_| "info,fuser::mnt=error".into()),
            )
            .envs(env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("starting lazyd")?;
        let mut agent = Lazyd {
            child: Some(child),
            root: root.to_path_buf(),
            _tmp: None,
            mounts: Vec::new(),
            server: AtomicU32::new(0),
        };
        let start = Instant::now();
        loop {
            if let Some(status) = agent.child_mut().try_wait()? {
                agent.child = None;
                bail!(
                    "lazyd exited with {status} at start; its log:\n{}",
                    agent.log()
                );
            }
            if UnixStream::connect(agent.socket()).is_ok() {
                return Ok(agent);
            }
            if start.elapsed() > START_TIMEOUT {
                bail!(
                    "lazyd did not answer within {START_TIMEOUT:?}; its log:\n{}",
                    agent.log()
                );
            }
            sleep(POLL);
        }
    }

    fn child_mut(&mut self) -> &mut Child {
        self.child.as_mut().expect("lazyd is running")
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn socket(&self) -> PathBuf {
        self.root.join("lazyd.sock")
    }

    pub fn cache_dir(&self) -> PathBuf {
        self.root.join("cache")
    }

    pub fn state_dir(&self) -> PathBuf {
        self.root.join("state")
    }

    /// The process this harness spawned: the supervisor (0 once it has been waited for).
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }

    /// The serving process (`pid` of the status), which the supervisor restarts: the one seen
    /// last while it is alive and the supervisor's child, else asked for again.
    pub fn server_pid(&self) -> u32 {
        let seen = self.server.load(Ordering::Relaxed);
        if seen != 0 && process_alive(seen) && parent_of(seen) == Some(self.pid()) {
            return seen;
        }
        let pid = status_pid(&self.status()).expect("the status names the server's pid");
        self.server.store(pid, Ordering::Relaxed);
        pid
    }

    /// Kills the server with SIGKILL, as a crash would, and waits until the supervisor's next
    /// server answers; returns its pid.
    pub fn kill_server(&mut self) -> Result<u32> {
        let old = self.server_pid();
        // SAFETY: kill(2) with the pid the agent reported a moment ago, a process of this test's
        // agent (its supervisor restarts it).
        unsafe { libc::kill(old as libc::pid_t, libc::SIGKILL) };
        self.wait_for_new_server(old)
    }

    /// A planned restart: SIGHUP to the supervisor, which has the server hand over and starts
    /// a new one; returns the new server's pid once it answers.
    pub fn restart_server(&mut self) -> Result<u32> {
        let old = self.server_pid();
        self.signal(libc::SIGHUP);
        self.wait_for_new_server(old)
    }

    /// `lazyctl upgrade --binary BINARY`: supervisor and server become `binary`, the mounts
    /// stay. Returns the new server's pid once it answers.
    pub fn upgrade(&mut self, binary: &Path) -> Result<u32> {
        let old = self.server_pid();
        let out = self.ctl([
            OsStr::new("upgrade"),
            OsStr::new("--binary"),
            binary.as_os_str(),
        ]);
        if !out.status.success() {
            bail!(
                "lazyctl upgrade --binary {} failed with {}:\n--- stdout ---\n{}--- stderr ---\n{}--- lazyd log ---\n{}",
                binary.display(),
                out.status,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr),
                self.log()
            );
        }
        self.wait_for_new_server(old)
    }

    /// Polls the socket until a server other than `old` answers; fails if the supervisor
    /// exits or none answers within [`RESTART_TIMEOUT`].
    fn wait_for_new_server(&mut self, old: u32) -> Result<u32> {
        let start = Instant::now();
        loop {
            if let Some(status) = self.child_mut().try_wait()? {
                self.child = None;
                bail!(
                    "the supervisor exited with {status} while the server {old} was replaced; \
                     its log:\n{}",
                    self.log()
                );
            }
            if let Some(pid) = self.try_status().as_ref().and_then(status_pid) {
                if pid != old {
                    self.server.store(pid, Ordering::Relaxed);
                    return Ok(pid);
                }
            }
            if start.elapsed() > RESTART_TIMEOUT {
                bail!(
                    "no server other than {old} answered within {RESTART_TIMEOUT:?}; the log:\n{}",
                    self.log()
                );
            }
            sleep(POLL);
        }
    }

    /// The status straight from the socket (`GET /v1/status`), or `None` when nothing answers
    /// within [`STATUS_TIMEOUT`]: for polling while the server is being replaced, where
    /// [`Lazyd::status`] would panic.
    pub fn try_status(&self) -> Option<serde_json::Value> {
        let mut s = UnixStream::connect(self.socket()).ok()?;
        s.set_read_timeout(Some(STATUS_TIMEOUT)).ok()?;
        s.set_write_timeout(Some(STATUS_TIMEOUT)).ok()?;
        write!(s, "GET /v1/status HTTP/1.0\r\nHost: lazyd\r\n\r\n").ok()?;
        let mut text = Vec::new();
        s.read_to_end(&mut text).ok()?;
        let text = String::from_utf8_lossy(&text);
        let (head, body) = text.split_once("\r\n\r\n")?;
        if head.split_whitespace().nth(1) != Some("200") {
            return None;
        }
        serde_json::from_str(body).ok()
    }

    /// The agent's log so far.
    pub fn log(&self) -> String {
        fs::read(self.root.join("lazyd.log"))
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default()
    }

    /// Runs `lazyctl --socket SOCKET ARGS...`.
    pub fn ctl<I, S>(&self, args: I) -> Output
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let mut command = Command::new(lazyctl_path());
        command.arg("--socket").arg(self.socket());
        for a in args {
            command.arg(a.as_ref());
        }
        command
            .stdin(Stdio::null())
            .output()
            .expect("cannot run lazyctl")
    }

    /// Like [`Lazyd::ctl`], but panics with both outputs (lazyctl's and the agent's log)
    /// unless it succeeded.
    pub fn ctl_ok<I, S>(&self, args: I) -> Output
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let args: Vec<std::ffi::OsString> = args
            .into_iter()
            .map(|a| a.as_ref().to_os_string())
            .collect();
        let out = self.ctl(&args);
        assert!(
            out.status.success(),
            "lazyctl {args:?} failed with {}:\n--- stdout ---\n{}--- stderr ---\n{}--- lazyd log ---\n{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            self.log()
        );
        out
    }

    /// `lazyctl mount IMAGE MNT` through this agent; the mount is unmounted when the agent
    /// is dropped, if the test has not done so.
    pub fn mount(&mut self, image: &str, mountpoint: &Path) -> Output {
        let out = self.ctl_ok([
            OsStr::new("mount"),
            OsStr::new(image),
            mountpoint.as_os_str(),
        ]);
        self.mounts.push(mountpoint.to_path_buf());
        out
    }

    /// `lazyctl warm --no-progress IMAGE` through this agent, in the background, its output
    /// piped.
    pub fn spawn_warm(&self, image: &str) -> Child {
        Command::new(lazyctl_path())
            .arg("--socket")
            .arg(self.socket())
            .args(["warm", "--no-progress", image])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("cannot run lazyctl")
    }

    /// Bytes the agent's first running warm has fetched so far; 0 when none runs.
    pub fn warm_fetched_bytes(&self) -> u64 {
        self.status()["warms"]
            .as_array()
            .and_then(|w| w.first())
            .map_or(0, |w| w["progress"]["fetched_bytes"].as_u64().unwrap())
    }

    /// The agent's status (`lazyctl status --json`).
    pub fn status(&self) -> serde_json::Value {
        let out = self.ctl_ok(["status", "--json"]);
        serde_json::from_slice(&out.stdout).expect("status is JSON")
    }

    /// `GET PATH` on the control socket (HTTP/1.0, so the agent closes the connection), as
    /// `curl --unix-socket` would do it. Returns the status code and body.
    pub fn http_get(&self, path: &str) -> Result<(u16, String)> {
        self.http(&format!("GET {path} HTTP/1.0\r\nHost: lazyd\r\n\r\n"))
    }

    /// `POST PATH` of the JSON `body` on the control socket, as `curl --unix-socket -d` would
    /// send it. Returns the status code and the answer's JSON (lazyd's `{"error": ...}` for a
    /// failure).
    pub fn http_post(
        &self,
        path: &str,
        body: &serde_json::Value,
    ) -> Result<(u16, serde_json::Value)> {
        let body = body.to_string();
        let (code, answer) = self.http(&format!(
            "POST {path} HTTP/1.0\r\nHost: lazyd\r\nContent-Type: application/json\r\n\
             Content-Length: {}\r\n\r\n{body}",
            body.len()
        ))?;
        let json = serde_json::from_str(&answer)
            .with_context(|| format!("POST {path}: the answer is not JSON: {answer}"))?;
        Ok((code, json))
    }

    /// Sends `request` (HTTP/1.0) on the control socket; returns the status code and body.
    fn http(&self, request: &str) -> Result<(u16, String)> {
        let mut s = UnixStream::connect(self.socket())?;
        s.write_all(request.as_bytes())?;
        let mut text = String::new();
        s.read_to_string(&mut text)?;
        let (head, body) = text
            .split_once("\r\n\r\n")
            .context("no end of headers in the answer")?;
        let code = head
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .context("no status code")?;
        Ok((code, body.to_string()))
    }

    /// Sends SIGTERM and waits for the agent to exit.
    pub fn stop(mut self) -> Result<ExitStatus> {
        self.signal(libc::SIGTERM);
        self.wait(STOP_TIMEOUT)
    }

    /// Sends `signal` to the agent.
    pub fn signal(&self, signal: libc::c_int) {
        if let Some(child) = &self.child {
            // SAFETY: kill(2) with a child's pid we still own (not yet reaped).
            unsafe { libc::kill(child.id() as libc::pid_t, signal) };
        }
    }

    /// Waits up to `timeout` for the agent to exit.
    pub fn wait(&mut self, timeout: Duration) -> Result<ExitStatus> {
        let start = Instant::now();
        loop {
            if let Some(status) = self.child_mut().try_wait()? {
                self.child = None;
                return Ok(status);
            }
            if start.elapsed() > timeout {
                bail!(
                    "lazyd did not exit within {timeout:?}; its log:\n{}",
                    self.log()
                );
            }
            sleep(POLL);
        }
    }

    /// The serving agent's memory and threads now, from `/proc/PID/status` of the server
    /// (the supervisor only holds file descriptors).
    pub fn memory(&self) -> ProcMemory {
        let pid = self.server_pid();
        let text = fs::read_to_string(format!("/proc/{pid}/status")).expect("lazyd is running");
        let field = |name: &str| {
            text.lines()
                .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
                .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
                .unwrap_or_else(|| panic!("no {name} in /proc/PID/status:\n{text}"))
        };
        ProcMemory {
            rss: field("VmRSS") << 10,
            peak_rss: field("VmHWM") << 10,
            rss_anon: field("RssAnon") << 10,
            threads: field("Threads"),
        }
    }

    /// Starts a new peak for [`ProcMemory::peak_rss`] (`/proc/PID/clear_refs`).
    pub fn reset_peak_memory(&self) {
        fs::write(format!("/proc/{}/clear_refs", self.server_pid()), "5")
            .expect("resetting lazyd's peak RSS");
    }

    /// Kills the whole agent at once (SIGKILL to the supervisor), as a crash of both would;
    /// returns once the supervisor and its servers (which die with their parent) are gone.
    pub fn kill(&mut self) -> Result<ExitStatus> {
        let servers = self.children();
        self.signal(libc::SIGKILL);
        let status = self.wait(STOP_TIMEOUT)?;
        let start = Instant::now();
        while let Some(alive) = servers.iter().find(|&&pid| process_alive(pid)) {
            if start.elapsed() > STOP_TIMEOUT {
                for &pid in &servers {
                    // SAFETY: kill(2) of a server left behind by its dead supervisor.
                    unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
                }
                bail!(
                    "the server {alive} outlived its killed supervisor by {STOP_TIMEOUT:?}; the \
                     log:\n{}",
                    self.log()
                );
            }
            sleep(POLL);
        }
        Ok(status)
    }

    /// The supervisor's child processes now (its server, two while one replaces another).
    fn children(&self) -> Vec<u32> {
        let pid = self.pid();
        fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))
            .unwrap_or_default()
            .split_whitespace()
            .filter_map(|p| p.parse().ok())
            .collect()
    }
}

/// The `pid` of a status: the serving process.
fn status_pid(status: &serde_json::Value) -> Option<u32> {
    status["pid"].as_u64().and_then(|p| u32::try_from(p).ok())
}

/// The parent of process `pid`, from `/proc/PID/stat`.
fn parent_of(pid: u32) -> Option<u32> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // After the command name (in parentheses, which may hold spaces): state, then ppid.
    let (_, rest) = stat.rsplit_once(')')?;
    rest.split_whitespace().nth(1)?.parse().ok()
}

/// Whether any thread of process `pid` is still running. A killed process's leader can be a
/// zombie while its other threads are still exiting, holding the descriptors (a FUSE
/// connection among them) the test waits for it to let go of.
fn process_alive(pid: u32) -> bool {
    let Ok(tasks) = fs::read_dir(format!("/proc/{pid}/task")) else {
        return false;
    };
    tasks.flatten().any(|task| {
        fs::read_to_string(task.path().join("stat")).is_ok_and(|stat| {
            // The state follows the command name, which is in parentheses and may hold spaces.
            stat.rsplit_once(')')
                .and_then(|(_, rest)| rest.split_whitespace().next())
                .is_some_and(|state| state != "Z" && state != "X")
        })
    })
}

impl Drop for Lazyd {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "--- lazyd log ({}) ---\n{}",
                self.root.display(),
                self.log()
            );
        }
        if self.child.is_some() {
            let servers = self.children();
            self.signal(libc::SIGTERM);
            if self.wait(STOP_TIMEOUT).is_err() {
                self.signal(libc::SIGKILL);
                let _ = self.wait(STOP_TIMEOUT);
            }
            // Servers die with their supervisor; one that did not would hold the mounts.
            let start = Instant::now();
            while servers.iter().any(|&pid| process_alive(pid)) && start.elapsed() < STOP_TIMEOUT {
                sleep(POLL);
            }
            for &pid in servers.iter().filter(|&&pid| process_alive(pid)) {
                eprintln!("lazyd: the server {pid} outlived its supervisor; killing it");
                // SAFETY: kill(2) of a server left behind by its supervisor.
                unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
            }
        }
        for m in &self.mounts {
            if is_fuse_mounted(m).unwrap_or(false) {
                let _ = Command::new("umount").arg("-l").arg(m).status();
            }
        }
        let _ = File::open(&self.root);
    }
}

/// A process's memory (bytes) and thread count, from `/proc/PID/status`.
#[derive(Debug, Clone, Copy)]
pub struct ProcMemory {
    /// `VmRSS`: resident now.
    pub rss: u64,
    /// `VmHWM`: the most resident since the start or [`Lazyd::reset_peak_memory`].
    pub peak_rss: u64,
    /// `RssAnon`: resident memory of its own (heap, stacks), not file pages.
    pub rss_anon: u64,
    pub threads: u64,
}

/// Bytes the agent's backends have received so far, from its status JSON.
pub fn backend_bytes(status: &serde_json::Value) -> u64 {
    status["metrics"]["backends"]
        .as_array()
        .map_or(0, |b| b.iter().map(|b| b["bytes"].as_u64().unwrap()).sum())
}

/// The counter at JSON pointer `path` of the agent's status; panics naming it when absent.
pub fn counter(status: &serde_json::Value, path: &str) -> u64 {
    status
        .pointer(path)
        .and_then(serde_json::Value::as_u64)
        .unwrap_or_else(|| panic!("no {path} in {status}"))
}
