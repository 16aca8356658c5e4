//! Test doubles for the registry client's tests: [`FakeServer`], a scripted HTTP/1.1 server
//! that records every request (method, path, headers, body), and [`LocalRegistry`], the real
//! Debian `docker-registry` on a loopback port, with helpers that build and push OCI images.

use std::collections::HashMap;
use std::io::Write as _;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use reqwest::Url;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use base64::Engine as _;

use super::*;
use crate::store::sha256_digest;

pub(super) fn tag(t: &str) -> Reference {
    Reference::Tag(t.to_string())
}

/// Deterministic xorshift, so the fuzz-style tests need no extra crate.
pub(super) fn xorshift(state: &mut u64) -> u64 {
    *state ^= *state << 13;
    *state ^= *state >> 7;
    *state ^= *state << 17;
    *state
}

// ---------------------------------------------------------------- an in-test HTTP server

#[derive(Debug, Clone)]
pub(super) struct SeenRequest {
    pub(super) method: String,
    /// Path and query, as sent.
    pub(super) path: String,
    /// Names lowercased.
    pub(super) headers: Vec<(String, String)>,
    /// Read by `Content-Length` or chunked transfer coding.
    pub(super) body: Vec<u8>,
}

impl SeenRequest {
    pub(super) fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    pub(super) fn query(&self, name: &str) -> Vec<String> {
        Url::parse(&format!("http://x{}", self.path))
            .map(|u| {
                u.query_pairs()
                    .filter(|(k, _)| k == name)
                    .map(|(_, v)| v.into_owned())
                    .collect()
            })
            .unwrap_or_default()
    }

    pub(super) fn path_only(&self) -> &str {
        self.path.split('?').next().unwrap_or_default()
    }
}

pub(super) struct Reply {
    pub(super) status: u16,
    pub(super) headers: Vec<(String, String)>,
    pub(super) body: Vec<u8>,
}

impl Reply {
    pub(super) fn new(status: u16, body: impl Into<Vec<u8>>) -> Self {
        Reply {
            status,
            headers: Vec::new(),
            body: body.into(),
        }
    }

    pub(super) fn header(mut self, name: &str, value: impl Into<String>) -> Self {
        self.headers.push((name.to_string(), value.into()));
        self
    }
}

/// Reads one request: head, then the body by `Content-Length` or chunked coding. `None` for a
/// TLS ClientHello (so the client falls back to http), junk, or a connection closed early.
async fn read_request(stream: &mut tokio::net::TcpStream) -> Option<SeenRequest> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 64 << 10];
    let head_end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        if buf.first() == Some(&0x16) || buf.len() > 64 << 10 {
            return None;
        }
        match stream.read(&mut chunk).await {
            Ok(0) | Err(_) => return None,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    };
    let text = String::from_utf8_lossy(&buf[..head_end]).into_owned();
    let mut lines = text.split("\r\n");
    let mut request_line = lines.next().unwrap_or_default().split(' ');
    let method = request_line.next().unwrap_or_default().to_string();
    let path = request_line.next().unwrap_or_default().to_string();
    let headers: Vec<(String, String)> = lines
        .take_while(|l| !l.is_empty())
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    let mut rest = buf.split_off(head_end);
    let header = |name: &str| {
        headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.clone())
    };
    let body = if header("transfer-encoding").is_some_and(|v| v.contains("chunked")) {
        let mut body = Vec::new();
        loop {
            while !rest.windows(2).any(|w| w == b"\r\n") {
                let want = rest.len() + 1;
                if !fill(stream, &mut rest, want).await {
                    return None;
                }
            }
            let line_end = rest.windows(2).position(|w| w == b"\r\n").unwrap();
            let size_text = String::from_utf8_lossy(&rest[..line_end]).into_owned();
            let size = usize::from_str_radix(size_text.split(';').next()?.trim(), 16).ok()?;
            rest.drain(..line_end + 2);
            if !fill(stream, &mut rest, size + 2).await {
                return None;
            }
            body.extend_from_slice(&rest[..size]);
            rest.drain(..size + 2);
            if size == 0 {
                break body;
            }
        }
    } else {
        let len = header("content-length")
            .and_then(|v| v.parse::<usize>().ok())
            .unwrap_or(0);
        if !fill(stream, &mut rest, len).await {
            return None;
        }
        rest.truncate(len);
        rest
    };
    Some(SeenRequest {
        method,
        path,
        headers,
        body,
    })
}

/// Reads from `stream` until `buf` holds at least `want` bytes; false if the stream ends first.
async fn fill(stream: &mut tokio::net::TcpStream, buf: &mut Vec<u8>, want: usize) -> bool {
    let mut chunk = vec![0u8; 256 << 10];
    while buf.len() < want {
        match stream.read(&mut chunk).await {
            Ok(0) | Err(_) => return false,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
    true
}

pub(super) type Handler = Arc<dyn Fn(&SeenRequest) -> Reply + Send + Sync>;

/// A minimal HTTP/1.1 server: one request per connection, every request recorded. It closes
/// TLS handshakes at once, so the client's https-then-http fallback for loopback is exercised.
pub(super) struct FakeServer {
    addr: SocketAddr,
    seen: Arc<Mutex<Vec<SeenRequest>>>,
    task: tokio::task::JoinHandle<()>,
}

impl FakeServer {
    pub(super) async fn start(make_handler: impl FnOnce(String) -> Handler) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let handler = make_handler(format!("http://{addr}"));
        let seen = Arc::new(Mutex::new(Vec::new()));
        let seen_by_task = seen.clone();
        let task = tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                let handler = handler.clone();
                let seen = seen_by_task.clone();
                tokio::spawn(async move {
                    let Some(request) = read_request(&mut stream).await else {
                        return;
                    };
                    let reply = handler(&request);
                    let head_only = request.method == "HEAD";
                    seen.lock().unwrap().push(request);
                    let mut out = format!("HTTP/1.1 {} X\r\n", reply.status);
                    for (n, v) in &reply.headers {
                        out.push_str(&format!("{n}: {v}\r\n"));
                    }
                    out.push_str(&format!(
                        "Content-Length: {}\r\nConnection: close\r\n\r\n",
                        reply.body.len()
                    ));
                    let mut bytes = out.into_bytes();
                    if !head_only {
                        bytes.extend_from_slice(&reply.body);
                    }
                    let _ = stream.write_all(&bytes).await;
                    let _ = stream.shutdown().await;
                });
            }
        });
        FakeServer { addr, seen, task }
    }

    pub(super) fn host(&self) -> String {
        self.addr.to_string()
    }

    pub(super) fn requests(&self) -> Vec<SeenRequest> {
        self.seen.lock().unwrap().clone()
    }

    pub(super) fn requests_to(&self, path: &str) -> Vec<SeenRequest> {
        self.requests()
            .into_iter()
            .filter(|r| r.path_only() == path)
            .collect()
    }

    pub(super) fn client(&self, credentials: Option<Credentials>) -> RegistryClient {
        RegistryClient::new(
            &self.host(),
            ClientOptions {
                credentials,
                ..Default::default()
            },
        )
        .unwrap()
    }
}

impl Drop for FakeServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

pub(super) fn basic_header(user: &str, password: &str) -> String {
    format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"))
    )
}

pub(super) const MANIFEST_BODY: &[u8] = br#"{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{},"layers":[]}"#;

pub(super) fn manifest_reply() -> Reply {
    Reply::new(200, MANIFEST_BODY).header("Content-Type", MEDIA_TYPE_OCI_MANIFEST)
}

pub(super) fn bearer_challenge(base: &str, repo: &str) -> Reply {
    Reply::new(401, r#"{"errors":[{"code":"UNAUTHORIZED"}]}"#).header(
        "WWW-Authenticate",
        format!(
            r#"Bearer realm="{base}/token",service="fake-registry",scope="repository:{repo}:pull""#
        ),
    )
}

/// A storage server holding `data`, and a registry in front of it that answers a GET of
/// `data`'s blob in `test/img` carrying its bearer token with a 307 to
/// `STORAGE/bucket/{object}?X-Amz-Signature={signature}`, as registries backed by S3 do.
/// Returns (storage, registry); both serve until dropped.
pub(super) async fn registry_redirecting_to_storage(
    data: &[u8],
    object: &'static str,
    signature: &'static str,
) -> (FakeServer, FakeServer) {
    let digest = sha256_digest(data);
    let stored = data.to_vec();
    let storage =
        FakeServer::start(move |_| Arc::new(move |req: &SeenRequest| range_reply(req, &stored)))
            .await;
    let storage_base = format!("http://{}", storage.host());
    let blob_path = format!("/v2/test/img/blobs/{digest}");
    let registry = FakeServer::start(move |base| {
        Arc::new(move |req: &SeenRequest| match req.path_only() {
            "/token" => Reply::new(200, r#"{"token":"secret-token"}"#),
            p if p == blob_path && req.header("authorization") == Some("Bearer secret-token") => {
                Reply::new(307, "").header(
                    "Location",
                    format!("{storage_base}/bucket/{object}?X-Amz-Signature={signature}"),
                )
            }
            _ => bearer_challenge(&base, "test/img"),
        })
    })
    .await;
    (storage, registry)
}

/// Deterministic bytes that do not compress, so gzip layers are as large as their content.
pub(super) fn noise(len: usize, seed: u64) -> Vec<u8> {
    let mut state = seed | 1;
    (0..len).map(|_| xorshift(&mut state) as u8).collect()
}

/// Serves `data` honouring `Range: bytes=a-b`.
pub(super) fn range_reply(req: &SeenRequest, data: &[u8]) -> Reply {
    let range = req
        .header("range")
        .and_then(|r| r.strip_prefix("bytes="))
        .and_then(|r| r.split_once('-'))
        .and_then(|(a, b)| Some((a.parse::<usize>().ok()?, b.parse::<usize>().ok()?)));
    match range {
        Some((first, last)) if first < data.len() => {
            let last = last.min(data.len() - 1);
            Reply::new(206, &data[first..=last]).header(
                "Content-Range",
                format!("bytes {first}-{last}/{}", data.len()),
            )
        }
        Some(_) => Reply::new(416, "").header("Content-Range", format!("bytes */{}", data.len())),
        None => Reply::new(200, data),
    }
}

// ---------------------------------------------------------------- a real docker-registry

pub(super) fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Reads one request head (up to the blank line) from a raw TCP test server's connection, one
/// byte at a time so no body byte is consumed. `None` when the peer hangs up first, or opens
/// with a TLS ClientHello (byte 0x16), which the server answers by hanging up so the client
/// falls back to http.
pub(super) async fn read_request_head(stream: &mut tokio::net::TcpStream) -> Option<Vec<u8>> {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        match stream.read(&mut byte).await {
            Ok(1) if head.is_empty() && byte[0] == 0x16 => return None,
            Ok(1) => head.push(byte[0]),
            _ => return None,
        }
    }
    Some(head)
}

/// The real `docker-registry` of the end-to-end harness, shared with these tests.
pub(super) use lazy_tests::registry::LocalRegistry;

pub(super) struct TestImage {
    pub(super) manifest_digest: String,
    pub(super) config: Vec<u8>,
    pub(super) layer: Vec<u8>,
}

pub(super) fn write_blob(layout: &Path, bytes: &[u8]) -> String {
    let digest = sha256_digest(bytes);
    let hex = digest.strip_prefix("sha256:").unwrap();
    std::fs::write(layout.join("blobs/sha256").join(hex), bytes).unwrap();
    digest
}

/// Writes an OCI image layout holding one image, a gzip tar layer with two files, tagged `tag`.
pub(super) fn build_oci_layout(layout: &Path, tag: &str) -> TestImage {
    std::fs::create_dir_all(layout.join("blobs/sha256")).unwrap();
    let mut tar = tar::Builder::new(Vec::new());
    for (path, data) in [
        ("hello.txt", b"hello from the registry test\n".to_vec()),
        ("data/noise.bin", noise(300_000, 11)),
    ] {
        let mut header = tar::Header::new_gnu();
        header.set_size(data.len() as u64);
        header.set_mode(0o644);
        header.set_mtime(0);
        header.set_cksum();
        tar.append_data(&mut header, path, data.as_slice()).unwrap();
    }
    let tar = tar.into_inner().unwrap();
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    gz.write_all(&tar).unwrap();
    let layer = gz.finish().unwrap();
    let layer_digest = write_blob(layout, &layer);

    let config = serde_json::to_vec(&serde_json::json!({
        "architecture": "amd64",
        "os": "linux",
        "config": {},
        "rootfs": {"type": "layers", "diff_ids": [sha256_digest(&tar)]},
    }))
    .unwrap();
    let config_digest = write_blob(layout, &config);
    let manifest = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "mediaType": MEDIA_TYPE_OCI_MANIFEST,
        "config": {
            "mediaType": "application/vnd.oci.image.config.v1+json",
            "digest": config_digest,
            "size": config.len(),
        },
        "layers": [{
            "mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
            "digest": layer_digest,
            "size": layer.len(),
        }],
    }))
    .unwrap();
    let manifest_digest = write_blob(layout, &manifest);
    let index = serde_json::json!({
        "schemaVersion": 2,
        "manifests": [{
            "mediaType": MEDIA_TYPE_OCI_MANIFEST,
            "digest": manifest_digest,
            "size": manifest.len(),
            "annotations": {"org.opencontainers.image.ref.name": tag},
        }],
    });
    std::fs::write(
        layout.join("index.json"),
        serde_json::to_vec(&index).unwrap(),
    )
    .unwrap();
    std::fs::write(
        layout.join("oci-layout"),
        r#"{"imageLayoutVersion":"1.0.0"}"#,
    )
    .unwrap();
    TestImage {
        manifest_digest,
        config,
        layer,
    }
}

/// A registry holding `127.0.0.1:PORT/test/img:v1`, and the image pushed there.
pub(super) fn registry_with_image() -> (LocalRegistry, TestImage) {
    let registry = LocalRegistry::start().unwrap();
    let scratch = tempfile::tempdir().unwrap();
    let layout = scratch.path().join("layout");
    let image = build_oci_layout(&layout, "v1");
    lazy_tests::reference::skopeo_copy(
        &format!("oci:{}:v1", layout.display()),
        &format!("docker://{}/test/img:v1", registry.host()),
    )
    .unwrap_or_else(|e| panic!("{e:#}\nregistry log:\n{}", registry.log()));
    (registry, image)
}

// ---------------------------------------------------------------- a registry in memory

/// A registry kept in memory, to serve from a [`FakeServer`] handler: blob `HEAD`/`GET`, uploads
/// (`POST`, then `PUT` to the location with the upload state in its query, which must come back
/// intact), manifest `PUT`/`GET`, and, with `referrers_api`, the referrers API and `OCI-Subject`
/// answers. Without it, `/referrers/` is a 404 like docker-registry 2.8's.
pub(super) struct MemoryRegistry {
    referrers_api: bool,
    /// Upload locations as absolute URLs (built from `Host`), instead of absolute paths.
    absolute_locations: bool,
    state: Mutex<MemoryState>,
}

#[derive(Default)]
struct MemoryState {
    /// By (repository, digest).
    blobs: HashMap<(String, String), Vec<u8>>,
    /// By (repository, tag or digest): media type and bytes.
    manifests: HashMap<(String, String), (String, Vec<u8>)>,
    uploads: u32,
}

fn registry_error(status: u16, code: &str) -> Reply {
    Reply::new(
        status,
        format!(r#"{{"errors":[{{"code":"{code}","message":"{code} (memory registry)"}}]}}"#),
    )
    .header("Content-Type", "application/json")
}

impl MemoryRegistry {
    pub(super) fn new(referrers_api: bool, absolute_locations: bool) -> Arc<Self> {
        Arc::new(MemoryRegistry {
            referrers_api,
            absolute_locations,
            state: Mutex::new(MemoryState::default()),
        })
    }

    /// A [`FakeServer`] handler serving this registry.
    pub(super) fn handler(self: &Arc<Self>) -> Handler {
        let this = self.clone();
        Arc::new(move |req: &SeenRequest| this.handle(req))
    }

    pub(super) fn blob(&self, repo: &str, digest: &str) -> Option<Vec<u8>> {
        let state = self.state.lock().unwrap();
        state
            .blobs
            .get(&(repo.to_string(), digest.to_string()))
            .cloned()
    }

    /// Media type and bytes of the manifest at `reference` (a tag or digest).
    pub(super) fn manifest(&self, repo: &str, reference: &str) -> Option<(String, Vec<u8>)> {
        let state = self.state.lock().unwrap();
        state
            .manifests
            .get(&(repo.to_string(), reference.to_string()))
            .cloned()
    }

    pub(super) fn handle(&self, req: &SeenRequest) -> Reply {
        let Some(rest) = req.path_only().strip_prefix("/v2/") else {
            return Reply::new(404, "404 page not found");
        };
        let method = req.method.as_str();
        let mut state = self.state.lock().unwrap();
        if let Some((repo, id)) = rest.split_once("/blobs/uploads/") {
            return match (method, id) {
                ("POST", "") => {
                    state.uploads += 1;
                    let n = state.uploads;
                    let path = format!("/v2/{repo}/blobs/uploads/u{n}?_state=s{n}");
                    let location = if self.absolute_locations {
                        format!("http://{}{path}", req.header("host").unwrap_or_default())
                    } else {
                        path
                    };
                    Reply::new(202, "")
                        .header("Location", location)
                        .header("Range", "0-0")
                }
                ("PUT", id) => {
                    let state_param = id.strip_prefix('u').map(|n| format!("s{n}"));
                    if req.query("_state") != state_param.into_iter().collect::<Vec<_>>() {
                        return registry_error(404, "BLOB_UPLOAD_UNKNOWN");
                    }
                    let [digest] = req.query("digest").try_into().unwrap_or_default();
                    if sha256_digest(&req.body) != digest {
                        return registry_error(400, "DIGEST_INVALID");
                    }
                    state
                        .blobs
                        .insert((repo.to_string(), digest.clone()), req.body.clone());
                    Reply::new(201, "")
                        .header("Location", format!("/v2/{repo}/blobs/{digest}"))
                        .header("Docker-Content-Digest", digest)
                }
                _ => registry_error(405, "UNSUPPORTED"),
            };
        }
        if let Some((repo, digest)) = rest.split_once("/blobs/") {
            return match state.blobs.get(&(repo.to_string(), digest.to_string())) {
                Some(data) => Reply::new(200, data.as_slice())
                    .header("Docker-Content-Digest", digest)
                    .header("Content-Type", "application/octet-stream"),
                None => registry_error(404, "BLOB_UNKNOWN"),
            };
        }
        if let Some((repo, reference)) = rest.split_once("/manifests/") {
            let key = (repo.to_string(), reference.to_string());
            return match method {
                "PUT" => {
                    let digest = sha256_digest(&req.body);
                    let media_type = req.header("content-type").unwrap_or_default().to_string();
                    let entry = (media_type, req.body.clone());
                    state.manifests.insert(key, entry.clone());
                    state
                        .manifests
                        .insert((repo.to_string(), digest.clone()), entry);
                    let subject = serde_json::from_slice::<serde_json::Value>(&req.body)
                        .ok()
                        .and_then(|m| m["subject"]["digest"].as_str().map(str::to_string));
                    let mut reply = Reply::new(201, "")
                        .header("Location", format!("/v2/{repo}/manifests/{digest}"))
                        .header("Docker-Content-Digest", digest);
                    if let Some(subject) = subject.filter(|_| self.referrers_api) {
                        reply = reply.header("OCI-Subject", subject);
                    }
                    reply
                }
                _ => match state.manifests.get(&key) {
                    Some((media_type, bytes)) => Reply::new(200, bytes.as_slice())
                        .header("Content-Type", media_type.clone())
                        .header("Docker-Content-Digest", sha256_digest(bytes)),
                    None => registry_error(404, "MANIFEST_UNKNOWN"),
                },
            };
        }
        if let Some((repo, subject)) = rest.split_once("/referrers/") {
            if !self.referrers_api {
                return Reply::new(404, "404 page not found");
            }
            let filter = req.query("artifactType").into_iter().next();
            let mut manifests: Vec<serde_json::Value> = state
                .manifests
                .iter()
                .filter(|((r, reference), _)| r == repo && reference.starts_with("sha256:"))
                .filter_map(|((_, digest), (media_type, bytes))| {
                    let m: serde_json::Value = serde_json::from_slice(bytes).ok()?;
                    if m["subject"]["digest"].as_str() != Some(subject) {
                        return None;
                    }
                    let artifact_type = m["artifactType"]
                        .as_str()
                        .or(m["config"]["mediaType"].as_str())?
                        .to_string();
                    if filter.as_ref().is_some_and(|f| *f != artifact_type) {
                        return None;
                    }
                    let mut d = serde_json::json!({
                        "mediaType": media_type,
                        "digest": digest,
                        "size": bytes.len(),
                        "artifactType": artifact_type,
                    });
                    if let Some(a) = m.get("annotations") {
                        d["annotations"] = a.clone();
                    }
                    Some(d)
                })
                .collect();
            manifests.sort_by_key(|d| d["digest"].as_str().unwrap_or_default().to_string());
            let index = serde_json::json!({
                "schemaVersion": 2,
                "mediaType": MEDIA_TYPE_OCI_INDEX,
                "manifests": manifests,
            });
            let mut reply = Reply::new(200, serde_json::to_vec(&index).unwrap())
                .header("Content-Type", MEDIA_TYPE_OCI_INDEX);
            if filter.is_some() {
                reply = reply.header("OCI-Filters-Applied", "artifactType");
            }
            return reply;
        }
        Reply::new(404, "404 page not found")
    }
}

/// `count` requests of `method` among `requests`.
pub(super) fn count_method(requests: &[SeenRequest], method: &str) -> usize {
    requests.iter().filter(|r| r.method == method).count()
}

/// Like [`noise`] but eight bytes per step, for blobs of hundreds of MiB.
pub(super) fn wide_noise(len: usize, seed: u64) -> Vec<u8> {
    let mut state = seed | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        out.extend_from_slice(&xorshift(&mut state).to_le_bytes());
    }
    out.truncate(len);
    out
}

/// A client for `host` with short timeouts, for tests that wait for them to fire.
pub(super) fn impatient_client(host: &str, read_timeout: Duration) -> RegistryClient {
    RegistryClient::new(
        host,
        ClientOptions {
            connect_timeout: Duration::from_secs(2),
            read_timeout,
            ..Default::default()
        },
    )
    .unwrap()
}
