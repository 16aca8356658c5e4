//! End-to-end tests of lazy images under containerd: a private containerd 1.6 (Debian's, with
//! `ctr` and stargz-snapshotter's `ctr-remote`), a real `docker-registry` on 127.0.0.1, the
//! Debian images of the fixtures, and `lazy-snapshotter` as containerd's `lazyimg` proxy plugin
//! over a real `lazyd`.
//!
//! - the baseline, with containerd's own overlayfs snapshotter: `ctr image pull` of the Debian +
//!   python3 image and `ctr run` of `python3 -c` print what they should;
//! - lazy: `ctr-remote image rpull --snapshotter lazyimg` of an image
//!   converted with `lazyctl convert` makes the registry send no layer blob of the original,
//!   and leaves the image mounted in lazyd,
//!   and the container's start fetches well under half the image; `ctr run` prints what it
//!   should; a container's write lands in a snapshot under the snapshotter's root, not in
//!   lazyd's lower mount;
//! - fallback: an image without a lazy version is unpacked by the
//!   snapshotter into a tree equal (metadata and content) to the overlayfs snapshotter's;
//! - restart: after a pull, the snapshotter killed and started again
//!   and lazyd's server replaced, `ctr run` still works;
//! - remove: once the container and the image are removed, no
//!   snapshot, no snapshot directory, no lower holder and no lower mount are left.
//! - Kubernetes: containerd's CRI plugin (`snapshotter = "lazyimg"`,
//!   `disable_snapshot_annotations = false`) pulls through the snapshotter on a kubelet's
//!   PullImage with no layer blob sent, the layer carries the CRI image labels, the image runs,
//!   and RemoveImage frees its snapshots (pods themselves need CNI and a pause image, which this
//!   machine has not);
//! - mixing: an image built on all of a lazy image's layers is unpacked over the lazy mount and
//!   equals the overlayfs snapshotter's tree; an image sharing only a lower layer of a lazy
//!   image is refused in that namespace with a message naming the lazy image, and unpacked in a
//!   containerd that has not pulled the lazy image.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use lazy_tests::agent::{backend_bytes, Lazyd};
use lazy_tests::containerd::{
    chain_id, Containerd, ContainerdOptions, LazySnapshotter, SNAPSHOTTER,
};
use lazy_tests::debian;
use lazy_tests::mount::{parse_mountinfo, require_root_and_fuse, require_runtime};
use lazy_tests::reference::skopeo_copy;
use lazy_tests::registry::LocalRegistry;
use lazy_tests::tree::assert_trees_equal;

/// One at a time: each test runs a containerd, a registry and containers; on a small machine
/// parallel ones would only slow each other down.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// No recorded profiles (so no start prefetches what an earlier one read), no whole-image
/// prefetch behind the reads (so the bytes fetched are what the container read, and the guesses
/// around it), and a lower that goes with its last holder (the remove test checks nothing is
/// left).
const AGENT_CONFIG: &str = "[profile]\nrecord = false\n[mount]\nlower_linger = \"0s\"\n\
                            [background]\nwhole_image = \"never\"\n";

/// What the python3 containers run, and what it prints.
const PYTHON_SCRIPT: &str =
    "import json, os, sys, email; print(json.dumps([sum(range(10)), os.getuid(), sys.version_info[0]]))";
const PYTHON_PRINTS: &str = "[45, 0, 3]\n";

/// How long containerd may take to dial a restarted snapshotter again (its backoff is at most
/// 3 s).
const RECONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// How long lazyd may take to let go of a lower after its last holder went.
const RELEASE_TIMEOUT: Duration = Duration::from_secs(20);

/// `HOST/REPO:TAG` of the Debian + python3 image pushed plainly, in `registry`.
fn push_python(registry: &LocalRegistry) -> String {
    let image = debian::python_image(&debian::default_python_cache_dir()).unwrap();
    let reference = format!("{}/plain/python:bookworm", registry.host());
    skopeo_copy(&image.oci_ref(), &format!("docker://{reference}")).unwrap();
    reference
}

/// The Debian + python3 image and its lazy version (`lazyctl convert`, the original as its
/// subject) in `registry`; returns the original's `HOST/REPO:TAG`, which containerd pulls.
fn push_and_convert_python(registry: &LocalRegistry) -> String {
    let image = debian::python_image(&debian::default_python_cache_dir()).unwrap();
    let lazy = registry
        .push_and_convert(&image, "lazy/python:bookworm")
        .unwrap();
    assert!(lazy.ends_with("-lazy"), "{lazy}");
    format!("{}/lazy/python:bookworm", registry.host())
}

/// `skopeo inspect WHAT` (`--raw`: the manifest, `--config`: the config) of `reference` in the
/// test registry.
fn skopeo_inspect(reference: &str, what: &str) -> serde_json::Value {
    let out = std::process::Command::new("skopeo")
        .args(["inspect", what, "--tls-verify=false"])
        .arg(format!("docker://{reference}"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "skopeo inspect {what} {reference}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// Asks `ready` every `every` until it gives a value; after `timeout` fails with what it said
/// last.
fn wait_for<T>(
    timeout: Duration,
    every: Duration,
    mut ready: impl FnMut() -> Result<T, String>,
) -> T {
    let start = Instant::now();
    loop {
        match ready() {
            Ok(value) => return value,
            Err(why) => assert!(start.elapsed() < timeout, "after {timeout:?}: {why}"),
        }
        std::thread::sleep(every);
    }
}

/// The layers of `reference`'s manifest in the registry: `(digest, size)`.
fn registry_layers(reference: &str) -> Vec<(String, u64)> {
    let manifest = skopeo_inspect(reference, "--raw");
    manifest["layers"]
        .as_array()
        .unwrap_or_else(|| panic!("no layers in {manifest}"))
        .iter()
        .map(|l| {
            (
                l["digest"].as_str().unwrap().to_string(),
                l["size"].as_u64().unwrap(),
            )
        })
        .collect()
}

/// The registry's access-log lines that GET a blob among `digests`
/// (`"GET /v2/REPO/blobs/sha256:... HTTP/1.1" 200 ...`).
fn blob_gets(registry_log: &str, digests: &[String]) -> Vec<String> {
    registry_log
        .lines()
        .filter(|line| {
            line.contains("\"GET /v2/")
                && digests
                    .iter()
                    .any(|d| line.contains(&format!("/blobs/{d} ")))
        })
        .map(str::to_string)
        .collect()
}

/// The bytes of the bodies the registry sent, from its access log's lines (`"GET ..." 200
/// SIZE`).
fn bytes_sent(registry_log: &str) -> u64 {
    registry_log
        .lines()
        .filter_map(|line| {
            let after = line.split("HTTP/1.1\" ").nth(1)?;
            let mut fields = after.split_whitespace();
            let _status = fields.next()?;
            fields.next()?.parse::<u64>().ok()
        })
        .sum()
}

/// A lazyd, a lazy-snapshotter over it and a containerd with it as `lazyimg`.
struct LazyStack {
    // Dropped in this order: containerd (its tasks and mounts) before the snapshotter, the
    // snapshotter before lazyd.
    containerd: Containerd,
    snapshotter: LazySnapshotter,
    agent: Lazyd,
}

impl LazyStack {
    fn start() -> LazyStack {
        LazyStack::start_with(ContainerdOptions::default())
    }

    /// With containerd's `options` (the snapshotter's socket added).
    fn start_with(options: ContainerdOptions) -> LazyStack {
        let agent = Lazyd::start(AGENT_CONFIG).unwrap();
        let snapshotter = LazySnapshotter::start(&agent.socket()).unwrap();
        let containerd = Containerd::start(&ContainerdOptions {
            snapshotter: Some(snapshotter.socket()),
            ..options
        })
        .unwrap();
        LazyStack {
            containerd,
            snapshotter,
            agent,
        }
    }

    /// `ctr-remote image rpull --plain-http --snapshotter lazyimg REFERENCE`.
    fn rpull(&self, reference: &str) {
        let t = Instant::now();
        self.containerd.ctr_remote_ok([
            "image",
            "rpull",
            "--plain-http",
            "--snapshotter",
            SNAPSHOTTER,
            reference,
        ]);
        println!("rpull {reference}: {:.2} s", t.elapsed().as_secs_f64());
    }

    /// `ctr run [--rm] --snapshotter lazyimg REFERENCE ID CMD...`; returns its stdout.
    fn run(&self, rm: bool, reference: &str, id: &str, cmd: &[&str]) -> String {
        let mut args = vec!["run"];
        if rm {
            args.push("--rm");
        }
        args.extend(["--snapshotter", SNAPSHOTTER, reference, id]);
        args.extend(cmd);
        let t = Instant::now();
        let out = self.containerd.ctr_ok(&args);
        println!("ctr run {id}: {:.2} s", t.elapsed().as_secs_f64());
        out
    }

    /// The FUSE mounts under lazyd's `state/lower/`: the shared lowers.
    fn lower_mounts(&self) -> Vec<PathBuf> {
        mounts_under(&self.agent.state_dir().join("lower"))
    }
}

/// The mounts at or below `dir` now.
fn mounts_under(dir: &Path) -> Vec<PathBuf> {
    let text = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    parse_mountinfo(&text)
        .into_iter()
        .filter(|m| m.mount_point.starts_with(dir))
        .map(|m| m.mount_point)
        .collect()
}

/// The files `snapshots/*/fs/REL` under the snapshotter's root.
fn in_snapshots(root: &Path, rel: &str) -> Vec<PathBuf> {
    let snapshots = root.join("snapshots");
    std::fs::read_dir(&snapshots)
        .unwrap_or_else(|e| panic!("{}: {e}", snapshots.display()))
        .map(|e| e.unwrap().path().join("fs").join(rel))
        .filter(|p| p.exists())
        .collect()
}

#[test]
fn ctr_pulls_and_runs_python_with_the_overlayfs_snapshotter() {
    lazy_tests::mount::require_root();
    require_runtime("runc");
    let _serial = serial();
    let registry = LocalRegistry::start().unwrap();
    let reference = push_python(&registry);
    let containerd = Containerd::start(&ContainerdOptions::default()).unwrap();

    let t = Instant::now();
    containerd.ctr_ok(["image", "pull", "--plain-http", &reference]);
    println!("ctr image pull: {:.2} s", t.elapsed().as_secs_f64());
    let images = containerd.ctr_ok(["image", "ls", "-q"]);
    assert!(images.lines().any(|l| l == reference), "{images}");

    let t = Instant::now();
    let out = containerd.ctr_ok([
        "run",
        "--rm",
        "--snapshotter",
        "overlayfs",
        &reference,
        "py0",
        "python3",
        "-c",
        PYTHON_SCRIPT,
    ]);
    println!("ctr run: {:.2} s", t.elapsed().as_secs_f64());
    assert_eq!(out, PYTHON_PRINTS);
    // --rm removed the container; its task and shim are gone.
    let containers = containerd.ctr_ok(["containers", "ls", "-q"]);
    assert!(
        containers.trim().is_empty(),
        "containers left: {containers}"
    );
    assert!(
        containerd.shims().is_empty(),
        "shims left: {:?}",
        containerd.shims()
    );
    // The pull sent the layers: the registry's access log shows each layer's GET.
    let layers: Vec<String> = registry_layers(&reference)
        .into_iter()
        .map(|(d, _)| d)
        .collect();
    let gets = blob_gets(&registry.log(), &layers);
    assert_eq!(
        gets.len(),
        layers.len(),
        "expected one GET per layer {layers:?}; the registry's log:\n{}",
        registry.log()
    );
}

#[test]
fn lazy_pull_sends_no_layer_blob_and_the_container_writes_to_its_own_snapshot() {
    require_root_and_fuse();
    require_runtime("runc");
    let _serial = serial();
    let registry = LocalRegistry::start().unwrap();
    let reference = push_and_convert_python(&registry);
    let layers = registry_layers(&reference);
    let image_bytes: u64 = layers.iter().map(|(_, size)| size).sum();
    let digests: Vec<String> = layers.into_iter().map(|(d, _)| d).collect();
    let stack = LazyStack::start();
    // The conversion downloaded the layers; what follows is the pull and the run.
    let mark = registry.log().len();

    stack.rpull(&reference);
    let gets = blob_gets(&registry.log()[mark..], &digests);
    assert!(
        gets.is_empty(),
        "the pull downloaded layers of the original image:\n{}",
        gets.join("\n")
    );
    let metrics = stack.snapshotter.metrics().unwrap();
    for line in [
        "lazy_snapshotter_layers_skipped_total{how=\"lazy\"} 1",
        "lazy_snapshotter_lazy_layers 1",
        "lazy_snapshotter_snapshots{kind=\"committed\"} 1",
        "lazy_snapshotter_requests_total{method=\"Prepare\"} 1",
    ] {
        assert!(
            metrics.lines().any(|l| l == line),
            "no {line} in:\n{metrics}"
        );
    }
    // The pulled image is mounted in lazyd for its top layer (--mount-at-pull), ahead of any
    // container.
    wait_for(RELEASE_TIMEOUT, Duration::from_millis(50), || {
        if stack.lower_mounts().is_empty() {
            return Err(format!(
                "the pulled lazy image was not mounted: {}",
                stack.agent.status()["lower_holders"]
            ));
        }
        Ok(())
    });

    let out = stack.run(false, &reference, "c1", &["python3", "-c", PYTHON_SCRIPT]);
    assert_eq!(out, PYTHON_PRINTS);
    let fetched = backend_bytes(&stack.agent.status());
    println!("python3 start: lazyd fetched {fetched} of the image's {image_bytes} bytes");
    assert!(
        fetched > 0 && fetched < image_bytes / 2,
        "lazyd fetched {fetched} bytes for a python3 start; the image is {image_bytes}"
    );
    // Still no layer blob: the start read through lazyd's lazy image, not the original. All
    // the registry sent (manifests, configs, the lazy index, the chunks read) is well under
    // half of the image.
    let log = registry.log();
    assert!(blob_gets(&log[mark..], &digests).is_empty());
    let sent = bytes_sent(&log[mark..]);
    println!("the registry sent {sent} bytes for the pull and the start");
    assert!(
        sent >= fetched && sent < image_bytes / 2,
        "the registry sent {sent} bytes (lazyd fetched {fetched}); the image is {image_bytes}"
    );

    // A write lands in the container's snapshot, while the lower it is overlaid on (mounted
    // as long as the container runs) stays as the image has it.
    stack.containerd.ctr_ok([
        "run",
        "-d",
        "--snapshotter",
        SNAPSHOTTER,
        &reference,
        "c2",
        "sh",
        "-c",
        "echo x > /root/written && sleep 120",
    ]);
    let root = stack.snapshotter.root();
    let written = wait_for(Duration::from_secs(30), Duration::from_millis(100), || {
        let found = in_snapshots(&root, "root/written");
        if found.is_empty() {
            return Err(format!(
                "no snapshots/*/fs/root/written under {} since the container started",
                root.display()
            ));
        }
        Ok(found)
    });
    assert_eq!(written.len(), 1, "{written:?}");
    assert_eq!(std::fs::read_to_string(&written[0]).unwrap(), "x\n");
    let lowers = stack.lower_mounts();
    assert!(
        !lowers.is_empty(),
        "no lower mounted under {} while a container runs over it",
        stack.agent.state_dir().join("lower").display()
    );
    for lower in &lowers {
        assert!(
            lower.join("etc/debian_version").exists(),
            "{} is not the image's tree",
            lower.display()
        );
        assert!(
            !lower.join("root/written").exists(),
            "the container's write reached the lower {}",
            lower.display()
        );
    }
    stack
        .containerd
        .ctr_ok(["tasks", "kill", "-s", "SIGKILL", "c2"]);
}

#[test]
fn an_image_without_a_lazy_version_is_unpacked_as_the_overlayfs_snapshotter_does() {
    require_root_and_fuse();
    require_runtime("runc");
    let _serial = serial();
    let registry = LocalRegistry::start().unwrap();
    let image = debian::minbase_image(&debian::default_cache_dir()).unwrap();
    let reference = format!("{}/plain/minbase:bookworm", registry.host());
    skopeo_copy(&image.oci_ref(), &format!("docker://{reference}")).unwrap();
    let stack = LazyStack::start();
    let ctr = &stack.containerd;

    for snapshotter in [SNAPSHOTTER, "overlayfs"] {
        ctr.ctr_ok([
            "image",
            "pull",
            "--plain-http",
            "--snapshotter",
            snapshotter,
            &reference,
        ]);
    }
    let lazy = ctr.ctr_ok([
        "run",
        "--rm",
        "--snapshotter",
        SNAPSHOTTER,
        &reference,
        "m1",
        "cat",
        "/etc/debian_version",
    ]);
    let plain = ctr.ctr_ok([
        "run",
        "--rm",
        "--snapshotter",
        "overlayfs",
        &reference,
        "m2",
        "cat",
        "/etc/debian_version",
    ]);
    assert!(lazy.starts_with("12."), "{lazy}");
    assert_eq!(lazy, plain);

    // Each snapshotter's view of the image's top layer, mounted read-only, compared.
    let diff_ids: Vec<String> = image.layers.iter().map(|l| l.diff_id.clone()).collect();
    let chain = chain_id(&diff_ids);
    let views = ctr.dir().join("views");
    let lazy_view = mount_view(ctr, SNAPSHOTTER, "view-lazy", &chain, &views.join("lazy"));
    let plain_view = mount_view(ctr, "overlayfs", "view-plain", &chain, &views.join("plain"));
    let stats = assert_trees_equal(&plain_view, &lazy_view);
    println!("lazyimg and overlayfs unpacks are equal: {stats}");
    for (snapshotter, key, target) in [
        (SNAPSHOTTER, "view-lazy", &lazy_view),
        ("overlayfs", "view-plain", &plain_view),
    ] {
        umount(target);
        // Unless containerd's collector removed the view already (see mount_view).
        let rm = ctr.ctr(["snapshots", "--snapshotter", snapshotter, "rm", key]);
        let stderr = String::from_utf8_lossy(&rm.stderr);
        assert!(
            rm.status.success() || stderr.contains("not found"),
            "ctr snapshots rm {key}: {stderr}"
        );
    }
}

/// A view `key` of the committed snapshot `chain` in `snapshotter`, mounted read-only at
/// `target` (created) as `ctr snapshots mounts` says; returns `target`.
fn mount_view(
    ctr: &Containerd,
    snapshotter: &str,
    key: &str,
    chain: &str,
    target: &Path,
) -> PathBuf {
    std::fs::create_dir_all(target).unwrap();
    // The mounts come with the view: a view no lease or container holds is garbage, and
    // containerd's collector (run after the earlier container's removal) may remove it at once.
    // A view's mount is its parents' directories, which the image holds, so it stays usable.
    let mounts = ctr.ctr_ok([
        "snapshots",
        "--snapshotter",
        snapshotter,
        "view",
        "--target",
        target.to_str().unwrap(),
        key,
        chain,
    ]);
    mount_read_only(&mounts, target);
    target.to_path_buf()
}

/// Runs what `ctr snapshots mounts TARGET KEY` printed (`mount -t TYPE SOURCE TARGET -o
/// OPTIONS`, one line per mount), read-only.
fn mount_read_only(printed: &str, target: &Path) {
    let lines: Vec<&str> = printed.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "expected one mount, got:\n{printed}");
    let fields: Vec<&str> = lines[0].split_whitespace().collect();
    let (kind, source, options) = match fields[..] {
        ["mount", "-t", kind, source, _, "-o", options] => (kind, source, options),
        ["mount", "-t", kind, source, _, "-o"] => (kind, source, ""),
        _ => panic!("cannot read the mount command {:?}", lines[0]),
    };
    let mut options: Vec<&str> = options
        .split(',')
        .filter(|o| !o.is_empty() && *o != "rw")
        .collect();
    if !options.contains(&"ro") {
        options.push("ro");
    }
    let mut command = std::process::Command::new("mount");
    // A bind mount (containerd prints type "bind") is `mount -o bind`/`rbind`, no type.
    if kind != "bind" {
        command.args(["-t", kind]);
    }
    let out = command
        .arg("-o")
        .arg(options.join(","))
        .arg(source)
        .arg(target)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "mounting {:?} read-only: {}",
        lines[0],
        String::from_utf8_lossy(&out.stderr)
    );
}

fn umount(target: &Path) {
    let status = std::process::Command::new("umount")
        .arg(target)
        .status()
        .unwrap();
    assert!(status.success(), "umount {}", target.display());
}

#[test]
fn containers_start_after_the_snapshotter_and_lazyd_restart() {
    require_root_and_fuse();
    require_runtime("runc");
    let _serial = serial();
    let registry = LocalRegistry::start().unwrap();
    let reference = push_and_convert_python(&registry);
    let mut stack = LazyStack::start();
    stack.rpull(&reference);

    let old = stack.snapshotter.pid();
    stack.snapshotter.restart().unwrap();
    assert_ne!(stack.snapshotter.pid(), old);
    stack.agent.restart_server().unwrap();
    // containerd dials a proxy plugin again with a backoff of at most 3 s: requests fail
    // (Unavailable) until it has reconnected, however soon the snapshotter listens again.
    let reconnected = Instant::now();
    wait_for(RECONNECT_TIMEOUT, Duration::from_millis(100), || {
        let ls = stack
            .containerd
            .ctr(["snapshots", "--snapshotter", SNAPSHOTTER, "ls"]);
        if !ls.status.success() {
            return Err(format!(
                "containerd does not reach the restarted snapshotter: {}",
                String::from_utf8_lossy(&ls.stderr)
            ));
        }
        Ok(())
    });
    println!(
        "containerd reached the restarted snapshotter after {:.2} s",
        reconnected.elapsed().as_secs_f64()
    );

    let out = stack.run(true, &reference, "r1", &["python3", "-c", PYTHON_SCRIPT]);
    assert_eq!(out, PYTHON_PRINTS);
    // The snapshots of the pull are still known to containerd and the snapshotter.
    let snapshots = stack
        .containerd
        .ctr_ok(["snapshots", "--snapshotter", SNAPSHOTTER, "ls"]);
    assert!(snapshots.lines().count() > 1, "{snapshots}");
}

#[test]
fn removing_the_container_and_the_image_frees_every_snapshot_and_the_lower() {
    require_root_and_fuse();
    require_runtime("runc");
    let _serial = serial();
    let registry = LocalRegistry::start().unwrap();
    let reference = push_and_convert_python(&registry);
    let stack = LazyStack::start();
    stack.rpull(&reference);
    let out = stack.run(false, &reference, "d1", &["python3", "-c", PYTHON_SCRIPT]);
    assert_eq!(out, PYTHON_PRINTS);

    let ctr = &stack.containerd;
    ctr.ctr_ok(["containers", "rm", "d1"]);
    ctr.ctr_ok(["image", "rm", "--sync", &reference]);

    let snapshots = ctr.ctr_ok(["snapshots", "--snapshotter", SNAPSHOTTER, "ls"]);
    let rows: Vec<&str> = snapshots.lines().skip(1).collect();
    assert!(rows.is_empty(), "snapshots left:\n{snapshots}");
    let dir = stack.snapshotter.root().join("snapshots");
    let left: Vec<_> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().file_name())
        .collect();
    assert!(left.is_empty(), "left in {}: {left:?}", dir.display());

    // lazyd lets go of the lower once its last holder is gone (lower_linger is 0 s).
    wait_for(RELEASE_TIMEOUT, Duration::from_millis(100), || {
        let status = stack.agent.status();
        let holders = status["lower_holders"].as_array().map_or(0, Vec::len);
        let mounts = status["mounts"].as_array().map_or(0, Vec::len);
        let lowers = stack.lower_mounts();
        if holders == 0 && mounts == 0 && lowers.is_empty() {
            return Ok(());
        }
        Err(format!(
            "since the image was removed, lazyd still has lower_holders {}, mounts {} and \
             lower mounts {lowers:?}",
            status["lower_holders"], status["mounts"]
        ))
    });
}

#[test]
fn kubernetes_pulls_through_the_cri_plugin_lazily_and_the_image_runs() {
    require_root_and_fuse();
    require_runtime("runc");
    let _serial = serial();
    let registry = LocalRegistry::start().unwrap();
    let reference = push_and_convert_python(&registry);
    let digests: Vec<String> = registry_layers(&reference)
        .into_iter()
        .map(|(d, _)| d)
        .collect();
    let stack = LazyStack::start_with(ContainerdOptions {
        cri: true,
        plain_http: vec![registry.host()],
        ..ContainerdOptions::default()
    });
    let ctr = &stack.containerd;
    let mark = registry.log().len();

    // What a kubelet asks: PullImage on containerd's socket. The CRI plugin pulls with
    // snapshotter = lazyimg and disable_snapshot_annotations = false.
    let t = Instant::now();
    let id = lazy_tests::cri::pull_image(&ctr.address(), &reference).unwrap();
    println!(
        "CRI PullImage {reference}: {id} in {:.2} s",
        t.elapsed().as_secs_f64()
    );
    assert!(id.starts_with("sha256:"), "{id}");
    let gets = blob_gets(&registry.log()[mark..], &digests);
    assert!(
        gets.is_empty(),
        "the CRI pull downloaded layers:\n{}",
        gets.join("\n")
    );

    // The CRI plugin works in the namespace k8s.io (a later --namespace replaces the harness's).
    let k8s = |args: &[&str]| {
        let mut all = vec!["--namespace", "k8s.io"];
        all.extend(args);
        ctr.ctr_ok(&all)
    };
    // The layer reached the snapshotter with the CRI plugin's image labels.
    let chain = chain_id(&image_diff_ids(&reference));
    let info = k8s(&["snapshots", "--snapshotter", SNAPSHOTTER, "info", &chain]);
    assert!(
        info.contains("containerd.io/snapshot/cri.image-ref") && info.contains(&reference),
        "{info}"
    );
    let id = format!("cri-{}", ctr.namespace());
    let out = k8s(&[
        "run",
        "--rm",
        "--snapshotter",
        SNAPSHOTTER,
        &reference,
        &id,
        "python3",
        "-c",
        PYTHON_SCRIPT,
    ]);
    assert_eq!(out, PYTHON_PRINTS);
    assert!(blob_gets(&registry.log()[mark..], &digests).is_empty());

    // RemoveImage, as the kubelet's image gc does: containerd's collector removes the layer.
    lazy_tests::cri::remove_image(&ctr.address(), &reference).unwrap();
    wait_for(RELEASE_TIMEOUT, Duration::from_millis(200), || {
        let left = k8s(&["snapshots", "--snapshotter", SNAPSHOTTER, "ls"]);
        if left.lines().count() <= 1 {
            return Ok(());
        }
        Err(format!("snapshots left after RemoveImage:\n{left}"))
    });
    assert!(stack.lower_mounts().is_empty());
}

/// The diff IDs of `reference`'s config.
fn image_diff_ids(reference: &str) -> Vec<String> {
    let config = skopeo_inspect(reference, "--config");
    config["rootfs"]["diff_ids"]
        .as_array()
        .unwrap_or_else(|| panic!("no diff_ids in {config}"))
        .iter()
        .map(|d| d.as_str().unwrap().to_string())
        .collect()
}

#[test]
fn images_without_a_lazy_version_are_never_built_on_part_of_a_lazy_image() {
    use lazy_tests::oci::{Compression, Entry, Layer, LayoutBuilder};
    require_root_and_fuse();
    require_runtime("runc");
    let _serial = serial();
    let registry = LocalRegistry::start().unwrap();
    let minbase = debian::minbase_image(&debian::default_cache_dir()).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let layout = dir.path().join("layout");
    // lazy: minbase + a layer, converted. from: all of lazy's layers + one more, not
    // converted. sibling: minbase + another layer, not converted: it shares only lazy's lower
    // layer.
    let lazy = LayoutBuilder::new("lazy")
        .on(&minbase)
        .layer(
            Layer::new(Compression::Gzip)
                .entry(Entry::dir("srv"))
                .entry(Entry::file("srv/lower", "from the lazy image\n")),
        )
        .write(&layout)
        .unwrap();
    let from = LayoutBuilder::new("from")
        .on(&lazy)
        .layer(
            // The directories are in the layer, so that both unpacks give them the layer's
            // times, not the time of the unpack.
            Layer::new(Compression::Gzip)
                .entry(Entry::dir("srv"))
                .entry(Entry::file("srv/upper", "built on it\n"))
                .entry(Entry::dir("etc"))
                .entry(Entry::whiteout("etc/debian_version")),
        )
        .write(&layout)
        .unwrap();
    let sibling = LayoutBuilder::new("sibling")
        .on(&minbase)
        .layer(
            Layer::new(Compression::Gzip)
                .entry(Entry::dir("srv"))
                .entry(Entry::file("srv/sibling", "beside it\n")),
        )
        .write(&layout)
        .unwrap();
    registry.push_and_convert(&lazy, "mix/lazy:v1").unwrap();
    let host = registry.host();
    for (image, name) in [(&from, "mix/from:v1"), (&sibling, "mix/sibling:v1")] {
        skopeo_copy(&image.oci_ref(), &format!("docker://{host}/{name}")).unwrap();
    }
    let (lazy_ref, from_ref, sibling_ref) = (
        format!("{host}/mix/lazy:v1"),
        format!("{host}/mix/from:v1"),
        format!("{host}/mix/sibling:v1"),
    );
    let stack = LazyStack::start();
    let ctr = &stack.containerd;
    stack.rpull(&lazy_ref);

    // Built on the whole lazy image: its own layer is unpacked over lazyd's mount of it.
    stack.rpull(&from_ref);
    let script =
        "cat /srv/lower /srv/upper; test -e /etc/debian_version && echo kept || echo whited out";
    let out = stack.run(true, &from_ref, "from1", &["sh", "-c", script]);
    assert_eq!(out, "from the lazy image\nbuilt on it\nwhited out\n");
    ctr.ctr_ok([
        "image",
        "pull",
        "--plain-http",
        "--snapshotter",
        "overlayfs",
        &from_ref,
    ]);
    let chain = chain_id(
        &from
            .layers
            .iter()
            .map(|l| l.diff_id.clone())
            .collect::<Vec<_>>(),
    );
    let views = ctr.dir().join("views");
    let lazy_view = mount_view(ctr, SNAPSHOTTER, "from-lazy", &chain, &views.join("lazy"));
    let plain_view = mount_view(ctr, "overlayfs", "from-plain", &chain, &views.join("plain"));
    let stats = assert_trees_equal(&plain_view, &lazy_view);
    println!("an image built on a lazy one, lazyimg and overlayfs: equal, {stats}");
    umount(&lazy_view);
    umount(&plain_view);

    // Sharing only the lazy image's lower layer: containerd reuses that layer from its own
    // records, and the snapshotter refuses to build on it rather than serve the whole lazy
    // image below the sibling's layer.
    let refused = ctr.ctr_remote([
        "image",
        "rpull",
        "--plain-http",
        "--snapshotter",
        SNAPSHOTTER,
        &sibling_ref,
    ]);
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(
        !refused.status.success(),
        "the sibling was pulled onto the lazy image's lower layer"
    );
    assert!(
        stderr.contains("is a layer below the top of the lazy image") && stderr.contains(&lazy_ref),
        "{stderr}"
    );

    // A containerd (namespace) that has not pulled the lazy image gets the sibling unpacked,
    // through the same snapshotter: the lazy layer it holds is not offered to it.
    let other = Containerd::start(&ContainerdOptions {
        snapshotter: Some(stack.snapshotter.socket()),
        ..ContainerdOptions::default()
    })
    .unwrap();
    other.ctr_remote_ok([
        "image",
        "rpull",
        "--plain-http",
        "--snapshotter",
        SNAPSHOTTER,
        &sibling_ref,
    ]);
    let out = other.ctr_ok([
        "run",
        "--rm",
        "--snapshotter",
        SNAPSHOTTER,
        &sibling_ref,
        "sib1",
        "sh",
        "-c",
        "cat /srv/sibling; test -e /srv/lower && echo mixed || echo apart",
    ]);
    assert_eq!(out, "beside it\napart\n");
}
