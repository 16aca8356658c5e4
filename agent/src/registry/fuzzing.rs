//! The parsers of what a registry sends, for the fuzz targets in `fuzz/` (they are private to
//! `registry`). Not an API: plain types in, plain types out. Uses `auth.rs`, `client.rs` and
//! `referrers.rs`; nothing in `registry` uses it.

use std::ops::RangeInclusive;
use std::time::Duration;

use reqwest::header::HeaderValue;

use super::auth::{self, Challenge, MAX_TOKEN_LIFETIME, MIN_TOKEN_LIFETIME};
use super::{client, referrers, Referrer};

/// The lifetimes a token can be given.
pub const TOKEN_LIFETIME: RangeInclusive<Duration> = MIN_TOKEN_LIFETIME..=MAX_TOKEN_LIFETIME;

/// The challenges of one `WWW-Authenticate` value: scheme and (lowercased name, value) pairs.
pub fn www_authenticate(header: &str) -> Vec<(String, Vec<(String, String)>)> {
    auth::parse_www_authenticate(header)
        .into_iter()
        .map(|c| (c.scheme, c.params))
        .collect()
}

/// A Bearer challenge's realm, service and scope.
pub type Bearer = (String, Option<String>, Option<String>);

/// The challenge the client answers among `values`: `Some(None)` for Basic, `Some(Some(_))`
/// for Bearer.
pub fn pick_challenge(values: &[&str]) -> Option<Option<Bearer>> {
    auth::pick_challenge(values).map(|c| match c {
        Challenge::Basic => None,
        Challenge::Bearer {
            realm,
            service,
            scope,
        } => Some((realm, service, scope)),
    })
}

/// A token server's reply: the `Authorization` value and the token's lifetime.
pub fn token_response(body: &[u8]) -> Result<(HeaderValue, Duration), String> {
    auth::parse_token_response(body)
}

/// The media type of a manifest served with `content_type`.
pub fn manifest_media_type(content_type: Option<&str>, bytes: &[u8]) -> Result<String, String> {
    client::manifest_media_type(content_type, bytes)
}

/// The referrers a referrers list (or referrers-tag index) names; `None` when it is not a
/// JSON object.
pub fn index_referrers(bytes: &[u8]) -> Option<Vec<Referrer>> {
    serde_json::from_slice(bytes)
        .ok()
        .map(|index| referrers::index_referrers(&index))
}
