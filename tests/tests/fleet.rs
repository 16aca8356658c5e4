//! End-to-end: a fleet of four hosts (network namespaces, each with its own lazyd) cold-starts
//! the same image at the same moment through the caching tier (nginx from `packaging/tier/`,
//! slice + cache lock) in front of a shaped, delayed origin (a registry; S3 through moto):
//!
//! 1. every host warms the whole image at once, then mounts it: each mounted tree equals the
//!    umoci unpack, and the origin served each slice of each blob once, all of them to the
//!    tier (its request log, per blob and range, and its reply bytes);
//! 2. a second image (the same tree cut into other chunks, so nothing is cached): the tier is
//!    stopped while the first host's warm is under way; every host falls back to the origin and
//!    finishes, the trees are still equal, and each host's mirror metrics show the failure.
//!
//! Needs root, `/dev/fuse`, `ip`/`tc` (iproute2), nginx with the slice module, docker-registry,
//! skopeo and umoci (scripts/setup.sh installs them); moto for the S3 case.

use std::collections::HashMap;
use std::net::IpAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use lazy_tests::fleet::{metric, Fleet, FleetConfig, Published};
use lazy_tests::mount::require_root_and_fuse;
use lazy_tests::{debian, reference, tree};

/// The tier's slice (`FleetConfig::slice` below); the bound on what the origin may send per
/// request.
const SLICE: u64 = 128 << 10;
/// Generous room for one HTTP reply's status line and headers.
const REPLY_HEAD: u64 = 2048;
/// Generous room for one reply that is not a slice (a manifest, a referrers list, a listing).
const SMALL_REPLY: u64 = 64 << 10;

/// Which origin a case publishes to.
#[derive(Clone, Copy)]
enum Origin {
    Registry,
    S3,
}

fn publish(fleet: &Fleet, origin: Origin, name: &str, convert: &[&str]) -> Published {
    let image = debian::minbase_image(&debian::default_cache_dir()).unwrap();
    match origin {
        Origin::Registry => fleet
            .publish_registry(&image, &format!("fleet/debian:{name}"), convert)
            .unwrap(),
        Origin::S3 => fleet
            .publish_s3(&image, &format!("debian/{name}"), convert)
            .unwrap(),
    }
}

/// Whether an origin request reads a blob (index, config or data): a registry's
/// `/v2/REPO/blobs/sha256:HEX`, an S3 image's `/BUCKET/PREFIX/blobs/sha256/HEX`; not manifests.
fn reads_blob(path: &str) -> bool {
    path.contains("/blobs/sha256")
}

/// Mounts `image` on every host (under MNT/NAME) and compares each tree with `expected`, the
/// hosts in parallel.
fn mount_and_compare_all(fleet: &mut Fleet, image: &str, name: &str, expected: &Path) {
    let mounts: Vec<_> = fleet
        .hosts_mut()
        .iter_mut()
        .map(|host| {
            let mnt = host.mnt.join(name);
            std::fs::create_dir_all(&mnt).unwrap();
            host.lazyd.mount(image, &mnt);
            mnt
        })
        .collect();
    std::thread::scope(|scope| {
        for mnt in &mounts {
            scope.spawn(move || tree::assert_trees_equal(expected, mnt));
        }
    });
    for (host, mnt) in fleet.hosts().iter().zip(&mounts) {
        host.lazyd
            .ctl_ok([std::ffi::OsStr::new("umount"), mnt.as_os_str()]);
    }
}

fn fleet_cold_starts_through_the_tier_and_falls_back_when_it_stops(origin: Origin) {
    require_root_and_fuse();
    let started = Instant::now();
    let image = debian::minbase_image(&debian::default_cache_dir()).unwrap();
    let expected = reference::umoci_unpack_cached(&image).unwrap();
    let mut fleet = Fleet::start(FleetConfig {
        s3: matches!(origin, Origin::S3),
        // The image is 88 MB stored: at the default 200 Mbit/s, four hosts falling back to the
        // origin would take 14 s. What is checked here is who fetches what, not speed.
        origin_rate: "1gbit".into(),
        slice: "128K".into(),
        ..FleetConfig::default()
    })
    .unwrap();
    let first = publish(&fleet, origin, "first", &[]);
    // The same tree in other chunks: nothing of it is in any cache yet.
    let second = publish(&fleet, origin, "second", &["--chunk-size", "512K"]);
    let tier = fleet.tier_ip();
    let hosts: Vec<IpAddr> = fleet.hosts().iter().map(|h| h.ip.into()).collect();
    println!("fleet up, images published in {:?}", started.elapsed());

    // Phase 1: four hosts warm the whole image at once, through the tier.
    for (i, (out, took)) in fleet.warm_all(&first.reference, false).iter().enumerate() {
        assert!(out.status.success(), "host {i}'s warm: {out:?}");
        println!("host {i} warmed {} in {took:?}", first.reference);
    }
    mount_and_compare_all(&mut fleet, &first.reference, "first", &expected);
    let requests = fleet.origin_requests();
    let data: Vec<_> = requests.iter().filter(|r| reads_blob(&r.path)).collect();
    for host in &hosts {
        let direct: Vec<_> = data.iter().filter(|r| r.client == *host).collect();
        assert!(
            direct.is_empty(),
            "host {host} read data from the origin, not the tier: {direct:?}"
        );
    }
    let mut per_slice: HashMap<(&str, Option<&str>), usize> = HashMap::new();
    for r in data.iter().filter(|r| r.client == tier) {
        *per_slice
            .entry((r.path.as_str(), r.range.as_deref()))
            .or_default() += 1;
    }
    let twice: Vec<_> = per_slice.iter().filter(|(_, &n)| n > 1).collect();
    assert!(
        twice.is_empty(),
        "the origin sent slices more than once: {twice:?}"
    );
    let slices = per_slice.len() as u64;
    let to_tier = fleet.origin_bytes_to(tier);
    println!(
        "phase 1: the origin served {slices} distinct slices, {to_tier} bytes to the tier, for \
         {} stored bytes; {} requests in all",
        first.stored_bytes,
        requests.len()
    );
    assert!(
        to_tier >= first.stored_bytes,
        "the tier fetched {to_tier} bytes, less than the image's {}",
        first.stored_bytes
    );
    let other = requests
        .iter()
        .filter(|r| r.client == tier && !reads_blob(&r.path))
        .count() as u64;
    assert!(
        to_tier <= slices * (SLICE + REPLY_HEAD) + other * SMALL_REPLY,
        "the origin sent the tier {to_tier} bytes for {slices} slices and {other} other requests"
    );
    let mirror = match origin {
        Origin::Registry => fleet.registry_mirror(),
        Origin::S3 => fleet.s3_mirror(),
    };
    // lazyd labels a mirror with its normalized URL (a `/` added).
    let label = format!("mirror=\"{mirror}");
    for (i, host) in fleet.hosts().iter().enumerate() {
        let metrics = host.metrics().unwrap();
        let mirror_bytes = metric(&metrics, "lazy_mirror_bytes_total", &label);
        assert!(
            mirror_bytes >= first.stored_bytes as f64,
            "host {i} fetched {mirror_bytes} bytes from the mirror, the image has {}",
            first.stored_bytes
        );
        assert_eq!(
            metric(&metrics, "lazy_mirror_failures_total", &label),
            0.0,
            "host {i}"
        );
        assert_eq!(metric(&metrics, "lazy_mirror_up", &label), 1.0, "host {i}");
    }

    // Phase 2: the tier stops once the first host's warm is under way.
    let before = fleet.origin_requests().len();
    let (warms, stopped_after) = std::thread::scope(|scope| {
        let fleet = &fleet;
        let warms = scope.spawn(|| fleet.warm_all(&second.reference, false));
        let deadline = Instant::now() + Duration::from_secs(20);
        while fleet.hosts()[0].lazyd.warm_fetched_bytes() == 0 {
            assert!(
                Instant::now() < deadline,
                "the first host's warm did not start"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        let stopping = Instant::now();
        fleet.stop_tier().unwrap();
        (warms.join().unwrap(), stopping.elapsed())
    });
    println!("phase 2: tier stopped; the warms ended {stopped_after:?} later");
    for (i, (out, took)) in warms.iter().enumerate() {
        assert!(
            out.status.success(),
            "host {i}'s warm without the tier: {out:?}"
        );
        println!("host {i} warmed {} in {took:?}", second.reference);
    }
    mount_and_compare_all(&mut fleet, &second.reference, "second", &expected);
    let fallback = &fleet.origin_requests()[before..];
    for (i, host) in fleet.hosts().iter().enumerate() {
        let direct = fallback
            .iter()
            .filter(|r| r.client == IpAddr::from(host.ip) && reads_blob(&r.path))
            .count();
        let metrics = host.metrics().unwrap();
        let failures = metric(&metrics, "lazy_mirror_failures_total", &label);
        let origin_bytes = metric(&metrics, "lazy_origin_bytes_total", "");
        println!(
            "host {i}: {direct} data requests to the origin, {failures} mirror failures, \
             {origin_bytes} bytes from the origin"
        );
        assert!(direct > 0, "host {i} never fell back to the origin");
        assert!(failures >= 1.0, "host {i}: no mirror failure counted");
        assert!(origin_bytes > 0.0, "host {i}: no origin bytes counted");
        assert_eq!(metric(&metrics, "lazy_mirror_up", &label), 0.0, "host {i}");
    }
    println!("whole test: {:?}", started.elapsed());
}

#[test]
fn registry_fleet_cold_starts_through_the_tier_and_falls_back_when_it_stops() {
    fleet_cold_starts_through_the_tier_and_falls_back_when_it_stops(Origin::Registry);
}

#[test]
fn s3_fleet_cold_starts_through_the_tier_and_falls_back_when_it_stops() {
    fleet_cold_starts_through_the_tier_and_falls_back_when_it_stops(Origin::S3);
}
