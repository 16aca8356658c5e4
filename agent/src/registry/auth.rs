//! Authenticating to a registry, the parts that need no network: reading `WWW-Authenticate`
//! challenges and choosing the one to answer ([`Challenge`]), reading a token server's reply and
//! how long its token lives, the per-client record of what the registry asked for and which
//! tokens are held ([`AuthState`], [`CachedToken`]), and credentials: [`Credentials`], the ones
//! `docker login` stored ([`docker_config_credentials`]), and where they may be sent
//! ([`credentials_may_go_to`]).
//!
//! `client.rs` drives the protocol with these: it sends the requests, answers the 401s, and
//! fetches and caches the tokens (see the `registry` module docs). This module uses
//! `reference.rs` (registry names) and nothing above it.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use base64::Engine as _;
use reqwest::header::HeaderValue;
use reqwest::Url;
use serde::Deserialize;
use tracing::warn;

use super::reference::normalize_registry;

/// Token responses carry one JWT-sized token; 1 MiB is far above any real one.
pub(super) const MAX_TOKEN_RESPONSE_BYTES: usize = 1 << 20;

/// Lifetime assumed for a token without `expires_in`, and the minimum the token spec allows.
pub(super) const MIN_TOKEN_LIFETIME: Duration = Duration::from_secs(60);
/// Upper bound on a server-provided lifetime, so a hostile `expires_in` cannot overflow `Instant`.
pub(super) const MAX_TOKEN_LIFETIME: Duration = Duration::from_secs(24 * 60 * 60);
/// A token is replaced this long before it expires, so it does not expire in flight.
const TOKEN_EXPIRY_MARGIN: Duration = Duration::from_secs(10);

/// A username and password (or token) for a registry. `Debug` does not print the password.
#[derive(Clone, PartialEq, Eq)]
pub struct Credentials {
    pub username: String,
    pub password: String,
}

impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Credentials")
            .field("username", &self.username)
            .field("password", &"<redacted>")
            .finish()
    }
}

#[derive(Default)]
pub(super) struct AuthState {
    /// The last challenge answered successfully; lets requests for new scopes and expired tokens
    /// authenticate up front instead of taking a 401 first.
    pub(super) challenge: Option<Challenge>,
    /// Bearer tokens by scope (`repository:REPO:pull`).
    pub(super) tokens: HashMap<String, CachedToken>,
}

pub(super) struct CachedToken {
    pub(super) header: HeaderValue,
    /// When to stop using it: the server's lifetime less [`TOKEN_EXPIRY_MARGIN`].
    pub(super) refresh_at: Instant,
}

impl CachedToken {
    /// A token just received that lives for `lifetime`; it is used until [`TOKEN_EXPIRY_MARGIN`]
    /// before that.
    pub(super) fn new(header: HeaderValue, lifetime: Duration) -> Self {
        CachedToken {
            header,
            refresh_at: Instant::now() + lifetime.saturating_sub(TOKEN_EXPIRY_MARGIN),
        }
    }
}

/// A usable `WWW-Authenticate` challenge.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Challenge {
    Basic,
    Bearer {
        realm: String,
        service: Option<String>,
        scope: Option<String>,
    },
}

#[derive(Deserialize)]
struct TokenResponseBody {
    token: Option<String>,
    access_token: Option<String>,
    /// Usually an integer; kept loose so that a float or string does not fail the whole token.
    expires_in: Option<serde_json::Value>,
}

/// Parses a JSON object into `T`. Structs that derive `Deserialize` also take a JSON array of
/// their fields' values in order (`[null,null]` passed for a manifest, `["t"]` for a token
/// reply); no server sends one, so it is refused.
pub(super) fn from_json_object<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> Result<T, String> {
    if bytes.trim_ascii_start().first() != Some(&b'{') {
        return Err("not a JSON object".into());
    }
    serde_json::from_slice(bytes).map_err(|e| e.to_string())
}

/// A token server's reply: the `Authorization` value to send (`Bearer TOKEN`, from `token` or,
/// when that is missing or empty, `access_token`) and how long the token lives.
pub(super) fn parse_token_response(body: &[u8]) -> Result<(HeaderValue, Duration), String> {
    let parsed: TokenResponseBody =
        from_json_object(body).map_err(|e| format!("not a token json: {e}"))?;
    let token = [parsed.token, parsed.access_token]
        .into_iter()
        .flatten()
        .find(|t| !t.is_empty())
        .ok_or("no token or access_token field")?;
    let mut header = HeaderValue::from_str(&format!("Bearer {token}"))
        .map_err(|_| "the token is not a valid header value")?;
    header.set_sensitive(true);
    Ok((header, token_lifetime(parsed.expires_in.as_ref())))
}

/// How long a token lives: `expires_in` clamped to [60 s, 24 h], 60 s when absent or unreadable.
fn token_lifetime(expires_in: Option<&serde_json::Value>) -> Duration {
    let secs = expires_in.and_then(|v| {
        v.as_u64()
            .or_else(|| {
                v.as_f64()
                    .filter(|f| f.is_finite() && *f >= 0.0)
                    .map(|f| f as u64)
            })
            .or_else(|| v.as_str().and_then(|s| s.parse().ok()))
    });
    secs.map_or(MIN_TOKEN_LIFETIME, |s| {
        Duration::from_secs(s).clamp(MIN_TOKEN_LIFETIME, MAX_TOKEN_LIFETIME)
    })
}

/// One `scheme param=value, ...` challenge of a `WWW-Authenticate` header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct RawChallenge {
    pub(super) scheme: String,
    /// Parameter names lowercased, values unquoted.
    pub(super) params: Vec<(String, String)>,
}

impl RawChallenge {
    fn param(&self, name: &str) -> Option<&str> {
        self.params
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

/// Parses a `WWW-Authenticate` value (RFC 7235), which may hold several challenges:
/// `Bearer realm="https://a/token",service="reg", Basic realm="x"`. Lenient and total: junk is
/// skipped, an unterminated quote runs to the end, and it never panics.
pub(super) fn parse_www_authenticate(header: &str) -> Vec<RawChallenge> {
    let b = header.as_bytes();
    let is_ws = |c: u8| c == b' ' || c == b'\t';
    let is_tchar = |c: u8| c.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&c);
    let text = |s: &[u8]| String::from_utf8_lossy(s).into_owned();
    let skip = |i: &mut usize, pred: &dyn Fn(u8) -> bool| {
        while *i < b.len() && pred(b[*i]) {
            *i += 1;
        }
    };
    let mut out = Vec::new();
    let mut i = 0;
    loop {
        skip(&mut i, &|c| is_ws(c) || c == b',');
        if i >= b.len() {
            break;
        }
        let start = i;
        skip(&mut i, &is_tchar);
        if i == start {
            i += 1; // not a scheme: skip the byte
            continue;
        }
        let scheme = text(&b[start..i]);
        let mut params = Vec::new();
        loop {
            skip(&mut i, &is_ws);
            let name_start = i;
            skip(&mut i, &is_tchar);
            let name_end = i;
            skip(&mut i, &is_ws);
            if name_end == name_start || i >= b.len() || b[i] != b'=' {
                i = name_start; // the next challenge's scheme, or the end
                break;
            }
            i += 1;
            skip(&mut i, &is_ws);
            let value = if i < b.len() && b[i] == b'"' {
                i += 1;
                let mut value = Vec::new();
                while i < b.len() && b[i] != b'"' {
                    if b[i] == b'\\' && i + 1 < b.len() {
                        i += 1;
                    }
                    value.push(b[i]);
                    i += 1;
                }
                i += 1; // closing quote, or past the end
                value
            } else {
                let value_start = i;
                skip(&mut i, &|c| !is_ws(c) && c != b',');
                b[value_start..i].to_vec()
            };
            params.push((
                text(&b[name_start..name_end]).to_ascii_lowercase(),
                text(&value),
            ));
            skip(&mut i, &is_ws);
            if i < b.len() && b[i] == b',' {
                i += 1;
            } else {
                break;
            }
        }
        out.push(RawChallenge { scheme, params });
    }
    out
}

/// Whether the registry's credentials may be sent to the token server at `realm`: over https,
/// or to the registry's own host (which the user chose to reach over plain http). A registry
/// that names a plain-http realm elsewhere would otherwise hand the password to whoever is on
/// the path to that host.
pub(super) fn credentials_may_go_to(realm: &Url, registry: &str) -> bool {
    if realm.scheme() == "https" {
        return true;
    }
    let Some(host) = realm.host_str() else {
        return false;
    };
    let registry_host = registry
        .rsplit_once(':')
        .filter(|(_, port)| port.chars().all(|c| c.is_ascii_digit()))
        .map_or(registry, |(host, _)| host);
    host.trim_start_matches('[').trim_end_matches(']')
        == registry_host.trim_start_matches('[').trim_end_matches(']')
}

/// The challenge to answer among all `WWW-Authenticate` values: Bearer (with a realm) over Basic.
pub(super) fn pick_challenge(values: &[&str]) -> Option<Challenge> {
    let challenges: Vec<RawChallenge> = values
        .iter()
        .flat_map(|v| parse_www_authenticate(v))
        .collect();
    let bearer = challenges.iter().find_map(|c| {
        if !c.scheme.eq_ignore_ascii_case("bearer") {
            return None;
        }
        Some(Challenge::Bearer {
            realm: c.param("realm")?.to_string(),
            service: c.param("service").map(str::to_string),
            scope: c.param("scope").map(str::to_string),
        })
    });
    bearer.or_else(|| {
        challenges
            .iter()
            .any(|c| c.scheme.eq_ignore_ascii_case("basic"))
            .then_some(Challenge::Basic)
    })
}

/// Credentials for `registry` from docker's `config.json` (`$DOCKER_CONFIG/config.json`, else
/// `~/.docker/config.json`), as `docker login` stores them in `auths`: a base64 `auth` of
/// `user:password`, or `username` and `password` fields. Docker Hub's entry is found under
/// `https://index.docker.io/v1/` as well as `docker.io`.
///
/// Credential helpers (`credsStore`, `credHelpers`) and `identitytoken` entries are not
/// supported: such registries get `None`, and the caller can pass credentials explicitly. A
/// missing file is `None`; an unreadable or malformed one is logged and is `None`.
pub fn docker_config_credentials(registry: &str) -> Option<Credentials> {
    let dir = std::env::var_os("DOCKER_CONFIG")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|home| PathBuf::from(home).join(".docker")))?;
    credentials_from_config_file(&dir.join("config.json"), registry)
}

fn credentials_from_config_file(path: &Path, registry: &str) -> Option<Credentials> {
    let text = match std::fs::read_to_string(path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return None,
        Err(e) => {
            warn!(path = %path.display(), error = %e, "cannot read docker config; pulling anonymously");
            return None;
        }
    };
    match credentials_from_config(&text, registry) {
        Ok(credentials) => credentials,
        Err(reason) => {
            warn!(path = %path.display(), %reason, "ignoring docker config; pulling anonymously");
            None
        }
    }
}

pub(super) fn credentials_from_config(
    text: &str,
    registry: &str,
) -> Result<Option<Credentials>, String> {
    #[derive(Deserialize)]
    struct DockerConfig {
        #[serde(default)]
        auths: BTreeMap<String, DockerAuth>,
    }
    #[derive(Deserialize)]
    struct DockerAuth {
        auth: Option<String>,
        username: Option<String>,
        password: Option<String>,
    }
    let config: DockerConfig =
        serde_json::from_str(text).map_err(|e| format!("not valid JSON: {e}"))?;
    let wanted = normalize_registry(registry);
    // An exact key wins over one that only matches after normalisation; BTreeMap order makes
    // the choice among the rest deterministic.
    let entry = config
        .auths
        .iter()
        .find(|(key, _)| key.as_str() == registry)
        .or_else(|| {
            config.auths.iter().find(|(key, _)| {
                let host = key
                    .trim_start_matches("https://")
                    .trim_start_matches("http://");
                let host = host.split('/').next().unwrap_or_default();
                normalize_registry(host) == wanted
            })
        });
    let Some((key, auth)) = entry else {
        return Ok(None);
    };
    if let Some(encoded) = auth.auth.as_deref().filter(|a| !a.is_empty()) {
        let decoded = base64::engine::general_purpose::STANDARD
            .decode(encoded.trim())
            .map_err(|_| format!("auth for {key} is not valid base64"))?;
        let decoded =
            String::from_utf8(decoded).map_err(|_| format!("auth for {key} is not UTF-8"))?;
        let (username, password) = decoded
            .split_once(':')
            .ok_or_else(|| format!("auth for {key} is not user:password"))?;
        return Ok(Some(Credentials {
            username: username.to_string(),
            password: password.to_string(),
        }));
    }
    match (&auth.username, &auth.password) {
        (Some(username), Some(password)) if !username.is_empty() => Ok(Some(Credentials {
            username: username.clone(),
            password: password.clone(),
        })),
        _ => Ok(None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credentials_go_to_https_realms_and_the_registrys_own_host_only() {
        let ok = |realm: &str, registry: &str| {
            credentials_may_go_to(&Url::parse(realm).unwrap(), registry)
        };
        assert!(ok("https://auth.example/token", "registry.example"));
        assert!(ok("http://127.0.0.1:5001/token", "127.0.0.1:5000"));
        assert!(ok("http://reg.local/token", "reg.local:5000"));
        assert!(ok("http://[::1]:5001/token", "[::1]:5000"));
        assert!(!ok("http://evil.example/token", "127.0.0.1:5000"));
        assert!(!ok("http://reg.local.evil/token", "reg.local:5000"));
        assert!(!ok("http://10.0.0.9/token", "registry.example"));
    }

    #[test]
    fn www_authenticate_parses_docker_hub_and_multiple_challenges() {
        let hub = r#"Bearer realm="https://auth.docker.io/token",service="registry.docker.io",scope="repository:library/ubuntu:pull""#;
        assert_eq!(
            pick_challenge(&[hub]),
            Some(Challenge::Bearer {
                realm: "https://auth.docker.io/token".into(),
                service: Some("registry.docker.io".into()),
                scope: Some("repository:library/ubuntu:pull".into()),
            })
        );

        let several = r#"Basic realm="basic, with comma", BEARER Realm = "http://x/t?a=1" , service=svc,error="invalid_token""#;
        let parsed = parse_www_authenticate(several);
        assert_eq!(parsed.len(), 2, "{parsed:?}");
        assert_eq!(parsed[0].scheme, "Basic");
        assert_eq!(parsed[0].param("realm"), Some("basic, with comma"));
        assert_eq!(parsed[1].param("realm"), Some("http://x/t?a=1"));
        assert_eq!(parsed[1].param("service"), Some("svc"));
        assert_eq!(parsed[1].param("error"), Some("invalid_token"));
        // Bearer is preferred over Basic, whatever the order.
        assert!(matches!(
            pick_challenge(&[several]),
            Some(Challenge::Bearer { .. })
        ));
        // Separate header values are combined.
        assert_eq!(
            pick_challenge(&["Basic realm=\"r\"", "Bearer realm=\"https://t/\""]),
            Some(Challenge::Bearer {
                realm: "https://t/".into(),
                service: None,
                scope: None
            })
        );

        let escaped = parse_www_authenticate(r#"Bearer realm="a\"b\\c""#);
        assert_eq!(escaped[0].param("realm"), Some(r#"a"b\c"#));
        let unterminated = parse_www_authenticate(r#"Bearer realm="https://t/token"#);
        assert_eq!(unterminated[0].param("realm"), Some("https://t/token"));

        assert_eq!(
            pick_challenge(&["Basic realm=\"registry\""]),
            Some(Challenge::Basic)
        );
        assert_eq!(pick_challenge(&["Basic"]), Some(Challenge::Basic));
        // Bearer without a realm cannot be answered; neither can unknown schemes or junk.
        assert_eq!(pick_challenge(&["Bearer service=\"x\""]), None);
        assert_eq!(pick_challenge(&["Negotiate abc=="]), None);
        assert_eq!(pick_challenge(&["\"\"==,,\\"]), None);
        assert_eq!(pick_challenge(&[]), None);
    }

    /// `["t",null,5]` deserialized as token, access_token and expires_in and was accepted as a
    /// token (found by the token_response fuzz target's check).
    #[test]
    fn token_reply_that_is_a_json_array_is_refused() {
        let e = parse_token_response(br#"["t",null,5]"#).unwrap_err();
        assert!(e.contains("not a JSON object"), "{e}");
        let (header, lifetime) =
            parse_token_response(br#" {"token":"","access_token":"t","expires_in":300}"#).unwrap();
        assert_eq!(header, "Bearer t");
        assert!(header.is_sensitive());
        assert_eq!(lifetime, Duration::from_secs(300));
    }

    #[test]
    fn token_lifetime_is_clamped() {
        let v = |s: &str| serde_json::from_str::<serde_json::Value>(s).unwrap();
        assert_eq!(token_lifetime(None), MIN_TOKEN_LIFETIME);
        assert_eq!(token_lifetime(Some(&v("300"))), Duration::from_secs(300));
        assert_eq!(token_lifetime(Some(&v("300.5"))), Duration::from_secs(300));
        assert_eq!(
            token_lifetime(Some(&v("\"600\""))),
            Duration::from_secs(600)
        );
        assert_eq!(token_lifetime(Some(&v("5"))), MIN_TOKEN_LIFETIME);
        assert_eq!(token_lifetime(Some(&v("-5"))), MIN_TOKEN_LIFETIME);
        assert_eq!(
            token_lifetime(Some(&v("18446744073709551615"))),
            MAX_TOKEN_LIFETIME
        );
        assert_eq!(token_lifetime(Some(&v("1e300"))), MAX_TOKEN_LIFETIME);
        assert_eq!(token_lifetime(Some(&v("{}"))), MIN_TOKEN_LIFETIME);
    }

    #[test]
    fn docker_config_auth_entries() {
        let alice = Credentials {
            username: "alice".into(),
            password: "pa:ss".into(),
        };
        let encoded = base64::engine::general_purpose::STANDARD.encode("alice:pa:ss");
        let config = format!(
            r#"{{"auths": {{
                "https://index.docker.io/v1/": {{"auth": "{encoded}"}},
                "ghcr.io": {{"username": "alice", "password": "pa:ss"}},
                "http://localhost:5000": {{"auth": "{encoded}"}},
                "helper.example.com": {{}},
                "broken.example.com": {{"auth": "%%%"}}
            }}, "credsStore": "desktop"}}"#
        );
        let creds = |r: &str| credentials_from_config(&config, r);
        assert_eq!(creds("registry-1.docker.io"), Ok(Some(alice.clone())));
        assert_eq!(creds("docker.io"), Ok(Some(alice.clone())));
        assert_eq!(creds("ghcr.io"), Ok(Some(alice.clone())));
        assert_eq!(creds("localhost:5000"), Ok(Some(alice.clone())));
        assert_eq!(creds("helper.example.com"), Ok(None));
        assert_eq!(creds("quay.io"), Ok(None));
        assert!(creds("broken.example.com")
            .unwrap_err()
            .contains("not valid base64"));
        assert!(credentials_from_config("{", "x").is_err());
        assert_eq!(credentials_from_config("{}", "x"), Ok(None));
        assert!(
            !format!("{alice:?}").contains("pa:ss"),
            "Debug must not print the password"
        );

        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.json");
        assert_eq!(credentials_from_config_file(&path, "ghcr.io"), None);
        std::fs::write(&path, &config).unwrap();
        assert_eq!(credentials_from_config_file(&path, "ghcr.io"), Some(alice));
        std::fs::write(&path, "not json").unwrap();
        assert_eq!(credentials_from_config_file(&path, "ghcr.io"), None);
    }
}
