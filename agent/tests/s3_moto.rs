//! `S3Store` against a real S3 API: moto on a loopback port (see `lazy_tests::s3`).
//!
//! Needs `moto_server` (`scripts/setup.sh` installs it); each test starts its own server, so
//! they run in parallel. Run with `cargo test -p agent --test s3_moto`.

use std::ops::Range;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use agent::blobstore::{BlobError, BlobStore};
use agent::s3::{BlobUpload, S3Error, S3Location, S3Options, S3Store, MULTIPART_THRESHOLD};
use lazy_tests::fault_proxy::{FaultProxy, HttpFault};
use lazy_tests::pseudo_random_bytes;
use lazy_tests::s3::{MotoServer, ACCESS_KEY_ID, REGION, SECRET_ACCESS_KEY};
use sha2::{Digest, Sha256};

const BUCKET: &str = "lazy-images";

fn options(moto: &MotoServer) -> S3Options {
    S3Options {
        connect_timeout: Duration::from_secs(1),
        read_timeout: Duration::from_secs(5),
        max_attempts: 1,
        endpoint_url: Some(moto.endpoint()),
        region: Some(REGION.into()),
        credentials: Some((ACCESS_KEY_ID.into(), SECRET_ACCESS_KEY.into())),
    }
}

/// A moto server with [`BUCKET`] and a store for `s3://BUCKET/PREFIX`.
async fn store_on_moto(prefix: &str) -> (MotoServer, S3Store) {
    let moto = MotoServer::start();
    moto.create_bucket(BUCKET);
    let location = S3Location::parse(&format!("s3://{BUCKET}/{prefix}")).unwrap();
    let store = S3Store::connect(location, &options(&moto)).await.unwrap();
    (moto, store)
}

fn digest_of(bytes: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(bytes)))
}

/// Uploads `bytes` as a blob and returns its digest.
async fn put_blob(store: &S3Store, bytes: &[u8]) -> String {
    let digest = digest_of(bytes);
    let key = store.location().blob_key(&digest).unwrap();
    store.put_bytes(&key, bytes.to_vec()).await.unwrap();
    digest
}

fn slice(bytes: &[u8], range: &Range<u64>) -> Vec<u8> {
    bytes[range.start as usize..range.end as usize].to_vec()
}

#[tokio::test]
async fn put_bytes_then_read_range_returns_exactly_the_asked_bytes() {
    let (_moto, store) = store_on_moto("images/debian").await;
    let blob = pseudo_random_bytes(1, 300_000);
    let digest = put_blob(&store, &blob).await;
    assert_eq!(store.id().kind(), "s3");
    assert_eq!(
        store.id().to_string(),
        format!("s3://{BUCKET}/images/debian")
    );
    let len = blob.len() as u64;
    for range in [
        0..1,
        0..len,
        1..2,
        4095..8193,
        100_000..250_000,
        len - 1..len,
    ] {
        let got = store.read_range(&digest, range.clone()).await.unwrap();
        assert_eq!(got.len() as u64, range.end - range.start, "{range:?}");
        assert!(got == slice(&blob, &range), "bytes differ in {range:?}");
    }
    assert!(store.read_range(&digest, 7..7).await.unwrap().is_empty());
    // The layout the module documents.
    let head = store
        .head_object(&format!(
            "images/debian/blobs/sha256/{}",
            &digest["sha256:".len()..]
        ))
        .await
        .unwrap();
    assert_eq!(head, Some(len));
}

/// With an endpoint given by host name the SDK would address `BUCKET.localhost` unless the
/// store asks for path-style requests.
#[tokio::test]
async fn endpoint_option_with_a_host_name_uses_path_style_requests() {
    let moto = MotoServer::start();
    moto.create_bucket(BUCKET);
    let opts = S3Options {
        endpoint_url: Some(format!("http://localhost:{}", moto.port())),
        ..options(&moto)
    };
    let location = S3Location::parse(&format!("s3://{BUCKET}/p")).unwrap();
    let store = S3Store::connect(location, &opts).await.unwrap();
    let digest = put_blob(&store, b"path style").await;
    assert_eq!(store.read_range(&digest, 5..10).await.unwrap(), b"style");
}

#[tokio::test]
async fn read_blob_refuses_blobs_over_the_cap() {
    let (_moto, store) = store_on_moto("p").await;
    let blob = pseudo_random_bytes(2, 10_000);
    let digest = put_blob(&store, &blob).await;
    assert_eq!(store.read_blob(&digest, 10_000).await.unwrap(), blob);
    let err = store.read_blob(&digest, 9_999).await.unwrap_err();
    assert!(matches!(err, BlobError::Invalid { .. }), "{err}");
    assert!(err.is_permanent());
    assert!(err.to_string().contains("9999-byte limit"), "{err}");

    let manifest = store.location().manifest_key();
    assert_eq!(manifest, "p/manifest.json");
    store.put_bytes(&manifest, b"{}".to_vec()).await.unwrap();
    assert_eq!(
        store.get_object(&manifest, 2).await.unwrap(),
        Some(b"{}".to_vec())
    );
    let err = store.get_object(&manifest, 1).await.unwrap_err();
    assert!(matches!(err, S3Error::Invalid { .. }), "{err}");
    assert!(err.to_string().contains("s3://lazy-images/p/manifest.json"));
}

#[tokio::test]
async fn missing_objects_are_not_found() {
    let (_moto, store) = store_on_moto("p").await;
    let missing = format!("sha256:{}", "ab".repeat(32));
    for err in [
        store.read_range(&missing, 0..10).await.unwrap_err(),
        store.read_blob(&missing, 1 << 20).await.unwrap_err(),
    ] {
        assert!(matches!(err, BlobError::NotFound { .. }), "{err}");
        assert!(err.is_permanent());
        assert!(err.to_string().contains("s3://lazy-images/p"), "{err}");
    }
    assert_eq!(
        store.get_object("p/manifest.json", 100).await.unwrap(),
        None
    );
    assert_eq!(store.head_object("p/manifest.json").await.unwrap(), None);
}

#[tokio::test]
async fn missing_bucket_is_a_permanent_error_naming_the_bucket() {
    let moto = MotoServer::start();
    let location = S3Location::parse("s3://no-such-bucket/p").unwrap();
    let store = S3Store::connect(location, &options(&moto)).await.unwrap();
    let digest = format!("sha256:{}", "cd".repeat(32));
    let err = store.read_range(&digest, 0..10).await.unwrap_err();
    assert!(err.is_permanent(), "{err}");
    assert!(
        err.to_string()
            .contains("bucket no-such-bucket does not exist"),
        "{err}"
    );
    let err = store
        .put_bytes("p/manifest.json", b"{}".to_vec())
        .await
        .unwrap_err();
    assert!(err.is_permanent(), "{err}");
    assert!(err.to_string().contains("NoSuchBucket"), "{err}");
}

#[tokio::test]
async fn unknown_access_key_is_denied_permanently() {
    let moto = MotoServer::start_enforcing_auth();
    let location = S3Location::parse(&format!("s3://{BUCKET}/p")).unwrap();
    let store = S3Store::connect(location, &options(&moto)).await.unwrap();
    let digest = format!("sha256:{}", "ab".repeat(32));
    let err = store.read_range(&digest, 0..10).await.unwrap_err();
    assert!(matches!(err, BlobError::Denied { .. }), "{err}");
    assert!(err.is_permanent());
    assert!(err.to_string().contains("InvalidAccessKeyId"), "{err}");
    let err = store
        .put_bytes("p/manifest.json", b"{}".to_vec())
        .await
        .unwrap_err();
    assert!(matches!(err, S3Error::Denied { .. }), "{err}");
    assert!(
        err.to_string().contains("s3://lazy-images/p/manifest.json"),
        "{err}"
    );
}

#[tokio::test]
async fn range_past_the_end_is_permanently_invalid() {
    let (_moto, store) = store_on_moto("p").await;
    let blob = pseudo_random_bytes(3, 1000);
    let digest = put_blob(&store, &blob).await;
    // Starts past the end (S3 answers 416) and starts inside but ends past it (S3 answers 206
    // with the 10 bytes that exist): both must be refused, not retried or returned short.
    for range in [1000..1010, 2000..3000, 990..1010] {
        let err = store.read_range(&digest, range.clone()).await.unwrap_err();
        assert!(matches!(err, BlobError::Invalid { .. }), "{range:?}: {err}");
        assert!(err.is_permanent());
    }
    #[allow(clippy::reversed_empty_ranges)] // a caller's bug, which must be an error
    let err = store.read_range(&digest, 10..5).await.unwrap_err();
    assert!(matches!(err, BlobError::Invalid { .. }), "{err}");
}

#[tokio::test]
async fn put_file_over_the_threshold_uses_multipart_and_reads_back_equal() {
    let (_moto, store) = store_on_moto("big").await;
    let size = 80 << 20;
    assert!(size > MULTIPART_THRESHOLD);
    let data = pseudo_random_bytes(4, size as usize);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("layer");
    std::fs::write(&path, &data).unwrap();
    let key = "big/blobs/sha256/data";

    let started = Instant::now();
    store.put_file(key, &path).await.unwrap();
    eprintln!(
        "multipart upload of 80 MiB to moto: {:?}",
        started.elapsed()
    );
    assert_eq!(store.head_object(key).await.unwrap(), Some(size));
    // A multipart object's ETag is `"<md5 of part md5s>-<parts>"`: 80 MiB in 16 MiB parts.
    let head = store
        .client()
        .head_object()
        .bucket(BUCKET)
        .key(key)
        .send()
        .await
        .unwrap();
    assert!(
        head.e_tag().unwrap_or_default().ends_with("-5\""),
        "{:?}",
        head.e_tag()
    );

    let digest = digest_of(&data);
    let blob_key = store.location().blob_key(&digest).unwrap();
    store.put_file(&blob_key, &path).await.unwrap();
    let part = 16u64 << 20;
    for range in [
        0..4096,
        part - 10..part + 10,
        3 * part - 1..3 * part + 1,
        size - 4096..size,
        12_345_678..12_345_678 + (1 << 20),
    ] {
        let started = Instant::now();
        let got = store.read_range(&digest, range.clone()).await.unwrap();
        eprintln!(
            "moto range GET of {} bytes from an 80 MiB object: {:?}",
            range.end - range.start,
            started.elapsed()
        );
        assert!(got == slice(&data, &range), "bytes differ in {range:?}");
    }
}

#[tokio::test]
async fn small_put_file_round_trips_in_one_put() {
    let (_moto, store) = store_on_moto("").await;
    let data = pseudo_random_bytes(5, 1 << 20);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("blob");
    std::fs::write(&path, &data).unwrap();
    let digest = digest_of(&data);
    assert_eq!(
        store.put_blob_file(&digest, &path).await.unwrap(),
        BlobUpload::Uploaded
    );
    assert_eq!(store.read_blob(&digest, 1 << 20).await.unwrap(), data);
    let err = store
        .put_file("x", Path::new("/nonexistent/lazy-blob"))
        .await
        .unwrap_err();
    assert!(matches!(err, S3Error::File { .. }), "{err}");
    assert!(err.to_string().contains("/nonexistent/lazy-blob"), "{err}");
}

#[tokio::test]
async fn put_blob_file_skips_a_blob_already_there_with_the_same_size() {
    let (_moto, store) = store_on_moto("p").await;
    let data = pseudo_random_bytes(6, 50_000);
    let digest = digest_of(&data);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("blob");
    std::fs::write(&path, &data).unwrap();
    assert_eq!(
        store.put_blob_file(&digest, &path).await.unwrap(),
        BlobUpload::Uploaded
    );

    // Replace the object behind the store's back with other bytes of the same size: if
    // put_blob_file sent the file again, the original bytes would come back.
    let key = store.location().blob_key(&digest).unwrap();
    let stand_in = vec![0xAA; data.len()];
    store.put_bytes(&key, stand_in.clone()).await.unwrap();
    assert_eq!(
        store.put_blob_file(&digest, &path).await.unwrap(),
        BlobUpload::AlreadyPresent
    );
    assert_eq!(store.read_blob(&digest, 1 << 20).await.unwrap(), stand_in);

    // A different size means a broken upload: it is replaced.
    store.put_bytes(&key, vec![0xAA; 10]).await.unwrap();
    assert_eq!(
        store.put_blob_file(&digest, &path).await.unwrap(),
        BlobUpload::Uploaded
    );
    assert_eq!(store.read_blob(&digest, 1 << 20).await.unwrap(), data);
}

#[tokio::test]
async fn stopped_server_is_a_quick_transient_error_and_the_store_recovers() {
    let (mut moto, store) = store_on_moto("p").await;
    let blob = pseudo_random_bytes(7, 4096);
    let digest = put_blob(&store, &blob).await;
    assert_eq!(
        store.read_range(&digest, 0..100).await.unwrap(),
        &blob[..100]
    );

    moto.stop();
    let started = Instant::now();
    let err = store.read_range(&digest, 0..100).await.unwrap_err();
    let elapsed = started.elapsed();
    eprintln!("read from a stopped server failed after {elapsed:?}: {err}");
    assert!(!err.is_permanent(), "{err}");
    assert!(
        matches!(
            err,
            BlobError::Unavailable { .. } | BlobError::Timeout { .. }
        ),
        "{err}"
    );
    assert!(elapsed < Duration::from_secs(3), "{elapsed:?}");
    // The message carries the real cause, not just "dispatch failure".
    let message = err.to_string();
    assert!(message.contains("Connection refused"), "{message}");
    assert!(
        message.contains("s3://lazy-images/p/blobs/sha256/"),
        "{message}"
    );

    // moto comes back empty: put the blob again, then the same store reads it.
    moto.restart();
    moto.create_bucket(BUCKET);
    put_blob(&store, &blob).await;
    assert_eq!(
        store.read_range(&digest, 0..100).await.unwrap(),
        &blob[..100]
    );
}

#[tokio::test]
async fn hung_server_times_out_within_the_read_timeout() {
    let moto = MotoServer::start();
    moto.create_bucket(BUCKET);
    let opts = S3Options {
        read_timeout: Duration::from_secs(1),
        ..options(&moto)
    };
    let location = S3Location::parse(&format!("s3://{BUCKET}/p")).unwrap();
    let store = S3Store::connect(location, &opts).await.unwrap();
    let blob = pseudo_random_bytes(8, 4096);
    let digest = put_blob(&store, &blob).await;

    moto.pause();
    let started = Instant::now();
    let result = store.read_range(&digest, 0..100).await;
    let elapsed = started.elapsed();
    moto.resume();
    let err = result.unwrap_err();
    assert!(matches!(err, BlobError::Timeout { .. }), "{err}");
    assert!(!err.is_permanent());
    assert!(elapsed < Duration::from_secs(3), "{elapsed:?}");
    assert_eq!(
        store.read_range(&digest, 0..100).await.unwrap(),
        &blob[..100]
    );
}

/// Answers a proxy in front of moto damages: a 429 with `Retry-After` is throttling with that
/// wait, a range answered with other bytes (or the right bytes under another `Content-Range`)
/// is refused naming the range, and a cut or reset body is a transient error; each time, the
/// next undamaged answer reads right.
#[tokio::test]
async fn damaged_answers_are_classified_and_the_next_good_one_reads() {
    let moto = MotoServer::start();
    moto.create_bucket(BUCKET);
    let proxy = FaultProxy::start(&format!("127.0.0.1:{}", moto.port())).unwrap();
    let opts = S3Options {
        endpoint_url: Some(format!("http://{}", proxy.host())),
        ..options(&moto)
    };
    let location = S3Location::parse(&format!("s3://{BUCKET}/p")).unwrap();
    let store = S3Store::connect(location, &opts).await.unwrap();
    let blob = pseudo_random_bytes(9, 8192);
    let digest = digest_of(&blob);
    moto.put_object(BUCKET, &store.location().blob_key(&digest).unwrap(), &blob);
    let range = 1000..5000;

    proxy.inject(
        HttpFault::Status {
            status: 429,
            retry_after: Some(3),
        },
        1,
    );
    let err = store.read_range(&digest, range.clone()).await.unwrap_err();
    assert_eq!(err.retry_after(), Some(Duration::from_secs(3)), "{err}");
    assert!(!err.is_permanent());
    for fault in [HttpFault::ShiftedRange, HttpFault::WrongContentRange] {
        proxy.inject(fault, 1);
        let err = store.read_range(&digest, range.clone()).await.unwrap_err();
        assert!(
            matches!(&err, BlobError::Invalid { reason, .. }
                if reason.contains("asked for bytes 1000-4999")),
            "{fault:?}: {err}"
        );
    }
    for fault in [HttpFault::Truncate, HttpFault::ResetMidBody] {
        proxy.inject(fault, 1);
        let err = store.read_range(&digest, range.clone()).await.unwrap_err();
        assert!(!err.is_permanent(), "{fault:?}: {err}");
    }
    assert_eq!(proxy.faults_injected(), 5);
    assert_eq!(
        store.read_range(&digest, range.clone()).await.unwrap(),
        slice(&blob, &range)
    );
}

/// The AWS environment variables reach the client. Checked in a child process (this test
/// binary, running only [`env_child`]) so that no test here sees another's environment.
#[test]
fn endpoint_region_and_credentials_come_from_the_aws_environment() {
    let moto = MotoServer::start();
    moto.create_bucket(BUCKET);
    let exe = std::env::current_exe().unwrap();
    let run = |mode: &str, vars: &[(&str, String)]| {
        let mut child = Command::new(&exe);
        child.args(["--exact", "env_child", "--nocapture", "--test-threads=1"]);
        for var in [
            "AWS_ENDPOINT_URL",
            "AWS_ENDPOINT_URL_S3",
            "AWS_REGION",
            "AWS_DEFAULT_REGION",
            "AWS_ACCESS_KEY_ID",
            "AWS_SECRET_ACCESS_KEY",
            "AWS_PROFILE",
        ] {
            child.env_remove(var);
        }
        // No ~/.aws files and no instance metadata lookups: only what we set counts.
        child.env("AWS_CONFIG_FILE", "/nonexistent/lazy-aws-config");
        child.env(
            "AWS_SHARED_CREDENTIALS_FILE",
            "/nonexistent/lazy-aws-credentials",
        );
        child.env("AWS_EC2_METADATA_DISABLED", "true");
        child.env("LAZY_S3_ENV_CHILD", mode);
        for (key, value) in vars {
            child.env(key, value);
        }
        let output = child.output().unwrap();
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        assert!(output.status.success(), "{vars:?}\n{text}");
        assert!(text.contains("env_child ok"), "child did not run:\n{text}");
    };
    let creds = [
        ("AWS_ACCESS_KEY_ID", ACCESS_KEY_ID.to_string()),
        ("AWS_SECRET_ACCESS_KEY", SECRET_ACCESS_KEY.to_string()),
    ];
    // Endpoints by host name, not IP address: the SDK picks path-style requests for an IP by
    // itself, for a name only when told to (else the request goes to `lazy-images.localhost`).
    let localhost = format!("http://localhost:{}", moto.port());
    // AWS_ENDPOINT_URL, no region anywhere (falls back to us-east-1).
    run(
        "ok",
        &[
            creds[0].clone(),
            creds[1].clone(),
            ("AWS_ENDPOINT_URL", localhost.clone()),
        ],
    );
    // The S3-specific variable alone, with a region.
    run(
        "ok",
        &[
            creds[0].clone(),
            creds[1].clone(),
            ("AWS_ENDPOINT_URL_S3", localhost.clone()),
            ("AWS_REGION", "eu-west-1".into()),
        ],
    );
    // The whole set the harness hands to child processes.
    let env = moto.env();
    let vars: Vec<(&str, String)> = env.iter().map(|(k, v)| (k.as_str(), v.clone())).collect();
    run("ok", &vars);
    // No credentials anywhere: a permanent error that says how to fix it, not a retry loop.
    run("no-credentials", &[("AWS_ENDPOINT_URL", moto.endpoint())]);
}

/// Body of [`endpoint_region_and_credentials_come_from_the_aws_environment`]; does nothing
/// unless that test started it.
#[tokio::test]
async fn env_child() {
    let Ok(mode) = std::env::var("LAZY_S3_ENV_CHILD") else {
        return;
    };
    let location = S3Location::parse(&format!("s3://{BUCKET}/env")).unwrap();
    let started = Instant::now();
    let store = S3Store::connect(location, &S3Options::default())
        .await
        .unwrap();
    eprintln!("connect from the environment took {:?}", started.elapsed());
    let region = store.client().config().region().map(|r| r.to_string());
    let expected = std::env::var("AWS_REGION").unwrap_or_else(|_| "us-east-1".into());
    assert_eq!(region.as_deref(), Some(expected.as_str()));
    if mode == "no-credentials" {
        let digest = format!("sha256:{}", "ef".repeat(32));
        let err = store.read_blob(&digest, 100).await.unwrap_err();
        eprintln!("without credentials: {err}");
        assert!(matches!(err, BlobError::Denied { .. }), "{err}");
        assert!(err.is_permanent());
        assert!(err.to_string().contains("AWS_ACCESS_KEY_ID"), "{err}");
        println!("env_child ok");
        return;
    }
    // Path-style requests to the endpoint from the environment, signed with its credentials
    // (moto accepts any, but the SDK refuses to send a request it cannot sign).
    let digest = put_blob(&store, b"from the environment").await;
    assert_eq!(
        store.read_blob(&digest, 100).await.unwrap(),
        b"from the environment"
    );
    println!("env_child ok");
}

/// A bucket mirror (`agent::mirror`) is asked for presigned range GETs; a mirror that answers
/// an error, or breaks a body off, leaves the rest to the origin, and the bytes are the blob's.
#[tokio::test]
async fn a_bucket_mirror_serves_presigned_ranges_and_the_origin_takes_over_its_failures() {
    use agent::mirror::{MirrorSpec, Mirrors, Origin};
    let (moto, store) = store_on_moto("images/mirrored").await;
    let blob = pseudo_random_bytes(7, 600_000);
    let digest = put_blob(&store, &blob).await;
    let tier = FaultProxy::start(&format!("127.0.0.1:{}", moto.port())).unwrap();
    let spec = MirrorSpec {
        origin: Origin::Bucket(BUCKET.into()),
        url: format!("http://{}", tier.host()).parse().unwrap(),
        timeout: Duration::from_secs(2),
        slice: 256 << 10,
        backoff: Duration::from_millis(300),
        max_backoff: Duration::from_secs(1),
    };
    let mirrors = Mirrors::new(&[spec]).unwrap();
    let mirrored = mirrors.s3_store(store.clone());
    assert_eq!(mirrored.id(), store.id());
    assert_eq!(mirrored.request_alignment(), Some(256 << 10));

    let ranges = [0..1, 1000..300_000, 599_999..600_000];
    for range in ranges.clone() {
        let got = mirrored.read_range(&digest, range.clone()).await.unwrap();
        assert!(got == slice(&blob, &range), "bytes differ in {range:?}");
    }
    assert_eq!(mirrored.read_blob(&digest, 1 << 20).await.unwrap(), blob);
    let (shown, origins) = mirrors.snapshot();
    assert_eq!(tier.ranged_requests(), 3);
    assert_eq!((shown[0].requests, shown[0].failures), (4, 0));
    assert_eq!(shown[0].bytes, 1 + 299_000 + 1 + 600_000);
    assert_eq!((origins[0].requests, origins[0].bytes), (0, 0));

    // An error answer: the origin serves it, and the mirror sits out its backoff.
    tier.inject(
        HttpFault::Status {
            status: 503,
            retry_after: None,
        },
        1,
    );
    let range = 4096..200_000;
    let got = mirrored.read_range(&digest, range.clone()).await.unwrap();
    assert!(got == slice(&blob, &range));
    mirrored.read_range(&digest, range.clone()).await.unwrap();
    let (shown, origins) = mirrors.snapshot();
    assert_eq!(tier.ranged_requests(), 4, "skipped within its backoff");
    assert!(!shown[0].up && shown[0].failures == 1, "{shown:?}");
    assert_eq!(origins[0].requests, 2);

    // A body broken off halfway: the origin sends only the rest.
    tokio::time::sleep(Duration::from_millis(350)).await;
    tier.inject(HttpFault::ResetMidBody, 1);
    let range = 10_000..410_000;
    let got = mirrored.read_range(&digest, range.clone()).await.unwrap();
    assert!(got == slice(&blob, &range));
    let (shown, origins) = mirrors.snapshot();
    assert_eq!(shown[0].failures, 2);
    let from_mirror = shown[0].bytes - (1 + 299_000 + 1 + 600_000);
    assert!(from_mirror > 0 && from_mirror < 400_000, "{from_mirror}");
    assert_eq!(origins[0].bytes, 2 * 195_904 + (400_000 - from_mirror));
}
