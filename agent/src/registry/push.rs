//! Pushing to a registry: blobs (`HEAD` to skip what is there, then one `POST` and a monolithic
//! `PUT` streaming the bytes) and manifests.
//!
//! A blob upload is `POST /v2/REPO/blobs/uploads/`, whose `Location` (relative or absolute, often
//! with the registry's upload state in its query) receives `PUT ...&digest=sha256:...` with the
//! whole blob as the body. The registry hashes what it received and refuses a mismatch; its
//! `Docker-Content-Digest` answer is checked as well. The body is streamed from the file in
//! [`UPLOAD_FRAME`](super::upload::UPLOAD_FRAME) pieces, never held in memory, and a monolithic `PUT` is what docker-registry,
//! and every registry in use, accept at any size (tested here with a 100+ MiB blob against the
//! Debian `docker-registry`), so chunked `PATCH` uploads are not implemented.
//!
//! Tokens for pushes are asked for with scope `repository:REPO:pull,push`, for every request of
//! the push, so one push needs one token. Uploads are watched for stalls rather than bounded by
//! reqwest's read timeout (see [`send_watched`](super::upload::send_watched)).

use std::path::Path;

use bytes::Bytes;
use reqwest::header::{HeaderMap, HeaderValue, CONTENT_LENGTH, CONTENT_TYPE, LOCATION};
use reqwest::{Method, StatusCode, Url};
use tracing::debug;

use super::client::{
    header_str, status_error, Access, Call, Payload, RegistryClient, Target, MAX_MANIFEST_BYTES,
};
use super::error::{ContentKind, Reference, RegistryError};
use super::reference::{validate_digest, validate_repository};
use crate::store::sha256_digest;

/// What [`RegistryClient::push_blob_file`] and [`RegistryClient::push_blob_bytes`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PushedBlob {
    /// The repository already had the blob; nothing was sent.
    AlreadyPresent,
    Uploaded,
}

/// A manifest the registry accepted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PushedManifest {
    /// `sha256:<hex>` of the pushed bytes, confirmed by the registry when it says.
    pub digest: String,
    /// The registry answered with `OCI-Subject`: it indexes the manifest's `subject` itself and
    /// lists it through the referrers API. When false and the manifest has a subject, the pusher
    /// must record it in the referrers tag ([`RegistryClient::add_referrer_fallback`]).
    pub subject_accepted: bool,
}

impl RegistryClient {
    /// The size of blob `digest` if `repo` has it, `None` if not (`HEAD /v2/REPO/blobs/DIGEST`).
    pub async fn blob_exists(
        &self,
        repo: &str,
        digest: &str,
    ) -> Result<Option<u64>, RegistryError> {
        self.stat_blob(repo, digest, Access::Pull).await
    }

    /// Uploads the file at `path` as blob `digest`, unless `repo` already has it. The file is
    /// streamed, and reopened if the registry asks for authentication mid-push; the registry
    /// verifies the digest.
    pub async fn push_blob_file(
        &self,
        repo: &str,
        digest: &str,
        path: &Path,
    ) -> Result<PushedBlob, RegistryError> {
        if self.stat_blob(repo, digest, Access::Push).await?.is_some() {
            debug!(repo, digest, "blob already in the registry; not uploading");
            return Ok(PushedBlob::AlreadyPresent);
        }
        self.upload_blob(repo, digest, Payload::File(path)).await?;
        Ok(PushedBlob::Uploaded)
    }

    /// Uploads `bytes` as blob `digest`, unless `repo` already has it. For small blobs (configs,
    /// indexes); `bytes` are checked against `digest` before anything is sent.
    pub async fn push_blob_bytes(
        &self,
        repo: &str,
        digest: &str,
        bytes: &[u8],
    ) -> Result<PushedBlob, RegistryError> {
        validate_digest(digest)?;
        let actual = sha256_digest(bytes);
        if actual != digest {
            return Err(RegistryError::DigestMismatch {
                kind: ContentKind::Blob,
                repo: repo.to_string(),
                expected: digest.to_string(),
                actual,
            });
        }
        if self.stat_blob(repo, digest, Access::Push).await?.is_some() {
            debug!(repo, digest, "blob already in the registry; not uploading");
            return Ok(PushedBlob::AlreadyPresent);
        }
        let payload = Payload::Bytes(Bytes::copy_from_slice(bytes));
        self.upload_blob(repo, digest, payload).await?;
        Ok(PushedBlob::Uploaded)
    }

    /// Pushes a manifest (or index) of `media_type` under `reference`: a tag, or its own digest.
    pub async fn put_manifest(
        &self,
        repo: &str,
        reference: &Reference,
        media_type: &str,
        bytes: &[u8],
    ) -> Result<PushedManifest, RegistryError> {
        validate_repository(repo)?;
        reference.validate()?;
        let invalid = |reason: String| RegistryError::InvalidManifest {
            repo: repo.to_string(),
            reference: reference.clone(),
            reason,
        };
        let digest = sha256_digest(bytes);
        if let Reference::Digest(expected) = reference {
            if *expected != digest {
                return Err(RegistryError::DigestMismatch {
                    kind: ContentKind::Manifest,
                    repo: repo.to_string(),
                    expected: expected.clone(),
                    actual: digest,
                });
            }
        }
        if bytes.len() > MAX_MANIFEST_BYTES {
            return Err(invalid(format!(
                "{} bytes is larger than the {MAX_MANIFEST_BYTES} bytes registries accept",
                bytes.len()
            )));
        }
        let content_type = HeaderValue::from_str(media_type)
            .map_err(|_| invalid(format!("media type {media_type:?} is not a header value")))?;
        let mut call = Call::new(
            Method::PUT,
            Target::Path(format!("/v2/{repo}/manifests/{reference}")),
        );
        call.headers.insert(CONTENT_TYPE, content_type);
        call.payload = Payload::Bytes(Bytes::copy_from_slice(bytes));
        let (resp, url) = self.request(repo, Access::Push, &call).await?;
        if !resp.status().is_success() {
            return Err(status_error(repo, &url, resp).await);
        }
        check_content_digest(resp.headers(), &digest, ContentKind::Manifest, repo)?;
        Ok(PushedManifest {
            digest,
            subject_accepted: resp.headers().contains_key("oci-subject"),
        })
    }

    /// `HEAD` of a blob: its size, or `None` when the repository does not have it.
    async fn stat_blob(
        &self,
        repo: &str,
        digest: &str,
        access: Access,
    ) -> Result<Option<u64>, RegistryError> {
        validate_repository(repo)?;
        validate_digest(digest)?;
        let call = Call::new(
            Method::HEAD,
            Target::Path(format!("/v2/{repo}/blobs/{digest}")),
        );
        let (resp, url) = self.request(repo, access, &call).await?;
        match resp.status() {
            StatusCode::OK => {
                check_content_digest(resp.headers(), digest, ContentKind::Blob, repo)?;
                // The header, not `resp.content_length()`: a HEAD response's body is empty.
                header_str(resp.headers(), CONTENT_LENGTH.as_str())
                    .and_then(|v| v.parse::<u64>().ok())
                    .map(Some)
                    .ok_or_else(|| RegistryError::BadResponse {
                        url,
                        reason: "no Content-Length in the answer to HEAD of a blob".into(),
                    })
            }
            StatusCode::NOT_FOUND => Ok(None),
            _ => Err(status_error(repo, &url, resp).await),
        }
    }

    /// `POST` to start an upload, then `PUT` the whole body to the location it names.
    async fn upload_blob(
        &self,
        repo: &str,
        digest: &str,
        payload: Payload<'_>,
    ) -> Result<(), RegistryError> {
        validate_repository(repo)?;
        validate_digest(digest)?;
        let start = Call::new(
            Method::POST,
            Target::Path(format!("/v2/{repo}/blobs/uploads/")),
        );
        let (resp, url) = self.request(repo, Access::Push, &start).await?;
        if resp.status() != StatusCode::ACCEPTED {
            return Err(status_error(repo, &url, resp).await);
        }
        let location = upload_location(&url, resp.headers(), digest)?;
        let mut put = Call::new(Method::PUT, Target::Url(location));
        put.headers.insert(
            CONTENT_TYPE,
            HeaderValue::from_static("application/octet-stream"),
        );
        put.payload = payload;
        let (resp, url) = self.request(repo, Access::Push, &put).await?;
        if resp.status() != StatusCode::CREATED {
            return Err(status_error(repo, &url, resp).await);
        }
        check_content_digest(resp.headers(), digest, ContentKind::Blob, repo)?;
        debug!(repo, digest, "blob uploaded");
        Ok(())
    }
}

/// Where to `PUT` the blob: the `Location` of the `POST` answer, resolved against the URL that
/// was posted to, with `digest` added to whatever query it already has.
fn upload_location(posted: &str, headers: &HeaderMap, digest: &str) -> Result<Url, RegistryError> {
    let bad = |reason: String| RegistryError::BadResponse {
        url: posted.to_string(),
        reason,
    };
    let location = header_str(headers, LOCATION.as_str())
        .filter(|l| !l.is_empty())
        .ok_or_else(|| bad("the registry started an upload but sent no Location".into()))?;
    let base = Url::parse(posted).map_err(|e| bad(format!("not a valid url: {e}")))?;
    let mut url = base
        .join(&location)
        .map_err(|e| bad(format!("upload Location {location:?} is not a url: {e}")))?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err(bad(format!("upload Location {location:?} is not http(s)")));
    }
    url.query_pairs_mut().append_pair("digest", digest);
    Ok(url)
}

/// Checks the registry's `Docker-Content-Digest`, when it sends one, against what was pushed.
fn check_content_digest(
    headers: &HeaderMap,
    expected: &str,
    kind: ContentKind,
    repo: &str,
) -> Result<(), RegistryError> {
    match header_str(headers, "docker-content-digest") {
        Some(actual) if actual != expected => Err(RegistryError::DigestMismatch {
            kind,
            repo: repo.to_string(),
            expected: expected.to_string(),
            actual,
        }),
        Some(_) | None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_support::*;
    use super::super::upload::UPLOAD_FRAME;
    use super::super::*;
    use crate::store::sha256_digest;
    use sha2::{Digest as _, Sha256};
    use std::sync::{Arc, Mutex};
    use std::time::{Duration, Instant};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    fn puts_to_uploads(server: &FakeServer) -> Vec<SeenRequest> {
        server
            .requests()
            .into_iter()
            .filter(|r| r.method == "PUT" && r.path.contains("/blobs/uploads/"))
            .collect()
    }

    #[tokio::test]
    async fn pushing_the_same_blob_twice_uploads_once() {
        let memory = MemoryRegistry::new(false, false);
        let server = FakeServer::start(|_| memory.handler()).await;
        let client = server.client(None);
        let blob = noise(5000, 1);
        let digest = sha256_digest(&blob);

        assert_eq!(client.blob_exists("test/img", &digest).await.unwrap(), None);
        let pushed = client.push_blob_bytes("test/img", &digest, &blob).await;
        assert_eq!(pushed.unwrap(), PushedBlob::Uploaded);
        assert_eq!(
            client.blob_exists("test/img", &digest).await.unwrap(),
            Some(5000)
        );
        let again = client.push_blob_bytes("test/img", &digest, &blob).await;
        assert_eq!(again.unwrap(), PushedBlob::AlreadyPresent);
        assert_eq!(memory.blob("test/img", &digest), Some(blob.clone()));
        // Blobs belong to a repository.
        assert_eq!(
            client.blob_exists("test/other", &digest).await.unwrap(),
            None
        );

        let requests = server.requests();
        assert_eq!(count_method(&requests, "POST"), 1, "{requests:?}");
        assert_eq!(count_method(&requests, "PUT"), 1, "{requests:?}");
        assert_eq!(count_method(&requests, "HEAD"), 5, "{requests:?}");
        let put = &puts_to_uploads(&server)[0];
        // The relative Location kept its query, and the digest was added to it.
        assert_eq!(put.path_only(), "/v2/test/img/blobs/uploads/u1");
        assert_eq!(put.query("_state"), ["s1"]);
        assert_eq!(put.query("digest"), [digest.as_str()]);
        assert_eq!(put.header("content-length"), Some("5000"));
        assert_eq!(put.header("content-type"), Some("application/octet-stream"));
        assert_eq!(put.body, blob);

        // Bytes that are not the digest are refused before anything is sent.
        let before = server.requests().len();
        let err = client
            .push_blob_bytes("test/img", &sha256_digest(b"other"), &blob)
            .await
            .unwrap_err();
        assert!(
            matches!(
                err,
                RegistryError::DigestMismatch {
                    kind: ContentKind::Blob,
                    ..
                }
            ),
            "{err}"
        );
        assert_eq!(server.requests().len(), before);
    }

    #[tokio::test]
    async fn blob_file_is_streamed_to_an_absolute_location() {
        let memory = MemoryRegistry::new(false, true);
        let server = FakeServer::start(|_| memory.handler()).await;
        let client = server.client(None);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("blob");
        // Several upload frames and a short last one.
        let blob = noise(3 * UPLOAD_FRAME + 17, 2);
        std::fs::write(&path, &blob).unwrap();
        let digest = sha256_digest(&blob);

        let pushed = client.push_blob_file("test/img", &digest, &path).await;
        assert_eq!(pushed.unwrap(), PushedBlob::Uploaded);
        assert_eq!(memory.blob("test/img", &digest), Some(blob.clone()));
        let put = &puts_to_uploads(&server)[0];
        assert_eq!(put.header("content-length"), Some(&*blob.len().to_string()));
        assert_eq!(put.query("_state"), ["s1"]);

        let pushed = client.push_blob_file("test/img", &digest, &path).await;
        assert_eq!(pushed.unwrap(), PushedBlob::AlreadyPresent);
        assert_eq!(puts_to_uploads(&server).len(), 1);

        let missing = dir.path().join("missing");
        let err = client
            .push_blob_file("test/img", &sha256_digest(b"absent"), &missing)
            .await
            .unwrap_err();
        assert!(
            matches!(err, RegistryError::ReadFile { .. }) && err.is_permanent(),
            "{err}"
        );
        assert!(err.to_string().contains("missing"), "{err}");
    }

    /// Bearer auth in front of a [`MemoryRegistry`]. The token server issues `tok-N`; only the
    /// latest token is accepted, and `revoke_after_post` revokes it as soon as an upload starts,
    /// so that the `PUT` that follows carries a token the server no longer takes.
    struct TokenGate {
        issued: u32,
        valid: Option<String>,
        revoke_after_post: bool,
    }

    fn gated(
        memory: Arc<MemoryRegistry>,
        gate: Arc<Mutex<TokenGate>>,
    ) -> impl FnOnce(String) -> Handler {
        move |base| {
            Arc::new(move |req: &SeenRequest| {
                let mut gate = gate.lock().unwrap();
                if req.path_only() == "/token" {
                    gate.issued += 1;
                    let token = format!("tok-{}", gate.issued);
                    gate.valid = Some(token.clone());
                    return Reply::new(200, format!(r#"{{"token":"{token}","expires_in":300}}"#));
                }
                let expected = gate.valid.as_ref().map(|t| format!("Bearer {t}"));
                if expected.is_none() || req.header("authorization") != expected.as_deref() {
                    let repo = req
                        .path_only()
                        .strip_prefix("/v2/")
                        .and_then(|p| p.split("/blobs/").next())
                        .unwrap_or_default()
                        .to_string();
                    return Reply::new(401, "").header(
                        "WWW-Authenticate",
                        format!(
                            r#"Bearer realm="{base}/token",service="fake",scope="repository:{repo}:pull,push""#
                        ),
                    );
                }
                if req.method == "POST" && gate.revoke_after_post {
                    gate.valid = None;
                }
                memory.handle(req)
            })
        }
    }

    #[tokio::test]
    async fn push_asks_for_pull_push_scope_and_resends_the_file_after_a_401() {
        let memory = MemoryRegistry::new(false, false);
        let gate = Arc::new(Mutex::new(TokenGate {
            issued: 0,
            valid: None,
            revoke_after_post: true,
        }));
        let server = FakeServer::start(gated(memory.clone(), gate.clone())).await;
        let client = server.client(None);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("blob");
        let blob = noise(2 * UPLOAD_FRAME + 5, 3);
        std::fs::write(&path, &blob).unwrap();
        let digest = sha256_digest(&blob);

        let pushed = client.push_blob_file("test/img", &digest, &path).await;
        assert_eq!(pushed.unwrap(), PushedBlob::Uploaded);
        assert_eq!(memory.blob("test/img", &digest), Some(blob.clone()));

        let puts = puts_to_uploads(&server);
        assert_eq!(
            puts.len(),
            2,
            "the PUT is sent again after the 401: {puts:?}"
        );
        assert_eq!(puts[0].header("authorization"), Some("Bearer tok-1"));
        assert_eq!(puts[1].header("authorization"), Some("Bearer tok-2"));
        for put in &puts {
            assert_eq!(put.body, blob, "the file is reread for the second attempt");
        }
        let scopes: Vec<_> = server
            .requests_to("/token")
            .iter()
            .map(|r| r.query("scope"))
            .collect();
        let push_scope = vec!["repository:test/img:pull,push".to_string()];
        assert_eq!(scopes, [push_scope.clone(), push_scope]);

        // A pull afterwards asks for its own, narrower scope.
        gate.lock().unwrap().revoke_after_post = false;
        assert_eq!(
            client.blob_exists("test/img", &digest).await.unwrap(),
            Some(blob.len() as u64)
        );
        let last = server.requests_to("/token").pop().unwrap();
        assert_eq!(last.query("scope"), ["repository:test/img:pull"]);
    }

    #[tokio::test]
    async fn push_with_basic_auth() {
        let memory = MemoryRegistry::new(false, true);
        let server = FakeServer::start(|_| {
            Arc::new(move |req: &SeenRequest| {
                if req.header("authorization") == Some(&basic_header("bob", "pw")) {
                    memory.handle(req)
                } else {
                    Reply::new(401, "").header("WWW-Authenticate", r#"Basic realm="r""#)
                }
            })
        })
        .await;
        let bob = Credentials {
            username: "bob".into(),
            password: "pw".into(),
        };
        let client = server.client(Some(bob));
        let blob = b"{}".to_vec();
        let digest = sha256_digest(&blob);
        let pushed = client.push_blob_bytes("test/img", &digest, &blob).await;
        assert_eq!(pushed.unwrap(), PushedBlob::Uploaded);
        let auth: Vec<_> = server
            .requests()
            .iter()
            .map(|r| (r.method.clone(), r.header("authorization").is_some()))
            .collect();
        let expected = [
            ("HEAD", false),
            ("HEAD", true),
            ("POST", true),
            ("PUT", true),
        ]
        .map(|(m, a)| (m.to_string(), a));
        assert_eq!(auth, expected);

        let err = server
            .client(None)
            .push_blob_bytes("test/img", &digest, &blob)
            .await
            .unwrap_err();
        assert!(matches!(err, RegistryError::Unauthorized { .. }), "{err}");
        assert!(err.to_string().contains("push access denied"), "{err}");
    }

    #[tokio::test]
    async fn upload_location_on_another_host_gets_no_token() {
        let storage = FakeServer::start(|_| {
            Arc::new(|req: &SeenRequest| {
                let [digest] = req.query("digest").try_into().unwrap_or_default();
                Reply::new(201, "").header("Docker-Content-Digest", digest)
            })
        })
        .await;
        let upload_base = format!("http://{}", storage.host());
        let gate = Arc::new(Mutex::new(TokenGate {
            issued: 0,
            valid: None,
            revoke_after_post: false,
        }));
        let memory = MemoryRegistry::new(false, false);
        let registry = FakeServer::start(move |base| {
            let inner = gated(memory, gate)(base);
            Arc::new(move |req: &SeenRequest| {
                let reply = inner(req);
                if req.method == "POST" && reply.status == 202 {
                    Reply::new(202, "")
                        .header("Location", format!("{upload_base}/upload/1?sig=abc"))
                } else {
                    reply
                }
            })
        })
        .await;
        let blob = noise(1000, 4);
        let digest = sha256_digest(&blob);
        let pushed = registry
            .client(None)
            .push_blob_bytes("test/img", &digest, &blob)
            .await;
        assert_eq!(pushed.unwrap(), PushedBlob::Uploaded);
        let stored = storage.requests();
        assert_eq!(stored.len(), 1, "{stored:?}");
        assert_eq!(stored[0].header("authorization"), None, "token leaked");
        assert_eq!(stored[0].query("sig"), ["abc"]);
        assert_eq!(stored[0].body, blob);
    }

    #[tokio::test]
    async fn registry_answers_to_uploads_are_checked() {
        let server = FakeServer::start(|_| {
            Arc::new(|req: &SeenRequest| {
                let path = req.path_only();
                let repo = path
                    .strip_prefix("/v2/")
                    .and_then(|p| p.split("/blobs/").next())
                    .unwrap_or_default();
                match (req.method.as_str(), repo) {
                    ("HEAD", _) => Reply::new(404, ""),
                    ("POST", "test/no-location") => Reply::new(202, ""),
                    ("POST", _) => Reply::new(202, "").header("Location", "/upload/1"),
                    ("PUT", "") if req.query("digest")[0].ends_with("00") => Reply::new(
                        400,
                        r#"{"errors":[{"code":"DIGEST_INVALID","message":"digest mismatch"}]}"#,
                    ),
                    ("PUT", "") => Reply::new(201, "")
                        .header("Docker-Content-Digest", sha256_digest(b"something else")),
                    _ => Reply::new(500, ""),
                }
            })
        })
        .await;
        let client = server.client(None);
        let blob = b"hello".to_vec();
        let digest = sha256_digest(&blob);

        let err = client
            .push_blob_bytes("test/lying", &digest, &blob)
            .await
            .unwrap_err();
        match &err {
            RegistryError::DigestMismatch {
                expected, actual, ..
            } => {
                assert_eq!(expected, &digest);
                assert_eq!(actual, &sha256_digest(b"something else"));
            }
            other => panic!("{other}"),
        }
        let err = client
            .push_blob_bytes("test/no-location", &digest, &blob)
            .await
            .unwrap_err();
        assert!(
            matches!(err, RegistryError::BadResponse { .. }) && err.is_permanent(),
            "{err}"
        );
        assert!(err.to_string().contains("no Location"), "{err}");

        // The registry's own digest check refusing the upload.
        let mut digest_00 = sha256_digest(b"x");
        digest_00.replace_range(digest_00.len() - 2.., "00");
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("blob");
        std::fs::write(&path, b"x").unwrap();
        let err = client
            .push_blob_file("test/img", &digest_00, &path)
            .await
            .unwrap_err();
        assert!(
            matches!(err, RegistryError::Http { status: 400, .. }) && err.is_permanent(),
            "{err}"
        );
        assert!(err.to_string().contains("DIGEST_INVALID"), "{err}");
    }

    #[tokio::test]
    async fn put_manifest_reports_whether_the_registry_took_the_subject() {
        let subject = br#"{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"sha256:aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa","size":2},"layers":[]}"#;
        let referrer = serde_json::to_vec(&serde_json::json!({
            "schemaVersion": 2,
            "mediaType": MEDIA_TYPE_OCI_MANIFEST,
            "artifactType": "application/vnd.lazyimg.image.v1",
            "config": {"mediaType": "application/vnd.oci.empty.v1+json", "digest": sha256_digest(b"{}"), "size": 2},
            "layers": [],
            "subject": {"mediaType": MEDIA_TYPE_OCI_MANIFEST, "digest": sha256_digest(subject), "size": subject.len()},
        }))
        .unwrap();
        for referrers_api in [false, true] {
            let memory = MemoryRegistry::new(referrers_api, false);
            let server = FakeServer::start(|_| memory.handler()).await;
            let client = server.client(None);
            let pushed = client
                .put_manifest("test/img", &tag("v1"), MEDIA_TYPE_OCI_MANIFEST, subject)
                .await
                .unwrap();
            assert_eq!(pushed.digest, sha256_digest(subject));
            assert!(!pushed.subject_accepted, "it has no subject");
            let by_digest = Reference::Digest(sha256_digest(&referrer));
            let pushed = client
                .put_manifest("test/img", &by_digest, MEDIA_TYPE_OCI_MANIFEST, &referrer)
                .await
                .unwrap();
            assert_eq!(pushed.subject_accepted, referrers_api);
            let (media_type, bytes) = memory.manifest("test/img", by_digest.as_str()).unwrap();
            assert_eq!(media_type, MEDIA_TYPE_OCI_MANIFEST);
            assert_eq!(bytes, referrer);
            let fetched = client.get_manifest("test/img", &tag("v1")).await.unwrap();
            assert_eq!(fetched.bytes, subject);

            // A digest reference must be the digest of the bytes; nothing is sent otherwise.
            let before = server.requests().len();
            let err = client
                .put_manifest("test/img", &by_digest, MEDIA_TYPE_OCI_MANIFEST, subject)
                .await
                .unwrap_err();
            assert!(matches!(err, RegistryError::DigestMismatch { .. }), "{err}");
            let err = client
                .put_manifest("test/img", &tag("v1"), "bad\ntype", subject)
                .await
                .unwrap_err();
            assert!(
                matches!(err, RegistryError::InvalidManifest { .. }),
                "{err}"
            );
            assert_eq!(server.requests().len(), before);
        }
    }

    /// A registry whose blob `PUT` reads the body at `bytes_per_tick` per `tick`, or not at all
    /// (`None`), then answers 201. Other requests: `HEAD` is 404, `POST` starts an upload.
    async fn throttled_registry(
        bytes_per_tick: Option<usize>,
        tick: Duration,
    ) -> (String, tokio::task::JoinHandle<()>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let host = listener.local_addr().unwrap().to_string();
        let task = tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let Some(head) = read_request_head(&mut stream).await else {
                        return;
                    };
                    let head = String::from_utf8_lossy(&head).to_lowercase();
                    let reply = if head.starts_with("head ") {
                        "HTTP/1.1 404 X\r\nContent-Length: 0\r\n\r\n".to_string()
                    } else if head.starts_with("post ") {
                        "HTTP/1.1 202 X\r\nLocation: /upload\r\nContent-Length: 0\r\n\r\n"
                            .to_string()
                    } else {
                        let len: usize = head
                            .lines()
                            .find_map(|l| l.strip_prefix("content-length:"))
                            .and_then(|v| v.trim().parse().ok())
                            .unwrap_or(0);
                        let Some(per_tick) = bytes_per_tick else {
                            tokio::time::sleep(Duration::from_secs(3600)).await;
                            return;
                        };
                        let mut hasher = Sha256::new();
                        let mut buf = vec![0u8; per_tick];
                        let mut left = len;
                        while left > 0 {
                            let n = stream.read(&mut buf[..per_tick.min(left)]).await.unwrap();
                            assert!(n > 0, "client hung up");
                            hasher.update(&buf[..n]);
                            left -= n;
                            tokio::time::sleep(tick).await;
                        }
                        let digest = format!("sha256:{}", hex::encode(hasher.finalize()));
                        format!(
                            "HTTP/1.1 201 X\r\nDocker-Content-Digest: {digest}\r\nContent-Length: 0\r\n\r\n"
                        )
                    };
                    let _ = stream.write_all(reply.as_bytes()).await;
                });
            }
        });
        (host, task)
    }

    #[tokio::test]
    async fn slow_upload_outlives_the_read_timeout() {
        let read_timeout = Duration::from_millis(300);
        let (host, task) = throttled_registry(Some(128 << 10), Duration::from_millis(20)).await;
        let client = impatient_client(&host, read_timeout);
        // Far more than loopback socket buffers hold, so the upload paces with the reader:
        // at 6.4 MiB/s it takes several read timeouts.
        let blob = wide_noise(16 << 20, 5);
        let digest = sha256_digest(&blob);
        let started = Instant::now();
        let pushed = client.push_blob_bytes("test/img", &digest, &blob).await;
        assert_eq!(pushed.unwrap(), PushedBlob::Uploaded);
        let took = started.elapsed();
        assert!(
            took > 2 * read_timeout,
            "the upload must outlast the read timeout for this test to mean anything: {took:?}"
        );
        task.abort();
    }

    #[tokio::test]
    async fn stalled_upload_fails_after_the_read_timeout() {
        let read_timeout = Duration::from_millis(300);
        let (host, task) = throttled_registry(None, Duration::ZERO).await;
        let client = impatient_client(&host, read_timeout);
        let blob = wide_noise(64 << 20, 6);
        let digest = sha256_digest(&blob);
        let started = Instant::now();
        let err = client
            .push_blob_bytes("test/img", &digest, &blob)
            .await
            .unwrap_err();
        let took = started.elapsed();
        match &err {
            RegistryError::Stalled { after, .. } => assert!(*after >= read_timeout, "{err}"),
            other => panic!("{other}"),
        }
        assert!(!err.is_permanent());
        assert!(took < Duration::from_secs(10), "{took:?}");
        assert!(err.to_string().contains("/upload"), "{err}");
        task.abort();
    }

    // ---------------------------------------------------------------- against docker-registry

    /// The whole push of a lazy image, against the real Debian `docker-registry` (2.8, which has
    /// no referrers API): blobs small and large, the source manifest, the lazy manifest with
    /// the source as its `subject`, the referrers tag, and reads back through the blob store.
    #[tokio::test]
    #[cfg_attr(
        not(feature = "system-tests"),
        ignore = "needs docker-registry (scripts/setup.sh installs it)"
    )]
    async fn pushes_a_lazy_image_with_a_subject_to_docker_registry() {
        use crate::blobstore::{BlobError, BlobStore};
        use fusefs::manifest::{self as lazy, Descriptor, LazyManifest};

        let registry = LocalRegistry::start().unwrap();
        let client = RegistryClient::new(&registry.host(), ClientOptions::default()).unwrap();
        let repo = "test/lazy";
        let dir = tempfile::tempdir().unwrap();

        // Over 100 MiB, and not a multiple of the upload frame.
        let big = wide_noise((100 << 20) + 12_345, 13);
        let big_digest = sha256_digest(&big);
        let big_path = dir.path().join("big");
        std::fs::write(&big_path, &big).unwrap();
        let config =
            br#"{"architecture":"amd64","os":"linux","rootfs":{"type":"layers","diff_ids":[]}}"#;
        let config_digest = sha256_digest(config);
        let index = noise(3000, 14);
        let index_digest = sha256_digest(&index);

        assert_eq!(client.blob_exists(repo, &big_digest).await.unwrap(), None);
        let pushed = client.push_blob_file(repo, &big_digest, &big_path).await;
        assert_eq!(pushed.unwrap(), PushedBlob::Uploaded);
        assert_eq!(
            client.blob_exists(repo, &big_digest).await.unwrap(),
            Some(big.len() as u64)
        );
        let again = client.push_blob_file(repo, &big_digest, &big_path).await;
        assert_eq!(again.unwrap(), PushedBlob::AlreadyPresent);
        assert_eq!(
            std::fs::read(registry.blob_file(&big_digest)).unwrap(),
            big,
            "the registry stored exactly the file"
        );
        for (digest, bytes) in [(&config_digest, &config[..]), (&index_digest, &index[..])] {
            let pushed = client.push_blob_bytes(repo, digest, bytes).await;
            assert_eq!(pushed.unwrap(), PushedBlob::Uploaded);
            let again = client.push_blob_bytes(repo, digest, bytes).await;
            assert_eq!(again.unwrap(), PushedBlob::AlreadyPresent);
        }

        // The source image: a plain manifest over the big blob, tagged v1.
        let source = serde_json::to_vec(&serde_json::json!({
            "schemaVersion": 2,
            "mediaType": MEDIA_TYPE_OCI_MANIFEST,
            "config": {"mediaType": lazy::MEDIA_TYPE_OCI_CONFIG, "digest": config_digest, "size": config.len()},
            "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": big_digest, "size": big.len()}],
        }))
        .unwrap();
        let pushed_source = client
            .put_manifest(repo, &tag("v1"), MEDIA_TYPE_OCI_MANIFEST, &source)
            .await
            .unwrap();
        assert_eq!(pushed_source.digest, sha256_digest(&source));
        assert!(!pushed_source.subject_accepted);
        let fetched = client.get_manifest(repo, &tag("v1")).await.unwrap();
        assert_eq!(fetched.bytes, source);

        // The lazy image, pointing at the source as its subject, pushed by digest.
        let descriptor = |media_type: &str, digest: &str, size: usize| Descriptor {
            media_type: media_type.into(),
            digest: digest.into(),
            size: size as u64,
            urls: None,
            annotations: None,
        };
        let mut manifest = LazyManifest::new(
            descriptor(lazy::MEDIA_TYPE_OCI_CONFIG, &config_digest, config.len()),
            descriptor(lazy::MEDIA_TYPE_INDEX, &index_digest, index.len()),
            vec![descriptor(lazy::MEDIA_TYPE_BLOB, &big_digest, big.len())],
        );
        manifest.subject = Some(descriptor(
            MEDIA_TYPE_OCI_MANIFEST,
            &pushed_source.digest,
            source.len(),
        ));
        let lazy_bytes = manifest.to_json();
        let lazy_digest = Reference::Digest(sha256_digest(&lazy_bytes));
        let pushed_lazy = client
            .put_manifest(repo, &lazy_digest, MEDIA_TYPE_OCI_MANIFEST, &lazy_bytes)
            .await
            .unwrap();
        assert!(
            !pushed_lazy.subject_accepted,
            "docker-registry 2.8 knows nothing of subjects"
        );

        // Not in the referrers tag yet, so not found; then recorded, and found.
        let found = client
            .referrers(repo, &pushed_source.digest, Some(lazy::ARTIFACT_TYPE))
            .await
            .unwrap();
        assert_eq!(found, []);
        let referrer = Referrer::of_manifest(MEDIA_TYPE_OCI_MANIFEST, &lazy_bytes);
        let added = client
            .add_referrer_fallback(repo, &pushed_source.digest, &referrer)
            .await
            .unwrap();
        assert!(added);
        let added = client
            .add_referrer_fallback(repo, &pushed_source.digest, &referrer)
            .await
            .unwrap();
        assert!(!added);
        for filter in [None, Some(lazy::ARTIFACT_TYPE)] {
            let found = client
                .referrers(repo, &pushed_source.digest, filter)
                .await
                .unwrap();
            assert_eq!(found, std::slice::from_ref(&referrer), "{filter:?}");
        }
        assert_eq!(referrer.digest, pushed_lazy.digest);
        let other_type = client
            .referrers(repo, &pushed_source.digest, Some("application/x-other"))
            .await
            .unwrap();
        assert_eq!(other_type, []);
        let fetched = client.get_manifest(repo, &lazy_digest).await.unwrap();
        assert_eq!(LazyManifest::parse(&fetched.bytes).unwrap(), manifest);

        // Reading it back as the fetcher does.
        let store = RegistryBlobStore::new(client.clone(), repo).unwrap();
        let len = big.len() as u64;
        let mib = 1u64 << 20;
        for range in [0..1, mib - 7..mib + 9, 37 * mib..45 * mib, len - 100..len] {
            let bytes = store.read_range(&big_digest, range.clone()).await.unwrap();
            assert!(
                bytes == big[range.start as usize..range.end as usize],
                "{range:?} differs"
            );
        }
        assert_eq!(
            store.read_blob(&index_digest, 1 << 20).await.unwrap(),
            index
        );
        let err = store.read_blob(&big_digest, 1 << 20).await.unwrap_err();
        assert!(matches!(err, BlobError::Invalid { .. }), "{err}");
        let err = store
            .read_range(&sha256_digest(b"never pushed"), 0..1)
            .await
            .unwrap_err();
        assert!(matches!(err, BlobError::NotFound { .. }), "{err}");
    }
}
