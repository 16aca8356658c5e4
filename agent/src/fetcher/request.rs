//! One request: the stored bytes of a run of adjacent chunks of one blob, as a single range
//! GET, each chunk's bytes handed on the moment the body has carried them (a reader waiting for
//! the first chunk of an 8 MiB request waits for that chunk, not for the request). A request is
//! bounded by `request_timeout`; transient failures (connection errors, 5xx, short bodies,
//! timeouts) are retried with exponential backoff up to `max_attempts`, and a retry asks only
//! for the chunks not delivered yet; permanent ones (missing blob, denied, bad range) are not
//! retried. An attempt that delivered something starts the count of attempts afresh. A store
//! that throttles (429 or 503 with `Retry-After`) is asked again no sooner than it said, but no
//! later than `read_timeout` after its answer: a reader never waits longer than that anyway, and
//! a server that asks for an hour would otherwise hold the request (and its chunks' flights) for
//! an hour.

use std::ops::Range;
use std::time::{Duration, Instant};

use tracing::debug;

use super::{Backend, FetcherConfig};
use crate::blobstore::{BlobError, BlobStore};

/// Fetches the chunks at `spans` (sorted, adjacent, in blob `blob`) from `store` (the
/// backend's, or the origin behind its mirrors), calling `deliver(i, bytes)` with span `i`'s
/// bytes, in order, as they arrive; `backend`'s metrics count the requests. Returns the index
/// of the first span not delivered and why, when retries are exhausted or the failure is
/// permanent.
pub(super) async fn fetch_spans(
    config: &FetcherConfig,
    backend: &Backend,
    store: &dyn BlobStore,
    blob: &str,
    spans: &[Range<u64>],
    deliver: &mut (dyn FnMut(usize, Vec<u8>) + Send),
) -> Result<(), (usize, BlobError)> {
    let mut next = 0;
    let mut attempt = 1;
    while next < spans.len() {
        let range = spans[next].start..spans[spans.len() - 1].end;
        let want = range.end - range.start;
        backend.metrics.requests.inc();
        let started = Instant::now();
        let first = next;
        let mut received = 0u64;
        let outcome = {
            let mut pending: Vec<u8> = Vec::new();
            let mut sink = |mut bytes: &[u8]| {
                // Counted as they arrive, before any chunk they complete is handed on.
                received += bytes.len() as u64;
                backend.metrics.bytes.add(bytes.len() as u64);
                while !bytes.is_empty() && next < spans.len() {
                    let span_len = (spans[next].end - spans[next].start) as usize;
                    if pending.capacity() == 0 {
                        pending.reserve_exact(span_len);
                    }
                    let take = (span_len - pending.len()).min(bytes.len());
                    pending.extend_from_slice(&bytes[..take]);
                    bytes = &bytes[take..];
                    if pending.len() == span_len {
                        deliver(next, std::mem::take(&mut pending));
                        next += 1;
                    }
                }
            };
            tokio::time::timeout(
                config.request_timeout,
                store.read_range_to(blob, range.clone(), &mut sink),
            )
            .await
        };
        backend.metrics.latency.observe(started.elapsed());
        let err = match outcome {
            Ok(Ok(())) if received == want => return Ok(()),
            Ok(Ok(())) => BlobError::Unavailable {
                store: backend.id.clone(),
                digest: blob.to_string(),
                reason: format!("got {received} of {want} bytes"),
            },
            Ok(Err(e)) => e,
            Err(_) => {
                backend.metrics.timeouts.inc();
                BlobError::Timeout {
                    store: backend.id.clone(),
                    digest: blob.to_string(),
                    after: config.request_timeout,
                }
            }
        };
        backend.metrics.errors.inc();
        if next > first {
            attempt = 1;
        }
        if err.is_permanent() || attempt >= config.max_attempts {
            return Err((next, err));
        }
        let delay = retry_delay(config, attempt, &err);
        debug!(
            backend = %backend.id,
            blob,
            attempt,
            "range {}..{} failed after {received} bytes, retrying the rest in {delay:?}: {err}",
            range.start,
            range.end
        );
        backend.metrics.retries.inc();
        tokio::time::sleep(delay).await;
        attempt += 1;
    }
    Ok(())
}

/// The wait before retry number `attempt`: `base`, doubled for each retry before it.
fn backoff(base: Duration, attempt: u32) -> Duration {
    base * 2u32.saturating_pow(attempt - 1)
}

/// The wait before retry number `attempt` after `err`: the backoff, or the store's
/// `Retry-After` when it asks for longer, up to the read timeout.
fn retry_delay(config: &FetcherConfig, attempt: u32, err: &BlobError) -> Duration {
    let asked = err
        .retry_after()
        .map_or(Duration::ZERO, |after| after.min(config.read_timeout));
    backoff(config.retry_backoff, attempt).max(asked)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::blobstore::BackendId;

    #[test]
    fn backoff_doubles() {
        let base = Duration::from_millis(100);
        assert_eq!(backoff(base, 1), base);
        assert_eq!(backoff(base, 3), base * 4);
    }

    #[test]
    fn retry_after_is_honoured_up_to_the_read_timeout() {
        let config = FetcherConfig {
            retry_backoff: Duration::from_millis(100),
            read_timeout: Duration::from_secs(5),
            ..FetcherConfig::default()
        };
        let throttled = |secs| BlobError::Throttled {
            store: BackendId::memory("s"),
            digest: "d".into(),
            reason: "http 429".into(),
            retry_after: Duration::from_secs(secs),
        };
        assert_eq!(
            retry_delay(&config, 1, &throttled(2)),
            Duration::from_secs(2)
        );
        assert_eq!(
            retry_delay(&config, 1, &throttled(3600)),
            Duration::from_secs(5)
        );
        // A server asking for less than the backoff gets the backoff.
        assert_eq!(
            retry_delay(&config, 3, &throttled(0)),
            Duration::from_millis(400)
        );
        let down = BlobError::Unavailable {
            store: BackendId::memory("s"),
            digest: "d".into(),
            reason: "http 503".into(),
        };
        assert_eq!(retry_delay(&config, 2, &down), Duration::from_millis(200));
    }
}
