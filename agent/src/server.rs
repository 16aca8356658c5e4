//! The control API on lazyd's unix socket: HTTP/1.1 routes onto [`Agent`] calls (messages in
//! `api`, reference in docs/API.md), and the Prometheus endpoint, also servable on TCP.
//!
//! The socket is created mode 0660 in a directory the agent creates; whoever can connect can
//! mount images as root, so access is access to root.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use http_body::Frame;
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::mpsc;

use crate::api::{
    ErrorBody, GcRequest, ImageRequest, LowerReleaseRequest, LowerRequest, MountRequest,
    ProfileRequest, RecordRequest, RootfsRemoveRequest, RootfsRequest, UmountRequest, WarmEvent,
    WarmRequest,
};
use crate::config::DEFAULT_SOCKET_GROUP;
use crate::daemon::{Agent, AgentError};
use crate::mount::MountError;

/// Every route of the control API.
pub fn router(agent: Arc<Agent>) -> Router {
    Router::new()
        .route("/v1/status", get(status))
        .route("/v1/mounts", get(mounts).post(mount))
        .route("/v1/umount", post(umount))
        .route("/v1/warm", post(warm))
        .route("/v1/gc", post(gc))
        .route("/v1/profile/show", post(profile_show))
        .route("/v1/profile/push", post(profile_push))
        .route("/v1/profile/record", post(profile_record))
        .route("/v1/rootfs", post(rootfs))
        .route("/v1/rootfs/remove", post(rootfs_remove))
        .route("/v1/image/config", post(image_config))
        .route("/v1/image/resolve", post(image_resolve))
        .route("/v1/lower", post(lower))
        .route("/v1/lower/release", post(lower_release))
        .route("/v1/upgrade", post(upgrade))
        .route("/metrics", get(metrics))
        .with_state(agent)
}

/// Serves only `GET /metrics` on a TCP listener, until the listener fails.
pub async fn serve_metrics(
    listener: tokio::net::TcpListener,
    agent: Arc<Agent>,
) -> std::io::Result<()> {
    let router = Router::new()
        .route("/metrics", get(metrics))
        .with_state(agent);
    axum::serve(listener, router).await
}

/// Binds the control socket at `path`, creating its directory. A socket file left by a
/// process that is gone is replaced; one that still answers means another lazyd runs.
pub async fn bind_socket(path: &Path) -> std::io::Result<UnixListener> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    if path.exists() {
        if UnixStream::connect(path).await.is_ok() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::AddrInUse,
                format!("another lazyd answers on {}", path.display()),
            ));
        }
        std::fs::remove_file(path)?;
    }
    let listener = UnixListener::bind(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660))?;
    Ok(listener)
}

/// Gives the control socket at `path` to `group` (`socket_group` in the config: a name, or a
/// number taken as a group ID as it is, for a lazyd in a container whose groups are not the
/// host's): the members of that group may then use the API. Without one, the group
/// [`DEFAULT_SOCKET_GROUP`] where it exists; else the socket stays root's. A named group that
/// does not exist is an error.
pub fn set_socket_group(path: &Path, group: Option<&str>) -> std::io::Result<()> {
    if let Some(gid) = group.and_then(|g| g.parse::<u32>().ok()) {
        return std::os::unix::fs::chown(path, None, Some(gid));
    }
    let name = group.unwrap_or(DEFAULT_SOCKET_GROUP);
    let found = nix::unistd::Group::from_name(name).map_err(std::io::Error::from)?;
    let gid = match (found, group) {
        (Some(g), _) => g.gid,
        (None, None) => return Ok(()),
        (None, Some(_)) => {
            return Err(std::io::Error::new(
                std::io::ErrorKind::NotFound,
                format!("socket_group {name:?}: no such group"),
            ))
        }
    };
    std::os::unix::fs::chown(path, None, Some(gid.as_raw()))
}

/// Serves `router` on `listener` until `stop` is notified, then stops accepting and returns
/// once every connection it accepted has ended. Unlike axum's graceful shutdown, a connection
/// accepted but whose request has not arrived yet is served, not closed: a client that connected
/// while lazyd hands over gets its answer. Connections not yet accepted stay queued on the
/// listening socket, which the next lazyd inherits.
pub async fn serve_until(listener: UnixListener, router: Router, stop: Arc<tokio::sync::Notify>) {
    let mut connections = tokio::task::JoinSet::new();
    loop {
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    tracing::warn!("control socket: accept failed: {e}");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = stop.notified() => break,
        };
        let service = hyper_util::service::TowerToHyperService::new(router.clone());
        connections.spawn(async move {
            let io = hyper_util::rt::TokioIo::new(stream);
            if let Err(e) = hyper::server::conn::http1::Builder::new()
                .serve_connection(io, service)
                .await
            {
                tracing::debug!("control connection: {e}");
            }
        });
        // Reap the connections that ended.
        while connections.try_join_next().is_some() {}
    }
    drop(listener);
    while connections.join_next().await.is_some() {}
}

/// An agent error as an HTTP response; the one place errors become statuses.
struct ApiError(AgentError);

impl From<AgentError> for ApiError {
    fn from(e: AgentError) -> Self {
        ApiError(e)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let backend = self.0.is_backend();
        let status = match &self.0 {
            AgentError::BadRequest(_) => StatusCode::BAD_REQUEST,
            AgentError::NotMounted(_) | AgentError::NoContainer(_) | AgentError::NoHolder(_) => {
                StatusCode::NOT_FOUND
            }
            AgentError::Conflict(_) | AgentError::Busy { .. } | AgentError::LowerInUse { .. } => {
                StatusCode::CONFLICT
            }
            AgentError::ShuttingDown => StatusCode::SERVICE_UNAVAILABLE,
            AgentError::OpenTimeout { .. } => StatusCode::GATEWAY_TIMEOUT,
            AgentError::Open { .. }
            | AgentError::Config { .. }
            | AgentError::Profile(_)
            | AgentError::Warm(_) => {
                if backend {
                    StatusCode::BAD_GATEWAY
                } else {
                    StatusCode::BAD_REQUEST
                }
            }
            AgentError::Mount(
                MountError::NotADirectory(_)
                | MountError::OverlayPath { .. }
                | MountError::DeadMount(_),
            ) => StatusCode::BAD_REQUEST,
            AgentError::Mount(
                MountError::Store(_)
                | MountError::Index(_)
                | MountError::Mount { .. }
                | MountError::Adopt { .. }
                | MountError::Overlay { .. },
            )
            | AgentError::Cache(_)
            | AgentError::BadConfig(_)
            | AgentError::Io { .. } => StatusCode::INTERNAL_SERVER_ERROR,
        };
        let error = crate::error::error_chain(&self.0);
        (status, Json(ErrorBody { error })).into_response()
    }
}

type Result<T> = std::result::Result<T, ApiError>;

/// Runs a change to the agent's mounts, containers or holders to its end on a task of its own,
/// whether or not the client waits for the answer. hyper drops a request's future when its
/// client goes away (a killed snapshotter, a Ctrl-C'd lazyctl); dropped halfway, a mount could
/// be made in the kernel but never recorded, so never handed over at a restart.
async fn to_the_end<T, F>(change: F) -> Result<T>
where
    T: Send + 'static,
    F: std::future::Future<Output = std::result::Result<T, AgentError>> + Send + 'static,
{
    match tokio::spawn(change).await {
        Ok(result) => Ok(result?),
        Err(e) => Err(ApiError(AgentError::Io {
            context: "the request's task".into(),
            source: std::io::Error::other(e),
        })),
    }
}

async fn status(State(agent): State<Arc<Agent>>) -> Json<crate::api::Status> {
    Json(agent.status())
}

async fn mounts(State(agent): State<Arc<Agent>>) -> Json<Vec<crate::api::MountInfo>> {
    Json(agent.status().mounts)
}

async fn mount(
    State(agent): State<Arc<Agent>>,
    Json(req): Json<MountRequest>,
) -> Result<Json<crate::api::MountInfo>> {
    Ok(Json(
        to_the_end(async move { agent.mount(req).await }).await?,
    ))
}

async fn umount(
    State(agent): State<Arc<Agent>>,
    Json(req): Json<UmountRequest>,
) -> Result<Json<serde_json::Value>> {
    to_the_end(async move { agent.umount(req).await }).await?;
    Ok(Json(serde_json::json!({})))
}

async fn gc(
    State(agent): State<Arc<Agent>>,
    Json(req): Json<GcRequest>,
) -> Result<Json<crate::api::GcReport>> {
    Ok(Json(to_the_end(async move { agent.gc(req).await }).await?))
}

async fn profile_show(
    State(agent): State<Arc<Agent>>,
    Json(req): Json<ProfileRequest>,
) -> Result<Json<crate::api::ProfileReport>> {
    Ok(Json(agent.profile_show(&req.image).await?))
}

async fn profile_push(
    State(agent): State<Arc<Agent>>,
    Json(req): Json<ProfileRequest>,
) -> Result<Json<crate::api::ProfileReport>> {
    Ok(Json(agent.profile_push(&req.image).await?))
}

async fn profile_record(
    State(agent): State<Arc<Agent>>,
    Json(req): Json<RecordRequest>,
) -> Result<Json<crate::api::MountInfo>> {
    Ok(Json(agent.record(req)?))
}

async fn rootfs(
    State(agent): State<Arc<Agent>>,
    Json(req): Json<RootfsRequest>,
) -> Result<Json<crate::api::RootfsInfo>> {
    Ok(Json(
        to_the_end(async move { agent.create_rootfs(req).await }).await?,
    ))
}

async fn rootfs_remove(
    State(agent): State<Arc<Agent>>,
    Json(req): Json<RootfsRemoveRequest>,
) -> Result<Json<crate::api::RootfsRemoved>> {
    Ok(Json(
        to_the_end(async move { agent.remove_rootfs(&req.name, req.keep).await }).await?,
    ))
}

/// The image's config blob as stored: its bytes are what the digest covers, so they are passed
/// on verbatim, not re-serialised.
async fn image_config(
    State(agent): State<Arc<Agent>>,
    Json(req): Json<ImageRequest>,
) -> Result<Response> {
    let bytes = agent.image_config(&req.image).await?;
    Ok(([(header::CONTENT_TYPE, "application/json")], bytes).into_response())
}

async fn image_resolve(
    State(agent): State<Arc<Agent>>,
    Json(req): Json<ImageRequest>,
) -> Result<Json<crate::api::ResolvedImage>> {
    Ok(Json(agent.resolve_image(&req.image).await?))
}

async fn lower(
    State(agent): State<Arc<Agent>>,
    Json(req): Json<LowerRequest>,
) -> Result<Json<crate::api::LowerInfo>> {
    Ok(Json(
        to_the_end(async move { agent.hold_lower(req).await }).await?,
    ))
}

async fn lower_release(
    State(agent): State<Arc<Agent>>,
    Json(req): Json<LowerReleaseRequest>,
) -> Result<Json<crate::api::LowerReleased>> {
    Ok(Json(
        to_the_end(async move { agent.release_held_lower(req).await }).await?,
    ))
}

async fn upgrade(
    State(agent): State<Arc<Agent>>,
    Json(req): Json<crate::api::UpgradeRequest>,
) -> Result<Json<crate::api::UpgradeStarted>> {
    Ok(Json(agent.request_upgrade(req.binary)?))
}

async fn metrics(State(agent): State<Arc<Agent>>) -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        agent.prometheus(),
    )
}

/// Warm events, one JSON object per line, for as long as the warm runs. When the client goes
/// away the body is dropped, the channel closes and the warm stops.
async fn warm(State(agent): State<Arc<Agent>>, Json(req): Json<WarmRequest>) -> Result<Response> {
    agent.check_warm(&req)?;
    // A few events of slack: the warm reports at most every 200 ms, so a full channel means a
    // client that stopped reading, and the warm then waits for it.
    let (tx, rx) = mpsc::channel(16);
    tokio::spawn(async move { agent.warm(req, tx).await });
    Ok((
        [(header::CONTENT_TYPE, "application/x-ndjson")],
        Body::new(EventBody(rx)),
    )
        .into_response())
}

/// A response body fed by a channel of warm events.
struct EventBody(mpsc::Receiver<WarmEvent>);

impl http_body::Body for EventBody {
    type Data = Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<std::result::Result<Frame<Bytes>, Self::Error>>> {
        self.0.poll_recv(cx).map(|event| {
            event.map(|e| {
                // Serialising these plain structs cannot fail; an empty line would be skipped.
                let mut line = serde_json::to_vec(&e).unwrap_or_default();
                line.push(b'\n');
                Ok(Frame::data(Bytes::from(line)))
            })
        })
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::MetadataExt;

    use super::*;

    #[tokio::test]
    #[cfg_attr(
        not(feature = "system-tests"),
        ignore = "needs root: gives a socket to another group"
    )]
    async fn the_socket_goes_to_the_named_group_and_a_missing_one_is_refused() {
        lazy_tests::mount::require_root();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("run/lazyd.sock");
        let _listener = bind_socket(&path).await.unwrap();
        let meta = std::fs::metadata(&path).unwrap();
        assert_eq!(meta.mode() & 0o777, 0o660);
        assert_eq!(meta.gid(), 0);

        // Debian's `daemon` group (gid 1), in every base system.
        set_socket_group(&path, Some("daemon")).unwrap();
        assert_eq!(std::fs::metadata(&path).unwrap().gid(), 1);
        // A number is a group ID, whether a group of that ID exists here or not.
        set_socket_group(&path, Some("54321")).unwrap();
        assert_eq!(std::fs::metadata(&path).unwrap().gid(), 54321);
        set_socket_group(&path, Some("daemon")).unwrap();

        let err = set_socket_group(&path, Some("no-such-group-here")).unwrap_err();
        assert!(err.to_string().contains("no-such-group-here"), "{err}");
        assert_eq!(std::fs::metadata(&path).unwrap().gid(), 1);

        // Unnamed: `lazyd` where it exists, else the socket is left as it is.
        set_socket_group(&path, None).unwrap();
        let lazyd = nix::unistd::Group::from_name(DEFAULT_SOCKET_GROUP).unwrap();
        let expected = lazyd.map_or(1, |g| g.gid.as_raw());
        assert_eq!(std::fs::metadata(&path).unwrap().gid(), expected);
    }
}
