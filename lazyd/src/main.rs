//! `lazyd`: the host agent. Owns the chunk cache, the fetcher and every lazy mount of the host,
//! and serves the control API on a unix socket (docs/API.md) for `lazyctl`.
//!
//! Started by hand or from a container's entrypoint, `lazyd` is a small supervisor
//! (`supervisor.rs`) that runs the serving lazyd as its child and keeps the mounts' FUSE
//! descriptors, so mounts survive the server's crashes, restarts and upgrades. Under systemd
//! with a descriptor store (packaging/systemd/lazyd.service) it serves directly and systemd
//! keeps the descriptors. docs/OPERATIONS.md says what each signal does.
//!
//! The serving process: SIGTERM or SIGINT hand the mounts over (the holder keeps them, the
//! next lazyd serves them) and exit at once; without a holder, or on SIGUSR1, it refuses new
//! work, unmounts every mount nobody uses and keeps serving the ones in use (a running
//! container's rootfs) until they are released, then exits; a second signal detaches the
//! remaining mounts at once (their users then get errors).

mod supervisor;

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use agent::config::{AgentConfig, DEFAULT_CONFIG};
use agent::daemon::Agent;
use agent::handover::{self, Holder};
use agent::server;
use anyhow::{Context, Result};
use clap::Parser;
use tokio::signal::unix::{signal, SignalKind};
use tracing::{info, warn};

#[derive(Parser)]
#[command(name = "lazyd", version, about = "The lazy-image host agent")]
struct Args {
    /// TOML config file (every key optional; see docs/OPERATIONS.md). Default:
    /// /etc/lazyd/config.toml when it exists, else built-in defaults.
    #[arg(long, short, env = "LAZYD_CONFIG")]
    config: Option<PathBuf>,
    /// Check the config file and print the settings in effect, then exit.
    #[arg(long)]
    check_config: bool,
    /// Serve in this process, without the supervisor that keeps mounts across restarts: the
    /// mounts then end with the process. (Under systemd, systemd is the supervisor.)
    #[arg(long)]
    no_supervisor: bool,
}

/// The exit status after handing the mounts over (EX_TEMPFAIL): the systemd unit takes it as a
/// success that still calls for a restart (packaging/systemd/lazyd.service).
const HANDOVER_EXIT: i32 = 75;

/// How long a handing-over lazyd lets its API requests finish.
const API_HANDOVER_WAIT: Duration = Duration::from_secs(2);

/// How often a stopping agent retries unmounting mounts that are in use.
const DRAIN_RETRY: Duration = Duration::from_secs(1);

fn main() -> ExitCode {
    bound_malloc_arenas();
    let args = Args::parse();
    let config = match load_config(args.config.as_deref()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("lazyd: {e:#}");
            return ExitCode::FAILURE;
        }
    };
    if args.check_config {
        println!("{config:#?}");
        return ExitCode::SUCCESS;
    }
    // RUST_LOG, when set, replaces the config's `log`.
    let (filter, from) = match std::env::var("RUST_LOG") {
        Ok(f) => (f, "RUST_LOG"),
        Err(_) => (config.log.clone(), "the config's log"),
    };
    let filter = match tracing_subscriber::EnvFilter::try_new(&filter) {
        Ok(f) => f,
        Err(e) => {
            eprintln!("lazyd: log filter {filter:?} in {from}: {e}");
            return ExitCode::FAILURE;
        }
    };
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    if std::env::var_os("NOTIFY_SOCKET").is_none() && !args.no_supervisor {
        return supervise(&config);
    }
    match run(config) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("lazyd: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Runs as the supervisor of a serving lazyd started with the same arguments.
fn supervise(config: &AgentConfig) -> ExitCode {
    let binary = match std::env::current_exe() {
        Ok(b) => b,
        Err(e) => {
            eprintln!("lazyd: cannot find its own binary: {e}");
            return ExitCode::FAILURE;
        }
    };
    let args: Vec<std::ffi::OsString> = std::env::args_os().skip(1).collect();
    match supervisor::run(&binary, &args, &config.state_dir) {
        Ok(code) => ExitCode::from(u8::try_from(code).unwrap_or(1)),
        Err(e) => {
            eprintln!("lazyd: supervisor: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn load_config(path: Option<&Path>) -> Result<AgentConfig> {
    match path {
        Some(p) => Ok(AgentConfig::load(p)?),
        None if Path::new(DEFAULT_CONFIG).exists() => {
            Ok(AgentConfig::load(Path::new(DEFAULT_CONFIG))?)
        }
        None => Ok(AgentConfig::default()),
    }
}

/// Worker threads of lazyd's runtime: requests, their timers and the control API are I/O;
/// chunk verification and decoding run on its blocking pool.
const RUNTIME_WORKERS: usize = 2;

fn run(config: AgentConfig) -> Result<()> {
    let holder = Holder::from_env();
    // Taken before anything else opens descriptors: they are this process's mounts.
    let fds = handover::inherited_fds();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(RUNTIME_WORKERS)
        .thread_name("lazyd")
        .enable_all()
        .build()
        .context("starting the runtime")?;
    let agent =
        Agent::new(config, runtime.handle().clone(), holder).context("starting the agent")?;
    if !holder.keeps_mounts() && std::env::var_os("NOTIFY_SOCKET").is_some() {
        warn!("systemd gives lazyd no file descriptor store (FileDescriptorStoreMax= in the unit, FDSTORE in its environment): mounts will not survive a restart");
    }
    runtime.block_on(serve(agent, fds))
}

async fn serve(
    agent: Arc<Agent>,
    mut fds: std::collections::HashMap<String, std::os::fd::OwnedFd>,
) -> Result<()> {
    let config = agent.config().clone();
    let inherited = fds.remove(handover::API_SOCKET);
    // First the mounts a predecessor handed over: their readers are waiting.
    agent.adopt(fds).await;
    let listener = control_socket(&agent, inherited).await?;
    let api_stop = Arc::new(tokio::sync::Notify::new());
    let api = tokio::spawn(server::serve_until(
        listener,
        server::router(agent.clone()),
        api_stop.clone(),
    ));
    if let Some(addr) = config.metrics_listen {
        let tcp = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("binding the metrics listener {addr}"))?;
        let metrics = server::serve_metrics(tcp, agent.clone());
        tokio::spawn(async move {
            if let Err(e) = metrics.await {
                warn!("metrics listener stopped: {e}");
            }
        });
        info!("metrics on http://{addr}/metrics");
    }
    info!(
        socket = %config.socket.display(),
        cache = %config.cache_dir.display(),
        cache_size = config.cache_size,
        "lazyd ready"
    );
    notify(&[sd_notify::NotifyState::Ready]);

    let mut term = signal(SignalKind::terminate()).context("installing signal handlers")?;
    let mut int = signal(SignalKind::interrupt()).context("installing signal handlers")?;
    let mut usr1 = signal(SignalKind::user_defined1()).context("installing signal handlers")?;
    let drain = tokio::select! {
        _ = term.recv() => !agent.holder().keeps_mounts(),
        _ = int.recv() => !agent.holder().keeps_mounts(),
        _ = usr1.recv() => true,
        _ = agent.upgrade_requested() => false,
    };
    notify(&[sd_notify::NotifyState::Stopping]);
    if !drain {
        // The API stops taking connections (clients retry until the next lazyd listens) and
        // finishes the requests it has, such as the upgrade request's answer; the mounts are
        // served meanwhile, so this wait costs their readers nothing.
        api_stop.notify_one();
        if tokio::time::timeout(API_HANDOVER_WAIT, api).await.is_err() {
            warn!(
                "API requests still running after {API_HANDOVER_WAIT:?}; their clients get errors"
            );
        }
        agent.hand_over();
        // Exits without running destructors: nothing may unmount, and the threads serving
        // requests stop where they are (the kernel resends what they had not answered).
        std::process::exit(HANDOVER_EXIT);
    }
    // Stopping for good: the supervisor must not start another server.
    notify(&[sd_notify::NotifyState::Custom("X_LAZYD_EXIT=1")]);
    info!("stopping: unmounting mounts that are not in use");
    agent.begin_shutdown();
    let mut reported = usize::MAX;
    loop {
        let busy = agent.unmount_all(false).await;
        if busy.is_empty() {
            break;
        }
        if busy.len() != reported {
            reported = busy.len();
            let list: Vec<String> = busy.iter().map(|p| p.display().to_string()).collect();
            warn!(
                "{} mount(s) in use, still serving them until they are released: {}; signal again to detach them now",
                busy.len(),
                list.join(", ")
            );
            let status = format!("draining: {} mount(s) in use", busy.len());
            notify(&[sd_notify::NotifyState::Status(&status)]);
        }
        tokio::select! {
            _ = tokio::time::sleep(DRAIN_RETRY) => {}
            _ = term.recv() => { force(&agent).await; break; }
            _ = int.recv() => { force(&agent).await; break; }
            _ = usr1.recv() => { force(&agent).await; break; }
        }
    }
    agent.holder().remove(handover::API_SOCKET);
    if let Err(e) = std::fs::remove_file(&config.socket) {
        warn!("cannot remove the socket {}: {e}", config.socket.display());
    }
    info!("stopped");
    Ok(())
}

/// The control socket (see [`listening_socket`]), given the configured group: also a
/// handed-over one, since the config may name another group than the predecessor's did.
async fn control_socket(
    agent: &Arc<Agent>,
    inherited: Option<std::os::fd::OwnedFd>,
) -> Result<tokio::net::UnixListener> {
    let listener = listening_socket(agent, inherited).await?;
    let path = &agent.config().socket;
    server::set_socket_group(path, agent.config().socket_group.as_deref())
        .with_context(|| format!("giving the control socket {} its group", path.display()))?;
    Ok(listener)
}

/// The listening socket a predecessor handed over when it is still at the configured path
/// (connections made during the restart wait in its queue), else a new one. It is handed to
/// the holder in turn, so that the next lazyd listens on the same socket.
async fn listening_socket(
    agent: &Arc<Agent>,
    inherited: Option<std::os::fd::OwnedFd>,
) -> Result<tokio::net::UnixListener> {
    let path = &agent.config().socket;
    let kept = inherited
        .map(std::os::unix::net::UnixListener::from)
        .filter(|l| {
            let same = l
                .local_addr()
                .ok()
                .and_then(|a| a.as_pathname().map(|p| p == path))
                .unwrap_or(false);
            if !same {
                warn!(socket = %path.display(), "the handed-over control socket is not at the configured path; binding a new one");
            }
            same && path.exists()
        });
    if let Some(listener) = kept {
        // The holder keeps it already.
        listener
            .set_nonblocking(true)
            .context("using the handed-over control socket")?;
        return tokio::net::UnixListener::from_std(listener)
            .context("using the handed-over control socket");
    }
    let listener = server::bind_socket(path)
        .await
        .with_context(|| format!("binding the control socket {}", path.display()))?;
    // A handed-over socket at another path is replaced, not kept beside this one.
    agent.holder().remove(handover::API_SOCKET);
    if let Err(e) = agent
        .holder()
        .store(handover::API_SOCKET, std::os::fd::AsFd::as_fd(&listener))
    {
        warn!(
            "cannot hand the control socket to the {} holder: {e}",
            agent.holder().name()
        );
    }
    Ok(listener)
}

async fn force(agent: &Arc<Agent>) {
    warn!("detaching the mounts still in use; their users will get errors");
    let left = agent.unmount_all(true).await;
    if !left.is_empty() {
        warn!("could not detach {} mount(s)", left.len());
    }
}

/// Tells systemd (Type=notify) about the agent's state; a no-op outside systemd.
fn notify(state: &[sd_notify::NotifyState<'_>]) {
    if let Err(e) = sd_notify::notify(false, state) {
        warn!("cannot notify systemd: {e}");
    }
}

/// At most two malloc arenas. glibc gives each thread that allocates under contention an arena
/// of its own (up to eight per core) and keeps what is freed in each: lazyd's fetch, decode
/// and FUSE threads pass megabyte chunk buffers between them, and with one arena per thread
/// its anonymous memory during a model load peaked at 255-293 MB; with two, at 139 MB, the
/// load as fast (docs/BENCHMARKS.md).
///
/// And a fixed mmap threshold above the largest chunk buffer: each FUSE session thread holds
/// a 16 MiB request buffer (`vec![0; ..]`, of which a read-only filesystem's requests touch a
/// few KiB). Mapped, its untouched pages cost nothing; but glibc raises its mmap threshold to
/// the size of the largest mapped block freed (up to 32 MiB), after which these buffers come
/// from an arena and `calloc` zeroes all 16 MiB: fifty mounts made lazyd 1 GiB larger, against
/// 19 MiB with the threshold fixed (docs/BENCHMARKS.md, "Fault matrix"). Must run before any
/// thread starts.
fn bound_malloc_arenas() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only sets tunables of the allocator; no thread runs yet.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 2);
        libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD);
    }
}

/// Blocks of at least this size are mapped, never taken from an arena: chunk buffers below it
/// (1 MiB chunks by default) are reused from the arenas, fuser's 16 MiB session buffers are
/// mapped.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
const MMAP_THRESHOLD: libc::c_int = 8 << 20;
