//! `lazyctl`'s client of lazyd's control API: HTTP/1.1 over the agent's unix socket (hyper),
//! JSON bodies whose types live in `agent::api`. Each call opens one connection; the calls are
//! few and local, so there is nothing to pool.

use std::path::{Path, PathBuf};

use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::TokioIo;
use serde::de::DeserializeOwned;
use serde::Serialize;
use thiserror::Error;
use tokio::net::UnixStream;

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
    /// Whether the agent said it has no mount at the path asked about.
    pub fn is_not_mounted(&self) -> bool {
        matches!(self, ClientError::Api { status, .. } if *status == StatusCode::NOT_FOUND)
    }
}

/// How long a call waits for lazyd to listen again on its socket.
const RESTART_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

/// A connection-per-call client of one agent socket.
pub struct AgentClient {
    socket: PathBuf,
    runtime: tokio::runtime::Runtime,
}

impl AgentClient {
    pub fn new(socket: &Path) -> std::io::Result<AgentClient> {
        Ok(AgentClient {
            socket: socket.to_path_buf(),
            runtime: tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?,
        })
    }

    pub fn socket(&self) -> &Path {
        &self.socket
    }

    pub fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T, ClientError> {
        let body = self.call(Method::GET, path, Bytes::new())?;
        self.decode(&body)
    }

    pub fn get_text(&self, path: &str) -> Result<String, ClientError> {
        let body = self.call(Method::GET, path, Bytes::new())?;
        String::from_utf8(body.to_vec()).map_err(|e| self.protocol(e))
    }

    pub fn post<B: Serialize, T: DeserializeOwned>(
        &self,
        path: &str,
        body: &B,
    ) -> Result<T, ClientError> {
        let request = serde_json::to_vec(body).map_err(|e| self.protocol(e))?;
        let body = self.call(Method::POST, path, Bytes::from(request))?;
        self.decode(&body)
    }

    /// Posts `body` and calls `on_event` with each JSON line of the streamed answer until the
    /// agent ends it.
    pub fn post_stream<B: Serialize, T: DeserializeOwned>(
        &self,
        path: &str,
        body: &B,
        mut on_event: impl FnMut(T),
    ) -> Result<(), ClientError> {
        let request = serde_json::to_vec(body).map_err(|e| self.protocol(e))?;
        self.runtime.block_on(async {
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
        })
    }

    fn call(&self, method: Method, path: &str, body: Bytes) -> Result<Bytes, ClientError> {
        self.runtime.block_on(async {
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
        })
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
                    tokio::time::sleep(std::time::Duration::from_millis(20)).await;
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
        let message = match serde_json::from_slice::<agent::api::ErrorBody>(body) {
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
