//! Request bodies for uploads, and the watchdog that fails an upload when its body stops
//! moving ([`send_watched`]; the `registry` module docs say why reqwest's read timeout cannot).
//!
//! An [`UploadBody`] is bytes, or a file read [`UPLOAD_FRAME`] at a time and never held in
//! memory, with its exact length, and it records in [`UploadProgress`] when hyper last took a
//! piece of it. `client.rs` sends every request that has a body this way (`push.rs`'s blob and
//! manifest uploads). Uses only `error.rs`.

use std::io;
use std::path::Path;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{ready, Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body::{Frame, SizeHint};
use reqwest::Response;
use tokio::io::{AsyncRead, ReadBuf};

use super::error::{transport, RegistryError};
use crate::sync::lock;

/// Size of each piece of an upload body: large enough that reads and frames are few, small
/// enough that progress is seen several times a second on a slow link.
pub(super) const UPLOAD_FRAME: usize = 256 << 10;
/// How long the registry may take to answer once it has the whole body: it hashes, verifies and
/// moves the blob into place first, which on an S3-backed registry is a server-side copy that
/// grows with the blob.
const COMMIT_TIMEOUT: Duration = Duration::from_secs(5 * 60);

/// How long an upload may go without progress.
#[derive(Debug, Clone, Copy)]
pub(super) struct StallLimits {
    /// Before the first byte goes out (the connection is still being made).
    pub(super) connect: Duration,
    /// Between pieces of the body.
    pub(super) idle: Duration,
}

/// When an upload body last moved, shared between the body and [`send_watched`].
#[derive(Debug)]
pub(super) struct UploadProgress {
    state: Mutex<ProgressState>,
}

#[derive(Debug)]
struct ProgressState {
    last: Instant,
    sent: u64,
    done: bool,
}

impl UploadProgress {
    fn new() -> Arc<Self> {
        Arc::new(UploadProgress {
            state: Mutex::new(ProgressState {
                last: Instant::now(),
                sent: 0,
                done: false,
            }),
        })
    }

    fn advance(&self, bytes: usize, done: bool) {
        let mut state = lock(&self.state);
        state.last = Instant::now();
        state.sent += bytes as u64;
        state.done = done;
    }

    /// How long since the body last moved, and how long it may stay so.
    fn idle(&self, limits: StallLimits) -> (Duration, Duration) {
        let state = lock(&self.state);
        let limit = if state.done {
            COMMIT_TIMEOUT.max(limits.idle)
        } else if state.sent == 0 {
            limits.connect + limits.idle
        } else {
            limits.idle
        };
        (state.last.elapsed(), limit)
    }
}

/// Sends a request whose body is an upload, and fails it with [`RegistryError::Stalled`] when
/// the body stops moving.
///
/// reqwest's read timeout cannot do this: it is one timer from the start of the request to the
/// response headers, so it would cut off every upload that takes longer than the timeout,
/// however fast its bytes move. The upload client has none; instead the body records each piece
/// that hyper takes from it (hyper takes the next only once the socket has room, so a server
/// that stops reading stops the pieces), and this watchdog fails the request when none has gone
/// for `limits.idle`. Once the whole body is out, the registry gets [`COMMIT_TIMEOUT`] to answer.
pub(super) async fn send_watched(
    request: reqwest::RequestBuilder,
    progress: Arc<UploadProgress>,
    limits: StallLimits,
    url: &str,
) -> Result<Response, RegistryError> {
    let watchdog = async {
        loop {
            let (idle, limit) = progress.idle(limits);
            if idle >= limit {
                return idle;
            }
            tokio::time::sleep(limit - idle).await;
        }
    };
    tokio::select! {
        sent = request.send() => sent.map_err(transport(url)),
        idle = watchdog => Err(RegistryError::Stalled {
            url: url.to_string(),
            after: idle,
        }),
    }
}

/// An upload body: bytes, or a file read [`UPLOAD_FRAME`] at a time, with its exact length (so
/// it goes out with `Content-Length`) and progress recorded for [`send_watched`].
pub(super) struct UploadBody {
    source: Source,
    len: u64,
    remaining: u64,
    /// The buffer the next file read fills; handed to hyper as the frame, so never copied.
    read_buf: Option<Vec<u8>>,
    progress: Arc<UploadProgress>,
}

enum Source {
    Bytes(Bytes),
    File(tokio::fs::File),
}

impl UploadBody {
    pub(super) fn from_bytes(bytes: Bytes) -> Self {
        let len = bytes.len() as u64;
        UploadBody {
            source: Source::Bytes(bytes),
            len,
            remaining: len,
            read_buf: None,
            progress: UploadProgress::new(),
        }
    }

    /// Opens `path`; the body is as long as the file is now.
    pub(super) async fn open(path: &Path) -> Result<Self, RegistryError> {
        let read_error = |source| RegistryError::ReadFile {
            path: path.to_path_buf(),
            source,
        };
        let file = tokio::fs::File::open(path).await.map_err(read_error)?;
        let len = file.metadata().await.map_err(read_error)?.len();
        Ok(UploadBody {
            source: Source::File(file),
            len,
            remaining: len,
            read_buf: None,
            progress: UploadProgress::new(),
        })
    }

    pub(super) fn len(&self) -> u64 {
        self.len
    }

    pub(super) fn progress(&self) -> Arc<UploadProgress> {
        self.progress.clone()
    }
}

impl http_body::Body for UploadBody {
    type Data = Bytes;
    type Error = io::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, io::Error>>> {
        let this = self.get_mut();
        if this.remaining == 0 {
            return Poll::Ready(None);
        }
        // At most UPLOAD_FRAME, so the cast cannot truncate.
        let want = this.remaining.min(UPLOAD_FRAME as u64) as usize;
        let piece = match &mut this.source {
            Source::Bytes(bytes) => bytes.split_to(want.min(bytes.len())),
            Source::File(file) => {
                let buf = this.read_buf.get_or_insert_with(|| vec![0; UPLOAD_FRAME]);
                let mut read = ReadBuf::new(&mut buf[..want]);
                ready!(Pin::new(file).poll_read(cx, &mut read))?;
                let n = read.filled().len();
                let mut buf = this.read_buf.take().unwrap_or_default();
                buf.truncate(n);
                Bytes::from(buf)
            }
        };
        if piece.is_empty() {
            return Poll::Ready(Some(Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!(
                    "upload source ended {} bytes short of its {} bytes",
                    this.remaining, this.len
                ),
            ))));
        }
        this.remaining -= piece.len() as u64;
        this.progress.advance(piece.len(), this.remaining == 0);
        Poll::Ready(Some(Ok(Frame::data(piece))))
    }

    fn is_end_stream(&self) -> bool {
        self.remaining == 0
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::with_exact(self.remaining)
    }
}
