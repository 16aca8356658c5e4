//! [`RegistryBlobStore`]: the [`BlobStore`] over one repository of an OCI registry, which is
//! where the lazy fetcher reads chunks from when an image is mounted from a registry.
//!
//! Reads go through [`RegistryClient`], so they share its connections, cached tokens (refreshed
//! before they expire, and after a 401 on a revoked or early-expired one) and redirect handling
//! (a blob served from S3-like storage through a 307 gets its `Range` but never the registry's
//! `Authorization`). This module's own job is the translation of [`RegistryError`] into
//! [`BlobError`], which decides what the fetcher retries; see [`blob_error`].

use std::ops::Range;

use async_trait::async_trait;

use super::client::RegistryClient;
use super::error::RegistryError;
use super::reference::validate_repository;
use crate::blobstore::{BackendId, BlobError, BlobStore};
use crate::error::error_chain;

/// Blobs of repository `repo` on the registry `client` talks to.
#[derive(Debug, Clone)]
pub struct RegistryBlobStore {
    client: RegistryClient,
    repo: String,
}

impl RegistryBlobStore {
    /// A store over `repo` (`library/debian`), which must be a valid repository name.
    pub fn new(client: RegistryClient, repo: &str) -> Result<Self, RegistryError> {
        validate_repository(repo)?;
        Ok(RegistryBlobStore {
            client,
            repo: repo.to_string(),
        })
    }

    pub fn client(&self) -> &RegistryClient {
        &self.client
    }

    pub fn repo(&self) -> &str {
        &self.repo
    }
}

#[async_trait]
impl BlobStore for RegistryBlobStore {
    fn id(&self) -> BackendId {
        BackendId::registry(self.client.registry(), &self.repo)
    }

    async fn read_range(&self, digest: &str, range: Range<u64>) -> Result<Vec<u8>, BlobError> {
        self.client
            .get_blob_range(&self.repo, digest, range)
            .await
            .map_err(|e| blob_error(self, digest, e))
    }

    async fn read_range_to(
        &self,
        digest: &str,
        range: Range<u64>,
        sink: &mut (dyn for<'b> FnMut(&'b [u8]) + Send),
    ) -> Result<(), BlobError> {
        self.client
            .get_blob_range_to(&self.repo, digest, range, sink)
            .await
            .map_err(|e| blob_error(self, digest, e))
    }

    async fn read_blob(&self, digest: &str, max_size: u64) -> Result<Vec<u8>, BlobError> {
        self.client
            .get_blob_bytes(&self.repo, digest, max_size)
            .await
            .map_err(|e| blob_error(self, digest, e))
    }
}

/// Translates a registry error for the fetcher. The reason is the whole cause chain, since
/// reqwest keeps what actually went wrong (refused, reset, certificate) in its sources.
///
/// - missing blob: [`BlobError::NotFound`];
/// - refused or impossible authentication: [`BlobError::Denied`];
/// - a timeout (reqwest's connect or read timeout, a stalled transfer): [`BlobError::Timeout`];
/// - a 429 or 503 with `Retry-After`: [`BlobError::Throttled`];
/// - everything else by [`RegistryError::is_permanent`]: [`BlobError::Invalid`] when a retry
///   cannot help, [`BlobError::Unavailable`] when it may.
fn blob_error(store: &RegistryBlobStore, digest: &str, err: RegistryError) -> BlobError {
    let name = store.id();
    let digest = digest.to_string();
    let reason = error_chain(&err);
    let inner = &store.client.inner;
    match err {
        RegistryError::BlobUnknown { .. } => BlobError::NotFound {
            store: name,
            digest,
        },
        RegistryError::Unauthorized { .. }
        | RegistryError::Denied { .. }
        | RegistryError::UnsupportedAuth { .. } => BlobError::Denied {
            store: name,
            digest,
            reason,
        },
        RegistryError::Transport { ref source, .. } if source.is_timeout() => BlobError::Timeout {
            store: name,
            digest,
            after: if source.is_connect() {
                inner.connect_timeout
            } else {
                inner.read_timeout
            },
        },
        RegistryError::Stalled { after, .. } => BlobError::Timeout {
            store: name,
            digest,
            after,
        },
        RegistryError::Http {
            retry_after: Some(retry_after),
            ..
        } => BlobError::Throttled {
            store: name,
            digest,
            reason,
            retry_after,
        },
        RegistryError::InvalidReference { .. }
        | RegistryError::InvalidRegistry { .. }
        | RegistryError::InvalidDigest { .. }
        | RegistryError::InvalidRange { .. }
        | RegistryError::ManifestUnknown { .. }
        | RegistryError::DigestMismatch { .. }
        | RegistryError::InvalidManifest { .. }
        | RegistryError::RangeMismatch { .. }
        | RegistryError::TruncatedBody { .. }
        | RegistryError::TokenResponse { .. }
        | RegistryError::Http { .. }
        | RegistryError::Transport { .. }
        | RegistryError::BlobTooLarge { .. }
        | RegistryError::BadResponse { .. }
        | RegistryError::Io { .. }
        | RegistryError::ReadFile { .. } => {
            if err.is_permanent() {
                BlobError::Invalid {
                    store: name,
                    digest,
                    reason,
                }
            } else {
                BlobError::Unavailable {
                    store: name,
                    digest,
                    reason,
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_support::*;
    use super::super::*;
    use crate::blobstore::{BlobError, BlobStore};
    use crate::store::sha256_digest;
    use crate::sync::lock;
    use std::ops::Range;
    use std::sync::{Arc, Mutex};
    use std::time::{Duration, Instant};
    use tokio::io::AsyncWriteExt;

    /// Serves `data` as blob `test/img@<its digest>`, honouring ranges; 404 for anything else.
    fn blob_handler(data: Vec<u8>) -> impl FnOnce(String) -> Handler {
        let path = format!("/v2/test/img/blobs/{}", sha256_digest(&data));
        move |_| {
            Arc::new(move |req: &SeenRequest| {
                if req.path_only() == path {
                    range_reply(req, &data)
                } else {
                    Reply::new(404, r#"{"errors":[{"code":"BLOB_UNKNOWN"}]}"#)
                }
            })
        }
    }

    fn store(client: RegistryClient) -> RegistryBlobStore {
        RegistryBlobStore::new(client, "test/img").unwrap()
    }

    #[tokio::test]
    async fn store_reads_ranges_and_whole_blobs_with_a_size_cap() {
        let data = noise(200_000, 8);
        let digest = sha256_digest(&data);
        let server = FakeServer::start(blob_handler(data.clone())).await;
        let store = store(server.client(None));
        assert_eq!(store.id().kind(), "registry");
        assert_eq!(
            store.id().to_string(),
            format!("registry {}/test/img", server.host())
        );

        for range in [0..1, 0..65_536, 12_345..150_001, 199_999..200_000, 7..7] {
            let bytes = store.read_range(&digest, range.clone()).await.unwrap();
            assert_eq!(bytes, &data[range.start as usize..range.end as usize]);
        }
        assert_eq!(store.read_blob(&digest, 200_000).await.unwrap(), data);
        let err = store.read_blob(&digest, 199_999).await.unwrap_err();
        assert!(
            matches!(&err, BlobError::Invalid { reason, .. } if reason.contains("199999-byte limit")),
            "{err}"
        );
        assert!(
            RegistryBlobStore::new(server.client(None), "Bad/Name").is_err(),
            "repository names are checked up front"
        );
    }

    #[tokio::test]
    async fn corrupted_whole_blob_is_invalid() {
        let data = noise(1000, 9);
        let digest = sha256_digest(&data);
        let mut served = data.clone();
        served[500] ^= 1;
        let path = format!("/v2/test/img/blobs/{digest}");
        let server = FakeServer::start(move |_| {
            Arc::new(move |req: &SeenRequest| {
                assert_eq!(req.path_only(), path);
                Reply::new(200, served.clone())
            })
        })
        .await;
        let err = store(server.client(None))
            .read_blob(&digest, 1 << 20)
            .await
            .unwrap_err();
        assert!(
            matches!(&err, BlobError::Invalid { reason, .. } if reason.contains("digest mismatch")),
            "{err}"
        );
    }

    #[tokio::test]
    async fn registry_errors_map_to_blob_errors() {
        let data = noise(100, 10);
        let digest = sha256_digest(&data);
        let served = data.clone();
        let server = FakeServer::start(move |base| {
            Arc::new(move |req: &SeenRequest| {
                let repo = req
                    .path_only()
                    .strip_prefix("/v2/")
                    .and_then(|p| p.split("/blobs/").next())
                    .unwrap_or_default();
                match repo {
                    "test/img" => range_reply(req, &served),
                    "test/short" => {
                        let mut reply = range_reply(req, &served);
                        reply.body.pop();
                        reply
                    }
                    "test/down" => Reply::new(
                        503,
                        r#"{"errors":[{"code":"UNAVAILABLE","message":"maintenance"}]}"#,
                    ),
                    "test/throttled" => Reply::new(
                        429,
                        r#"{"errors":[{"code":"TOOMANYREQUESTS","message":"slow down"}]}"#,
                    )
                    .header("Retry-After", "7"),
                    "test/forbidden" => Reply::new(403, ""),
                    "test/negotiate" => Reply::new(401, "").header("WWW-Authenticate", "Negotiate"),
                    "test/private" => bearer_challenge(&base, "test/private"),
                    _ if req.path_only() == "/token" => Reply::new(401, ""),
                    _ => Reply::new(404, ""),
                }
            })
        })
        .await;
        let client = server.client(None);
        let read = |repo: &'static str, range: Range<u64>| {
            let store = RegistryBlobStore::new(client.clone(), repo).unwrap();
            let digest = digest.clone();
            async move { store.read_range(&digest, range).await.unwrap_err() }
        };

        let err = read("test/missing", 0..10).await;
        assert!(matches!(err, BlobError::NotFound { .. }), "{err}");
        for repo in ["test/forbidden", "test/negotiate", "test/private"] {
            let err = read(repo, 0..10).await;
            assert!(matches!(err, BlobError::Denied { .. }), "{repo}: {err}");
            assert!(err.is_permanent());
        }
        let err = read("test/private", 0..10).await;
        assert!(err.to_string().contains("docker login"), "{err}");
        let err = read("test/down", 0..10).await;
        assert!(
            matches!(&err, BlobError::Unavailable { reason, .. } if reason.contains("UNAVAILABLE maintenance")),
            "{err}"
        );
        let err = read("test/throttled", 0..10).await;
        assert!(
            matches!(&err, BlobError::Throttled { reason, retry_after, .. }
                if reason.contains("http 429") && *retry_after == Duration::from_secs(7)),
            "{err}"
        );
        assert!(!err.is_permanent());
        let err = read("test/short", 0..10).await;
        assert!(
            matches!(&err, BlobError::Unavailable { reason, .. } if reason.contains("after 9 bytes")),
            "{err}"
        );
        let err = read("test/img", 90..110).await;
        assert!(
            matches!(&err, BlobError::Invalid { reason, .. } if reason.contains("only 100 bytes")),
            "{err}"
        );
        let store = RegistryBlobStore::new(client.clone(), "test/img").unwrap();
        let err = store.read_range("sha256:../../x", 0..1).await.unwrap_err();
        assert!(matches!(err, BlobError::Invalid { .. }), "{err}");
        assert!(err.is_permanent());

        // Nothing listening: the reason carries reqwest's hidden cause.
        let port = free_port();
        let closed = RegistryClient::new(&format!("127.0.0.1:{port}"), Default::default());
        let err = RegistryBlobStore::new(closed.unwrap(), "test/img")
            .unwrap()
            .read_range(&digest, 0..1)
            .await
            .unwrap_err();
        match &err {
            BlobError::Unavailable { reason, .. } => {
                assert!(reason.contains("Connection refused"), "{reason}")
            }
            other => panic!("{other}"),
        }
        assert!(!err.is_permanent());
    }

    /// A server that answers a blob request with headers and the first bytes of a 206, then
    /// sends nothing more while holding the connection (a stalled storage backend).
    async fn stalling_server() -> (String, tokio::task::JoinHandle<()>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let host = listener.local_addr().unwrap().to_string();
        let task = tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                tokio::spawn(async move {
                    if read_request_head(&mut stream).await.is_none() {
                        return;
                    }
                    let reply = "HTTP/1.1 206 X\r\nContent-Range: bytes 0-9/100\r\nContent-Length: 10\r\n\r\nabc";
                    let _ = stream.write_all(reply.as_bytes()).await;
                    tokio::time::sleep(Duration::from_secs(3600)).await;
                });
            }
        });
        (host, task)
    }

    #[tokio::test]
    async fn stalled_read_is_a_timeout() {
        let (host, task) = stalling_server().await;
        let read_timeout = Duration::from_millis(300);
        let store = store(impatient_client(&host, read_timeout));
        let started = Instant::now();
        let err = store
            .read_range(&sha256_digest(b"x"), 0..10)
            .await
            .unwrap_err();
        match &err {
            BlobError::Timeout { after, .. } => assert_eq!(*after, read_timeout),
            other => panic!("{other}"),
        }
        assert!(!err.is_permanent());
        assert!(started.elapsed() < Duration::from_secs(5));
        task.abort();
    }

    #[tokio::test]
    async fn expired_or_revoked_tokens_are_replaced() {
        /// Tokens the server takes: only the newest, and only for `lifetime` after issue.
        struct Tokens {
            issued: u32,
            newest: Option<(String, Instant)>,
        }
        let lifetime = Duration::from_millis(500);
        let data = noise(5000, 11);
        let digest = sha256_digest(&data);
        let tokens = Arc::new(Mutex::new(Tokens {
            issued: 0,
            newest: None,
        }));
        let server_tokens = tokens.clone();
        let served = data.clone();
        let server = FakeServer::start(move |base| {
            Arc::new(move |req: &SeenRequest| {
                let mut tokens = server_tokens.lock().unwrap();
                if req.path_only() == "/token" {
                    tokens.issued += 1;
                    let token = format!("tok-{}", tokens.issued);
                    tokens.newest = Some((token.clone(), Instant::now()));
                    // Shorter than the 60 s the client assumes at least, as some servers do.
                    return Reply::new(200, format!(r#"{{"token":"{token}","expires_in":1}}"#));
                }
                let valid = tokens
                    .newest
                    .as_ref()
                    .filter(|(_, at)| at.elapsed() < lifetime)
                    .map(|(t, _)| format!("Bearer {t}"));
                if valid.is_some() && req.header("authorization") == valid.as_deref() {
                    range_reply(req, &served)
                } else {
                    bearer_challenge(&base, "test/img")
                }
            })
        })
        .await;
        let store = store(server.client(None));
        assert_eq!(store.read_range(&digest, 0..10).await.unwrap(), &data[..10]);
        // The server lets the token expire; the cached one is answered with a 401 and replaced.
        tokio::time::sleep(lifetime + Duration::from_millis(100)).await;
        assert_eq!(
            store.read_range(&digest, 10..20).await.unwrap(),
            &data[10..20]
        );
        // The client's own expiry: a token due for refresh is replaced before the request.
        for token in lock(&store.client().inner.auth).tokens.values_mut() {
            token.refresh_at = Instant::now();
        }
        assert_eq!(
            store.read_range(&digest, 20..30).await.unwrap(),
            &data[20..30]
        );

        let auth: Vec<_> = server
            .requests_to(&format!("/v2/test/img/blobs/{digest}"))
            .iter()
            .map(|r| r.header("authorization").map(str::to_string))
            .collect();
        let bearer = |n: u32| Some(format!("Bearer tok-{n}"));
        assert_eq!(
            auth,
            [None, bearer(1), bearer(1), bearer(2), bearer(3)],
            "anonymous, tok-1; tok-1 refused, tok-2; tok-3 fetched up front"
        );
        assert_eq!(tokens.lock().unwrap().issued, 3);
    }

    #[tokio::test]
    async fn redirect_to_storage_keeps_range_and_drops_authorization() {
        let data = noise(300_000, 12);
        let digest = sha256_digest(&data);
        let (storage, registry) = registry_redirecting_to_storage(&data, "blob", "s3cr3t").await;
        let store = store(registry.client(None));
        let ranges = [0..4096, 4096..131_072, 299_000..300_000];
        for range in ranges.clone() {
            let bytes = store.read_range(&digest, range.clone()).await.unwrap();
            assert_eq!(bytes, &data[range.start as usize..range.end as usize]);
        }
        assert_eq!(store.read_blob(&digest, 1 << 20).await.unwrap(), data);

        let fetched = storage.requests();
        assert_eq!(fetched.len(), 4, "{fetched:?}");
        for req in &fetched {
            assert_eq!(req.header("authorization"), None, "token leaked: {req:?}");
            assert_eq!(req.query("X-Amz-Signature"), ["s3cr3t"]);
        }
        let sent_ranges: Vec<_> = fetched.iter().map(|r| r.header("range")).collect();
        assert_eq!(
            sent_ranges,
            [
                Some("bytes=0-4095"),
                Some("bytes=4096-131071"),
                Some("bytes=299000-299999"),
                None
            ]
        );

        // Storage that fails: the error names the registry URL, never the signed one.
        drop(storage);
        let err = store.read_range(&digest, 0..10).await.unwrap_err();
        assert!(matches!(err, BlobError::Unavailable { .. }), "{err}");
        assert!(!err.to_string().contains("s3cr3t"), "{err}");
    }
}
