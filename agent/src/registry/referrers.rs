//! Referrers (OCI distribution spec 1.1): the manifests whose `subject` is a given manifest. A
//! lazy image pushed with `subject` = its source image is how `lazyctl` finds the lazy version
//! of an image it is asked to run.
//!
//! A registry that implements the referrers API lists them at `GET /v2/REPO/referrers/DIGEST`
//! (optionally filtered with `?artifactType=`, possibly paged with `Link: <...>; rel="next"`),
//! and says so when a manifest with a subject is pushed by answering with `OCI-Subject`.
//!
//! A registry that does not (it answers 404 on that endpoint, as docker-registry 2.8 from
//! Debian does) gets the spec's fallback, the referrers tag schema: an OCI index tagged
//! `sha256-<hex of the subject>` whose `manifests` are the referrers. Registries do not maintain
//! that index; the client that pushes a manifest with a subject and does not get `OCI-Subject`
//! back must add it ([`RegistryClient::add_referrer_fallback`]). The update is a read, modify
//! and write of a tag, so two clients updating the same subject's tag at the same moment can
//! lose one entry, as the spec acknowledges; pushing again repairs it.

use std::collections::BTreeMap;

use reqwest::header::{HeaderMap, HeaderValue, ACCEPT};
use reqwest::{Method, StatusCode, Url};
use serde::{Deserialize, Serialize};
use tracing::{debug, warn};

use super::client::{
    read_capped, status_error, Access, Call, RegistryClient, Target, MAX_MANIFEST_BYTES,
};
use super::error::{Reference, RegistryError};
use super::reference::{validate_digest, validate_repository};
use super::MEDIA_TYPE_OCI_INDEX;
use crate::store::sha256_digest;

/// Pages of a referrers list followed at most; at the registries' usual page sizes this is
/// thousands of referrers, and it bounds a server that links pages in a loop.
const MAX_REFERRER_PAGES: usize = 64;

/// One referrer: the descriptor of a manifest whose `subject` is the manifest asked about, as
/// the referrers API and the fallback index list it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Referrer {
    pub media_type: String,
    pub digest: String,
    pub size: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub artifact_type: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub annotations: Option<BTreeMap<String, String>>,
}

impl Referrer {
    /// The entry for a manifest (about to be) pushed as `bytes` with `media_type`: its digest and
    /// size, its `artifactType` (or, as the spec says for a manifest without one, its config's
    /// media type), and its annotations. Fields that are missing or malformed are left out.
    pub fn of_manifest(media_type: &str, bytes: &[u8]) -> Referrer {
        #[derive(Deserialize)]
        #[serde(rename_all = "camelCase")]
        struct Sniff {
            artifact_type: Option<String>,
            config: Option<ConfigSniff>,
            annotations: Option<BTreeMap<String, String>>,
        }
        #[derive(Deserialize)]
        #[serde(rename_all = "camelCase")]
        struct ConfigSniff {
            media_type: Option<String>,
        }
        let sniff = serde_json::from_slice::<Sniff>(bytes).ok();
        let (artifact_type, annotations) = match sniff {
            Some(s) => (
                s.artifact_type
                    .filter(|t| !t.is_empty())
                    .or_else(|| s.config.and_then(|c| c.media_type)),
                s.annotations.filter(|a| !a.is_empty()),
            ),
            None => (None, None),
        };
        Referrer {
            media_type: media_type.to_string(),
            digest: sha256_digest(bytes),
            size: bytes.len() as u64,
            artifact_type,
            annotations,
        }
    }
}

/// The tag under which the tag schema keeps `subject_digest`'s referrers: `sha256-<hex>`.
pub fn referrers_tag(subject_digest: &str) -> Result<String, RegistryError> {
    validate_digest(subject_digest)?;
    Ok(subject_digest.replacen(':', "-", 1))
}

impl RegistryClient {
    /// The manifests in `repo` whose subject is `subject_digest`, only those of `artifact_type`
    /// when one is given. Uses the referrers API, and the referrers tag when the registry
    /// answers 404 there (see the module docs). No referrers is an empty list, not an error.
    pub async fn referrers(
        &self,
        repo: &str,
        subject_digest: &str,
        artifact_type: Option<&str>,
    ) -> Result<Vec<Referrer>, RegistryError> {
        validate_repository(repo)?;
        validate_digest(subject_digest)?;
        let listed = match self
            .referrers_api(repo, subject_digest, artifact_type)
            .await?
        {
            Some(listed) => listed,
            None => {
                debug!(
                    repo,
                    subject_digest, "no referrers API; reading the referrers tag"
                );
                match self
                    .read_referrers_tag(repo, subject_digest, Access::Pull)
                    .await?
                {
                    Some(index) => index_referrers(&index),
                    None => Vec::new(),
                }
            }
        };
        // Registries may ignore the filter (they say so by leaving out OCI-Filters-Applied), and
        // the tag schema has none, so it is always applied here.
        Ok(listed
            .into_iter()
            .filter(|r| artifact_type.is_none_or(|t| r.artifact_type.as_deref() == Some(t)))
            .collect())
    }

    /// Records `referrer` in the referrers tag of `subject_digest` (creating the index if there
    /// is none), unless it is listed there already. Returns whether it was added.
    ///
    /// Call it after [`RegistryClient::put_manifest`] of a manifest with a `subject` returned
    /// `subject_accepted: false`; `referrer` is usually
    /// [`Referrer::of_manifest`] of the pushed bytes.
    pub async fn add_referrer_fallback(
        &self,
        repo: &str,
        subject_digest: &str,
        referrer: &Referrer,
    ) -> Result<bool, RegistryError> {
        validate_repository(repo)?;
        validate_digest(&referrer.digest)?;
        let tag = referrers_tag(subject_digest)?;
        let reference = Reference::Tag(tag.clone());
        let invalid = |reason: String| RegistryError::InvalidManifest {
            repo: repo.to_string(),
            reference: reference.clone(),
            reason,
        };
        let mut index = self
            .read_referrers_tag(repo, subject_digest, Access::Push)
            .await?
            .unwrap_or_else(|| {
                let mut index = serde_json::Map::new();
                index.insert("schemaVersion".into(), 2.into());
                index.insert("mediaType".into(), MEDIA_TYPE_OCI_INDEX.into());
                index
            });
        let manifests = index
            .entry("manifests")
            .or_insert_with(|| serde_json::Value::Array(Vec::new()));
        let serde_json::Value::Array(manifests) = manifests else {
            return Err(invalid("its manifests field is not a list".into()));
        };
        let listed = manifests
            .iter()
            .any(|m| m.get("digest").and_then(|d| d.as_str()) == Some(referrer.digest.as_str()));
        if listed {
            return Ok(false);
        }
        let entry = serde_json::to_value(referrer)
            .map_err(|e| invalid(format!("cannot encode the new entry: {e}")))?;
        manifests.push(entry);
        let bytes = serde_json::to_vec(&index)
            .map_err(|e| invalid(format!("cannot encode the index: {e}")))?;
        self.put_manifest(repo, &reference, MEDIA_TYPE_OCI_INDEX, &bytes)
            .await?;
        debug!(repo, %tag, digest = %referrer.digest, "added to the referrers tag");
        Ok(true)
    }

    /// The referrers API's list, all pages of it; `None` when the registry does not have the API.
    async fn referrers_api(
        &self,
        repo: &str,
        subject_digest: &str,
        artifact_type: Option<&str>,
    ) -> Result<Option<Vec<Referrer>>, RegistryError> {
        let mut path = format!("/v2/{repo}/referrers/{subject_digest}");
        if let Some(t) = artifact_type {
            path.push_str("?artifactType=");
            path.push_str(&query_escape(t));
        }
        let mut target = Target::Path(path);
        let mut listed = Vec::new();
        for page in 0..MAX_REFERRER_PAGES {
            let mut headers = HeaderMap::new();
            headers.insert(ACCEPT, HeaderValue::from_static(MEDIA_TYPE_OCI_INDEX));
            let call = Call {
                headers,
                ..Call::new(Method::GET, target)
            };
            let (mut resp, url) = self.request(repo, Access::Pull, &call).await?;
            match resp.status() {
                StatusCode::OK => {}
                // The spec: a registry with the API never answers 404 here, so 404 means the
                // client must fall back to the tag schema.
                StatusCode::NOT_FOUND if page == 0 => return Ok(None),
                _ => return Err(status_error(repo, &url, resp).await),
            }
            let bad = |reason: String| RegistryError::BadResponse {
                url: url.clone(),
                reason,
            };
            let next = next_link(resp.headers(), &url).map_err(bad)?;
            let body = read_capped(&mut resp, MAX_MANIFEST_BYTES, &url)
                .await?
                .ok_or_else(|| bad(format!("referrers list over {MAX_MANIFEST_BYTES} bytes")))?;
            let index: serde_json::Map<String, serde_json::Value> =
                serde_json::from_slice(&body)
                    .map_err(|e| bad(format!("referrers list is not a JSON index: {e}")))?;
            listed.extend(index_referrers(&index));
            match next {
                Some(url) => target = Target::Url(url),
                None => return Ok(Some(listed)),
            }
        }
        Err(RegistryError::BadResponse {
            url: format!("/v2/{repo}/referrers/{subject_digest}"),
            reason: format!("more than {MAX_REFERRER_PAGES} pages of referrers"),
        })
    }

    /// The index at the referrers tag of `subject_digest`, as a JSON object so that a rewrite
    /// keeps fields this client does not know; `None` when there is no such tag.
    async fn read_referrers_tag(
        &self,
        repo: &str,
        subject_digest: &str,
        access: Access,
    ) -> Result<Option<serde_json::Map<String, serde_json::Value>>, RegistryError> {
        let reference = Reference::Tag(referrers_tag(subject_digest)?);
        let manifest = match self.fetch_manifest(repo, &reference, access).await {
            Ok(manifest) => manifest,
            Err(RegistryError::ManifestUnknown { .. }) => return Ok(None),
            Err(e) => return Err(e),
        };
        let invalid = |reason: String| RegistryError::InvalidManifest {
            repo: repo.to_string(),
            reference: reference.clone(),
            reason,
        };
        if manifest.media_type != MEDIA_TYPE_OCI_INDEX {
            return Err(invalid(format!(
                "the referrers tag holds a {}, not an OCI index",
                manifest.media_type
            )));
        }
        serde_json::from_slice(&manifest.bytes)
            .map(Some)
            .map_err(|e| invalid(format!("not a JSON object: {e}")))
    }
}

/// The usable entries of an index's `manifests`. An entry that is not a descriptor with a
/// sha256 digest is skipped with a warning, so that one bad entry (written by some other tool)
/// does not hide the rest.
pub(super) fn index_referrers(index: &serde_json::Map<String, serde_json::Value>) -> Vec<Referrer> {
    let Some(serde_json::Value::Array(manifests)) = index.get("manifests") else {
        return Vec::new();
    };
    manifests
        .iter()
        .filter_map(|entry| {
            match serde_json::from_value::<Referrer>(entry.clone()) {
                Ok(r) if validate_digest(&r.digest).is_ok() => return Some(r),
                Ok(r) => warn!(digest = %r.digest, "skipping a referrer with an unusable digest"),
                Err(e) => warn!(error = %e, "skipping a referrer that is not a descriptor"),
            }
            None
        })
        .collect()
}

/// The `rel="next"` target of a `Link` header (RFC 8288), resolved against `current`.
fn next_link(headers: &HeaderMap, current: &str) -> Result<Option<Url>, String> {
    for value in headers.get_all(reqwest::header::LINK) {
        let value = value
            .to_str()
            .map_err(|_| "Link header is not text".to_string())?;
        for link in value.split(',') {
            let Some((target, params)) = link
                .trim()
                .strip_prefix('<')
                .and_then(|l| l.split_once('>'))
            else {
                continue;
            };
            let is_next = params.split(';').any(|p| {
                p.trim()
                    .strip_prefix("rel=")
                    .is_some_and(|rel| rel.trim_matches('"').split(' ').any(|r| r == "next"))
            });
            if is_next {
                let base = Url::parse(current).map_err(|e| format!("bad url {current}: {e}"))?;
                let next = base
                    .join(target)
                    .map_err(|e| format!("Link target {target:?} is not a url: {e}"))?;
                return Ok(Some(next));
            }
        }
    }
    Ok(None)
}

/// Percent-encodes everything but RFC 3986 unreserved characters, for a query value.
fn query_escape(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for b in value.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::super::test_support::*;
    use super::super::*;
    use super::{next_link, query_escape, referrers_tag};
    use crate::store::sha256_digest;
    use reqwest::header::HeaderMap;
    use std::sync::Arc;

    const LAZY: &str = "application/vnd.lazyimg.image.v1";
    const SBOM: &str = "application/vnd.example.sbom.v1";

    /// A manifest with `subject`, of `artifact_type`, distinguished by `n`.
    fn referring_manifest(subject: &[u8], artifact_type: &str, n: u32) -> Vec<u8> {
        serde_json::to_vec(&serde_json::json!({
            "schemaVersion": 2,
            "mediaType": MEDIA_TYPE_OCI_MANIFEST,
            "artifactType": artifact_type,
            "config": {"mediaType": "application/vnd.oci.empty.v1+json", "digest": sha256_digest(b"{}"), "size": 2},
            "layers": [],
            "subject": {"mediaType": MEDIA_TYPE_OCI_MANIFEST, "digest": sha256_digest(subject), "size": subject.len()},
            "annotations": {"n": n.to_string()},
        }))
        .unwrap()
    }

    /// Pushes `bytes` by digest and, when the registry did not take the subject, records it in
    /// the referrers tag, as a pusher must.
    async fn push_referrer(client: &RegistryClient, subject: &[u8], bytes: &[u8]) -> bool {
        let digest = Reference::Digest(sha256_digest(bytes));
        let pushed = client
            .put_manifest("test/img", &digest, MEDIA_TYPE_OCI_MANIFEST, bytes)
            .await
            .unwrap();
        if !pushed.subject_accepted {
            let referrer = Referrer::of_manifest(MEDIA_TYPE_OCI_MANIFEST, bytes);
            let subject = sha256_digest(subject);
            assert!(client
                .add_referrer_fallback("test/img", &subject, &referrer)
                .await
                .unwrap());
        }
        pushed.subject_accepted
    }

    #[tokio::test]
    async fn referrers_come_from_the_api_when_the_registry_has_it() {
        let memory = MemoryRegistry::new(true, false);
        let server = FakeServer::start(|_| memory.handler()).await;
        let client = server.client(None);
        let subject = MANIFEST_BODY;
        let subject_digest = sha256_digest(subject);
        let lazy = referring_manifest(subject, LAZY, 1);
        let sbom = referring_manifest(subject, SBOM, 2);
        assert!(push_referrer(&client, subject, &lazy).await);
        assert!(push_referrer(&client, subject, &sbom).await);

        let all = client
            .referrers("test/img", &subject_digest, None)
            .await
            .unwrap();
        assert_eq!(all.len(), 2, "{all:?}");
        let found = client
            .referrers("test/img", &subject_digest, Some(LAZY))
            .await
            .unwrap();
        assert_eq!(
            found,
            [Referrer::of_manifest(MEDIA_TYPE_OCI_MANIFEST, &lazy)]
        );
        assert_eq!(found[0].digest, sha256_digest(&lazy));
        assert_eq!(found[0].size, lazy.len() as u64);
        assert_eq!(found[0].artifact_type.as_deref(), Some(LAZY));
        assert_eq!(found[0].annotations.as_ref().unwrap()["n"], "1");

        let asked = server.requests_to(&format!("/v2/test/img/referrers/{subject_digest}"));
        assert_eq!(asked.len(), 2);
        assert_eq!(asked[1].query("artifactType"), [LAZY]);
        assert!(asked[1].path.contains("application%2Fvnd.lazyimg.image.v1"));
        let fallback_tag = referrers_tag(&subject_digest).unwrap();
        assert!(
            server
                .requests()
                .iter()
                .all(|r| !r.path.contains(&fallback_tag)),
            "the tag schema is not used when the API works"
        );
    }

    #[tokio::test]
    async fn referrers_fall_back_to_the_tag_schema_on_404() {
        let memory = MemoryRegistry::new(false, false);
        let server = FakeServer::start(|_| memory.handler()).await;
        let client = server.client(None);
        let subject = MANIFEST_BODY;
        let subject_digest = sha256_digest(subject);
        let fallback_tag = referrers_tag(&subject_digest).unwrap();
        assert_eq!(fallback_tag, subject_digest.replace("sha256:", "sha256-"));

        let none = client.referrers("test/img", &subject_digest, None).await;
        assert_eq!(none.unwrap(), []);

        let lazy = referring_manifest(subject, LAZY, 1);
        assert!(!push_referrer(&client, subject, &lazy).await);
        let (media_type, index) = memory.manifest("test/img", &fallback_tag).unwrap();
        assert_eq!(media_type, MEDIA_TYPE_OCI_INDEX);
        let index: serde_json::Value = serde_json::from_slice(&index).unwrap();
        assert_eq!(index["schemaVersion"], 2);
        assert_eq!(index["mediaType"], MEDIA_TYPE_OCI_INDEX);
        assert_eq!(index["manifests"][0]["digest"], sha256_digest(&lazy));
        assert_eq!(index["manifests"][0]["artifactType"], LAZY);

        // Recording it again changes nothing and writes nothing.
        let puts_before = count_method(&server.requests(), "PUT");
        let referrer = Referrer::of_manifest(MEDIA_TYPE_OCI_MANIFEST, &lazy);
        let added = client
            .add_referrer_fallback("test/img", &subject_digest, &referrer)
            .await
            .unwrap();
        assert!(!added);
        assert_eq!(count_method(&server.requests(), "PUT"), puts_before);

        let sbom = referring_manifest(subject, SBOM, 2);
        assert!(!push_referrer(&client, subject, &sbom).await);
        let all = client
            .referrers("test/img", &subject_digest, None)
            .await
            .unwrap();
        let digests: Vec<_> = all.iter().map(|r| r.digest.clone()).collect();
        assert_eq!(digests, [sha256_digest(&lazy), sha256_digest(&sbom)]);
        let found = client
            .referrers("test/img", &subject_digest, Some(SBOM))
            .await
            .unwrap();
        assert_eq!(
            found,
            [Referrer::of_manifest(MEDIA_TYPE_OCI_MANIFEST, &sbom)]
        );
        let other = sha256_digest(b"another subject");
        assert_eq!(
            client.referrers("test/img", &other, None).await.unwrap(),
            []
        );
    }

    #[tokio::test]
    async fn fallback_update_keeps_what_other_tools_wrote() {
        let memory = MemoryRegistry::new(false, false);
        let server = FakeServer::start(|_| memory.handler()).await;
        let client = server.client(None);
        let subject_digest = sha256_digest(MANIFEST_BODY);
        let fallback_tag = referrers_tag(&subject_digest).unwrap();
        let foreign = serde_json::json!({
            "schemaVersion": 2,
            "mediaType": MEDIA_TYPE_OCI_INDEX,
            "annotations": {"written-by": "another tool"},
            "manifests": [
                {"mediaType": MEDIA_TYPE_OCI_MANIFEST, "digest": DIGEST_B, "size": 7,
                 "artifactType": SBOM, "platform": {"os": "linux", "architecture": "arm64"}},
                {"mediaType": MEDIA_TYPE_OCI_MANIFEST, "digest": "md5:nonsense", "size": 1},
                "not even an object",
            ],
        });
        client
            .put_manifest(
                "test/img",
                &tag(&fallback_tag),
                MEDIA_TYPE_OCI_INDEX,
                &serde_json::to_vec(&foreign).unwrap(),
            )
            .await
            .unwrap();
        let listed = client
            .referrers("test/img", &subject_digest, None)
            .await
            .unwrap();
        assert_eq!(listed.len(), 1, "unusable entries are skipped: {listed:?}");
        assert_eq!(listed[0].digest, DIGEST_B);

        let lazy = referring_manifest(MANIFEST_BODY, LAZY, 1);
        let referrer = Referrer::of_manifest(MEDIA_TYPE_OCI_MANIFEST, &lazy);
        let added = client
            .add_referrer_fallback("test/img", &subject_digest, &referrer)
            .await
            .unwrap();
        assert!(added);
        let (_, index) = memory.manifest("test/img", &fallback_tag).unwrap();
        let index: serde_json::Value = serde_json::from_slice(&index).unwrap();
        assert_eq!(index["annotations"]["written-by"], "another tool");
        assert_eq!(index["manifests"][0]["platform"]["architecture"], "arm64");
        assert_eq!(index["manifests"][2], "not even an object");
        assert_eq!(index["manifests"][3]["digest"], referrer.digest);
    }

    #[tokio::test]
    async fn referrers_tag_holding_something_else_is_an_error() {
        let memory = MemoryRegistry::new(false, false);
        let server = FakeServer::start(|_| memory.handler()).await;
        let client = server.client(None);
        let subject_digest = sha256_digest(MANIFEST_BODY);
        let fallback_tag = referrers_tag(&subject_digest).unwrap();
        client
            .put_manifest(
                "test/img",
                &tag(&fallback_tag),
                MEDIA_TYPE_OCI_MANIFEST,
                MANIFEST_BODY,
            )
            .await
            .unwrap();
        let err = client
            .referrers("test/img", &subject_digest, None)
            .await
            .unwrap_err();
        assert!(
            matches!(err, RegistryError::InvalidManifest { .. }) && err.is_permanent(),
            "{err}"
        );
        assert!(err.to_string().contains("not an OCI index"), "{err}");
        let referrer = Referrer::of_manifest(MEDIA_TYPE_OCI_MANIFEST, b"{}");
        let err = client
            .add_referrer_fallback("test/img", &subject_digest, &referrer)
            .await
            .unwrap_err();
        assert!(
            matches!(err, RegistryError::InvalidManifest { .. }),
            "{err}"
        );
        let err = client
            .referrers("test/img", "sha256:short", None)
            .await
            .unwrap_err();
        assert!(matches!(err, RegistryError::InvalidDigest { .. }), "{err}");
    }

    #[tokio::test]
    async fn referrers_api_pages_are_followed() {
        let subject_digest = sha256_digest(MANIFEST_BODY);
        let first = format!("/v2/test/img/referrers/{subject_digest}");
        let entry = |digest: &str| serde_json::json!({"mediaType": MEDIA_TYPE_OCI_MANIFEST, "digest": digest, "size": 3, "artifactType": LAZY});
        let page = |entries: Vec<serde_json::Value>| {
            serde_json::to_vec(&serde_json::json!({"schemaVersion": 2, "manifests": entries}))
                .unwrap()
        };
        let (page1, page2) = (page(vec![entry(DIGEST_A)]), page(vec![entry(DIGEST_B)]));
        let server = FakeServer::start(move |_| {
            Arc::new(move |req: &SeenRequest| {
                if req.path_only() != first {
                    return Reply::new(404, "");
                }
                if req.query("last").is_empty() {
                    Reply::new(200, page1.clone())
                        .header("Link", format!(r#"<{first}?n=1&last=a>; rel="next""#))
                } else {
                    Reply::new(200, page2.clone())
                }
            })
        })
        .await;
        let listed = server
            .client(None)
            .referrers("test/img", &subject_digest, Some(LAZY))
            .await
            .unwrap();
        let digests: Vec<_> = listed.iter().map(|r| r.digest.as_str()).collect();
        assert_eq!(digests, [DIGEST_A, DIGEST_B]);
        assert_eq!(server.requests().len(), 2);
    }

    #[test]
    fn referrer_of_manifest_takes_the_artifact_type_or_the_config_type() {
        let with_type =
            br#"{"artifactType":"a/b","config":{"mediaType":"c/d"},"annotations":{"k":"v"}}"#;
        let r = Referrer::of_manifest(MEDIA_TYPE_OCI_MANIFEST, with_type);
        assert_eq!(r.artifact_type.as_deref(), Some("a/b"));
        assert_eq!(r.annotations.unwrap()["k"], "v");
        assert_eq!(r.size, with_type.len() as u64);
        let config_only = br#"{"config":{"mediaType":"c/d"},"annotations":{}}"#;
        let r = Referrer::of_manifest(MEDIA_TYPE_OCI_MANIFEST, config_only);
        assert_eq!(r.artifact_type.as_deref(), Some("c/d"));
        assert_eq!(r.annotations, None);
        let junk = Referrer::of_manifest("x/y", b"<html>");
        assert_eq!((junk.artifact_type, junk.annotations), (None, None));
        assert_eq!(junk.digest, sha256_digest(b"<html>"));
        // Optional fields stay out of the JSON when absent, as descriptors are written.
        let json = serde_json::to_string(&Referrer::of_manifest("x/y", b"{}")).unwrap();
        assert!(
            !json.contains("artifactType") && !json.contains("annotations"),
            "{json}"
        );
    }

    #[test]
    fn link_and_query_helpers() {
        let mut headers = HeaderMap::new();
        headers.insert(
            reqwest::header::LINK,
            r#"<https://other/x>; rel="prev", </v2/r/referrers/d?last=b>; rel="next""#
                .parse()
                .unwrap(),
        );
        let next = next_link(&headers, "http://h:5000/v2/r/referrers/d?n=1").unwrap();
        assert_eq!(
            next.unwrap().as_str(),
            "http://h:5000/v2/r/referrers/d?last=b"
        );
        assert_eq!(next_link(&Default::default(), "http://h/"), Ok(None));
        assert_eq!(
            query_escape("application/vnd.a+json; x=é"),
            "application%2Fvnd.a%2Bjson%3B%20x%3D%C3%A9"
        );
    }

    const DIGEST_A: &str =
        "sha256:aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";
    const DIGEST_B: &str =
        "sha256:bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb";
}
