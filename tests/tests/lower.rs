//! End-to-end tests of the routes a containerd snapshotter uses: `POST /v1/image/resolve`,
//! `POST /v1/lower` and `POST /v1/lower/release`, on a real `lazyd`, a real `docker-registry`
//! on 127.0.0.1 and small two-layer images converted with `lazyctl convert`.
//!
//! - resolve gives the source image's diff_ids and a pinned reference that still opens the same
//!   lazy image after its tag moved; an image with no lazy version is a 400 saying so;
//! - holders share one FUSE mount of the lower; asking again is idempotent, another image under
//!   a held name is a 409, an umount of a held lower is a 409 naming the holders; releasing one
//!   holder keeps the lower, releasing the last unmounts it; an unknown holder is a 404;
//! - holders and their lower survive a restart of lazyd (handed over), and a holder whose lower
//!   did not survive (lazyd stopped and started again) gets it mounted again on its next ask;
//! - a hold whose client goes away before the answer (a snapshotter killed mid-request) is
//!   carried out all the same, recorded, and its lower handed over at a restart.

use std::io::Write;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use lazy_tests::agent::Lazyd;
use lazy_tests::mount::{is_fuse_mounted, parse_mountinfo, require_root_and_fuse};
use lazy_tests::oci::{Compression, Entry, Layer, LayoutBuilder, LayoutInfo};
use lazy_tests::proxy::DelayProxy;
use lazy_tests::reference::skopeo_copy;
use lazy_tests::registry::LocalRegistry;
use serde_json::{json, Value};

/// No recording, and a lower that goes with its last user at once.
const AGENT_CONFIG: &str = "[profile]\nrecord = false\n[mount]\nlower_linger = \"0s\"\n";

/// A two-layer image tagged `tag` in the layout at `dir` whose `/app/version` holds `version`.
fn app_image(dir: &Path, tag: &str, version: &str) -> LayoutInfo {
    LayoutBuilder::new(tag)
        .layer(Layer::new(Compression::Gzip).entries([
            Entry::dir("etc"),
            Entry::file("etc/os-release", "ID=lowertest\n"),
        ]))
        .layer(Layer::new(Compression::Gzip).entries([
            Entry::dir("app"),
            Entry::file("app/version", format!("{version}\n")),
        ]))
        .write(dir)
        .unwrap()
}

/// `POST path body`; panics with the agent's log unless the answer has status `want`.
fn post(agent: &Lazyd, path: &str, body: Value, want: u16) -> Value {
    let (code, answer) = agent.http_post(path, &body).unwrap();
    assert_eq!(
        code,
        want,
        "POST {path} {body}: {answer}\n--- lazyd log ---\n{}",
        agent.log()
    );
    answer
}

fn hold(agent: &Lazyd, holder: &str, image: &str) -> Value {
    post(
        agent,
        "/v1/lower",
        json!({"holder": holder, "image": image}),
        200,
    )
}

fn release(agent: &Lazyd, holder: &str) -> Value {
    post(agent, "/v1/lower/release", json!({"holder": holder}), 200)
}

/// The FUSE mounts under `dir`.
fn fuse_mounts_under(dir: &Path) -> Vec<PathBuf> {
    let text = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    parse_mountinfo(&text)
        .into_iter()
        .filter(|m| m.mount_point.starts_with(dir) && m.fs_type.starts_with("fuse"))
        .map(|m| m.mount_point)
        .collect()
}

fn holder_names(status: &Value) -> Vec<String> {
    status["lower_holders"]
        .as_array()
        .unwrap_or_else(|| panic!("no lower_holders in {status}"))
        .iter()
        .map(|h| h["holder"].as_str().unwrap().to_string())
        .collect()
}

fn mount_count(status: &Value) -> usize {
    status["mounts"].as_array().unwrap().len()
}

fn lower_path(info: &Value) -> PathBuf {
    PathBuf::from(info["lower"].as_str().unwrap())
}

#[test]
fn resolve_pins_the_lazy_image_and_lists_its_source_diff_ids() {
    require_root_and_fuse();
    let layouts = tempfile::tempdir().unwrap();
    let registry = LocalRegistry::start().unwrap();
    let v1 = app_image(layouts.path(), "v1", "one");
    let lazy = registry.push_and_convert(&v1, "lower/app:v1").unwrap();
    // Every resolve asks the registry, so the moved tag below is seen at once.
    let config = format!("[fetch]\nresolve_ttl = \"0s\"\n{AGENT_CONFIG}");
    let agent = Lazyd::start(&config).unwrap();

    let resolved = post(&agent, "/v1/image/resolve", json!({"image": lazy}), 200);
    println!("resolved: {resolved}");
    assert_eq!(resolved["image"], lazy.as_str());
    let expected: Vec<&str> = v1.layers.iter().map(|l| l.diff_id.as_str()).collect();
    assert_eq!(resolved["diff_ids"], json!(expected));
    let digest = resolved["manifest_digest"].as_str().unwrap().to_string();
    assert!(digest.starts_with("sha256:"), "{digest}");
    let pinned = resolved["pinned"].as_str().unwrap().to_string();
    assert_eq!(pinned, format!("{}/lower/app@{digest}", registry.host()));
    // The source image's reference finds the same lazy image (by its referrer or -lazy tag).
    let source = format!("docker://{}/lower/app:v1", registry.host());
    let by_source = post(&agent, "/v1/image/resolve", json!({"image": source}), 200);
    assert_eq!(by_source["manifest_digest"], digest.as_str());
    assert_eq!(by_source["diff_ids"], json!(expected));

    // The tag moves to another image; the pinned reference still opens the first one.
    let v2 = app_image(layouts.path(), "v2", "two");
    registry.push_and_convert(&v2, "lower/app:v1").unwrap();
    let moved = post(&agent, "/v1/image/resolve", json!({"image": source}), 200);
    assert_ne!(
        moved["manifest_digest"],
        digest.as_str(),
        "the tag did not move"
    );
    let held = hold(&agent, "pinned", &pinned);
    assert_eq!(held["manifest_digest"], digest.as_str());
    assert_eq!(
        std::fs::read_to_string(lower_path(&held).join("app/version")).unwrap(),
        "one\n"
    );
    release(&agent, "pinned");

    // An image that was never converted.
    let plain = format!("docker://{}/plain/app:v1", registry.host());
    skopeo_copy(&v1.oci_ref(), &plain).unwrap();
    let refused = post(&agent, "/v1/image/resolve", json!({"image": plain}), 400);
    let message = refused["error"].as_str().unwrap();
    assert!(
        message.contains("is not a lazy image and has no lazy version")
            && message.contains("lazyctl convert"),
        "{message}"
    );
}

#[test]
fn holders_share_one_lower_which_goes_with_the_last_and_survives_a_restart() {
    require_root_and_fuse();
    let layouts = tempfile::tempdir().unwrap();
    let registry = LocalRegistry::start().unwrap();
    let v1 = app_image(layouts.path(), "v1", "one");
    let lazy = registry.push_and_convert(&v1, "lower/app:v1").unwrap();
    let v2 = app_image(layouts.path(), "v2", "two");
    let other = registry.push_and_convert(&v2, "lower/app:v2").unwrap();
    let mut agent = Lazyd::start(AGENT_CONFIG).unwrap();
    let lowers = agent.state_dir().join("lower");

    let a = hold(&agent, "snap-a", &lazy);
    let digest = a["manifest_digest"].as_str().unwrap();
    let lower = lower_path(&a);
    assert_eq!(lower, lowers.join(digest.strip_prefix("sha256:").unwrap()));
    assert_eq!(a["holder"], "snap-a");
    assert_eq!(a["image"], lazy.as_str());
    assert!(is_fuse_mounted(&lower).unwrap());
    assert_eq!(
        std::fs::read_to_string(lower.join("app/version")).unwrap(),
        "one\n"
    );
    // The same holder again: the same answer, nothing new.
    assert_eq!(hold(&agent, "snap-a", &lazy), a);
    // A second holder shares the mount.
    let b = hold(&agent, "snap-b", &lazy);
    assert_eq!(lower_path(&b), lower);
    assert_eq!(fuse_mounts_under(&lowers), std::slice::from_ref(&lower));
    let status = agent.status();
    assert_eq!(holder_names(&status), ["snap-a", "snap-b"]);
    assert_eq!(mount_count(&status), 1, "{}", status["mounts"]);
    let (_, metrics) = agent.http_get("/metrics").unwrap();
    assert!(metrics.contains("lazyd_lower_holders 2"), "{metrics}");

    // Another image under a held name; a bad name; an umount of the held lower.
    let conflict = post(
        &agent,
        "/v1/lower",
        json!({"holder": "snap-a", "image": other}),
        409,
    );
    let said = conflict["error"].as_str().unwrap();
    assert!(
        said.contains("holder snap-a holds the lower of") && said.contains(&other),
        "{said}"
    );
    let bad = post(
        &agent,
        "/v1/lower",
        json!({"holder": "../x", "image": lazy}),
        400,
    );
    let said = bad["error"].as_str().unwrap();
    assert!(said.contains("\"../x\" must start with a letter"), "{said}");
    let umount = agent.ctl([std::ffi::OsStr::new("umount"), lower.as_os_str()]);
    let said = String::from_utf8_lossy(&umount.stderr);
    assert!(!umount.status.success(), "umount of a held lower succeeded");
    assert!(said.contains("holder(s) snap-a, snap-b"), "{said}");
    assert!(is_fuse_mounted(&lower).unwrap());

    // Releasing one keeps the lower for the other.
    assert_eq!(release(&agent, "snap-a"), json!({"holder": "snap-a"}));
    assert!(is_fuse_mounted(&lower).unwrap());
    assert_eq!(holder_names(&agent.status()), ["snap-b"]);

    // A restart hands the lower and its holder over.
    let old = agent.server_pid();
    let new = agent.restart_server().unwrap();
    assert_ne!(old, new);
    let status = agent.status();
    assert_eq!(holder_names(&status), ["snap-b"]);
    assert_eq!(status["lower_holders"][0], b);
    assert_eq!(status["mounts"][0]["restarts_survived"], 1);
    assert_eq!(
        std::fs::read_to_string(lower.join("app/version")).unwrap(),
        "one\n"
    );
    assert_eq!(hold(&agent, "snap-b", &lazy), b);

    // The last release unmounts it (no linger here).
    release(&agent, "snap-b");
    assert!(fuse_mounts_under(&lowers).is_empty());
    let status = agent.status();
    assert_eq!(mount_count(&status), 0, "{}", status["mounts"]);
    assert!(holder_names(&status).is_empty());
    let unknown = post(
        &agent,
        "/v1/lower/release",
        json!({"holder": "snap-b"}),
        404,
    );
    assert!(
        unknown["error"].as_str().unwrap().contains("snap-b"),
        "{unknown}"
    );
}

#[test]
fn a_holders_lower_is_mounted_again_after_lazyd_stopped_without_handing_it_over() {
    require_root_and_fuse();
    let layouts = tempfile::tempdir().unwrap();
    let registry = LocalRegistry::start().unwrap();
    let v1 = app_image(layouts.path(), "v1", "one");
    let lazy = registry.push_and_convert(&v1, "lower/app:v1").unwrap();
    let root = tempfile::tempdir().unwrap();

    let agent = Lazyd::start_in(root.path(), AGENT_CONFIG, &[]).unwrap();
    let held = hold(&agent, "snap-a", &lazy);
    let lower = lower_path(&held);
    assert!(is_fuse_mounted(&lower).unwrap());
    // Stopping for good unmounts every mount that is not in use, the held lower too.
    assert!(agent.stop().unwrap().success());
    assert!(!is_fuse_mounted(&lower).unwrap());

    let agent = Lazyd::start_in(root.path(), AGENT_CONFIG, &[]).unwrap();
    let status = agent.status();
    assert_eq!(status["lower_holders"], json!([held]));
    assert_eq!(mount_count(&status), 0, "{}", status["mounts"]);
    assert_eq!(hold(&agent, "snap-a", &lazy), held);
    assert!(is_fuse_mounted(&lower).unwrap());
    assert_eq!(
        std::fs::read_to_string(lower.join("app/version")).unwrap(),
        "one\n"
    );
    release(&agent, "snap-a");
    assert!(!is_fuse_mounted(&lower).unwrap());
}

#[test]
fn a_hold_whose_client_leaves_is_carried_out_and_handed_over_at_a_restart() {
    require_root_and_fuse();
    let layouts = tempfile::tempdir().unwrap();
    let registry = LocalRegistry::start().unwrap();
    let v1 = app_image(layouts.path(), "v1", "one");
    let lazy = registry.push_and_convert(&v1, "lower/app:v1").unwrap();
    // Each request to the registry takes 300 ms more, so the hold is still opening the image
    // (four requests) when its client has long gone.
    let proxy = DelayProxy::start(&registry.host(), Duration::from_millis(300)).unwrap();
    let slow = lazy.replace(&registry.host(), &proxy.host());
    let mut agent = Lazyd::start(AGENT_CONFIG).unwrap();
    {
        let mut client = UnixStream::connect(agent.socket()).unwrap();
        let body = json!({"holder": "gone", "image": slow}).to_string();
        write!(
            client,
            "POST /v1/lower HTTP/1.1\r\nHost: lazyd\r\nContent-Type: application/json\r\n\
             Content-Length: {}\r\n\r\n{body}",
            body.len()
        )
        .unwrap();
        // Long enough for lazyd to be handling it (opening the image through the proxy takes
        // over a second); then closed, without reading the answer.
        std::thread::sleep(Duration::from_millis(300));
    }
    let start = Instant::now();
    let lower = loop {
        let status = agent.status();
        if let Some(held) = status["lower_holders"].as_array().and_then(|h| h.first()) {
            break lower_path(held);
        }
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "the hold of a client that left was dropped: {status}\n--- lazyd log ---\n{}",
            agent.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(is_fuse_mounted(&lower).unwrap());
    // Recorded in the mount table: the next lazyd serves it.
    agent.restart_server().unwrap();
    assert_eq!(holder_names(&agent.status()), ["gone"]);
    assert_eq!(
        std::fs::read_to_string(lower.join("app/version")).unwrap(),
        "one\n"
    );
    release(&agent, "gone");
}
