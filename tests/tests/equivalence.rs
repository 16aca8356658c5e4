//! End-to-end: real images converted with `lazyctl convert`, mounted with `lazyctl mount`, and
//! compared with a reference unpack in type, mode, owner, size, mtime, xattrs, link targets,
//! device numbers, hardlink grouping and the content of every file.

use std::ffi::OsString;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use lazy_tests::mount::{lazyctl, lazyctl_ok, require_root_and_fuse, Mounted};
use lazy_tests::registry::LocalRegistry;
use lazy_tests::{debian, oci, reference, synthetic, tree};

/// Converts `src` into a fresh store under `work`; returns the store path.
fn convert(work: &Path, name: &str, src: &str) -> PathBuf {
    let store = work.join(name);
    let dest = format!("dir:{}", store.display());
    lazyctl_ok(["convert", "--no-progress", src, dest.as_str()]);
    store
}

/// The digest of the index blob of the store's only image.
fn index_digest(store: &Path) -> String {
    let out = lazyctl_ok(["inspect".to_string(), format!("dir:{}", store.display())]);
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    text.lines()
        .find_map(|l| l.strip_prefix("index:"))
        .and_then(|l| l.split_whitespace().next())
        .map(str::to_string)
        .unwrap_or_else(|| panic!("no index line in inspect output:\n{text}"))
}

fn mount(store: &Path, mnt: &Path) -> Mounted {
    std::fs::create_dir_all(mnt).unwrap();
    Mounted::new(store, mnt).unwrap()
}

#[test]
fn every_entry_type_image_mounts_like_umoci_unpacks_it() {
    require_root_and_fuse();
    let image = synthetic::every_entry_type_image_cached().unwrap();
    let expected = reference::umoci_unpack_cached(&image).unwrap();
    let work = tempfile::tempdir().unwrap();
    let store = convert(work.path(), "store", &image.oci_ref());
    let m = mount(&store, &work.path().join("mnt"));
    let stats = tree::assert_trees_equal(&expected, m.path());
    println!("mounted tree equals umoci unpack: {stats}");

    // Targeted checks of what the comparison covers implicitly.
    let root = m.path();
    let group: Vec<u64> = synthetic::HARDLINK_GROUP
        .iter()
        .map(|p| std::fs::symlink_metadata(root.join(p)).unwrap().ino())
        .collect();
    assert!(
        group.windows(2).all(|w| w[0] == w[1]),
        "hardlinks differ: {group:?}"
    );
    let upper: Vec<u64> = synthetic::UPPER_HARDLINK
        .iter()
        .map(|p| std::fs::symlink_metadata(root.join(p)).unwrap().ino())
        .collect();
    assert_eq!(
        upper[0], upper[1],
        "hardlink across layers is not one inode"
    );
    let cap = xattr::get(root.join(synthetic::CAPABILITY_PATH), "security.capability")
        .unwrap()
        .unwrap();
    assert_eq!(cap, synthetic::CAPABILITY_VALUE);
    let md = std::fs::symlink_metadata(root.join(synthetic::NSEC_PATH)).unwrap();
    assert_eq!(
        (md.mtime() as u64, md.mtime_nsec() as u32),
        synthetic::NSEC_MTIME
    );
    let huge = std::fs::metadata(root.join(synthetic::HUGE_PATH)).unwrap();
    assert_eq!(huge.len(), synthetic::HUGE_SIZE);
    for deleted in synthetic::DELETED_PATHS {
        assert!(
            std::fs::symlink_metadata(root.join(deleted)).is_err(),
            "whited-out {deleted} is visible"
        );
    }
    let status = m.unmount().unwrap();
    assert!(status.success(), "mount exited with {status}");
}

#[test]
fn archives_recompressed_layers_and_registry_sources_convert_to_the_same_image() {
    require_root_and_fuse();
    let image = synthetic::every_entry_type_image_cached().unwrap();
    let work = tempfile::tempdir().unwrap();
    let from_layout = index_digest(&convert(work.path(), "layout", &image.oci_ref()));

    let oci_archive = work.path().join("image.oci.tar");
    oci::oci_archive(&image, &oci_archive).unwrap();
    let docker_archive = work.path().join("image.docker.tar");
    oci::docker_archive(&image, "lazy/synthetic:v1", &docker_archive).unwrap();
    let gzip_only = work.path().join("gzip-layout");
    let regz = oci::recompress(&image, &gzip_only, |_| oci::Compression::Gzip).unwrap();
    let plain_dir = work.path().join("plain-layout");
    let plain = oci::recompress(&image, &plain_dir, |_| oci::Compression::None).unwrap();

    let registry = LocalRegistry::start().unwrap();
    let remote = format!("docker://{}/lazy/synthetic:v1", registry.host());
    reference::skopeo_copy(&image.oci_ref(), &remote).unwrap();

    for (name, src) in [
        (
            "oci-archive",
            format!("oci-archive:{}", oci_archive.display()),
        ),
        (
            "docker-archive",
            format!("docker-archive:{}", docker_archive.display()),
        ),
        ("gzip layers", regz.oci_ref()),
        ("uncompressed layers", plain.oci_ref()),
        ("registry", remote.clone()),
    ] {
        let store = convert(work.path(), &name.replace(' ', "-"), &src);
        assert_eq!(
            index_digest(&store),
            from_layout,
            "{name} source gives a different image than the OCI layout"
        );
    }
    // Same bytes served means same index and same chunks; spot-check one mount anyway.
    let store = work.path().join("registry");
    let m = mount(&store, &work.path().join("mnt"));
    let expected = reference::umoci_unpack_cached(&image).unwrap();
    tree::assert_trees_equal(&expected, m.path());
    m.unmount().unwrap();
}

#[test]
fn gnu_sparse_files_mount_like_gnu_tar_extracts_them() {
    require_root_and_fuse();
    let work = tempfile::tempdir().unwrap();
    let image = synthetic::gnu_sparse_image(&work.path().join("layout")).unwrap();
    let expected = work.path().join("expected");
    std::fs::create_dir_all(&expected).unwrap();
    synthetic::write_gnu_sparse_expected(&expected).unwrap();
    let store = convert(work.path(), "store", &image.oci_ref());
    let m = mount(&store, &work.path().join("mnt"));
    tree::assert_trees_equal(&expected, m.path());
    m.unmount().unwrap();
}

fn run_as_nobody(root: &Path, argv: &[&str]) -> std::process::Output {
    Command::new("chroot")
        .arg("--userspec=65534:65534")
        .arg(root)
        .args(argv)
        .output()
        .unwrap()
}

/// The Debian fixture converted into a store under `work` and mounted; with its reference
/// unpack.
fn mounted_debian(work: &Path) -> (PathBuf, Mounted) {
    require_root_and_fuse();
    let image = debian::minbase_image(&debian::default_cache_dir()).unwrap();
    let expected = reference::umoci_unpack_cached(&image).unwrap();
    let store = convert(work, "store", &image.oci_ref());
    (expected, mount(&store, &work.join("mnt")))
}

#[test]
fn debian_image_mounts_like_umoci_unpacks_it_and_runs() {
    let work = tempfile::tempdir().unwrap();
    let (expected, m) = mounted_debian(work.path());
    let stats = tree::assert_trees_equal(&expected, m.path());
    println!("debian: mounted tree equals umoci unpack: {stats}");

    let out = Command::new("chroot")
        .arg(m.path())
        .args(["/bin/sh", "-c", "echo ok"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    assert_eq!(out.stdout, b"ok\n");

    // allow_other + default_permissions: a non-root user inside sees the image's permission
    // bits enforced by the kernel.
    let ok = run_as_nobody(m.path(), &["/bin/cat", "/etc/debian_version"]);
    assert!(ok.status.success(), "{ok:?}");
    let denied = run_as_nobody(m.path(), &["/bin/cat", "/etc/shadow"]);
    assert!(!denied.status.success());
    assert!(
        String::from_utf8_lossy(&denied.stderr).contains("Permission denied"),
        "{denied:?}"
    );
    // Writes are refused: the image is read-only.
    let write = Command::new("chroot")
        .arg(m.path())
        .args(["/bin/sh", "-c", "echo x > /etc/new-file"])
        .output()
        .unwrap();
    assert!(!write.status.success());
    assert!(
        String::from_utf8_lossy(&write.stderr).contains("Read-only file system"),
        "{write:?}"
    );
    m.unmount().unwrap();
}

#[test]
fn concurrent_readers_all_get_exact_bytes() {
    let work = tempfile::tempdir().unwrap();
    let (expected, m) = mounted_debian(work.path());
    let mut files = Vec::new();
    let mut stack = vec![PathBuf::new()];
    while let Some(rel) = stack.pop() {
        for e in std::fs::read_dir(expected.join(&rel)).unwrap() {
            let e = e.unwrap();
            let ty = e.file_type().unwrap();
            let p = rel.join(e.file_name());
            if ty.is_dir() {
                stack.push(p);
            } else if ty.is_file() {
                files.push(p);
            }
        }
    }
    files.sort();
    assert!(files.len() > 1000, "only {} files", files.len());
    // Eight readers walk the same files in different orders, so many read the same chunk
    // at the same moment.
    let mount_root = m.path().to_path_buf();
    std::thread::scope(|s| {
        for t in 0..8usize {
            let files = &files;
            let (mount_root, expected) = (&mount_root, &expected);
            s.spawn(move || {
                let n = files.len();
                for i in 0..n {
                    let p = &files[(i * (2 * t + 1) + t * 97) % n];
                    let got = std::fs::read(mount_root.join(p)).unwrap();
                    let want = std::fs::read(expected.join(p)).unwrap();
                    assert!(got == want, "thread {t}: {} differs", p.display());
                }
            });
        }
    });
    m.unmount().unwrap();
}

#[test]
fn sigterm_and_sigint_unmount_cleanly() {
    require_root_and_fuse();
    let work = tempfile::tempdir().unwrap();
    let src = work.path().join("src");
    std::fs::create_dir_all(src.join("d")).unwrap();
    std::fs::write(src.join("d/f"), b"hello").unwrap();
    let store = convert(work.path(), "store", &format!("path:{}", src.display()));
    for signal in [libc::SIGTERM, libc::SIGINT] {
        let mnt = work.path().join(format!("mnt-{signal}"));
        let m = mount(&store, &mnt);
        assert_eq!(std::fs::read(m.path().join("d/f")).unwrap(), b"hello");
        let status = m.signal_and_wait(signal).unwrap();
        assert!(status.success(), "signal {signal}: exit {status}");
    }
}

#[test]
fn mount_of_missing_image_fails_clearly() {
    require_root_and_fuse();
    let work = tempfile::tempdir().unwrap();
    let mnt = work.path().join("mnt");
    std::fs::create_dir_all(&mnt).unwrap();
    let missing = format!("dir:{}", work.path().join("nowhere").display());
    let out = lazyctl([
        OsString::from("mount"),
        OsString::from("--standalone"),
        missing.into(),
        mnt.clone().into_os_string(),
    ]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("is not a lazy image store"),
        "{out:?}"
    );
}
