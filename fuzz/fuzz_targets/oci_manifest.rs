//! Fuzzes the parsers of OCI manifests and indexes, which come from registries, buckets and
//! stores other people can write: the lazy image manifest (`LazyManifest::parse`), the registry
//! client's media type of a manifest and its referrers lists (`agent::registry`), the referrer
//! entry of a manifest about to be pushed (`Referrer::of_manifest`), and the converter's choice
//! of a platform in an image index (`tools::image::pick_platform`).
//!
//! Checks: an accepted lazy manifest keeps every rule `parse` states and parses back equal from
//! its `to_json`; an accepted media type is one of the four the client handles, and only a JSON
//! object is accepted; a referrer entry names the bytes' digest and size; listed referrers have
//! sha256 digests and are no more than the entries listed; a picked manifest is one the index
//! lists for this host's platform.
#![no_main]

use agent::registry::{
    fuzzing, Referrer, MEDIA_TYPE_DOCKER_MANIFEST, MEDIA_TYPE_DOCKER_MANIFEST_LIST,
    MEDIA_TYPE_OCI_INDEX, MEDIA_TYPE_OCI_MANIFEST,
};
use agent::store::sha256_digest;
use fusefs::manifest::{
    is_sha256_digest, LazyManifest, MEDIA_TYPE_BLOB, MEDIA_TYPE_BLOB_EXTERNAL, MEDIA_TYPE_INDEX,
};
use libfuzzer_sys::fuzz_target;
use serde_json::Value;
use oci_spec::image::ImageIndex;
use tools::image::{host_platform, pick_platform};

const SUPPORTED: [&str; 4] = [
    MEDIA_TYPE_OCI_INDEX,
    MEDIA_TYPE_OCI_MANIFEST,
    MEDIA_TYPE_DOCKER_MANIFEST_LIST,
    MEDIA_TYPE_DOCKER_MANIFEST,
];

fn lazy_manifest(data: &[u8]) {
    let Ok(m) = LazyManifest::parse(data) else {
        return;
    };
    assert_eq!(m.index().media_type, MEDIA_TYPE_INDEX);
    assert!(m.index().urls.is_none() && m.config.urls.is_none());
    for d in std::iter::once(&m.config).chain(&m.layers) {
        assert!(is_sha256_digest(&d.digest), "{:?}", d.digest);
    }
    for b in m.blobs() {
        assert!(b.media_type == MEDIA_TYPE_BLOB || b.media_type == MEDIA_TYPE_BLOB_EXTERNAL);
        assert_eq!(
            b.external_url().is_some(),
            b.media_type == MEDIA_TYPE_BLOB_EXTERNAL
        );
    }
    assert_eq!(LazyManifest::parse(&m.to_json()).unwrap(), m);
}

fn media_type(data: &[u8]) {
    let is_object = data.trim_ascii_start().first() == Some(&b'{');
    for content_type in [
        None,
        Some("application/json"),
        Some(MEDIA_TYPE_OCI_INDEX),
        Some(MEDIA_TYPE_DOCKER_MANIFEST),
    ] {
        if let Ok(media_type) = fuzzing::manifest_media_type(content_type, data) {
            assert!(is_object, "a body that is not a JSON object was accepted");
            assert!(SUPPORTED.contains(&media_type.as_str()), "{media_type:?}");
            if let Some(ct) = content_type.filter(|ct| SUPPORTED.contains(ct)) {
                assert_eq!(media_type, ct, "the Content-Type names a manifest type");
            }
        }
    }
    // Schema 1 manifests are never taken, whatever the body says.
    let schema1 = "application/vnd.docker.distribution.manifest.v1+prettyjws";
    assert!(fuzzing::manifest_media_type(Some(schema1), data).is_err());
}

fn referrers(data: &[u8]) {
    let entry = Referrer::of_manifest(MEDIA_TYPE_OCI_MANIFEST, data);
    assert_eq!(entry.digest, sha256_digest(data));
    assert_eq!(entry.size, data.len() as u64);
    assert!(entry.annotations.as_ref().is_none_or(|a| !a.is_empty()));

    if let Some(listed) = fuzzing::index_referrers(data) {
        let entries = serde_json::from_slice::<Value>(data)
            .ok()
            .and_then(|v| v.get("manifests")?.as_array().map(Vec::len))
            .unwrap_or(0);
        assert!(listed.len() <= entries);
        for r in &listed {
            assert!(is_sha256_digest(&r.digest), "{:?}", r.digest);
        }
    }
}

fn platform(data: &[u8]) {
    let Ok(index) = serde_json::from_slice::<Value>(data) else {
        return;
    };
    let Ok(typed) = serde_json::from_slice::<ImageIndex>(data) else {
        return;
    };
    let Ok(digest) = pick_platform(&typed) else {
        return;
    };
    let (os, arch) = host_platform();
    let listed = index["manifests"].as_array().unwrap().iter().any(|m| {
        m["digest"] == digest.as_str()
            && m["platform"]["os"] == os
            && m["platform"]["architecture"] == arch
    });
    assert!(
        listed,
        "{digest:?} is not a manifest of {os}/{arch} in the index"
    );
}

fuzz_target!(|data: &[u8]| {
    lazy_manifest(data);
    media_type(data);
    referrers(data);
    platform(data);
});
