//! A real `lazyd` for a test: its own socket, cache and state directories under one temporary
//! directory, a config file written from the test, and logs in a file that is shown when the
//! agent fails to start or a test panics while it runs.
//!
//! The binary is `$LAZYD` or `lazyd` beside `lazyctl` (`cargo build -p agent --bin lazyd`).
//! Dropping a [`Lazyd`] stops it with SIGTERM (which unmounts its mounts), then SIGKILL and
//! `umount -l` for anything left, so a failing test leaves no mount behind.

use std::ffi::OsStr;
use std::fs::{self, File};
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::thread::sleep;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::mount::{is_fuse_mounted, lazyctl_path};

/// How long the agent may take to answer on its socket after it starts.
const START_TIMEOUT: Duration = Duration::from_secs(20);
/// How long it may take to exit after SIGTERM.
const STOP_TIMEOUT: Duration = Duration::from_secs(20);
const POLL: Duration = Duration::from_millis(20);

/// The `lazyd` binary under test.
pub fn lazyd_path() -> PathBuf {
    if let Some(p) = std::env::var_os("LAZYD") {
        return PathBuf::from(p);
    }
    let path = lazyctl_path().with_file_name("lazyd");
    assert!(
        path.is_file(),
        "lazyd not found at {}: build it with `cargo build -p agent --bin lazyd` or set LAZYD",
        path.display()
    );
    path
}

/// A running agent.
pub struct Lazyd {
    child: Option<Child>,
    root: PathBuf,
    /// Keeps `root` alive when the agent made it.
    _tmp: Option<tempfile::TempDir>,
    mounts: Vec<PathBuf>,
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

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
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
        let mut s = UnixStream::connect(self.socket())?;
        write!(s, "GET {path} HTTP/1.0\r\nHost: lazyd\r\n\r\n")?;
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

    /// The agent's memory and threads now, from `/proc/PID/status`.
    pub fn memory(&self) -> ProcMemory {
        let text =
            fs::read_to_string(format!("/proc/{}/status", self.pid())).expect("lazyd is running");
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
        fs::write(format!("/proc/{}/clear_refs", self.pid()), "5")
            .expect("resetting lazyd's peak RSS");
    }

    /// Kills the agent at once (SIGKILL), as a crash would.
    pub fn kill(&mut self) -> Result<ExitStatus> {
        self.signal(libc::SIGKILL);
        self.wait(STOP_TIMEOUT)
    }
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
            self.signal(libc::SIGTERM);
            if self.wait(STOP_TIMEOUT).is_err() {
                self.signal(libc::SIGKILL);
                let _ = self.wait(STOP_TIMEOUT);
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
