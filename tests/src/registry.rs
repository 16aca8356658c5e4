//! A real OCI registry for end-to-end tests: Debian's `docker-registry` (CNCF distribution)
//! on a free 127.0.0.1 port, storing into a temporary directory, killed on drop.

use std::fs;
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

/// A running `docker-registry serve`.
pub struct LocalRegistry {
    child: Option<Child>,
    port: u16,
    config: PathBuf,
    /// The registry's storage root.
    storage: PathBuf,
    dir: tempfile::TempDir,
}

impl LocalRegistry {
    /// Starts a registry and waits (up to 20 s) until it accepts connections.
    pub fn start() -> Result<LocalRegistry> {
        LocalRegistry::start_with(None)
    }

    /// Like [`LocalRegistry::start`], serving (and storing into) the registry storage at
    /// `storage` instead of a new one: images pushed there before, e.g. by a benchmark.
    pub fn serve(storage: &Path) -> Result<LocalRegistry> {
        LocalRegistry::start_with(Some(storage))
    }

    fn start_with(storage: Option<&Path>) -> Result<LocalRegistry> {
        let dir = tempfile::Builder::new()
            .prefix("lazy-registry-")
            .tempdir()?;
        let port = TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        let config = dir.path().join("config.yml");
        let storage = storage.map_or_else(|| dir.path().join("storage"), Path::to_path_buf);
        fs::write(
            &config,
            format!(
                "version: 0.1\nlog:\n  level: warn\nstorage:\n  filesystem:\n    rootdirectory: {}\nhttp:\n  addr: 127.0.0.1:{port}\n",
                storage.display()
            ),
        )?;
        let mut registry = LocalRegistry {
            child: None,
            port,
            config,
            storage,
            dir,
        };
        registry.restart()?;
        Ok(registry)
    }

    /// Stops the registry (its storage and port are kept for [`LocalRegistry::restart`]).
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts the registry again on the same port and storage; waits until it listens.
    pub fn restart(&mut self) -> Result<()> {
        self.stop();
        // Appended to across restarts, so a failing test can show the whole history.
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())?;
        let child = Command::new("docker-registry")
            .arg("serve")
            .arg(&self.config)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("docker-registry not found in PATH; apt-get install -y docker-registry")?;
        let child = self.child.insert(child);
        let deadline = Instant::now() + Duration::from_secs(20);
        while TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            if let Some(status) = child.try_wait()? {
                bail!(
                    "docker-registry exited with {status} before listening: {}",
                    self.log()
                );
            }
            if Instant::now() > deadline {
                bail!(
                    "docker-registry did not listen on 127.0.0.1:{} within 20 s",
                    self.port
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(())
    }

    /// `127.0.0.1:PORT`.
    pub fn host(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// What the registry has logged so far (for failure messages).
    pub fn log(&self) -> String {
        fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("registry.log")
    }

    /// The port it listens on.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The file holding blob `digest` (`sha256:<hex>`) in the registry's storage, so tests can
    /// damage it.
    pub fn blob_file(&self, digest: &str) -> PathBuf {
        let hex = digest.trim_start_matches("sha256:");
        self.storage
            .join("docker/registry/v2/blobs/sha256")
            .join(&hex[..2])
            .join(hex)
            .join("data")
    }

    /// Pushes `image` here as `REPO:TAG` (`repo_tag`) with skopeo, then converts it with
    /// `lazyctl convert` to `REPO:TAG-lazy`, with the source image as its subject. Returns the
    /// lazy image's `docker://` reference.
    pub fn push_and_convert(
        &self,
        image: &crate::oci::LayoutInfo,
        repo_tag: &str,
    ) -> Result<String> {
        let source = format!("docker://{}/{repo_tag}", self.host());
        crate::reference::skopeo_copy(&image.oci_ref(), &source)?;
        let lazy = format!("{source}-lazy");
        let out = crate::mount::lazyctl(["convert", "--no-progress", &source, &lazy]);
        if !out.status.success() {
            bail!(
                "lazyctl convert {source} {lazy} failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(lazy)
    }
}

impl Drop for LocalRegistry {
    fn drop(&mut self) {
        self.stop();
    }
}
