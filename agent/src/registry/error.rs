//! What can go wrong talking to a registry: [`RegistryError`], whose variants name the image,
//! blob or URL they are about and say whether a retry can help
//! ([`RegistryError::is_permanent`]), and the values its variants carry: [`ContentKind`] and
//! [`Reference`] (a tag or a digest).
//!
//! `Reference` is defined here rather than in `reference.rs` because two variants carry one,
//! while `reference.rs` returns these errors when it validates one: defining it here keeps this
//! module at the bottom of `registry`, using nothing else of it. Also here: [`error_chain`],
//! which prints an error with its causes, `transport`, which wraps a reqwest error without the
//! signed query of the URL it names, and `registry_error_detail`, which reads the `errors` of a
//! registry's JSON error body. Turning a response into an error (`status_error`) is
//! `client.rs`'s, since it reads the response.

use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use reqwest::StatusCode;
use serde::Deserialize;

/// Errors from the registry client. Each one names the image, blob or URL it is about.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error("invalid image reference {input:?}: {reason}")]
    InvalidReference { input: String, reason: &'static str },
    #[error("invalid registry host {host:?}: expected HOST[:PORT]")]
    InvalidRegistry { host: String },
    #[error("invalid digest {digest:?}: expected sha256:<64 lowercase hex digits>")]
    InvalidDigest { digest: String },
    #[error("invalid range {start}..{end} for blob {digest}: start is past end")]
    InvalidRange {
        digest: String,
        start: u64,
        end: u64,
    },
    #[error("manifest unknown: {repo}{}{reference}", .reference.separator())]
    ManifestUnknown { repo: String, reference: Reference },
    #[error("blob unknown: {repo}@{digest}")]
    BlobUnknown { repo: String, digest: String },
    #[error("unauthorized for {repo}: {detail}")]
    Unauthorized { repo: String, detail: String },
    #[error("access denied to {repo} (http 403 from {url})")]
    Denied { repo: String, url: String },
    #[error("{kind} {repo}@{expected} digest mismatch: got {actual}")]
    DigestMismatch {
        kind: ContentKind,
        repo: String,
        expected: String,
        actual: String,
    },
    #[error("manifest {repo}{}{reference} is unusable: {reason}", .reference.separator())]
    InvalidManifest {
        repo: String,
        reference: Reference,
        reason: String,
    },
    #[error("range {start}..{end} of blob {repo}@{digest}: {reason}")]
    RangeMismatch {
        repo: String,
        digest: String,
        start: u64,
        end: u64,
        reason: String,
    },
    #[error("range {start}..{end} of blob {repo}@{digest}: body ended after {received} bytes")]
    TruncatedBody {
        repo: String,
        digest: String,
        start: u64,
        end: u64,
        received: u64,
    },
    #[error("unsupported authentication challenge from {url}: {header:?}")]
    UnsupportedAuth { url: String, header: String },
    #[error("bad token response from {realm}: {reason}")]
    TokenResponse { realm: String, reason: String },
    #[error("http {status} from {url}{}", detail_suffix(.detail))]
    Http {
        status: u16,
        url: String,
        detail: String,
        /// The wait a 429 or 503 asked for with `Retry-After`.
        retry_after: Option<Duration>,
    },
    #[error("request to {url} failed")]
    Transport {
        url: String,
        #[source]
        source: reqwest::Error,
    },
    #[error("blob {repo}@{digest} is larger than the {limit}-byte limit")]
    BlobTooLarge {
        repo: String,
        digest: String,
        limit: u64,
    },
    /// The server answered in a way the protocol does not allow: an upload without a `Location`,
    /// a referrers list that is not an index.
    #[error("unusable response from {url}: {reason}")]
    BadResponse { url: String, reason: String },
    /// An upload body made no progress (or the registry did not answer after it) for `after`.
    #[error("upload to {url} stalled: no progress for {after:?}")]
    Stalled { url: String, after: Duration },
    #[error("writing {path}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("reading {path}")]
    ReadFile {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

fn detail_suffix(detail: &str) -> String {
    if detail.is_empty() {
        String::new()
    } else {
        format!(": {detail}")
    }
}

impl RegistryError {
    /// True when retrying the same request cannot help: the thing is missing, access is refused,
    /// the input is malformed or the content is wrong. Timeouts, connection failures, truncated
    /// bodies, 5xx, 408 and 429 are transient.
    pub fn is_permanent(&self) -> bool {
        match self {
            RegistryError::InvalidReference { .. }
            | RegistryError::InvalidRegistry { .. }
            | RegistryError::InvalidDigest { .. }
            | RegistryError::InvalidRange { .. }
            | RegistryError::ManifestUnknown { .. }
            | RegistryError::BlobUnknown { .. }
            | RegistryError::Unauthorized { .. }
            | RegistryError::Denied { .. }
            | RegistryError::DigestMismatch { .. }
            | RegistryError::InvalidManifest { .. }
            | RegistryError::RangeMismatch { .. }
            | RegistryError::UnsupportedAuth { .. }
            | RegistryError::TokenResponse { .. }
            | RegistryError::BlobTooLarge { .. }
            | RegistryError::BadResponse { .. }
            | RegistryError::Io { .. }
            | RegistryError::ReadFile { .. } => true,
            RegistryError::TruncatedBody { .. } | RegistryError::Stalled { .. } => false,
            RegistryError::Http { status, .. } => {
                let status = *status;
                !(status >= 500
                    || status == StatusCode::REQUEST_TIMEOUT.as_u16()
                    || status == StatusCode::TOO_MANY_REQUESTS.as_u16())
            }
            // A bad URL or a redirect loop fails the same way every time; everything else
            // (connect, TLS handshake, timeout, reset mid-body) may not.
            RegistryError::Transport { source, .. } => source.is_builder() || source.is_redirect(),
        }
    }
}

/// What a [`RegistryError::DigestMismatch`] was about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ContentKind {
    Manifest,
    Blob,
}

impl fmt::Display for ContentKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ContentKind::Manifest => "manifest",
            ContentKind::Blob => "blob",
        })
    }
}

/// Which manifest of a repository: a tag or a content digest.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Reference {
    Tag(String),
    /// `sha256:<hex>`; fetching by digest verifies the manifest against it.
    Digest(String),
}

impl Reference {
    /// The tag or digest as it appears in a URL.
    pub fn as_str(&self) -> &str {
        match self {
            Reference::Tag(s) | Reference::Digest(s) => s,
        }
    }

    /// What joins it to the repository name: `repo:tag`, `repo@digest`.
    pub(super) fn separator(&self) -> char {
        match self {
            Reference::Tag(_) => ':',
            Reference::Digest(_) => '@',
        }
    }
}

impl fmt::Display for Reference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

pub(super) fn transport(url: &str) -> impl FnOnce(reqwest::Error) -> RegistryError + '_ {
    move |mut source| {
        // reqwest names the URL it was at, which after a redirect may be a presigned storage
        // URL whose query is a credential. The path is enough to tell what failed.
        if let Some(at) = source.url_mut() {
            if at.query().is_some() {
                at.set_query(Some("redacted"));
            }
        }
        RegistryError::Transport {
            url: url.to_string(),
            source,
        }
    }
}

/// `CODE: message` from a registry error body (`{"errors":[{"code":..,"message":..}]}`), or "".
pub(super) fn registry_error_detail(body: &[u8]) -> String {
    #[derive(Deserialize)]
    struct ErrorBody {
        errors: Vec<ErrorEntry>,
    }
    #[derive(Deserialize)]
    struct ErrorEntry {
        #[serde(default)]
        code: String,
        #[serde(default)]
        message: String,
    }
    match serde_json::from_slice::<ErrorBody>(body) {
        Ok(parsed) => parsed
            .errors
            .iter()
            .map(|e| format!("{} {}", e.code, e.message).trim().to_string())
            .collect::<Vec<_>>()
            .join("; "),
        Err(_) => String::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_support::{free_port, tag};
    use super::*;
    use crate::error::error_chain;

    const DIGEST_A: &str =
        "sha256:aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";

    #[test]
    fn permanence_of_errors() {
        let http = |status| RegistryError::Http {
            status,
            url: "u".into(),
            detail: String::new(),
            retry_after: None,
        };
        for status in [500, 502, 503, 408, 429] {
            assert!(!http(status).is_permanent(), "{status}");
        }
        for status in [400, 404, 405, 410] {
            assert!(http(status).is_permanent(), "{status}");
        }
        let manifest = RegistryError::ManifestUnknown {
            repo: "test/img".into(),
            reference: tag("nope"),
        };
        assert!(manifest.is_permanent());
        assert_eq!(manifest.to_string(), "manifest unknown: test/img:nope");
        let by_digest = RegistryError::ManifestUnknown {
            repo: "test/img".into(),
            reference: Reference::Digest(DIGEST_A.into()),
        };
        assert_eq!(
            by_digest.to_string(),
            format!("manifest unknown: test/img@{DIGEST_A}")
        );
        assert!(!RegistryError::TruncatedBody {
            repo: "r".into(),
            digest: DIGEST_A.into(),
            start: 0,
            end: 2,
            received: 1
        }
        .is_permanent());
        let detail = RegistryError::Http {
            status: 500,
            url: "u".into(),
            detail: "X y".into(),
            retry_after: None,
        };
        assert_eq!(detail.to_string(), "http 500 from u: X y");
        assert_eq!(http(500).to_string(), "http 500 from u");
        assert_eq!(
            registry_error_detail(
                br#"{"errors":[{"code":"BLOB_UNKNOWN","message":"blob unknown to registry"}]}"#
            ),
            "BLOB_UNKNOWN blob unknown to registry"
        );
        assert_eq!(registry_error_detail(b"<html>"), "");

        let stalled = RegistryError::Stalled {
            url: "u".into(),
            after: Duration::from_secs(30),
        };
        assert!(!stalled.is_permanent());
        assert_eq!(
            stalled.to_string(),
            "upload to u stalled: no progress for 30s"
        );
        let too_large = RegistryError::BlobTooLarge {
            repo: "r".into(),
            digest: DIGEST_A.into(),
            limit: 10,
        };
        assert!(too_large.is_permanent());
        assert!(RegistryError::BadResponse {
            url: "u".into(),
            reason: "no Location".into()
        }
        .is_permanent());
    }

    #[tokio::test]
    async fn transport_errors_keep_their_cause_and_hide_signed_queries() {
        let port = free_port();
        let url = format!("http://127.0.0.1:{port}/bucket/blob?X-Amz-Signature=s3cr3t");
        let source = reqwest::Client::new().get(&url).send().await.unwrap_err();
        assert!(
            source.to_string().contains("s3cr3t"),
            "reqwest names the url: {source}"
        );
        let err = transport("the registry url")(source);
        let chain = error_chain(&err);
        assert!(!chain.contains("s3cr3t"), "{chain}");
        assert!(
            chain.starts_with("request to the registry url failed: "),
            "{chain}"
        );
        assert!(chain.contains("/bucket/blob"), "{chain}");
        assert!(
            chain.contains("Connection refused"),
            "the cause is kept: {chain}"
        );
    }
}
