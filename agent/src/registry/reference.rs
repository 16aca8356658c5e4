//! Image names: [`ImageRef`] (`registry/repository:tag` or `registry/repository@digest`,
//! parsed the way docker parses them, Docker Hub's aliases and `library/` namespace included),
//! and the grammar each part follows: repositories, tags, sha256 digests, `HOST[:PORT]`
//! registries, and which registries are loopback (and so may be reached over plain http).
//!
//! The client checks every name here before it goes into a URL. [`Reference`] (a tag or a
//! digest) is defined in `error.rs`, whose errors carry one; it is validated here. Uses only
//! `error.rs`.

use std::fmt;
use std::net::{IpAddr, Ipv6Addr};

use super::error::{Reference, RegistryError};

/// Host that serves Docker Hub's registry API; `docker.io` and `index.docker.io` map to it.
const DOCKER_HUB_REGISTRY: &str = "registry-1.docker.io";
/// How docker prints Docker Hub in image names.
const DOCKER_HUB_DISPLAY: &str = "docker.io";
/// Namespace of Docker Hub's official images (`ubuntu` is `library/ubuntu`).
const DOCKER_HUB_OFFICIAL_NAMESPACE: &str = "library";
const DEFAULT_TAG: &str = "latest";
/// Docker's limit on the length of a repository name.
const MAX_REPOSITORY_LEN: usize = 255;
/// Docker's limit on the length of a tag.
const MAX_TAG_LEN: usize = 128;
/// What a valid tag looks like, for error messages.
const TAG_RULE: &str = "a tag is 1-128 characters of [A-Za-z0-9_.-], not starting with . or -";

impl Reference {
    pub(super) fn validate(&self) -> Result<(), RegistryError> {
        match self {
            Reference::Tag(tag) if valid_tag(tag) => Ok(()),
            Reference::Tag(tag) => Err(RegistryError::InvalidReference {
                input: tag.clone(),
                reason: TAG_RULE,
            }),
            Reference::Digest(digest) => validate_digest(digest),
        }
    }
}

/// A parsed image name: `registry/repository:tag` or `registry/repository@digest`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ImageRef {
    /// Host and optional port the API is served on; Docker Hub is `registry-1.docker.io`.
    pub registry: String,
    /// Repository path, e.g. `library/ubuntu`.
    pub repository: String,
    pub reference: Reference,
}

impl ImageRef {
    /// Parses an image name the way docker does.
    ///
    /// - An optional `docker://` prefix is stripped.
    /// - The first path component is the registry if it contains `.` or `:` or is `localhost`;
    ///   otherwise the image is on Docker Hub (`registry-1.docker.io`), and a single-component
    ///   name is an official image (`ubuntu` is `library/ubuntu`).
    /// - Without a tag or digest the tag is `latest`. With both (`name:tag@sha256:...`) the
    ///   digest wins, as in docker.
    pub fn parse(input: &str) -> Result<Self, RegistryError> {
        let invalid = |reason| RegistryError::InvalidReference {
            input: input.to_string(),
            reason,
        };
        let s = input.strip_prefix("docker://").unwrap_or(input);
        if s.is_empty() {
            return Err(invalid("empty image name"));
        }
        let (name_and_tag, digest) = match s.split_once('@') {
            Some((name, digest)) => (name, Some(digest)),
            None => (s, None),
        };
        // A tag is the part after the last ':' of the last path component, so that the port in
        // `host:5000/repo` is not taken for one.
        let last_component = name_and_tag.rfind('/').map_or(0, |i| i + 1);
        let (name, tag) = match name_and_tag[last_component..].rfind(':') {
            Some(i) => {
                let colon = last_component + i;
                (&name_and_tag[..colon], Some(&name_and_tag[colon + 1..]))
            }
            None => (name_and_tag, None),
        };

        let (registry, repository) = match name.split_once('/') {
            Some((first, rest))
                if first.contains('.') || first.contains(':') || first == "localhost" =>
            {
                (first, rest.to_string())
            }
            _ => (DOCKER_HUB_DISPLAY, name.to_string()),
        };
        let registry = normalize_registry(registry);
        if !valid_registry(&registry) {
            return Err(invalid("the registry must be HOST[:PORT]"));
        }
        let repository = if registry == DOCKER_HUB_REGISTRY && !repository.contains('/') {
            format!("{DOCKER_HUB_OFFICIAL_NAMESPACE}/{repository}")
        } else {
            repository
        };
        if !valid_repository(&repository) {
            return Err(invalid(
                "the repository must be lowercase [a-z0-9] components separated by '/', \
                 joined within a component by '.', '_', '__' or dashes",
            ));
        }

        let reference = match (digest, tag) {
            (Some(digest), _) => {
                validate_digest(digest)
                    .map_err(|_| invalid("the digest must be sha256:<64 lowercase hex digits>"))?;
                Reference::Digest(digest.to_string())
            }
            (None, Some(tag)) => {
                if !valid_tag(tag) {
                    return Err(invalid(TAG_RULE));
                }
                Reference::Tag(tag.to_string())
            }
            (None, None) => Reference::Tag(DEFAULT_TAG.to_string()),
        };
        Ok(ImageRef {
            registry,
            repository,
            reference,
        })
    }
}

impl fmt::Display for ImageRef {
    /// The canonical name, which parses back to the same `ImageRef`: `docker.io/library/ubuntu:latest`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let registry = if self.registry == DOCKER_HUB_REGISTRY {
            DOCKER_HUB_DISPLAY
        } else {
            &self.registry
        };
        write!(
            f,
            "{registry}/{}{}{}",
            self.repository,
            self.reference.separator(),
            self.reference
        )
    }
}

pub(super) fn validate_digest(digest: &str) -> Result<(), RegistryError> {
    if fusefs::manifest::is_sha256_digest(digest) {
        Ok(())
    } else {
        Err(RegistryError::InvalidDigest {
            digest: digest.to_string(),
        })
    }
}

pub(super) fn validate_repository(repo: &str) -> Result<(), RegistryError> {
    if valid_repository(repo) {
        Ok(())
    } else {
        Err(RegistryError::InvalidReference {
            input: repo.to_string(),
            reason: "the repository must be lowercase [a-z0-9] components separated by '/'",
        })
    }
}

/// Docker's repository grammar: components of `[a-z0-9]+` joined by `.`, `_`, `__` or dashes,
/// separated by `/`, at most 255 characters.
fn valid_repository(repo: &str) -> bool {
    repo.len() <= MAX_REPOSITORY_LEN && repo.split('/').all(valid_path_component)
}

fn valid_path_component(component: &str) -> bool {
    let b = component.as_bytes();
    let alnum = |c: u8| c.is_ascii_lowercase() || c.is_ascii_digit();
    if !b.first().is_some_and(|&c| alnum(c)) || !b.last().is_some_and(|&c| alnum(c)) {
        return false;
    }
    let mut i = 0;
    while i < b.len() {
        if alnum(b[i]) {
            i += 1;
            continue;
        }
        let start = i;
        while i < b.len() && !alnum(b[i]) {
            i += 1;
        }
        let sep = &b[start..i];
        if !(sep == b"." || sep == b"_" || sep == b"__" || sep.iter().all(|&c| c == b'-')) {
            return false;
        }
    }
    true
}

fn valid_tag(tag: &str) -> bool {
    let word = |c: u8| c.is_ascii_alphanumeric() || c == b'_';
    let b = tag.as_bytes();
    !b.is_empty()
        && b.len() <= MAX_TAG_LEN
        && word(b[0])
        && b.iter().all(|&c| word(c) || c == b'.' || c == b'-')
}

/// Maps Docker Hub's aliases to the host that serves its API.
pub(super) fn normalize_registry(registry: &str) -> String {
    match registry {
        "docker.io" | "index.docker.io" | DOCKER_HUB_REGISTRY => DOCKER_HUB_REGISTRY.to_string(),
        other => other.to_string(),
    }
}

/// Splits `host[:port]` or `[v6]:port` into host and port text, without validating.
pub(super) fn split_host_port(registry: &str) -> Option<(&str, Option<&str>)> {
    if let Some(rest) = registry.strip_prefix('[') {
        let (host, after) = rest.split_once(']')?;
        match after {
            "" => Some((host, None)),
            _ => Some((host, Some(after.strip_prefix(':')?))),
        }
    } else {
        match registry.split_once(':') {
            Some((host, port)) => Some((host, Some(port))),
            None => Some((registry, None)),
        }
    }
}

pub(super) fn valid_registry(registry: &str) -> bool {
    let Some((host, port)) = split_host_port(registry) else {
        return false;
    };
    let port_ok = port.is_none_or(|p| {
        !p.is_empty() && p.bytes().all(|c| c.is_ascii_digit()) && p.parse::<u16>().is_ok()
    });
    let host_ok = if registry.starts_with('[') {
        host.parse::<Ipv6Addr>().is_ok()
    } else {
        !host.is_empty()
            && host.split('.').all(|label| {
                !label.is_empty()
                    && !label.starts_with('-')
                    && !label.ends_with('-')
                    && label
                        .bytes()
                        .all(|c| c.is_ascii_alphanumeric() || c == b'-')
            })
    };
    port_ok && host_ok
}

pub(super) fn is_loopback_registry(registry: &str) -> bool {
    match split_host_port(registry) {
        Some((host, _)) => {
            host.eq_ignore_ascii_case("localhost")
                || host.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback())
        }
        None => false,
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_support::tag;
    use super::*;

    fn parsed(s: &str) -> (String, String, Reference) {
        let r = ImageRef::parse(s).unwrap_or_else(|e| panic!("{s}: {e}"));
        (r.registry, r.repository, r.reference)
    }

    const DIGEST_A: &str =
        "sha256:aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";

    #[test]
    fn image_ref_parse_follows_docker_normalisation() {
        let hub = DOCKER_HUB_REGISTRY.to_string();
        assert_eq!(
            parsed("ubuntu"),
            (hub.clone(), "library/ubuntu".into(), tag("latest"))
        );
        assert_eq!(
            parsed("ubuntu:22.04"),
            (hub.clone(), "library/ubuntu".into(), tag("22.04"))
        );
        assert_eq!(
            parsed("docker://ubuntu"),
            (hub.clone(), "library/ubuntu".into(), tag("latest"))
        );
        assert_eq!(
            parsed("docker.io/ubuntu"),
            (hub.clone(), "library/ubuntu".into(), tag("latest"))
        );
        assert_eq!(
            parsed("index.docker.io/library/ubuntu:x"),
            (hub.clone(), "library/ubuntu".into(), tag("x"))
        );
        assert_eq!(
            parsed("bitnami/redis:7"),
            (hub.clone(), "bitnami/redis".into(), tag("7"))
        );
        assert_eq!(
            parsed("127.0.0.1:5000/test/img:v1"),
            ("127.0.0.1:5000".into(), "test/img".into(), tag("v1"))
        );
        assert_eq!(
            parsed("localhost/a/b/c"),
            ("localhost".into(), "a/b/c".into(), tag("latest"))
        );
        assert_eq!(
            parsed("localhost:5000/img"),
            ("localhost:5000".into(), "img".into(), tag("latest"))
        );
        assert_eq!(
            parsed("[::1]:5000/img:t"),
            ("[::1]:5000".into(), "img".into(), tag("t"))
        );
        assert_eq!(
            parsed(&format!("ghcr.io/o/r@{DIGEST_A}")),
            (
                "ghcr.io".into(),
                "o/r".into(),
                Reference::Digest(DIGEST_A.into())
            )
        );
        // Tag and digest: the digest wins.
        assert_eq!(
            parsed(&format!("quay.io/o/r:v1@{DIGEST_A}")),
            (
                "quay.io".into(),
                "o/r".into(),
                Reference::Digest(DIGEST_A.into())
            )
        );
        assert_eq!(
            parsed("my-registry.example.com:443/a__b/c-d.e:T_1.2-x"),
            (
                "my-registry.example.com:443".into(),
                "a__b/c-d.e".into(),
                tag("T_1.2-x")
            )
        );
    }

    #[test]
    fn image_ref_display_is_canonical_and_parses_back() {
        for (input, canonical) in [
            ("ubuntu", "docker.io/library/ubuntu:latest"),
            (
                "docker://registry-1.docker.io/library/ubuntu:22.04",
                "docker.io/library/ubuntu:22.04",
            ),
            ("127.0.0.1:5000/test/img:v1", "127.0.0.1:5000/test/img:v1"),
            (
                &format!("ghcr.io/o/r@{DIGEST_A}"),
                &format!("ghcr.io/o/r@{DIGEST_A}"),
            ),
        ] {
            let r = ImageRef::parse(input).unwrap();
            assert_eq!(r.to_string(), canonical);
            assert_eq!(ImageRef::parse(&r.to_string()).unwrap(), r);
        }
    }

    #[test]
    fn image_ref_parse_rejects_malformed_names() {
        for bad in [
            "",
            "docker://",
            "Ubuntu",
            "ghcr.io/Owner/repo",
            "ubuntu:",
            "ubuntu:-x",
            "ubuntu:.x",
            "ubuntu@sha256:abc",
            "ubuntu@sha512:aaaa",
            &format!("ubuntu@{}", DIGEST_A.to_uppercase()),
            "host:99999/repo",
            "host:/repo",
            "a//b",
            "a/",
            "/a",
            "a..b",
            "a___b",
            "a-",
            "bad_host!.com/repo",
            "ubuntu:t\u{e9}",
            "r\u{e9}po",
            &"a".repeat(256),
            &format!("ubuntu:{}", "t".repeat(129)),
        ] {
            let err = ImageRef::parse(bad).expect_err(bad);
            assert!(
                matches!(err, RegistryError::InvalidReference { .. }),
                "{bad}: {err}"
            );
            assert!(err.is_permanent());
            assert!(
                err.to_string().starts_with("invalid image reference"),
                "{err}"
            );
        }
    }

    #[test]
    fn registry_hosts() {
        for ok in [
            "localhost",
            "localhost:5000",
            "a.b-c.io",
            "10.0.0.1:443",
            "[::1]",
            "[::1]:5000",
        ] {
            assert!(valid_registry(ok), "{ok}");
        }
        for bad in [
            "", ":5000", "a:", "a:b", "[::1", "[zz]:1", "a..b", "-a.io", "a_b.io", "a/b", "[::1]x",
        ] {
            assert!(!valid_registry(bad), "{bad}");
        }
        for lo in [
            "localhost:5000",
            "LOCALHOST",
            "127.0.0.1",
            "127.1.2.3:80",
            "[::1]:5000",
        ] {
            assert!(is_loopback_registry(lo), "{lo}");
        }
        for remote in [
            "ghcr.io",
            "10.0.0.1:5000",
            "localhost.example.com",
            "[::2]:5000",
        ] {
            assert!(!is_loopback_registry(remote), "{remote}");
        }
    }
}
