//! `lazyctl run`: one container on a lazy image.
//!
//! 1. lazyd mounts the image (once per manifest, shared by every container of it) and puts a
//!    writable overlay on it for this container (`POST /v1/rootfs`);
//! 2. the image's config (`POST /v1/image/config`) and the flags become the bundle's
//!    `config.json` (`spec`), written to `DIR/bundle` beside the container's upper layer;
//! 3. the OCI runtime (crun or runc) runs it in the foreground with our stdio; the signals
//!    lazyctl gets are passed on to the runtime, which passes them to the container;
//! 4. whatever happened, the runtime's state and then the overlay are removed (the upper layer
//!    and bundle stay with `--keep`), and lazyctl exits with the container's status.
//!
//! A signal that arrives before the container starts stops the run there (after cleaning up).

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};

use agent::api::{ImageRequest, RootfsInfo, RootfsRemoveRequest, RootfsRemoved, RootfsRequest};
use anyhow::{bail, Context, Result};
use signal_hook::consts::{SIGHUP, SIGINT, SIGQUIT, SIGTERM, SIGUSR1, SIGUSR2};

use crate::client::AgentClient;
use crate::spec::{self, RunRequest, Volume};

/// The signals passed on to the container (through the runtime, which forwards them to its
/// init process). Others keep their default action.
pub const FORWARDED_SIGNALS: [i32; 6] = [SIGINT, SIGTERM, SIGHUP, SIGQUIT, SIGUSR1, SIGUSR2];

/// Runtimes tried, in order, when none is named.
pub const DEFAULT_RUNTIMES: [&str; 2] = ["crun", "runc"];

/// What `lazyctl run` was asked.
#[derive(Debug, Clone, Default)]
pub struct RunOptions {
    pub image: String,
    /// Default: lazyd picks a random one.
    pub name: Option<String>,
    /// Keep the upper layer and the bundle after the container exits.
    pub keep: bool,
    /// `KEY=VALUE` or `KEY`.
    pub env: Vec<String>,
    /// `SRC:DST[:ro|rw]`.
    pub volumes: Vec<String>,
    pub workdir: Option<String>,
    pub user: Option<String>,
    pub entrypoint: Option<String>,
    /// `crun`, `runc` or a path; default the first of `DEFAULT_RUNTIMES` on PATH.
    pub runtime: Option<String>,
    /// After `--`.
    pub command: Vec<String>,
    pub network: spec::Network,
    /// `--security-opt`: `seccomp=PATH` or `seccomp=unconfined`.
    pub security_opt: Vec<String>,
}

/// Runs the container to its end and returns the exit code lazyctl should exit with: the
/// container's, or 128+N when it (or the runtime) was killed by signal N.
pub fn run(client: &AgentClient, opts: &RunOptions) -> Result<u8> {
    // Everything that can be checked without lazyd is checked before anything is mounted.
    let crun_blocked = crun_blocking_controllers(Path::new(CGROUP_ROOT));
    let runtime = find_runtime(
        opts.runtime.as_deref(),
        std::env::var_os("PATH").as_deref(),
        crun_blocked.as_deref(),
    )?;
    if let Some(name) = &opts.name {
        check_name(name)?;
    }
    let volumes: Vec<Volume> = opts
        .volumes
        .iter()
        .map(|v| spec::parse_volume(v))
        .collect::<Result<_, _>>()?;
    let mut env = Vec::new();
    for arg in &opts.env {
        env.extend(spec::parse_env(arg, |k| std::env::var(k).ok())?);
    }
    let seccomp = seccomp_filter(&opts.security_opt)?;
    let signals = SignalForwarder::install()?;

    let info: RootfsInfo = client
        .post(
            "/v1/rootfs",
            &RootfsRequest {
                image: opts.image.clone(),
                name: opts.name.clone(),
                target: None,
            },
        )
        .with_context(|| format!("preparing a root filesystem of {}", opts.image))?;
    tracing::debug!(name = %info.name, rootfs = %info.rootfs.display(), "rootfs ready");

    let bundle = info.dir.join("bundle");
    let outcome = prepare_and_run(
        client,
        opts,
        &info,
        &bundle,
        &runtime,
        RunRequest {
            name: info.name.clone(),
            rootfs: info.rootfs.clone(),
            entrypoint: opts.entrypoint.clone(),
            command: opts.command.clone(),
            env,
            workdir: opts.workdir.clone(),
            user: opts.user.clone(),
            volumes,
            nofile_ceiling: own_nofile_hard_limit(),
            network: opts.network,
            seccomp,
        },
        &signals,
    );
    let cleaned = cleanup(client, &runtime, &info, &bundle, opts.keep);
    signals.close();
    let code = outcome?;
    cleaned?;
    Ok(code)
}

fn prepare_and_run(
    client: &AgentClient,
    opts: &RunOptions,
    info: &RootfsInfo,
    bundle: &Path,
    runtime: &Path,
    request: RunRequest,
    signals: &SignalForwarder,
) -> Result<u8> {
    let config: serde_json::Value = client
        .post(
            "/v1/image/config",
            &ImageRequest {
                image: opts.image.clone(),
            },
        )
        .with_context(|| format!("reading the config of {}", opts.image))?;
    let image = spec::parse_image_config(config)?;
    let spec = spec::build(&image, &request)?;
    write_bundle(bundle, &spec)?;

    let mut command = Command::new(runtime);
    command
        .arg("run")
        .arg("--bundle")
        .arg(bundle)
        .arg(&info.name)
        .stdin(Stdio::inherit())
        .stdout(Stdio::inherit())
        .stderr(Stdio::inherit());
    let Some(mut child) = signals.spawn(&mut command).with_context(|| {
        format!(
            "starting {} (check that it is an OCI runtime)",
            runtime.display()
        )
    })?
    else {
        let sig = signals.pending().unwrap_or(SIGINT);
        eprintln!("lazyctl: interrupted (signal {sig}) before the container started");
        return Ok(exit_code_for_signal(sig));
    };
    wait_without_reaping(child.id());
    // The pid is still ours until `wait` reaps it, so no signal can reach a reused pid.
    signals.child_exited();
    let status = child
        .wait()
        .with_context(|| format!("waiting for {}", runtime.display()))?;
    use std::os::unix::process::ExitStatusExt;
    Ok(match (status.code(), status.signal()) {
        (Some(code), _) => u8::try_from(code).unwrap_or(u8::MAX),
        (None, Some(sig)) => exit_code_for_signal(sig),
        (None, None) => u8::MAX,
    })
}

/// Writes the bundle's `config.json`; both are root's alone: the spec holds the `--env` values
/// (tokens, passwords) the user passed.
fn write_bundle(bundle: &Path, spec: &oci_spec::runtime::Spec) -> Result<()> {
    use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(bundle)
        .with_context(|| format!("creating {}", bundle.display()))?;
    let config_path = bundle.join("config.json");
    let file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&config_path)
        .with_context(|| format!("writing {}", config_path.display()))?;
    let mut out = std::io::BufWriter::new(file);
    serde_json::to_writer(&mut out, spec)
        .map_err(std::io::Error::from)
        .and_then(|()| std::io::Write::flush(&mut out))
        .with_context(|| format!("writing {}", config_path.display()))
}

/// The seccomp filter `--security-opt` asks for: docker's default profile unless
/// `seccomp=unconfined` or `seccomp=PATH`, as with `docker run`.
fn seccomp_filter(security_opt: &[String]) -> Result<Option<oci_spec::runtime::LinuxSeccomp>> {
    let mut profile = None;
    for opt in security_opt {
        match opt.split_once(['=', ':']) {
            Some(("seccomp", "unconfined")) => profile = Some(None),
            Some(("seccomp", path)) if !path.is_empty() => {
                profile = Some(Some(PathBuf::from(path)));
            }
            _ => bail!("--security-opt {opt:?}: expected seccomp=PATH or seccomp=unconfined"),
        }
    }
    let path = match profile {
        Some(None) => return Ok(None),
        Some(Some(path)) => Some(path),
        None => None,
    };
    let profile = crate::seccomp::load(path.as_deref())?;
    let granted = spec::DEFAULT_CAPABILITIES.into_iter().collect();
    let filter = crate::seccomp::to_spec(
        &profile,
        &granted,
        crate::seccomp::native_arch(),
        crate::seccomp::kernel_version(),
    )?;
    Ok(Some(filter))
}

/// Waits until `pid` (our child) has exited, leaving it unreaped (`WNOWAIT`).
fn wait_without_reaping(pid: u32) {
    loop {
        // SAFETY: `info` is a plain C struct that waitid(2) fills; zeroed is a valid value.
        let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
        // SAFETY: waitid on our own child with a valid pointer to `info`.
        let r = unsafe {
            libc::waitid(
                libc::P_PID,
                pid as libc::id_t,
                &mut info,
                libc::WEXITED | libc::WNOWAIT,
            )
        };
        if r == 0 || std::io::Error::last_os_error().kind() != std::io::ErrorKind::Interrupted {
            return;
        }
    }
}

/// lazyctl's hard RLIMIT_NOFILE (the runtime inherits it); `None` when unlimited or unknown.
fn own_nofile_hard_limit() -> Option<u64> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit fills the struct we pass.
    let r = unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) };
    (r == 0 && limit.rlim_max != libc::RLIM_INFINITY).then_some(limit.rlim_max)
}

/// The shell's convention for a process killed by signal `sig`.
pub fn exit_code_for_signal(sig: i32) -> u8 {
    u8::try_from(128 + sig).unwrap_or(u8::MAX)
}

/// Removes the runtime's state of the container (normally `run` already did), then the
/// overlay; with `keep`, tells where the upper layer and the bundle stayed.
fn cleanup(
    client: &AgentClient,
    runtime: &Path,
    info: &RootfsInfo,
    bundle: &Path,
    keep: bool,
) -> Result<()> {
    match Command::new(runtime)
        .args(["delete", "--force"])
        .arg(&info.name)
        .stdin(Stdio::null())
        .output()
    {
        Ok(out) if out.status.success() => {}
        Ok(out) => {
            let stderr = String::from_utf8_lossy(&out.stderr);
            if !is_missing_container(&stderr) {
                tracing::warn!(
                    "{} delete --force {}: {}",
                    runtime.display(),
                    info.name,
                    stderr.trim()
                );
            }
        }
        Err(e) => tracing::warn!("running {} delete: {e}", runtime.display()),
    }
    let removed: RootfsRemoved = client
        .post(
            "/v1/rootfs/remove",
            &RootfsRemoveRequest {
                name: info.name.clone(),
                keep,
            },
        )
        .with_context(|| {
            format!(
                "removing the root filesystem of container {} (remove it later with `lazyctl umount {}`)",
                info.name,
                info.rootfs.display()
            )
        })?;
    if keep {
        eprintln!(
            "lazyctl: kept container {}: upper layer {}, bundle {}",
            info.name,
            removed
                .kept_upper
                .as_deref()
                .unwrap_or(&info.upper)
                .display(),
            bundle.display()
        );
    }
    Ok(())
}

/// What crun and runc say when asked to delete a container that `run` already deleted.
fn is_missing_container(stderr: &str) -> bool {
    let s = stderr.to_ascii_lowercase();
    s.contains("does not exist") || s.contains("not found") || s.contains("no such file")
}

/// Where the host's cgroup hierarchies are mounted.
const CGROUP_ROOT: &str = "/sys/fs/cgroup";

/// On a hybrid cgroup host (v1 controllers, v2 at `unified/`), crun refuses to run while any
/// controller is still bound to v2 ("cgroups in hybrid mode not supported, drop all controllers
/// from cgroupv2"); runc copes. Returns those controllers (e.g. `hugetlb`) when that is so.
pub fn crun_blocking_controllers(cgroup_root: &Path) -> Option<String> {
    if cgroup_root.join("cgroup.controllers").exists() {
        return None; // unified (v2 only): fine
    }
    let controllers =
        std::fs::read_to_string(cgroup_root.join("unified/cgroup.controllers")).ok()?;
    let controllers = controllers.trim();
    (!controllers.is_empty()).then(|| controllers.to_string())
}

/// The runtime to use: `requested` (a name looked up on PATH, or a path), else crun, else runc;
/// crun is passed over for runc when `crun_blocked` names the cgroup v2 controllers that stop
/// it (see `crun_blocking_controllers`).
pub fn find_runtime(
    requested: Option<&str>,
    path: Option<&OsStr>,
    crun_blocked: Option<&str>,
) -> Result<PathBuf> {
    let search = |name: &str| -> Option<PathBuf> {
        std::env::split_paths(path?)
            .map(|dir| dir.join(name))
            .find(|p| is_executable(p))
    };
    let warn_if_blocked = |runtime: &Path| {
        if let (Some(controllers), Some("crun")) =
            (crun_blocked, runtime.file_name().and_then(|n| n.to_str()))
        {
            tracing::warn!(
                "crun does not run on this hybrid cgroup host while cgroup v2 has controllers \
                 ({controllers}); use --runtime runc, or bind them to v1 (for hugetlb: mkdir \
                 {CGROUP_ROOT}/hugetlb && mount -t cgroup -o hugetlb cgroup {CGROUP_ROOT}/hugetlb)"
            );
        }
    };
    let runtime = match requested {
        Some(r) if r.contains('/') => {
            let p = PathBuf::from(r);
            if !is_executable(&p) {
                bail!("runtime {r} is not an executable file");
            }
            p
        }
        Some(r) => search(r).with_context(|| {
            format!("runtime {r:?} is not on PATH; install it (apt-get install {r}) or give its path with --runtime")
        })?,
        None => {
            let found: Vec<PathBuf> = DEFAULT_RUNTIMES.iter().filter_map(|r| search(r)).collect();
            let usable = found.iter().find(|p| {
                crun_blocked.is_none() || p.file_name().and_then(|n| n.to_str()) != Some("crun")
            });
            match (usable, found.first()) {
                (Some(p), _) => p.clone(),
                (None, Some(p)) => p.clone(),
                (None, None) => bail!(
                    "no OCI runtime found on PATH: install crun or runc (apt-get install crun), or name one with --runtime or LAZY_RUNTIME"
                ),
            }
        }
    };
    warn_if_blocked(&runtime);
    tracing::debug!(runtime = %runtime.display(), "OCI runtime");
    Ok(runtime)
}

fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// Container names are runtime ids and hostnames: crun and runc accept `[A-Za-z0-9_.+-]`, and
/// a hostname wants at most 64 characters.
pub fn check_name(name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"_.-".contains(&b))
        && !name.starts_with(['.', '-']);
    if !ok {
        bail!("container name {name:?}: use 1 to 64 letters, digits, '_', '.' or '-', not starting with '.' or '-'");
    }
    Ok(())
}

/// Catches the forwarded signals from before the rootfs is made until cleanup is done, so
/// lazyctl itself is never killed half-way by them: before the runtime starts, the first one is
/// remembered (and the run stops there); while it runs, each is sent to it; afterwards they are
/// ignored.
struct SignalForwarder {
    state: Arc<Mutex<ForwardState>>,
    handle: signal_hook::iterator::Handle,
    thread: Option<std::thread::JoinHandle<()>>,
}

#[derive(Default)]
struct ForwardState {
    child: Option<u32>,
    pending: Option<i32>,
    exited: bool,
}

impl SignalForwarder {
    fn install() -> Result<SignalForwarder> {
        let mut signals = signal_hook::iterator::Signals::new(FORWARDED_SIGNALS)
            .context("installing signal handlers")?;
        let handle = signals.handle();
        let state = Arc::new(Mutex::new(ForwardState::default()));
        let shared = state.clone();
        let thread = std::thread::spawn(move || {
            for sig in signals.forever() {
                let mut s = shared.lock().unwrap_or_else(|e| e.into_inner());
                match (s.child, s.exited) {
                    (Some(pid), false) => {
                        tracing::debug!(signal = sig, pid, "forwarding signal to the runtime");
                        // SAFETY: kill(2) touches no memory. The pid is our child and not
                        // reaped yet: `exited` is set, under this lock, before it is reaped.
                        unsafe {
                            libc::kill(pid as libc::pid_t, sig);
                        }
                    }
                    (None, _) => {
                        s.pending.get_or_insert(sig);
                    }
                    (Some(_), true) => {
                        tracing::debug!(signal = sig, "container ended; cleaning up")
                    }
                }
            }
        });
        Ok(SignalForwarder {
            state,
            handle,
            thread: Some(thread),
        })
    }

    /// Spawns the runtime unless a signal came first (`None`).
    fn spawn(&self, command: &mut Command) -> std::io::Result<Option<std::process::Child>> {
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if s.pending.is_some() {
            return Ok(None);
        }
        let child = command.spawn()?;
        s.child = Some(child.id());
        Ok(Some(child))
    }

    fn pending(&self) -> Option<i32> {
        self.state.lock().unwrap_or_else(|e| e.into_inner()).pending
    }

    /// After `wait` returned: the pid may be reused, so nothing more is sent to it.
    fn child_exited(&self) {
        self.state.lock().unwrap_or_else(|e| e.into_inner()).exited = true;
    }

    fn close(mut self) {
        self.handle.close();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn fake_bin(dir: &Path, name: &str) -> PathBuf {
        let p = dir.join(name);
        std::fs::write(&p, "#!/bin/sh\n").unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
        p
    }

    #[test]
    fn runtime_prefers_crun_then_runc() {
        let a = tempfile::tempdir().unwrap();
        let b = tempfile::tempdir().unwrap();
        let runc = fake_bin(b.path(), "runc");
        let path = std::env::join_paths([a.path(), b.path()]).unwrap();
        assert_eq!(find_runtime(None, Some(&path), None).unwrap(), runc);
        let crun = fake_bin(b.path(), "crun");
        assert_eq!(find_runtime(None, Some(&path), None).unwrap(), crun);
        assert_eq!(find_runtime(Some("runc"), Some(&path), None).unwrap(), runc);
        assert_eq!(
            find_runtime(Some(runc.to_str().unwrap()), None, None).unwrap(),
            runc
        );
    }

    #[test]
    fn missing_runtime_says_what_to_install() {
        let empty = tempfile::tempdir().unwrap();
        let path = empty.path().as_os_str();
        let err = find_runtime(None, Some(path), None)
            .unwrap_err()
            .to_string();
        assert!(err.contains("install crun or runc"), "{err}");
        let err = find_runtime(Some("youki"), Some(path), None)
            .unwrap_err()
            .to_string();
        assert!(err.contains("\"youki\" is not on PATH"), "{err}");
        // Not executable: not a runtime.
        let plain = empty.path().join("crun");
        std::fs::write(&plain, "").unwrap();
        assert!(find_runtime(None, Some(path), None).is_err());
        assert!(find_runtime(Some(plain.to_str().unwrap()), None, None).is_err());
    }

    #[test]
    fn crun_is_passed_over_on_a_hybrid_host_with_v2_controllers() {
        let bin = tempfile::tempdir().unwrap();
        let crun = fake_bin(bin.path(), "crun");
        let path = bin.path().as_os_str();
        // Only crun: it is still chosen (with a warning).
        assert_eq!(
            find_runtime(None, Some(path), Some("hugetlb")).unwrap(),
            crun
        );
        let runc = fake_bin(bin.path(), "runc");
        assert_eq!(
            find_runtime(None, Some(path), Some("hugetlb")).unwrap(),
            runc
        );
        assert_eq!(find_runtime(None, Some(path), None).unwrap(), crun);
        // Asked for by name, crun is used anyway.
        assert_eq!(
            find_runtime(Some("crun"), Some(path), Some("hugetlb")).unwrap(),
            crun
        );
    }

    #[test]
    fn hybrid_cgroup_detection() {
        let root = tempfile::tempdir().unwrap();
        let r = root.path();
        assert_eq!(crun_blocking_controllers(r), None);
        std::fs::create_dir_all(r.join("unified")).unwrap();
        std::fs::write(r.join("unified/cgroup.controllers"), "\n").unwrap();
        assert_eq!(crun_blocking_controllers(r), None);
        std::fs::write(r.join("unified/cgroup.controllers"), "hugetlb\n").unwrap();
        assert_eq!(crun_blocking_controllers(r).as_deref(), Some("hugetlb"));
        // Unified hosts have cgroup.controllers at the root: crun is fine.
        std::fs::write(r.join("cgroup.controllers"), "cpu memory\n").unwrap();
        assert_eq!(crun_blocking_controllers(r), None);
    }

    #[test]
    fn container_names() {
        for ok in ["web", "a1b2c3d4e5f6", "my_app.v2-1"] {
            check_name(ok).unwrap();
        }
        for bad in ["", "-x", ".x", "a/b", "a b", &"x".repeat(65)] {
            assert!(check_name(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn signal_exit_codes() {
        assert_eq!(exit_code_for_signal(SIGINT), 130);
        assert_eq!(exit_code_for_signal(SIGTERM), 143);
        assert_eq!(exit_code_for_signal(9), 137);
    }

    #[test]
    fn delete_of_a_gone_container_is_quiet() {
        assert!(is_missing_container("container does not exist"));
        assert!(is_missing_container(
            "error opening file `/run/crun/x/status`: No such file or directory"
        ));
        assert!(!is_missing_container("permission denied"));
    }
}
