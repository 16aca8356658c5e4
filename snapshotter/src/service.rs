//! containerd's snapshots gRPC service (`containerd.services.snapshots.v1.Snapshots`) over the
//! [`Snapshotter`]: messages in and out, errors as the gRPC codes containerd's errdefs map back
//! (NotFound, AlreadyExists, FailedPrecondition, InvalidArgument, Unavailable), and each
//! request counted and timed.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Instant, SystemTime};

use tokio_stream::Stream;
use tonic::{Request, Response, Status};
use tracing::warn;

use crate::metrics::Metrics;
use crate::proto::snapshots::{self as api, snapshots_server::Snapshots};
use crate::proto::types;
use crate::snapshots::{Info, Mount, SnapError, Snapshotter};
use crate::store::Kind;

/// How many snapshots one `List` answer carries.
const LIST_BATCH: usize = 100;

pub struct Service {
    snapshotter: Arc<Snapshotter>,
    metrics: Arc<Metrics>,
}

impl Service {
    pub fn new(snapshotter: Arc<Snapshotter>, metrics: Arc<Metrics>) -> Service {
        Service {
            snapshotter,
            metrics,
        }
    }

    /// Runs one request: counts and times it, and logs failures containerd does not expect.
    async fn serve<T>(
        &self,
        method: &'static str,
        call: impl Future<Output = Result<T, SnapError>>,
    ) -> Result<Response<T>, Status> {
        let started = Instant::now();
        let result = call.await;
        self.metrics
            .request(method, started.elapsed(), result.is_err());
        match result {
            Ok(answer) => Ok(Response::new(answer)),
            Err(e) => {
                // AlreadyExists and NotFound are answers containerd asks for, not failures.
                if !matches!(e, SnapError::AlreadyExists(_) | SnapError::NotFound(_)) {
                    warn!(method, "{e}");
                }
                Err(status(e))
            }
        }
    }
}

fn status(e: SnapError) -> Status {
    let message = e.to_string();
    match e {
        SnapError::NotFound(_) => Status::not_found(message),
        SnapError::AlreadyExists(_) => Status::already_exists(message),
        SnapError::FailedPrecondition(_) => Status::failed_precondition(message),
        SnapError::InvalidArgument(_) => Status::invalid_argument(message),
        SnapError::Unavailable(_) => Status::unavailable(message),
        SnapError::Store(_) | SnapError::Io { .. } => Status::internal(message),
    }
}

fn to_mounts(mounts: Vec<Mount>) -> Vec<types::Mount> {
    mounts
        .into_iter()
        .map(|m| types::Mount {
            r#type: m.kind,
            source: m.source,
            target: String::new(),
            options: m.options,
        })
        .collect()
}

fn kind_of(kind: Kind) -> api::Kind {
    match kind {
        Kind::View => api::Kind::View,
        Kind::Active => api::Kind::Active,
        Kind::Committed => api::Kind::Committed,
    }
}

fn to_info(info: Info) -> api::Info {
    api::Info {
        name: info.name,
        parent: info.parent,
        kind: kind_of(info.kind).into(),
        created_at: Some(info.created.into()),
        updated_at: Some(info.updated.into()),
        labels: info.labels,
    }
}

fn from_info(info: api::Info) -> Info {
    let time = |t: Option<prost_types::Timestamp>| {
        t.and_then(|t| SystemTime::try_from(t).ok())
            .unwrap_or(SystemTime::UNIX_EPOCH)
    };
    Info {
        name: info.name,
        parent: info.parent,
        kind: match api::Kind::try_from(info.kind) {
            Ok(api::Kind::View) => Kind::View,
            Ok(api::Kind::Committed) => Kind::Committed,
            _ => Kind::Active,
        },
        created: time(info.created_at),
        updated: time(info.updated_at),
        labels: info.labels,
    }
}

type ListStream = Pin<Box<dyn Stream<Item = Result<api::ListSnapshotsResponse, Status>> + Send>>;

#[tonic::async_trait]
impl Snapshots for Service {
    async fn prepare(
        &self,
        request: Request<api::PrepareSnapshotRequest>,
    ) -> Result<Response<api::PrepareSnapshotResponse>, Status> {
        let r = request.into_inner();
        self.serve("Prepare", async {
            let mounts = self
                .snapshotter
                .create(Kind::Active, &r.key, &r.parent, r.labels)
                .await?;
            Ok(api::PrepareSnapshotResponse {
                mounts: to_mounts(mounts),
            })
        })
        .await
    }

    async fn view(
        &self,
        request: Request<api::ViewSnapshotRequest>,
    ) -> Result<Response<api::ViewSnapshotResponse>, Status> {
        let r = request.into_inner();
        self.serve("View", async {
            let mounts = self
                .snapshotter
                .create(Kind::View, &r.key, &r.parent, r.labels)
                .await?;
            Ok(api::ViewSnapshotResponse {
                mounts: to_mounts(mounts),
            })
        })
        .await
    }

    async fn mounts(
        &self,
        request: Request<api::MountsRequest>,
    ) -> Result<Response<api::MountsResponse>, Status> {
        let r = request.into_inner();
        self.serve("Mounts", async {
            let mounts = self.snapshotter.mounts(&r.key).await?;
            Ok(api::MountsResponse {
                mounts: to_mounts(mounts),
            })
        })
        .await
    }

    async fn commit(
        &self,
        request: Request<api::CommitSnapshotRequest>,
    ) -> Result<Response<()>, Status> {
        let r = request.into_inner();
        self.serve("Commit", self.snapshotter.commit(&r.name, &r.key, r.labels))
            .await
    }

    async fn remove(
        &self,
        request: Request<api::RemoveSnapshotRequest>,
    ) -> Result<Response<()>, Status> {
        let r = request.into_inner();
        self.serve("Remove", self.snapshotter.remove(&r.key)).await
    }

    async fn stat(
        &self,
        request: Request<api::StatSnapshotRequest>,
    ) -> Result<Response<api::StatSnapshotResponse>, Status> {
        let r = request.into_inner();
        self.serve("Stat", async {
            let info = self.snapshotter.stat(&r.key)?;
            Ok(api::StatSnapshotResponse {
                info: Some(to_info(info)),
            })
        })
        .await
    }

    async fn update(
        &self,
        request: Request<api::UpdateSnapshotRequest>,
    ) -> Result<Response<api::UpdateSnapshotResponse>, Status> {
        let r = request.into_inner();
        self.serve("Update", async {
            let info = r
                .info
                .ok_or_else(|| SnapError::InvalidArgument("Update without an info".into()))?;
            let paths = r.update_mask.map(|m| m.paths).unwrap_or_default();
            let info = self.snapshotter.update(from_info(info), &paths)?;
            Ok(api::UpdateSnapshotResponse {
                info: Some(to_info(info)),
            })
        })
        .await
    }

    type ListStream = ListStream;

    async fn list(
        &self,
        request: Request<api::ListSnapshotsRequest>,
    ) -> Result<Response<Self::ListStream>, Status> {
        let r = request.into_inner();
        let answer = self
            .serve("List", async { self.snapshotter.list(&r.filters) })
            .await?;
        let infos = answer.into_inner();
        let batches: Vec<Result<api::ListSnapshotsResponse, Status>> = infos
            .chunks(LIST_BATCH)
            .map(|chunk| {
                Ok(api::ListSnapshotsResponse {
                    info: chunk.iter().cloned().map(to_info).collect(),
                })
            })
            .collect();
        Ok(Response::new(Box::pin(tokio_stream::iter(batches))))
    }

    async fn usage(
        &self,
        request: Request<api::UsageRequest>,
    ) -> Result<Response<api::UsageResponse>, Status> {
        let r = request.into_inner();
        self.serve("Usage", async {
            let usage = self.snapshotter.usage(&r.key).await?;
            Ok(api::UsageResponse {
                size: usage.size,
                inodes: usage.inodes,
            })
        })
        .await
    }

    async fn cleanup(
        &self,
        _request: Request<api::CleanupRequest>,
    ) -> Result<Response<()>, Status> {
        self.serve("Cleanup", self.snapshotter.cleanup()).await
    }
}
