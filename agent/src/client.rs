//! A client of lazyd's control API: HTTP/1.1 over the agent's unix socket (hyper), JSON bodies
//! whose types live in [`crate::api`]. Each call opens one connection; the calls are few and
//! local, so there is nothing to pool.
//!
//! [`Client`] is async and runs on any tokio runtime (the connection is driven by a spawned
//! task). `lazyctl` wraps it in a blocking client of its own (`tools::client::AgentClient`);
//! a containerd snapshotter calls it from its multi-thread runtime.

use std::path::{Path, PathBuf};
use std::time::Duration;

use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::TokioIo;
use serde::de::DeserializeOwned;
use serde::Serialize;
use thiserror::Error;
use tokio::net::UnixStream;

use crate::api::ErrorBody;

#[derive(Debug, Error)]
pub enum ClientError {
    #[error("cannot reach lazyd at {socket}: {source} (is lazyd running? start it with `lazyd --config FILE` or `systemctl start lazyd`; --socket or LAZYD_SOCKET name another socket)")]
    Unreachable {
        socket: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The agent answered with an error.
    #[error("{message}")]
    Api { status: StatusCode, message: String },
    #[error("talking to lazyd at {socket}: {reason}")]
    Protocol { socket: PathBuf, reason: String },
}

impl ClientError {
    /// The status of the agent's error answer; `None` when there was no answer.
    pub fn status(&self) -> Option<StatusCode> {
        match self {
            ClientError::Api { status, .. } => Some(*status),
            ClientError::Unreachable { .. } | ClientError::Protocol { .. } => None,
        }
    }

    /// Whether the agent said it has no such thing (404: no mount at the path, no container or
    /// lower holder of the name).
    pub fn is_not_found(&self) -> bool {
        self.status() == Some(StatusCode::NOT_FOUND)
    }

    /// Whether the agent refused the request itself (400: a bad reference, not a lazy image).
    pub fn is_bad_request(&self) -> bool {
        self.status() == Some(StatusCode::BAD_REQUEST)
    }

    /// Whether nothing listens on the socket (lazyd is not running).
    pub fn is_unreachable(&self) -> bool {
        matches!(self, ClientError::Unreachable { .. })
    }
}

/// How long a call waits for lazyd to listen again on its socket.
const RESTART_WAIT: Duration = Duration::from_secs(5);

/// A connection-per-call client of one agent socket.
#[derive(Debug, Clone)]
pub struct Client {
    socket: PathBuf,
}

impl Client {
    pub fn new(socket: &Path) -> Client {
        Client {
            socket: socket.to_path_buf(),
        }
    }

    pub fn socket(&self) -> &Path {
        &self.socket
    }

    pub async fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T, ClientError> {
        let body = self.call(Method::GET, path, Bytes::new()).await?;
        self.decode(&body)
    }

    pub async fn get_text(&self, path: &str) -> Result<String, ClientError> {
        let body = self.call(Method::GET, path, Bytes::new()).await?;
        String::from_utf8(body.to_vec()).map_err(|e| self.protocol(e))
    }

    pub async fn post<B: Serialize, T: DeserializeOwned>(
        &self,
        path: &str,
        body: &B,
    ) -> Result<T, ClientError> {
        let request = serde_json::to_vec(body).map_err(|e| self.protocol(e))?;
        let body = self.call(Method::POST, path, Bytes::from(request)).await?;
        self.decode(&body)
    }

    /// Posts `body` and calls `on_event` with each JSON line of the streamed answer until the
    /// agent ends it.
    pub async fn post_stream<B: Serialize, T: DeserializeOwned>(
        &self,
        path: &str,
        body: &B,
        mut on_event: impl FnMut(T),
    ) -> Result<(), ClientError> {
        let request = serde_json::to_vec(body).map_err(|e| self.protocol(e))?;
        let response = self.send(Method::POST, path, Bytes::from(request)).await?;
        let status = response.status();
        let mut body = response.into_body();
        if !status.is_success() {
            let bytes = body
                .collect()
                .await
                .map_err(|e| self.protocol(e))?
                .to_bytes();
            return Err(self.api_error(status, &bytes));
        }
        let mut pending = Vec::new();
        while let Some(frame) = body.frame().await {
            let frame = frame.map_err(|e| self.protocol(e))?;
            let Some(data) = frame.data_ref() else {
                continue;
            };
            pending.extend_from_slice(data);
            while let Some(end) = pending.iter().position(|&b| b == b'\n') {
                let line: Vec<u8> = pending.drain(..=end).collect();
                if line.len() > 1 {
                    on_event(self.decode(&line)?);
                }
            }
        }
        Ok(())
    }

    /// Sends one request and reads the whole answer; an error status becomes
    /// [`ClientError::Api`].
    async fn call(&self, method: Method, path: &str, body: Bytes) -> Result<Bytes, ClientError> {
        let response = self.send(method, path, body).await?;
        let status = response.status();
        let bytes = response
            .into_body()
            .collect()
            .await
            .map_err(|e| self.protocol(e))?
            .to_bytes();
        if status.is_success() {
            Ok(bytes)
        } else {
            Err(self.api_error(status, &bytes))
        }
    }

    async fn send(
        &self,
        method: Method,
        path: &str,
        body: Bytes,
    ) -> Result<hyper::Response<hyper::body::Incoming>, ClientError> {
        let stream = self.connect().await?;
        let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| self.protocol(e))?;
        tokio::spawn(connection);
        let request = Request::builder()
            .method(method)
            .uri(path)
            .header(hyper::header::HOST, "lazyd")
            .header(hyper::header::CONTENT_TYPE, "application/json")
            .body(Full::new(body))
            .map_err(|e| self.protocol(e))?;
        sender
            .send_request(request)
            .await
            .map_err(|e| self.protocol(e))
    }

    /// Connects to the socket. A socket nobody listens on (ECONNREFUSED) is lazyd between two
    /// processes (a restart, a crash its supervisor is recovering from, an upgrade): tried
    /// again for up to [`RESTART_WAIT`].
    async fn connect(&self) -> Result<UnixStream, ClientError> {
        let deadline = tokio::time::Instant::now() + RESTART_WAIT;
        loop {
            match UnixStream::connect(&self.socket).await {
                Ok(stream) => return Ok(stream),
                Err(e)
                    if e.kind() == std::io::ErrorKind::ConnectionRefused
                        && tokio::time::Instant::now() < deadline =>
                {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                Err(source) => {
                    return Err(ClientError::Unreachable {
                        socket: self.socket.clone(),
                        source,
                    })
                }
            }
        }
    }

    fn decode<T: DeserializeOwned>(&self, bytes: &[u8]) -> Result<T, ClientError> {
        serde_json::from_slice(bytes).map_err(|e| self.protocol(e))
    }

    fn api_error(&self, status: StatusCode, body: &[u8]) -> ClientError {
        let message = match serde_json::from_slice::<ErrorBody>(body) {
            Ok(e) => e.error,
            Err(_) => format!("lazyd answered {status}: {}", String::from_utf8_lossy(body)),
        };
        ClientError::Api { status, message }
    }

    fn protocol(&self, reason: impl std::fmt::Display) -> ClientError {
        ClientError::Protocol {
            socket: self.socket.clone(),
            reason: reason.to_string(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::routing::{get, post};
    use axum::{Json, Router};

    /// A server of three routes on a unix socket in `dir`: `GET /text`, `POST /echo` (answers
    /// its body) and `POST /lines` (three JSON lines); anything else is a 404 with lazyd's
    /// error body.
    async fn serve(dir: &Path) -> PathBuf {
        let socket = dir.join("api.sock");
        let listener = tokio::net::UnixListener::bind(&socket).unwrap();
        let router = Router::new()
            .route("/text", get(|| async { "hello" }))
            .route(
                "/echo",
                post(|Json(v): Json<serde_json::Value>| async move { Json(v) }),
            )
            .route("/lines", post(|| async { "1\n\n2\n3\n" }))
            .fallback(|| async {
                (
                    StatusCode::NOT_FOUND,
                    Json(ErrorBody {
                        error: "no such thing".into(),
                    }),
                )
            });
        tokio::spawn(async move { axum::serve(listener, router).await });
        socket
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn calls_decode_answers_and_errors_keep_the_status_and_message() {
        let dir = tempfile::tempdir().unwrap();
        let client = Client::new(&serve(dir.path()).await);
        assert_eq!(client.get_text("/text").await.unwrap(), "hello");
        let sent = serde_json::json!({"image": "r/x:1", "n": 2});
        let back: serde_json::Value = client.post("/echo", &sent).await.unwrap();
        assert_eq!(back, sent);
        let mut events = Vec::new();
        client
            .post_stream("/lines", &sent, |n: u32| events.push(n))
            .await
            .unwrap();
        assert_eq!(events, [1, 2, 3]);

        let e = client
            .get::<serde_json::Value>("/missing")
            .await
            .unwrap_err();
        assert_eq!(e.status(), Some(StatusCode::NOT_FOUND));
        assert!(e.is_not_found() && !e.is_bad_request() && !e.is_unreachable());
        assert_eq!(e.to_string(), "no such thing");
    }

    #[tokio::test]
    async fn a_socket_nobody_serves_is_unreachable() {
        let dir = tempfile::tempdir().unwrap();
        let client = Client::new(&dir.path().join("none.sock"));
        let e = client.get_text("/v1/status").await.unwrap_err();
        assert!(e.is_unreachable(), "{e}");
        assert_eq!(e.status(), None);
        assert!(!e.is_not_found());
    }
}
