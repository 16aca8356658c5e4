//! Fuzzes the registry client's `WWW-Authenticate` parser and its choice of a challenge
//! (`agent::registry`), with the input's lines as the values of separate headers.
//!
//! Checks: schemes and parameter names are RFC 7230 tokens, names lowercased; written back in
//! canonical form (each value quoted and escaped) a value parses to the same challenges; the
//! challenge chosen is the first Bearer with a realm (its first realm, service and scope), else
//! Basic when there is one, else none.
#![no_main]

use agent::registry::fuzzing;
use libfuzzer_sys::fuzz_target;

fn is_tchar(c: u8) -> bool {
    c.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&c)
}

/// Challenges as RFC 7235 writes them: `Scheme name="value", name="value", Scheme2`.
fn write(challenges: &[(String, Vec<(String, String)>)]) -> String {
    let quote = |v: &str| v.replace('\\', "\\\\").replace('"', "\\\"");
    challenges
        .iter()
        .map(|(scheme, params)| {
            let params: Vec<String> = params
                .iter()
                .map(|(name, value)| format!("{name}=\"{}\"", quote(value)))
                .collect();
            if params.is_empty() {
                scheme.clone()
            } else {
                format!("{scheme} {}", params.join(", "))
            }
        })
        .collect::<Vec<_>>()
        .join(", ")
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let values: Vec<&str> = text.split('\n').collect();
    let mut all = Vec::new();
    for value in &values {
        let challenges = fuzzing::www_authenticate(value);
        for (scheme, params) in &challenges {
            assert!(
                !scheme.is_empty() && scheme.bytes().all(is_tchar),
                "{scheme:?}"
            );
            for (name, _) in params {
                assert!(
                    !name.is_empty()
                        && name.bytes().all(|c| is_tchar(c) && !c.is_ascii_uppercase()),
                    "{name:?}"
                );
            }
        }
        let written = write(&challenges);
        assert_eq!(
            fuzzing::www_authenticate(&written),
            challenges,
            "{value:?} written as {written:?}"
        );
        all.extend(challenges);
    }

    let param = |params: &[(String, String)], name: &str| {
        params
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.clone())
    };
    let bearer = all.iter().find_map(|(scheme, params)| {
        if !scheme.eq_ignore_ascii_case("bearer") {
            return None;
        }
        Some((
            param(params, "realm")?,
            param(params, "service"),
            param(params, "scope"),
        ))
    });
    let expected = match bearer {
        Some(b) => Some(Some(b)),
        None => all
            .iter()
            .any(|(scheme, _)| scheme.eq_ignore_ascii_case("basic"))
            .then_some(None),
    };
    assert_eq!(fuzzing::pick_challenge(&values), expected);
});
