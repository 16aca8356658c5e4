//! A client of the Kubernetes CRI image service (`runtime.v1.ImageService`), the calls a
//! kubelet makes to pull and remove images, for tests of containerd's CRI plugin with the
//! lazy snapshotter. Debian 12 has no crictl; the three messages needed are declared here with
//! the CRI API's field numbers (k8s.io/cri-api, `pkg/apis/runtime/v1/api.proto`), fields the
//! tests do not use left out (protobuf skips unknown fields).

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use hyper_util::rt::TokioIo;
use tonic::codegen::http::uri::PathAndQuery;
use tonic::transport::{Endpoint, Uri};

#[derive(Clone, PartialEq, prost::Message)]
struct ImageSpec {
    #[prost(string, tag = "1")]
    image: String,
}

#[derive(Clone, PartialEq, prost::Message)]
struct PullImageRequest {
    #[prost(message, optional, tag = "1")]
    image: Option<ImageSpec>,
}

#[derive(Clone, PartialEq, prost::Message)]
struct PullImageResponse {
    #[prost(string, tag = "1")]
    image_ref: String,
}

#[derive(Clone, PartialEq, prost::Message)]
struct RemoveImageRequest {
    #[prost(message, optional, tag = "1")]
    image: Option<ImageSpec>,
}

#[derive(Clone, PartialEq, prost::Message)]
struct RemoveImageResponse {}

/// `PullImage` of `image` through containerd's CRI plugin at `socket` (its gRPC address), as a
/// kubelet asks for it; returns the image's ID (`sha256:` of its config).
pub fn pull_image(socket: &Path, image: &str) -> Result<String> {
    let request = PullImageRequest {
        image: Some(ImageSpec {
            image: image.to_string(),
        }),
    };
    let response: PullImageResponse = call(socket, "/runtime.v1.ImageService/PullImage", request)
        .with_context(|| format!("CRI PullImage {image}"))?;
    Ok(response.image_ref)
}

/// `RemoveImage` of `image` through the CRI plugin.
pub fn remove_image(socket: &Path, image: &str) -> Result<()> {
    let request = RemoveImageRequest {
        image: Some(ImageSpec {
            image: image.to_string(),
        }),
    };
    let _: RemoveImageResponse = call(socket, "/runtime.v1.ImageService/RemoveImage", request)
        .with_context(|| format!("CRI RemoveImage {image}"))?;
    Ok(())
}

/// One unary gRPC call on the unix socket.
fn call<Q, A>(socket: &Path, method: &'static str, request: Q) -> Result<A>
where
    Q: prost::Message + Send + Sync + 'static,
    A: prost::Message + Default + Send + Sync + 'static,
{
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let socket: PathBuf = socket.to_path_buf();
    runtime.block_on(async move {
        // The URI is required but unused: the connector dials the socket.
        let channel = Endpoint::try_from("http://cri.invalid")?
            .connect_with_connector(tower::service_fn(move |_: Uri| {
                let socket = socket.clone();
                async move {
                    Ok::<_, std::io::Error>(TokioIo::new(
                        tokio::net::UnixStream::connect(socket).await?,
                    ))
                }
            }))
            .await
            .context("connecting to containerd")?;
        let mut grpc = tonic::client::Grpc::new(channel);
        grpc.ready().await.context("containerd is not ready")?;
        let codec = tonic_prost::ProstCodec::<Q, A>::default();
        let answer = grpc
            .unary(
                tonic::Request::new(request),
                PathAndQuery::from_static(method),
                codec,
            )
            .await
            .map_err(|status| anyhow::anyhow!("{method}: {status}"))?;
        Ok(answer.into_inner())
    })
}
