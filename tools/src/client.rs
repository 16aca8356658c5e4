//! `lazyctl`'s client of lazyd's control API: the agent's async [`agent::client::Client`],
//! called through a current-thread runtime of its own, so the commands stay plain blocking code.

use std::path::Path;

use agent::client::Client;
pub use agent::client::ClientError;
use serde::de::DeserializeOwned;
use serde::Serialize;

/// A blocking client of one agent socket.
pub struct AgentClient {
    client: Client,
    runtime: tokio::runtime::Runtime,
}

impl AgentClient {
    pub fn new(socket: &Path) -> std::io::Result<AgentClient> {
        Ok(AgentClient {
            client: Client::new(socket),
            runtime: tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?,
        })
    }

    pub fn socket(&self) -> &Path {
        self.client.socket()
    }

    pub fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T, ClientError> {
        self.runtime.block_on(self.client.get(path))
    }

    pub fn get_text(&self, path: &str) -> Result<String, ClientError> {
        self.runtime.block_on(self.client.get_text(path))
    }

    pub fn post<B: Serialize, T: DeserializeOwned>(
        &self,
        path: &str,
        body: &B,
    ) -> Result<T, ClientError> {
        self.runtime.block_on(self.client.post(path, body))
    }

    /// Posts `body` and calls `on_event` with each JSON line of the streamed answer until the
    /// agent ends it.
    pub fn post_stream<B: Serialize, T: DeserializeOwned>(
        &self,
        path: &str,
        body: &B,
        on_event: impl FnMut(T),
    ) -> Result<(), ClientError> {
        self.runtime
            .block_on(self.client.post_stream(path, body, on_event))
    }
}
