//! What the snapshotter asks lazyd, over its control API (`agent::client`, as lazyctl does):
//! whether an image has a lazy version (`POST /v1/image/resolve`, remembered for a minute so
//! the layers of one pull get one answer), and to hold or release the image's shared read-only
//! mount for a snapshot (`POST /v1/lower`, `POST /v1/lower/release`).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use agent::api::{
    ImageRequest, LowerInfo, LowerReleaseRequest, LowerReleased, LowerRequest, ResolvedImage,
    Status,
};
use agent::client::{Client, ClientError};
use agent::sync::lock;
use tracing::{debug, warn};

/// How long an answer to "is there a lazy version of IMAGE?" is reused: long enough for every
/// layer of one pull, short enough that converting an image takes effect at the next pull.
const RESOLVE_TTL: Duration = Duration::from_secs(60);

/// Whether an image is pulled lazily.
#[derive(Debug, Clone)]
pub enum Resolution {
    Lazy(ResolvedImage),
    /// Not lazily, and why (no lazy version, or lazyd could not tell).
    Unpack(String),
}

pub struct Lazyd {
    client: Client,
    resolved: Mutex<HashMap<String, (Instant, Resolution)>>,
}

impl Lazyd {
    pub fn new(socket: &Path) -> Lazyd {
        Lazyd {
            client: Client::new(socket),
            resolved: Mutex::new(HashMap::new()),
        }
    }

    /// Whether `image` has a lazy version. lazyd's definite "no" (400: not a lazy image and
    /// none found beside it) is remembered like a "yes"; when lazyd cannot answer (down, the
    /// registry failing) the answer is to unpack, not remembered, and logged.
    pub async fn resolve(&self, image: &str) -> Resolution {
        if let Some((at, answer)) = lock(&self.resolved).get(image) {
            if at.elapsed() < RESOLVE_TTL {
                return answer.clone();
            }
        }
        let request = ImageRequest {
            image: image.to_string(),
        };
        let answer = match self
            .client
            .post::<_, ResolvedImage>("/v1/image/resolve", &request)
            .await
        {
            Ok(resolved) => Resolution::Lazy(resolved),
            Err(e) if e.is_bad_request() => {
                debug!(image, "no lazy version: {e}");
                Resolution::Unpack(e.to_string())
            }
            Err(e) => {
                warn!(
                    image,
                    "lazyd cannot say whether the image has a lazy version, so it is unpacked: {e}"
                );
                return Resolution::Unpack(e.to_string());
            }
        };
        let mut resolved = lock(&self.resolved);
        resolved.retain(|_, (at, _)| at.elapsed() < RESOLVE_TTL);
        resolved.insert(image.to_string(), (Instant::now(), answer.clone()));
        answer
    }

    /// Holds the shared read-only mount of `image` for `holder` (mounting it if it is not);
    /// returns where it is mounted. Asking again is harmless.
    pub async fn hold(&self, image: &str, holder: &str) -> Result<PathBuf, ClientError> {
        let request = LowerRequest {
            image: image.to_string(),
            holder: holder.to_string(),
        };
        let info: LowerInfo = self.client.post("/v1/lower", &request).await?;
        Ok(info.lower)
    }

    /// Lets go of what `holder` holds; a holder lazyd does not know is already released.
    pub async fn release(&self, holder: &str) -> Result<(), ClientError> {
        let request = LowerReleaseRequest {
            holder: holder.to_string(),
            lazy: false,
        };
        match self
            .client
            .post::<_, LowerReleased>("/v1/lower/release", &request)
            .await
        {
            Ok(_) => Ok(()),
            Err(e) if e.is_not_found() => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// The holders lazyd knows of.
    pub async fn holders(&self) -> Result<Vec<LowerInfo>, ClientError> {
        let status: Status = self.client.get("/v1/status").await?;
        Ok(status.lower_holders)
    }
}
