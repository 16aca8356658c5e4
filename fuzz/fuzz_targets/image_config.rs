//! Fuzzes the image config JSON that `lazyctl run` turns into a container's runtime spec
//! (`tools::spec::parse_image_config`, then `tools::spec::build`): entrypoint, cmd, env, working
//! directory and user come from the image, which anyone can publish. The image's /etc/passwd
//! and /etc/group are a fixed small pair, so named users resolve.
//!
//! Checks on a spec that builds: the command is the image's entrypoint then its cmd, and only an
//! image with neither is refused for having nothing to run; the working directory is absolute;
//! every env entry is `KEY=VALUE` with each key once, PATH, HOSTNAME and HOME among them; a
//! numeric user runs as that uid.
#![no_main]

use std::path::Path;
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use tools::spec::{build, parse_image_config, RunRequest, SpecError};

/// A container root holding only /etc/passwd and /etc/group.
fn rootfs() -> &'static Path {
    static ROOT: OnceLock<tempfile::TempDir> = OnceLock::new();
    ROOT.get_or_init(|| {
        let root = tempfile::tempdir().unwrap();
        let etc = root.path().join("etc");
        std::fs::create_dir(&etc).unwrap();
        std::fs::write(
            etc.join("passwd"),
            "root:x:0:0:root:/root:/bin/sh\napp:x:1000:1000::/home/app:/bin/sh\n",
        )
        .unwrap();
        std::fs::write(
            etc.join("group"),
            "root:x:0:\nstaff:x:50:app\napp:x:1000:\n",
        )
        .unwrap();
        root
    })
    .path()
}

fuzz_target!(|data: &[u8]| {
    let Ok(json) = serde_json::from_slice(data) else {
        return;
    };
    let Ok(image) = parse_image_config(json) else {
        return;
    };
    let config = image.config().clone().unwrap_or_default();
    let expected: Vec<String> = [config.entrypoint(), config.cmd()]
        .into_iter()
        .flat_map(|part| part.clone().unwrap_or_default())
        .collect();
    let request = RunRequest {
        name: "fuzz".into(),
        rootfs: rootfs().to_path_buf(),
        ..RunRequest::default()
    };
    let spec = match build(&image, &request) {
        Ok(spec) => spec,
        Err(SpecError::EmptyCommand) => {
            assert!(expected.is_empty(), "{expected:?} refused as empty");
            return;
        }
        Err(_) => return,
    };
    let process = spec.process().as_ref().expect("a spec has a process");
    assert_eq!(process.args().as_deref(), Some(&expected[..]));
    assert!(process.cwd().is_absolute(), "{:?}", process.cwd());
    let env = process.env().as_deref().unwrap_or_default();
    let mut keys: Vec<&str> = env
        .iter()
        .map(|e| e.split_once('=').expect("env entries are KEY=VALUE").0)
        .collect();
    for key in ["PATH", "HOSTNAME", "HOME"] {
        assert!(keys.contains(&key), "{key} missing from {env:?}");
    }
    keys.sort_unstable();
    let count = keys.len();
    keys.dedup();
    assert_eq!(keys.len(), count, "a key set twice in {env:?}");
    let uid = config
        .user()
        .as_deref()
        .and_then(|u| u.split(':').next()?.parse::<u32>().ok());
    if let Some(uid) = uid {
        assert_eq!(process.user().uid(), uid);
    }
});
