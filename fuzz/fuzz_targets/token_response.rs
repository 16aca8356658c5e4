//! Fuzzes the registry client's reading of a token server's reply (`agent::registry`, docker's
//! token protocol: `{"token": ..., "access_token": ..., "expires_in": ...}`).
//!
//! Checks on an accepted reply: it is a JSON object; the `Authorization` value is `Bearer `
//! and the `token` field, or `access_token` when `token` is missing or empty, and is marked
//! sensitive (kept out of logs); the lifetime is within the client's bounds, and is
//! `expires_in` (clamped to them) when that is a whole number of seconds.
#![no_main]

use std::time::Duration;

use agent::registry::fuzzing;
use libfuzzer_sys::fuzz_target;
use serde_json::{Map, Value};

fuzz_target!(|data: &[u8]| {
    let Ok((header, lifetime)) = fuzzing::token_response(data) else {
        return;
    };
    assert_eq!(
        data.trim_ascii_start().first(),
        Some(&b'{'),
        "an accepted reply is a JSON object"
    );
    assert!(header.as_bytes().starts_with(b"Bearer ") && header.len() > "Bearer ".len());
    assert!(header.is_sensitive());
    assert!(fuzzing::TOKEN_LIFETIME.contains(&lifetime), "{lifetime:?}");
    // Fields the client does not read are skipped unchecked (serde_json does not validate their
    // UTF-8); a reply that is valid JSON throughout is compared field by field.
    let Ok(reply) = serde_json::from_slice::<Map<String, Value>>(data) else {
        return;
    };
    let field = |name| {
        reply
            .get(name)
            .and_then(Value::as_str)
            .filter(|t| !t.is_empty())
    };
    let token = field("token")
        .or_else(|| field("access_token"))
        .expect("a token was found");
    assert_eq!(header.as_bytes(), format!("Bearer {token}").as_bytes());
    if let Some(secs) = reply.get("expires_in").and_then(Value::as_u64) {
        let bounds = &fuzzing::TOKEN_LIFETIME;
        assert_eq!(
            lifetime,
            Duration::from_secs(secs).clamp(*bounds.start(), *bounds.end())
        );
    }
});
