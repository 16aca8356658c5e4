//! `lazy-snapshotter`: a containerd remote snapshotter (a `proxy_plugins` entry of type
//! `snapshot`). Images with a lazy version are served through lazyd, with no layer downloaded;
//! other images are unpacked by containerd into overlay snapshots, as with its own overlayfs
//! snapshotter. docs/OPERATIONS.md ("containerd") says how to install and configure it.

mod filter;
mod lazyd;
mod metrics;
mod service;
mod snapshots;
mod store;

/// The generated messages and server of containerd's snapshots API (`proto/`), in modules
/// nested as the protobuf packages are (the generated code names `containerd.types` by its
/// relative path).
#[allow(unused_qualifications)]
mod proto {
    pub mod containerd {
        pub mod types {
            tonic::include_proto!("containerd.types");
        }
        pub mod services {
            pub mod snapshots {
                pub mod v1 {
                    tonic::include_proto!("containerd.services.snapshots.v1");
                }
            }
        }
    }
    pub use containerd::services::snapshots::v1 as snapshots;
    pub use containerd::types;
}

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{bail, Context};
use clap::Parser;
use tokio::net::UnixListener;
use tracing::{error, info};

use crate::metrics::Metrics;
use crate::proto::snapshots::snapshots_server::SnapshotsServer;
use crate::service::Service;
use crate::snapshots::Snapshotter;

#[derive(Debug, Parser)]
#[command(
    version,
    about = "A containerd remote snapshotter for lazy images, served through lazyd"
)]
struct Args {
    /// Where snapshots and their metadata live (an absolute path without ',' or ':').
    #[arg(
        long,
        env = "LAZY_SNAPSHOTTER_ROOT",
        default_value = "/var/lib/lazy-snapshotter"
    )]
    root: PathBuf,
    /// The unix socket containerd connects to (its proxy plugin's `address`).
    #[arg(
        long,
        env = "LAZY_SNAPSHOTTER_ADDRESS",
        default_value = "/run/lazy-snapshotter/snapshotter.sock"
    )]
    address: PathBuf,
    /// lazyd's control socket.
    #[arg(long, env = "LAZYD_SOCKET", default_value = "/run/lazyd/lazyd.sock")]
    lazyd_socket: PathBuf,
    /// Serve Prometheus metrics over HTTP at this address (`/metrics`), e.g. 127.0.0.1:9184.
    #[arg(long, env = "LAZY_SNAPSHOTTER_METRICS")]
    metrics_address: Option<std::net::SocketAddr>,
    /// lazyd holds a lazy image's mount for each snapshot over it, in the name PREFIX-ID; two
    /// snapshotters sharing one lazyd need different prefixes.
    #[arg(long, default_value = "snapshotter")]
    holder_prefix: String,
    /// Mount a lazy image in lazyd as soon as it is pulled, so that its background fetch (and
    /// profile prefetch) starts with the pull, as a pull downloads an image; `false`: at its
    /// first container.
    #[arg(long, env = "LAZY_SNAPSHOTTER_MOUNT_AT_PULL", default_value_t = true, action = clap::ArgAction::Set)]
    mount_at_pull: bool,
    /// Log filter (tracing's EnvFilter syntax); RUST_LOG, when set, replaces it.
    #[arg(long, default_value = "info")]
    log: String,
}

fn main() -> ExitCode {
    let args = Args::parse();
    let (filter, from) = match std::env::var("RUST_LOG") {
        Ok(f) => (f, "RUST_LOG"),
        Err(_) => (args.log.clone(), "--log"),
    };
    let filter = match tracing_subscriber::EnvFilter::try_new(&filter) {
        Ok(f) => f,
        Err(e) => {
            eprintln!("lazy-snapshotter: log filter {filter:?} in {from}: {e}");
            return ExitCode::FAILURE;
        }
    };
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(r) => r,
        Err(e) => {
            error!("cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(serve(args)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            error!("{e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn serve(args: Args) -> anyhow::Result<()> {
    let metrics = Arc::new(Metrics::default());
    let lazyd = lazyd::Lazyd::new(&args.lazyd_socket);
    let snapshotter = Snapshotter::open(
        &args.root,
        lazyd,
        &args.holder_prefix,
        args.mount_at_pull,
        metrics.clone(),
    )
    .with_context(|| format!("opening the snapshotter's root {}", args.root.display()))?;
    let snapshotter = Arc::new(snapshotter);
    let listener = listen(&args.address)?;
    if let Some(address) = args.metrics_address {
        let snapshotter = snapshotter.clone();
        let listener = tokio::net::TcpListener::bind(address)
            .await
            .with_context(|| format!("listening for metrics on {address}"))?;
        let app = axum::Router::new().route(
            "/metrics",
            axum::routing::get(move || {
                let snapshotter = snapshotter.clone();
                async move { snapshotter.metrics_text() }
            }),
        );
        tokio::spawn(async move {
            if let Err(e) = axum::serve(listener, app).await {
                error!("the metrics server stopped: {e}");
            }
        });
        info!(%address, "serving metrics at /metrics");
    }
    let service = Service::new(snapshotter, metrics);
    info!(
        address = %args.address.display(),
        lazyd = %args.lazyd_socket.display(),
        root = %args.root.display(),
        "serving containerd's snapshots API"
    );
    notify_ready();
    tonic::transport::Server::builder()
        .add_service(SnapshotsServer::new(service))
        .serve_with_incoming_shutdown(
            tokio_stream::wrappers::UnixListenerStream::new(listener),
            stopped(),
        )
        .await
        .context("serving the snapshots API")?;
    let _ = std::fs::remove_file(&args.address);
    info!("stopped");
    Ok(())
}

/// Binds the socket (mode 0660: whoever can connect can mount as root), replacing one whose
/// server is gone; refuses to start beside a live one.
fn listen(address: &Path) -> anyhow::Result<UnixListener> {
    if let Some(dir) = address.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    if address.exists() {
        if std::os::unix::net::UnixStream::connect(address).is_ok() {
            bail!(
                "another server answers on {}; stop it or choose another --address",
                address.display()
            );
        }
        std::fs::remove_file(address)
            .with_context(|| format!("removing the stale socket {}", address.display()))?;
    }
    let listener = UnixListener::bind(address)
        .with_context(|| format!("listening on {}", address.display()))?;
    std::fs::set_permissions(address, std::fs::Permissions::from_mode(0o660))
        .with_context(|| format!("setting the mode of {}", address.display()))?;
    Ok(listener)
}

/// Resolves at SIGTERM or SIGINT.
async fn stopped() {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        error!("cannot handle signals; stop the snapshotter with SIGKILL");
        return std::future::pending().await;
    };
    tokio::select! {
        _ = term.recv() => info!("SIGTERM: stopping"),
        _ = int.recv() => info!("SIGINT: stopping"),
    }
}

/// Tells systemd (`Type=notify`) that the socket is listening.
fn notify_ready() {
    if std::env::var_os("NOTIFY_SOCKET").is_some() {
        if let Err(e) = sd_notify::notify(false, &[sd_notify::NotifyState::Ready]) {
            error!("cannot notify systemd: {e}");
        }
    }
}
