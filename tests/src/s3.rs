//! A real S3 API for tests: `moto_server` (moto's stand-alone server, from PyPI) on a free
//! 127.0.0.1 port, killed on drop.
//!
//! moto keeps everything in memory: [`MotoServer::stop`] then [`MotoServer::restart`] brings the
//! server back on the same port (so clients configured with [`MotoServer::endpoint`] reconnect)
//! but with no buckets or objects; a test re-creates what it needs. To make the server hang
//! instead (accepting connections, answering nothing) and keep its data, use
//! [`MotoServer::pause`] and [`MotoServer::resume`]. moto runs through `tests/s3/moto_server.py`,
//! which makes a ranged GET read only its range (moto reads the whole object for each one,
//! which would make multi-GB objects unusable); it is still Python, for API behaviour, not
//! throughput.
//!
//! The binary is `$MOTO_SERVER`, else `/opt/lazy-venv/bin/moto_server` (where
//! `scripts/setup.sh` installs it), else `moto_server` in `PATH`. Every failure here panics
//! with what to do: this is test code, and a missing server must fail loudly, not skip.

use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Where `scripts/setup.sh` installs moto.
pub const DEFAULT_MOTO_SERVER: &str = "/opt/lazy-venv/bin/moto_server";
/// How long moto may take to answer after it is started (a cold Python import of moto takes a
/// few seconds on a loaded machine).
const START_TIMEOUT: Duration = Duration::from_secs(30);
/// Poll interval while waiting for the server.
const POLL: Duration = Duration::from_millis(50);
/// Credentials moto accepts (it does not check them); tests sign with these.
pub const ACCESS_KEY_ID: &str = "test";
pub const SECRET_ACCESS_KEY: &str = "test";
pub const REGION: &str = "us-east-1";

/// The `moto_server` binary: `$MOTO_SERVER`, else [`DEFAULT_MOTO_SERVER`], else `PATH`.
/// Panics, naming `scripts/setup.sh`, when none exists.
pub fn moto_server_path() -> PathBuf {
    if let Some(path) = std::env::var_os("MOTO_SERVER") {
        let path = PathBuf::from(path);
        assert!(
            path.is_file(),
            "MOTO_SERVER={} does not name a file; unset it or point it at moto_server",
            path.display()
        );
        return path;
    }
    let default = Path::new(DEFAULT_MOTO_SERVER);
    if default.is_file() {
        return default.to_path_buf();
    }
    std::env::var_os("PATH")
        .and_then(|paths| {
            std::env::split_paths(&paths)
                .map(|dir| dir.join("moto_server"))
                .find(|candidate| candidate.is_file())
        })
        .unwrap_or_else(|| {
            panic!(
                "moto_server not found ($MOTO_SERVER unset, no {DEFAULT_MOTO_SERVER}, none in \
                 PATH): run scripts/setup.sh as root, which installs moto[server] into \
                 /opt/lazy-venv"
            )
        })
}

/// moto's server with ranged GETs that read only the range (moto itself reads the whole
/// object for each one); run by the Python of the `moto_server` script. See the file.
const RANGED_LAUNCHER: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/s3/moto_server.py");

/// The interpreter named by the `#!` line of the `moto_server` script (the Python that has
/// moto installed).
fn interpreter_of(script: &Path) -> PathBuf {
    let text = fs::read(script).unwrap_or_else(|e| panic!("reading {}: {e}", script.display()));
    let first = text.split(|&b| b == b'\n').next().unwrap_or_default();
    let interpreter = std::str::from_utf8(first)
        .ok()
        .and_then(|line| line.strip_prefix("#!"))
        .map(str::trim)
        .filter(|path| !path.is_empty() && !path.contains(' '))
        .unwrap_or_else(|| {
            panic!(
                "{} does not start with a #!/path/to/python line; point MOTO_SERVER at the \
                 moto_server script of a Python environment with moto installed",
                script.display()
            )
        });
    PathBuf::from(interpreter)
}

/// A running `moto_server -H 127.0.0.1 -p PORT` (through [`RANGED_LAUNCHER`]).
pub struct MotoServer {
    child: Option<Child>,
    port: u16,
    binary: PathBuf,
    /// Extra environment for the server process (kept across restarts).
    env: Vec<(String, String)>,
    dir: tempfile::TempDir,
}

impl MotoServer {
    /// Starts moto on a free port and waits (up to 30 s) until it answers HTTP.
    pub fn start() -> MotoServer {
        Self::start_with_env(Vec::new())
    }

    /// Starts moto checking every request's signature and access key against its own IAM
    /// (`INITIAL_NO_AUTH_ACTION_COUNT=0`): no key is known to it, so every request, signed or
    /// not, is refused with 403. For tests of how "access denied" is reported.
    pub fn start_enforcing_auth() -> MotoServer {
        Self::start_with_env(vec![("INITIAL_NO_AUTH_ACTION_COUNT".into(), "0".into())])
    }

    fn start_with_env(env: Vec<(String, String)>) -> MotoServer {
        let binary = moto_server_path();
        let dir = tempfile::Builder::new()
            .prefix("lazy-moto-")
            .tempdir()
            .expect("creating a temporary directory for moto's log");
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|listener| listener.local_addr())
            .expect("finding a free port")
            .port();
        let mut server = MotoServer {
            child: None,
            port,
            binary,
            env,
            dir,
        };
        server.spawn();
        server
    }

    /// `http://127.0.0.1:PORT`.
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// Environment for a child process (e.g. `lazyctl`) that should use this server:
    /// `AWS_ENDPOINT_URL`, static test credentials and `AWS_REGION`.
    pub fn env(&self) -> Vec<(String, String)> {
        [
            ("AWS_ENDPOINT_URL", self.endpoint().as_str()),
            ("AWS_ACCESS_KEY_ID", ACCESS_KEY_ID),
            ("AWS_SECRET_ACCESS_KEY", SECRET_ACCESS_KEY),
            ("AWS_REGION", REGION),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
    }

    /// Creates bucket `name` (a plain unsigned `PUT /name`, which moto accepts).
    pub fn create_bucket(&self, name: &str) {
        match http_status(self.port, "PUT", &format!("/{name}")) {
            Ok(200) => {}
            Ok(status) => panic!(
                "creating bucket {name:?} on moto at {}: HTTP {status}\n{}",
                self.endpoint(),
                self.log_tail()
            ),
            Err(e) => panic!(
                "creating bucket {name:?} on moto at {}: {e}\n{}",
                self.endpoint(),
                self.log_tail()
            ),
        }
    }

    /// Kills the server: connections are refused until [`MotoServer::restart`]. Its data is
    /// gone.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts a fresh (empty) server on the same port, stopping the old one if it still runs.
    pub fn restart(&mut self) {
        self.stop();
        self.spawn();
    }

    /// Freezes the server (SIGSTOP): the kernel still accepts connections on its port but
    /// nothing answers, like a hung server. Data is kept.
    pub fn pause(&self) {
        self.signal(libc::SIGSTOP);
    }

    /// Undoes [`MotoServer::pause`] (SIGCONT); requests sent meanwhile are then answered.
    pub fn resume(&self) {
        self.signal(libc::SIGCONT);
    }

    fn signal(&self, signal: libc::c_int) {
        let child = self.child.as_ref().expect("moto is not running");
        let pid = libc::pid_t::try_from(child.id()).expect("pid fits pid_t");
        // SAFETY: kill(2) on the pid of a child we spawned and have not reaped.
        let rc = unsafe { libc::kill(pid, signal) };
        assert_eq!(
            rc,
            0,
            "signal {signal} to moto: {}",
            io::Error::last_os_error()
        );
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("moto.log")
    }

    /// The end of moto's output, for failure messages.
    fn log_tail(&self) -> String {
        let log = fs::read_to_string(self.log_path()).unwrap_or_default();
        let start = log.len().saturating_sub(4000);
        let start = (start..log.len())
            .find(|&i| log.is_char_boundary(i))
            .unwrap_or(log.len());
        format!("--- moto output (end) ---\n{}", &log[start..])
    }

    fn spawn(&mut self) {
        // Output goes to a file: a pipe nobody reads would block a chatty server.
        let log = File::options()
            .create(true)
            .append(true)
            .open(self.log_path())
            .expect("opening moto's log file");
        let stderr = log.try_clone().expect("cloning moto's log file handle");
        let child = Command::new(interpreter_of(&self.binary))
            .arg(RANGED_LAUNCHER)
            .args(["-H", "127.0.0.1", "-p", &self.port.to_string()])
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(stderr)
            .spawn()
            .unwrap_or_else(|e| {
                panic!(
                    "starting {}: {e}; run scripts/setup.sh as root to install moto",
                    self.binary.display()
                )
            });
        self.child = Some(child);
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if http_status(self.port, "GET", "/").is_ok() {
                return;
            }
            let child = self.child.as_mut().expect("just spawned");
            if let Some(status) = child.try_wait().expect("waiting for moto") {
                self.child = None;
                panic!(
                    "{} exited with {status} before answering on port {}\n{}",
                    self.binary.display(),
                    self.port,
                    self.log_tail()
                );
            }
            if Instant::now() > deadline {
                panic!(
                    "moto did not answer on {} within {START_TIMEOUT:?}\n{}",
                    self.endpoint(),
                    self.log_tail()
                );
            }
            std::thread::sleep(POLL);
        }
    }
}

/// Objects, unsigned (moto accepts unsigned requests): what a test puts in a bucket as a user's
/// upload would, and what it reads back to check what a push wrote.
impl MotoServer {
    /// `PUT /bucket/key` with `body`; replaces an existing object.
    pub fn put_object(&self, bucket: &str, key: &str, body: &[u8]) {
        let path = format!("/{bucket}/{}", encode_key(key));
        match http_request(self.port, "PUT", &path, body) {
            Ok((200, _)) => {}
            other => panic!(
                "PUT s3://{bucket}/{key} on moto: {other:?}\n{}",
                self.log_tail()
            ),
        }
    }

    /// `DELETE /bucket/key`.
    pub fn delete_object(&self, bucket: &str, key: &str) {
        let path = format!("/{bucket}/{}", encode_key(key));
        match http_request(self.port, "DELETE", &path, &[]) {
            Ok((204 | 200, _)) => {}
            other => panic!("DELETE s3://{bucket}/{key} on moto: {other:?}"),
        }
    }

    /// `GET /bucket/key`: the object's bytes, `None` if it does not exist.
    pub fn get_object(&self, bucket: &str, key: &str) -> Option<Vec<u8>> {
        let path = format!("/{bucket}/{}", encode_key(key));
        match http_request(self.port, "GET", &path, &[]) {
            Ok((200, body)) => Some(body),
            Ok((404, _)) => None,
            other => panic!("GET s3://{bucket}/{key} on moto: {other:?}"),
        }
    }

    /// Keys under `prefix` in `bucket` (one ListObjectsV2 page: up to 1000 keys).
    pub fn list_keys(&self, bucket: &str, prefix: &str) -> Vec<String> {
        let path = format!("/{bucket}?list-type=2&prefix={}", encode_key(prefix));
        let body = match http_request(self.port, "GET", &path, &[]) {
            Ok((200, body)) => String::from_utf8(body).expect("listing is UTF-8"),
            other => panic!("listing s3://{bucket}/{prefix} on moto: {other:?}"),
        };
        body.split("<Key>")
            .skip(1)
            .filter_map(|rest| rest.split_once("</Key>").map(|(k, _)| k.to_string()))
            .collect()
    }
}

/// Percent-encodes a key for a request path, keeping `/` (so `a/../b` reaches S3 as that key,
/// never as a path a client or server might normalize).
fn encode_key(key: &str) -> String {
    key.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'~' | b'/' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// Sends `METHOD PATH` with `body`; returns the status and the response body (not chunked:
/// moto answers with a Content-Length). The request names the test access key in an
/// `Authorization` header whose signature moto does not check, so that it acts as the account
/// the clients use (an anonymous GET of their objects is refused).
fn http_request(port: u16, method: &str, path: &str, body: &[u8]) -> io::Result<(u16, Vec<u8>)> {
    let mut stream = TcpStream::connect(("127.0.0.1", port))?;
    stream.set_read_timeout(Some(Duration::from_secs(30)))?;
    write!(
        stream,
        "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Length: {}\r\n\
         Authorization: AWS4-HMAC-SHA256 Credential={ACCESS_KEY_ID}/20240101/{REGION}/s3/\
         aws4_request, SignedHeaders=host, Signature=0\r\n\
         Connection: close\r\n\r\n",
        body.len()
    )?;
    stream.write_all(body)?;
    let mut response = Vec::new();
    stream.read_to_end(&mut response)?;
    let split = response
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| io::Error::other("no end of HTTP headers"))?;
    let head = String::from_utf8_lossy(&response[..split]).into_owned();
    let status = head
        .strip_prefix("HTTP/1.")
        .and_then(|rest| rest.get(2..5))
        .and_then(|code| code.parse().ok())
        .ok_or_else(|| io::Error::other(format!("not an HTTP response: {head:?}")))?;
    Ok((status, response[split + 4..].to_vec()))
}

impl Drop for MotoServer {
    fn drop(&mut self) {
        // SIGKILL also ends a paused (SIGSTOPped) server.
        self.stop();
    }
}

/// Sends `METHOD PATH` with an empty body and returns the response status.
fn http_status(port: u16, method: &str, path: &str) -> io::Result<u16> {
    let mut stream = TcpStream::connect(("127.0.0.1", port))?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(
        stream,
        "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Length: 0\r\n\
         Connection: close\r\n\r\n"
    )?;
    let mut response = Vec::new();
    stream.read_to_end(&mut response)?;
    let head = String::from_utf8_lossy(&response[..response.len().min(64)]).into_owned();
    head.strip_prefix("HTTP/1.")
        .and_then(|rest| rest.get(2..5))
        .and_then(|code| code.parse().ok())
        .ok_or_else(|| io::Error::other(format!("not an HTTP response: {head:?}")))
}

/// Runs `lazyctl convert ARGS --no-progress` against `moto`; asserts it succeeds.
pub fn convert(moto: &MotoServer, args: &[&str]) {
    let out = Command::new(crate::mount::lazyctl_path())
        .arg("convert")
        .args(args)
        .arg("--no-progress")
        .envs(moto.env())
        .output()
        .unwrap();
    assert!(out.status.success(), "lazyctl convert {args:?}: {out:?}");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    #[cfg_attr(
        not(feature = "system-tests"),
        ignore = "needs moto_server (scripts/setup.sh installs it)"
    )]
    fn moto_starts_creates_buckets_and_restarts_on_the_same_port() {
        let mut moto = MotoServer::start();
        let port = moto.port();
        moto.create_bucket("lazy-harness");
        assert_eq!(
            http_status(port, "GET", "/lazy-harness").unwrap(),
            200,
            "bucket listing"
        );
        moto.stop();
        assert!(
            TcpStream::connect(("127.0.0.1", port)).is_err(),
            "stopped moto still accepts connections"
        );
        moto.restart();
        assert_eq!(moto.port(), port);
        // A fresh server: the bucket is gone.
        assert_eq!(http_status(port, "GET", "/lazy-harness").unwrap(), 404);
        let env = moto.env();
        assert!(env.contains(&("AWS_ENDPOINT_URL".into(), moto.endpoint())));
        assert!(env.iter().any(|(k, _)| k == "AWS_SECRET_ACCESS_KEY"));
    }
}
