//! The OCI runtime spec (`config.json`) of a container that `lazyctl run` starts: the image's
//! config (entrypoint, cmd, env, working dir, user) merged with the user's flags, on top of a
//! fixed, docker-like sandbox (pid/ipc/uts/mount namespaces, a network namespace of its own unless
//! `--network host`, podman's default capabilities (docker's less NET_RAW), docker's default
//! seccomp profile, runc's masked and read-only paths, no new privileges).
//!
//! Everything here is pure but for reading the image's `/etc/passwd` and `/etc/group` (through
//! the container's root, never the host's) and checking that volume sources exist, so the whole
//! mapping is unit-tested without a runtime. `run` writes the result into the bundle.

use std::collections::HashSet;
use std::io;
use std::path::{Component, Path, PathBuf};

use oci_spec::image::ImageConfiguration;
use oci_spec::runtime::{
    Capability, LinuxBuilder, LinuxCapabilitiesBuilder, LinuxDeviceCgroupBuilder,
    LinuxNamespaceBuilder, LinuxNamespaceType, LinuxResourcesBuilder, LinuxSeccomp, Mount,
    MountBuilder, PosixRlimitBuilder, PosixRlimitType, ProcessBuilder, RootBuilder, Spec,
    SpecBuilder, UserBuilder,
};
use thiserror::Error;

/// The runtime spec version written; runc >= 1.0 and crun >= 0.20 read it.
pub const OCI_VERSION: &str = "1.0.2";

/// PATH when the image sets none (docker's default).
pub const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// Podman's default capability set, which is docker's without NET_RAW (raw sockets let a
/// container forge packets, and ping works without it through ICMP sockets): enough for package
/// managers and daemons that drop privileges, nothing that reaches the host (no SYS_ADMIN,
/// NET_ADMIN, SYS_PTRACE).
pub const DEFAULT_CAPABILITIES: [Capability; 13] = [
    Capability::Chown,
    Capability::DacOverride,
    Capability::Fsetid,
    Capability::Fowner,
    Capability::Mknod,
    Capability::Setgid,
    Capability::Setuid,
    Capability::Setfcap,
    Capability::Setpcap,
    Capability::NetBindService,
    Capability::SysChroot,
    Capability::Kill,
    Capability::AuditWrite,
];

/// Paths masked (bind-mounted over with /dev/null or an empty tmpfs), as in `runc spec`.
pub const MASKED_PATHS: [&str; 10] = [
    "/proc/acpi",
    "/proc/asound",
    "/proc/kcore",
    "/proc/keys",
    "/proc/latency_stats",
    "/proc/timer_list",
    "/proc/timer_stats",
    "/proc/sched_debug",
    "/sys/firmware",
    "/proc/scsi",
];

/// Paths remounted read-only, as in `runc spec`.
pub const READONLY_PATHS: [&str; 5] = [
    "/proc/bus",
    "/proc/fs",
    "/proc/irq",
    "/proc/sys",
    "/proc/sysrq-trigger",
];

/// Open files per process: docker's (containerd's) soft and hard limits, lowered to lazyctl's
/// own hard limit (`RunRequest::nofile_ceiling`): without CAP_SYS_RESOURCE (lazyd in an
/// unprivileged container, say) the runtime cannot raise it and the container would not start.
const NOFILE_SOFT: u64 = 1024;
const NOFILE_HARD: u64 = 524_288;

/// Symlinks followed while resolving one path inside the rootfs (the kernel's MAXSYMLINKS).
const MAX_SYMLINKS: usize = 40;

#[derive(Debug, Error)]
pub enum SpecError {
    #[error("the image's config is not valid: {0}")]
    ImageConfig(String),
    #[error("nothing to run: the image has no entrypoint or cmd; give a command after `--` (lazyctl run IMAGE -- CMD ARGS...)")]
    EmptyCommand,
    #[error("--env {arg:?}: expected KEY=VALUE (or KEY, to pass lazyctl's own value)")]
    BadEnv { arg: String },
    #[error("--workdir {dir:?}: must be an absolute path")]
    RelativeWorkdir { dir: String },
    #[error("user {user:?}: expected NAME, UID, NAME:GROUP or UID:GID")]
    BadUser { user: String },
    #[error(
        "user {name:?} is not in the image's {file}; use a numeric UID or a user the image defines"
    )]
    UnknownUser { name: String, file: &'static str },
    #[error("group {name:?} is not in the image's {file}; use a numeric GID or a group the image defines")]
    UnknownGroup { name: String, file: &'static str },
    #[error("reading the image's {file}: {source}")]
    ReadImageFile {
        file: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("--volume {arg:?}: {reason}; expected SRC:DST[:ro|rw] with DST absolute")]
    BadVolume { arg: String, reason: String },
    #[error("building the runtime spec: {0}")]
    Oci(#[from] oci_spec::OciSpecError),
}

/// A host directory or file bind-mounted into the container (`--volume SRC:DST[:ro]`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Volume {
    /// Absolute and existing on the host (resolved when parsed).
    pub source: PathBuf,
    /// Absolute inside the container.
    pub destination: PathBuf,
    pub read_only: bool,
}

/// Parses `SRC:DST[:ro|rw]`; SRC is resolved against the current directory and must exist.
pub fn parse_volume(arg: &str) -> Result<Volume, SpecError> {
    let bad = |reason: String| SpecError::BadVolume {
        arg: arg.to_string(),
        reason,
    };
    let parts: Vec<&str> = arg.split(':').collect();
    let (src, dst, read_only) = match parts.as_slice() {
        [src, dst] => (*src, *dst, false),
        [src, dst, "ro"] => (*src, *dst, true),
        [src, dst, "rw"] => (*src, *dst, false),
        [_, _, mode] => return Err(bad(format!("unknown mode {mode:?} (ro or rw)"))),
        _ => return Err(bad("not two or three fields separated by ':'".into())),
    };
    if src.is_empty() || dst.is_empty() {
        return Err(bad("empty source or destination".into()));
    }
    let destination = PathBuf::from(dst);
    if !destination.is_absolute() {
        return Err(bad(format!("destination {dst} is not an absolute path")));
    }
    if destination.components().all(|c| c == Component::RootDir) {
        return Err(bad("the destination cannot be the container's root".into()));
    }
    let source =
        std::fs::canonicalize(src).map_err(|e| bad(format!("source {src} cannot be used: {e}")))?;
    Ok(Volume {
        source,
        destination,
        read_only,
    })
}

/// Parses `KEY=VALUE`; a bare `KEY` takes `lookup(KEY)` and is dropped when that is `None`
/// (docker's `-e KEY`).
pub fn parse_env(
    arg: &str,
    lookup: impl Fn(&str) -> Option<String>,
) -> Result<Option<(String, String)>, SpecError> {
    let (key, value) = match arg.split_once('=') {
        Some((key, value)) => (key, Some(value.to_string())),
        None => (arg, None),
    };
    if key.is_empty() || key.contains(char::is_whitespace) {
        return Err(SpecError::BadEnv {
            arg: arg.to_string(),
        });
    }
    Ok(value
        .or_else(|| lookup(key))
        .map(|value| (key.to_string(), value)))
}

/// What the user asked for on the command line, parsed.
#[derive(Debug, Clone, Default)]
pub struct RunRequest {
    /// The container's name: its runtime id and hostname.
    pub name: String,
    /// The mounted, writable root filesystem.
    pub rootfs: PathBuf,
    /// `--entrypoint`: replaces the image's entrypoint and drops the image's cmd; `""` clears
    /// the entrypoint.
    pub entrypoint: Option<String>,
    /// After `--`: replaces the image's cmd.
    pub command: Vec<String>,
    /// `--env`, in order; later ones win.
    pub env: Vec<(String, String)>,
    pub workdir: Option<String>,
    pub user: Option<String>,
    pub volumes: Vec<Volume>,
    /// The highest RLIMIT_NOFILE the runtime can set (lazyctl's own hard limit); `None`: no
    /// ceiling.
    pub nofile_ceiling: Option<u64>,
    pub network: Network,
    /// The seccomp filter (`crate::seccomp::to_spec`); `None`: unconfined.
    pub seccomp: Option<LinuxSeccomp>,
}

/// `--network`: the container's network.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum Network {
    /// A network namespace of its own with only loopback (docker's `--network none`).
    #[default]
    None,
    /// The host's network namespace: its interfaces, addresses and ports.
    Host,
}

/// Parses the image config JSON that lazyd's `/v1/image/config` returns.
pub fn parse_image_config(json: serde_json::Value) -> Result<ImageConfiguration, SpecError> {
    serde_json::from_value(json).map_err(|e| SpecError::ImageConfig(e.to_string()))
}

/// The runtime spec of one container.
pub fn build(image: &ImageConfiguration, req: &RunRequest) -> Result<Spec, SpecError> {
    let config = image.config().clone().unwrap_or_default();

    let args = command_line(
        config.entrypoint().as_deref(),
        config.cmd().as_deref(),
        req.entrypoint.as_deref(),
        &req.command,
    )?;

    let cwd = match (&req.workdir, config.working_dir()) {
        (Some(dir), _) if !dir.starts_with('/') => {
            return Err(SpecError::RelativeWorkdir { dir: dir.clone() })
        }
        (Some(dir), _) => dir.clone(),
        (None, Some(dir)) if !dir.is_empty() => {
            // Docker treats a relative WorkingDir as relative to /.
            if dir.starts_with('/') {
                dir.clone()
            } else {
                format!("/{dir}")
            }
        }
        (None, _) => "/".to_string(),
    };

    let user_arg = req
        .user
        .clone()
        .or_else(|| config.user().clone())
        .filter(|u| !u.is_empty());
    let user = resolve_user(&req.rootfs, user_arg.as_deref())?;

    let env = environment(
        config.env().as_deref().unwrap_or_default(),
        &req.env,
        &req.name,
        &user.home,
    );

    let capabilities: oci_spec::runtime::Capabilities = DEFAULT_CAPABILITIES.into_iter().collect();
    let mut oci_user = UserBuilder::default().uid(user.uid).gid(user.gid);
    if !user.additional_gids.is_empty() {
        oci_user = oci_user.additional_gids(user.additional_gids.clone());
    }
    let nofile_hard = NOFILE_HARD.min(req.nofile_ceiling.unwrap_or(u64::MAX));
    let process = ProcessBuilder::default()
        .terminal(false)
        .user(oci_user.build()?)
        .args(args)
        .env(env)
        .cwd(cwd)
        .capabilities(
            LinuxCapabilitiesBuilder::default()
                .bounding(capabilities.clone())
                .effective(capabilities.clone())
                .permitted(capabilities)
                .inheritable(HashSet::new())
                .ambient(HashSet::new())
                .build()?,
        )
        .rlimits(vec![PosixRlimitBuilder::default()
            .typ(PosixRlimitType::RlimitNofile)
            .soft(NOFILE_SOFT.min(nofile_hard))
            .hard(nofile_hard)
            .build()?])
        .no_new_privileges(true)
        .build()?;

    let mut mounts = default_mounts()?;
    for v in &req.volumes {
        mounts.push(
            MountBuilder::default()
                .destination(&v.destination)
                .typ("bind")
                .source(&v.source)
                .options(vec![
                    "rbind".to_string(),
                    if v.read_only { "ro" } else { "rw" }.to_string(),
                ])
                .build()?,
        );
    }

    let mut namespaces = vec![
        LinuxNamespaceType::Pid,
        LinuxNamespaceType::Ipc,
        LinuxNamespaceType::Uts,
        LinuxNamespaceType::Mount,
    ];
    if req.network == Network::None {
        namespaces.push(LinuxNamespaceType::Network);
    }
    let namespaces = namespaces
        .into_iter()
        .map(|typ| LinuxNamespaceBuilder::default().typ(typ).build())
        .collect::<Result<Vec<_>, _>>()?;
    let mut linux = LinuxBuilder::default()
        .namespaces(namespaces)
        // Deny every device; the runtime then allows its defaults (null, zero, full, random,
        // urandom, tty, ptmx, pts), as with `runc spec`.
        .resources(
            LinuxResourcesBuilder::default()
                .devices(vec![LinuxDeviceCgroupBuilder::default()
                    .allow(false)
                    .access("rwm")
                    .build()?])
                .build()?,
        )
        .masked_paths(MASKED_PATHS.map(String::from).to_vec())
        .readonly_paths(READONLY_PATHS.map(String::from).to_vec());
    if let Some(seccomp) = &req.seccomp {
        linux = linux.seccomp(seccomp.clone());
    }
    let linux = linux.build()?;

    Ok(SpecBuilder::default()
        .version(OCI_VERSION)
        .root(
            RootBuilder::default()
                .path(&req.rootfs)
                .readonly(false)
                .build()?,
        )
        .hostname(req.name.clone())
        .mounts(mounts)
        .process(process)
        .linux(linux)
        .build()?)
}

/// Docker's rule: `--entrypoint` replaces the image's entrypoint and drops its cmd; a command
/// after `--` replaces the cmd.
fn command_line(
    image_entrypoint: Option<&[String]>,
    image_cmd: Option<&[String]>,
    entrypoint: Option<&str>,
    command: &[String],
) -> Result<Vec<String>, SpecError> {
    let (mut args, default_cmd) = match entrypoint {
        Some("") => (Vec::new(), &[][..]),
        Some(e) => (vec![e.to_string()], &[][..]),
        None => (
            image_entrypoint.unwrap_or_default().to_vec(),
            image_cmd.unwrap_or_default(),
        ),
    };
    if command.is_empty() {
        args.extend_from_slice(default_cmd);
    } else {
        args.extend_from_slice(command);
    }
    if args.is_empty() {
        return Err(SpecError::EmptyCommand);
    }
    Ok(args)
}

/// The image's env, then `--env` (a key set again replaces the earlier value in place), then
/// PATH, HOSTNAME and HOME where still unset.
fn environment(
    image_env: &[String],
    overrides: &[(String, String)],
    hostname: &str,
    home: &str,
) -> Vec<String> {
    let mut env: Vec<(String, String)> = Vec::new();
    let mut set = |key: &str, value: &str| match env.iter_mut().find(|(k, _)| k == key) {
        Some(entry) => entry.1 = value.to_string(),
        None => env.push((key.to_string(), value.to_string())),
    };
    for entry in image_env {
        match entry.split_once('=') {
            Some((k, v)) => set(k, v),
            None => set(entry, ""),
        }
    }
    for (k, v) in overrides {
        set(k, v);
    }
    for (key, default) in [
        ("PATH", DEFAULT_PATH),
        ("HOSTNAME", hostname),
        ("HOME", home),
    ] {
        if !env.iter().any(|(k, _)| k == key) {
            env.push((key.to_string(), default.to_string()));
        }
    }
    env.into_iter().map(|(k, v)| format!("{k}={v}")).collect()
}

/// /proc, /dev, /dev/pts, /dev/shm, /dev/mqueue and a read-only /sys, with docker's options.
fn default_mounts() -> Result<Vec<Mount>, SpecError> {
    let table: [(&str, &str, &str, &[&str]); 6] = [
        ("/proc", "proc", "proc", &["nosuid", "noexec", "nodev"]),
        (
            "/dev",
            "tmpfs",
            "tmpfs",
            &["nosuid", "strictatime", "mode=755", "size=65536k"],
        ),
        (
            "/dev/pts",
            "devpts",
            "devpts",
            &[
                "nosuid",
                "noexec",
                "newinstance",
                "ptmxmode=0666",
                "mode=0620",
                "gid=5",
            ],
        ),
        (
            "/dev/shm",
            "tmpfs",
            "shm",
            &["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"],
        ),
        (
            "/dev/mqueue",
            "mqueue",
            "mqueue",
            &["nosuid", "noexec", "nodev"],
        ),
        (
            "/sys",
            "sysfs",
            "sysfs",
            &["nosuid", "noexec", "nodev", "ro"],
        ),
    ];
    table
        .into_iter()
        .map(|(destination, typ, source, options)| {
            Ok(MountBuilder::default()
                .destination(destination)
                .typ(typ)
                .source(source)
                .options(options.iter().map(|o| o.to_string()).collect::<Vec<_>>())
                .build()?)
        })
        .collect()
}

/// The process's identity inside the container.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResolvedUser {
    pub uid: u32,
    pub gid: u32,
    /// Groups that list the user as a member (only when no group was named).
    pub additional_gids: Vec<u32>,
    /// From passwd; `/` for a user passwd does not know.
    pub home: String,
}

const PASSWD: &str = "/etc/passwd";
const GROUP: &str = "/etc/group";

/// Resolves NAME, UID, NAME:GROUP, UID:GID (and the mixed forms) against the image's
/// /etc/passwd and /etc/group, as runc does: a numeric id need not be in the files, a name
/// must; with no group, the gid is passwd's (0 for an unknown uid) and the groups that list the
/// user are added. `None` is root.
pub fn resolve_user(rootfs: &Path, user: Option<&str>) -> Result<ResolvedUser, SpecError> {
    let user = user.unwrap_or("0");
    let bad = || SpecError::BadUser {
        user: user.to_string(),
    };
    let (user_part, group_part) = match user.split_once(':') {
        Some((u, g)) => (u, Some(g)),
        None => (user, None),
    };
    if user_part.is_empty() || group_part == Some("") || group_part.is_some_and(|g| g.contains(':'))
    {
        return Err(bad());
    }
    let passwd = read_image_file(rootfs, PASSWD)?;
    let entries: Vec<PasswdEntry> = passwd.as_deref().map(parse_passwd).unwrap_or_default();
    let numeric_uid = user_part.parse::<u32>().ok();
    let entry = entries.iter().find(|e| match numeric_uid {
        Some(uid) => e.uid == uid,
        None => e.name == user_part,
    });
    let (uid, mut gid, home, username) = match (entry, numeric_uid) {
        (Some(e), _) => (e.uid, e.gid, e.home.clone(), Some(e.name.clone())),
        (None, Some(uid)) => (uid, 0, "/".to_string(), None),
        (None, None) => {
            return Err(SpecError::UnknownUser {
                name: user_part.to_string(),
                file: PASSWD,
            })
        }
    };

    let mut additional_gids = Vec::new();
    let needs_groups = group_part.is_some_and(|g| g.parse::<u32>().is_err()) || username.is_some();
    if needs_groups {
        let group = read_image_file(rootfs, GROUP)?;
        let groups: Vec<GroupEntry> = group.as_deref().map(parse_group).unwrap_or_default();
        match group_part {
            Some(g) => {
                gid = match g.parse::<u32>() {
                    Ok(gid) => gid,
                    Err(_) => {
                        groups
                            .iter()
                            .find(|e| e.name == g)
                            .ok_or_else(|| SpecError::UnknownGroup {
                                name: g.to_string(),
                                file: GROUP,
                            })?
                            .gid
                    }
                };
            }
            None => {
                let name = username.as_deref().unwrap_or_default();
                for e in groups
                    .iter()
                    .filter(|e| e.members.iter().any(|m| m == name))
                {
                    if e.gid != gid && !additional_gids.contains(&e.gid) {
                        additional_gids.push(e.gid);
                    }
                }
            }
        }
    } else if let Some(g) = group_part {
        gid = g.parse::<u32>().map_err(|_| bad())?;
    }
    Ok(ResolvedUser {
        uid,
        gid,
        additional_gids,
        home: if home.is_empty() { "/".into() } else { home },
    })
}

struct PasswdEntry {
    name: String,
    uid: u32,
    gid: u32,
    home: String,
}

struct GroupEntry {
    name: String,
    gid: u32,
    members: Vec<String>,
}

/// `name:password:uid:gid:gecos:home:shell`; malformed lines are skipped, as libc does.
fn parse_passwd(text: &str) -> Vec<PasswdEntry> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|line| {
            let f: Vec<&str> = line.split(':').collect();
            Some(PasswdEntry {
                name: f.first()?.to_string(),
                uid: f.get(2)?.parse().ok()?,
                gid: f.get(3)?.parse().ok()?,
                home: f.get(5).unwrap_or(&"").to_string(),
            })
        })
        .collect()
}

/// `name:password:gid:member,member`.
fn parse_group(text: &str) -> Vec<GroupEntry> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|line| {
            let f: Vec<&str> = line.split(':').collect();
            Some(GroupEntry {
                name: f.first()?.to_string(),
                gid: f.get(2)?.parse().ok()?,
                members: f
                    .get(3)
                    .unwrap_or(&"")
                    .split(',')
                    .filter(|m| !m.is_empty())
                    .map(String::from)
                    .collect(),
            })
        })
        .collect()
}

/// The most an image's /etc/passwd or /etc/group may hold (real ones are a few KB).
const MAX_IMAGE_FILE: u64 = 4 << 20;

/// Reads a file of the image as the container will see it; `None` when it does not exist. The
/// image chooses what the path is: it must be a regular file of at most [`MAX_IMAGE_FILE`]
/// bytes (a FIFO would hang the read, a huge sparse file exhaust memory).
fn read_image_file(rootfs: &Path, file: &'static str) -> Result<Option<String>, SpecError> {
    let read = resolve_in_root(rootfs, Path::new(file)).and_then(|path| {
        use std::io::Read;
        use std::os::unix::fs::OpenOptionsExt;
        let opened = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
            .open(path)?;
        let meta = opened.metadata()?;
        if !meta.is_file() || meta.len() > MAX_IMAGE_FILE {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("not a regular file of at most {MAX_IMAGE_FILE} bytes"),
            ));
        }
        let mut bytes = Vec::new();
        opened.take(MAX_IMAGE_FILE).read_to_end(&mut bytes)?;
        Ok(bytes)
    });
    match read {
        Ok(bytes) => Ok(Some(String::from_utf8_lossy(&bytes).into_owned())),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(SpecError::ReadImageFile { file, source }),
    }
}

/// `path` inside `root` as the container sees it: symlinks are followed with absolute targets
/// taken relative to `root`, and `..` stops at `root`, so an image's `/etc/passwd -> /x` or
/// `../../..` never reads the host's files.
pub fn resolve_in_root(root: &Path, path: &Path) -> io::Result<PathBuf> {
    let mut resolved = PathBuf::new();
    let mut pending: Vec<PathBuf> = vec![path.to_path_buf()];
    let mut links = 0;
    // `pending` is a stack of paths still to walk; a symlink's target is pushed on top of the
    // rest of the path it interrupted.
    while let Some(next) = pending.pop() {
        let mut components = next.components();
        while let Some(c) = components.next() {
            match c {
                Component::RootDir | Component::Prefix(_) => resolved = PathBuf::new(),
                Component::CurDir => {}
                Component::ParentDir => {
                    resolved.pop();
                }
                Component::Normal(name) => {
                    let candidate = resolved.join(name);
                    let host = root.join(&candidate);
                    match std::fs::symlink_metadata(&host) {
                        Ok(m) if m.file_type().is_symlink() => {
                            links += 1;
                            if links > MAX_SYMLINKS {
                                return Err(io::Error::other(format!(
                                    "too many symlinks resolving {}",
                                    path.display()
                                )));
                            }
                            let target = std::fs::read_link(&host)?;
                            let rest = components.as_path().to_path_buf();
                            pending.push(rest);
                            pending.push(target);
                            break;
                        }
                        _ => resolved = candidate,
                    }
                }
            }
        }
    }
    Ok(root.join(resolved))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn image(config: serde_json::Value) -> ImageConfiguration {
        parse_image_config(json!({
            "architecture": "amd64",
            "os": "linux",
            "rootfs": {"type": "layers", "diff_ids": []},
            "config": config,
        }))
        .unwrap()
    }

    fn rootfs(passwd: &str, group: &str) -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("etc")).unwrap();
        std::fs::write(dir.path().join("etc/passwd"), passwd).unwrap();
        std::fs::write(dir.path().join("etc/group"), group).unwrap();
        dir
    }

    const PASSWD_TEXT: &str = "root:x:0:0:root:/root:/bin/bash\n\
        daemon:x:1:1:daemon:/usr/sbin:/usr/sbin/nologin\n\
        # a comment\n\
        broken line\n\
        app:x:1000:1000:App:/home/app:/bin/sh\n";
    const GROUP_TEXT: &str = "root:x:0:\n\
        audio:x:29:app,daemon\n\
        video:x:44:app\n\
        app:x:1000:\n\
        staff:x:50:\n";

    fn request(root: &Path) -> RunRequest {
        RunRequest {
            name: "c1".into(),
            rootfs: root.to_path_buf(),
            ..RunRequest::default()
        }
    }

    fn args(spec: &Spec) -> Vec<String> {
        spec.process().as_ref().unwrap().args().clone().unwrap()
    }

    fn env(spec: &Spec) -> Vec<String> {
        spec.process().as_ref().unwrap().env().clone().unwrap()
    }

    fn strings(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn image_entrypoint_and_cmd_are_joined() {
        let root = rootfs(PASSWD_TEXT, GROUP_TEXT);
        let img = image(json!({"Entrypoint": ["/bin/app", "-v"], "Cmd": ["serve"]}));
        let spec = build(&img, &request(root.path())).unwrap();
        assert_eq!(args(&spec), strings(&["/bin/app", "-v", "serve"]));
    }

    #[test]
    fn command_after_dashes_replaces_cmd_and_keeps_entrypoint() {
        let root = rootfs(PASSWD_TEXT, GROUP_TEXT);
        let img = image(json!({"Entrypoint": ["/bin/app"], "Cmd": ["serve"]}));
        let mut req = request(root.path());
        req.command = strings(&["check", "--all"]);
        assert_eq!(
            args(&build(&img, &req).unwrap()),
            strings(&["/bin/app", "check", "--all"])
        );
    }

    #[test]
    fn entrypoint_flag_drops_image_cmd() {
        let root = rootfs(PASSWD_TEXT, GROUP_TEXT);
        let img = image(json!({"Entrypoint": ["/bin/app"], "Cmd": ["serve"]}));
        let mut req = request(root.path());
        req.entrypoint = Some("/bin/sh".into());
        assert_eq!(args(&build(&img, &req).unwrap()), strings(&["/bin/sh"]));
        req.command = strings(&["-c", "true"]);
        assert_eq!(
            args(&build(&img, &req).unwrap()),
            strings(&["/bin/sh", "-c", "true"])
        );
        // An empty entrypoint clears the image's: the command runs alone.
        req.entrypoint = Some(String::new());
        req.command = strings(&["/bin/true"]);
        assert_eq!(args(&build(&img, &req).unwrap()), strings(&["/bin/true"]));
    }

    #[test]
    fn cmd_only_image() {
        let root = rootfs(PASSWD_TEXT, GROUP_TEXT);
        let img = image(json!({"Cmd": ["bash"]}));
        assert_eq!(
            args(&build(&img, &request(root.path())).unwrap()),
            strings(&["bash"])
        );
    }

    #[test]
    fn nothing_to_run_is_an_error() {
        let root = rootfs(PASSWD_TEXT, GROUP_TEXT);
        let err = build(&image(json!({})), &request(root.path())).unwrap_err();
        assert!(matches!(err, SpecError::EmptyCommand), "{err}");
        assert!(err.to_string().contains("after `--`"));
        let mut req = request(root.path());
        req.entrypoint = Some(String::new());
        let img = image(json!({"Entrypoint": ["/x"], "Cmd": ["y"]}));
        assert!(matches!(
            build(&img, &req).unwrap_err(),
            SpecError::EmptyCommand
        ));
        // An image without any "config" at all.
        let bare = parse_image_config(json!({
            "architecture": "amd64", "os": "linux",
            "rootfs": {"type": "layers", "diff_ids": []},
        }))
        .unwrap();
        assert!(matches!(
            build(&bare, &request(root.path())).unwrap_err(),
            SpecError::EmptyCommand
        ));
    }

    #[test]
    fn env_overrides_by_key_and_gets_defaults() {
        let root = rootfs(PASSWD_TEXT, GROUP_TEXT);
        let img = image(json!({"Cmd": ["x"], "Env": ["LANG=C.UTF-8", "A=1", "B=2=two"]}));
        let mut req = request(root.path());
        req.env = vec![("A".into(), "override".into()), ("NEW".into(), "n".into())];
        assert_eq!(
            env(&build(&img, &req).unwrap()),
            strings(&[
                "LANG=C.UTF-8",
                "A=override",
                "B=2=two",
                "NEW=n",
                &format!("PATH={DEFAULT_PATH}"),
                "HOSTNAME=c1",
                "HOME=/root",
            ])
        );
        // The image's PATH and a user's HOME are kept.
        let img = image(json!({"Cmd": ["x"], "Env": ["PATH=/opt/bin"]}));
        req.env = vec![("HOME".into(), "/tmp".into())];
        req.user = Some("app".into());
        assert_eq!(
            env(&build(&img, &req).unwrap()),
            strings(&["PATH=/opt/bin", "HOME=/tmp", "HOSTNAME=c1"])
        );
    }

    #[test]
    fn parse_env_forms() {
        let none = |_: &str| None;
        assert_eq!(
            parse_env("K=V=W", none).unwrap(),
            Some(("K".into(), "V=W".into()))
        );
        assert_eq!(
            parse_env("K=", none).unwrap(),
            Some(("K".into(), "".into()))
        );
        assert_eq!(parse_env("K", none).unwrap(), None);
        assert_eq!(
            parse_env("K", |k| Some(format!("host-{k}"))).unwrap(),
            Some(("K".into(), "host-K".into()))
        );
        assert!(matches!(
            parse_env("=V", none),
            Err(SpecError::BadEnv { .. })
        ));
        assert!(parse_env("A B=1", none).is_err());
    }

    #[test]
    fn workdir_flag_image_and_default() {
        let root = rootfs(PASSWD_TEXT, GROUP_TEXT);
        let cwd = |img: &ImageConfiguration, req: &RunRequest| {
            build(img, req)
                .unwrap()
                .process()
                .as_ref()
                .unwrap()
                .cwd()
                .clone()
        };
        let mut req = request(root.path());
        let plain = image(json!({"Cmd": ["x"]}));
        assert_eq!(cwd(&plain, &req), PathBuf::from("/"));
        let with_dir = image(json!({"Cmd": ["x"], "WorkingDir": "/srv/app"}));
        assert_eq!(cwd(&with_dir, &req), PathBuf::from("/srv/app"));
        let relative = image(json!({"Cmd": ["x"], "WorkingDir": "srv"}));
        assert_eq!(cwd(&relative, &req), PathBuf::from("/srv"));
        req.workdir = Some("/tmp".into());
        assert_eq!(cwd(&with_dir, &req), PathBuf::from("/tmp"));
        req.workdir = Some("tmp".into());
        assert!(matches!(
            build(&with_dir, &req).unwrap_err(),
            SpecError::RelativeWorkdir { .. }
        ));
    }

    fn user(root: &Path, arg: Option<&str>) -> Result<ResolvedUser, SpecError> {
        resolve_user(root, arg)
    }

    fn resolved(uid: u32, gid: u32, additional_gids: &[u32], home: &str) -> ResolvedUser {
        ResolvedUser {
            uid,
            gid,
            additional_gids: additional_gids.to_vec(),
            home: home.into(),
        }
    }

    #[test]
    fn user_forms_resolve_against_the_images_files() {
        let root = rootfs(PASSWD_TEXT, GROUP_TEXT);
        let r = root.path();
        assert_eq!(user(r, None).unwrap(), resolved(0, 0, &[], "/root"));
        assert_eq!(
            user(r, Some("app")).unwrap(),
            resolved(1000, 1000, &[29, 44], "/home/app")
        );
        assert_eq!(
            user(r, Some("1000")).unwrap(),
            resolved(1000, 1000, &[29, 44], "/home/app")
        );
        assert_eq!(
            user(r, Some("app:staff")).unwrap(),
            resolved(1000, 50, &[], "/home/app")
        );
        assert_eq!(
            user(r, Some("app:7")).unwrap(),
            resolved(1000, 7, &[], "/home/app")
        );
        assert_eq!(
            user(r, Some("1:audio")).unwrap(),
            resolved(1, 29, &[], "/usr/sbin")
        );
        // Numeric ids the files do not know are allowed.
        assert_eq!(user(r, Some("4242")).unwrap(), resolved(4242, 0, &[], "/"));
        assert_eq!(
            user(r, Some("4242:4343")).unwrap(),
            resolved(4242, 4343, &[], "/")
        );
    }

    #[test]
    fn unknown_names_are_errors_naming_the_file() {
        let root = rootfs(PASSWD_TEXT, GROUP_TEXT);
        let err = user(root.path(), Some("nobody")).unwrap_err();
        assert!(matches!(err, SpecError::UnknownUser { .. }), "{err}");
        assert!(err.to_string().contains("/etc/passwd"), "{err}");
        let err = user(root.path(), Some("app:wheel")).unwrap_err();
        assert!(matches!(err, SpecError::UnknownGroup { .. }), "{err}");
        assert!(err.to_string().contains("/etc/group"), "{err}");
        for bad in ["", ":1", "1:", "a:b:c"] {
            assert!(
                matches!(user(root.path(), Some(bad)), Err(SpecError::BadUser { .. })),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn missing_passwd_allows_numeric_users_only() {
        let root = tempfile::tempdir().unwrap();
        assert_eq!(user(root.path(), None).unwrap(), resolved(0, 0, &[], "/"));
        assert_eq!(
            user(root.path(), Some("12:34")).unwrap(),
            resolved(12, 34, &[], "/")
        );
        let err = user(root.path(), Some("app")).unwrap_err();
        assert!(err.to_string().contains("/etc/passwd"), "{err}");
    }

    #[test]
    fn image_user_is_used_and_flag_wins() {
        let root = rootfs(PASSWD_TEXT, GROUP_TEXT);
        let img = image(json!({"Cmd": ["x"], "User": "app"}));
        let mut req = request(root.path());
        let spec = build(&img, &req).unwrap();
        let u = spec.process().as_ref().unwrap().user().clone();
        assert_eq!((u.uid(), u.gid()), (1000, 1000));
        assert_eq!(u.additional_gids().clone(), Some(vec![29, 44]));
        assert!(env(&spec).contains(&"HOME=/home/app".to_string()));
        req.user = Some("0".into());
        let spec = build(&img, &req).unwrap();
        let u = spec.process().as_ref().unwrap().user().clone();
        assert_eq!((u.uid(), u.gid()), (0, 0));
        assert_eq!(u.additional_gids().clone(), None);
    }

    #[test]
    fn passwd_symlink_stays_inside_the_rootfs() {
        let root = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(root.path().join("etc")).unwrap();
        std::fs::create_dir_all(root.path().join("data")).unwrap();
        std::fs::write(
            root.path().join("data/passwd"),
            "inside:x:77:77::/in:/bin/sh\n",
        )
        .unwrap();
        // An absolute link is taken inside the rootfs, never on the host.
        std::os::unix::fs::symlink("/data/passwd", root.path().join("etc/passwd")).unwrap();
        assert_eq!(
            user(root.path(), Some("inside")).unwrap(),
            resolved(77, 77, &[], "/in")
        );
        // `..` stops at the root.
        std::fs::remove_file(root.path().join("etc/passwd")).unwrap();
        std::os::unix::fs::symlink("../../../../../data/passwd", root.path().join("etc/passwd"))
            .unwrap();
        assert_eq!(user(root.path(), Some("inside")).unwrap().uid, 77);
        assert_eq!(
            resolve_in_root(root.path(), Path::new("/etc/passwd")).unwrap(),
            root.path().join("data/passwd")
        );
        // A loop is an error, not a hang.
        std::fs::remove_file(root.path().join("etc/passwd")).unwrap();
        std::os::unix::fs::symlink("/etc/passwd", root.path().join("etc/passwd")).unwrap();
        assert!(matches!(
            user(root.path(), Some("inside")),
            Err(SpecError::ReadImageFile { .. })
        ));
    }

    #[test]
    fn passwd_that_is_not_a_small_regular_file_is_refused_without_hanging() {
        let root = rootfs(PASSWD_TEXT, GROUP_TEXT);
        let passwd = root.path().join("etc/passwd");
        std::fs::remove_file(&passwd).unwrap();
        let fifo = std::ffi::CString::new(passwd.to_str().unwrap()).unwrap();
        // SAFETY: a valid NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o644) }, 0);
        let err = user(root.path(), Some("app")).unwrap_err().to_string();
        assert!(
            err.contains("/etc/passwd") && err.contains("regular file"),
            "{err}"
        );

        std::fs::remove_file(&passwd).unwrap();
        let huge = std::fs::File::create(&passwd).unwrap();
        huge.set_len(1 << 40).unwrap();
        let err = user(root.path(), Some("app")).unwrap_err().to_string();
        assert!(err.contains("at most"), "{err}");
    }

    #[test]
    #[cfg_attr(
        not(feature = "system-tests"),
        ignore = "needs containers-common (/usr/share/containers/seccomp.json)"
    )]
    fn network_namespace_unless_host_and_seccomp_when_given() {
        let root = rootfs(PASSWD_TEXT, GROUP_TEXT);
        let namespaces = |req: &RunRequest| -> Vec<String> {
            let spec = build(&image(json!({"Cmd": ["x"]})), req).unwrap();
            let json = serde_json::to_value(&spec).unwrap();
            json["linux"]["namespaces"]
                .as_array()
                .unwrap()
                .iter()
                .map(|n| n["type"].as_str().unwrap().to_string())
                .collect()
        };
        let mut req = request(root.path());
        assert_eq!(namespaces(&req), ["pid", "ipc", "uts", "mount", "network"]);
        req.network = Network::Host;
        assert_eq!(namespaces(&req), ["pid", "ipc", "uts", "mount"]);

        let spec = build(&image(json!({"Cmd": ["x"]})), &req).unwrap();
        assert!(spec.linux().as_ref().unwrap().seccomp().is_none());
        let profile = crate::seccomp::load(None).unwrap();
        let granted = DEFAULT_CAPABILITIES.into_iter().collect();
        req.seccomp = Some(crate::seccomp::to_spec(&profile, &granted, "amd64", None).unwrap());
        let spec = build(&image(json!({"Cmd": ["x"]})), &req).unwrap();
        let json = serde_json::to_value(&spec).unwrap();
        assert_eq!(json["linux"]["seccomp"]["defaultAction"], "SCMP_ACT_ERRNO");
    }

    #[test]
    fn volumes_parse_and_become_rbind_mounts() {
        let host = tempfile::tempdir().unwrap();
        let src = host.path().to_str().unwrap();
        let v = parse_volume(&format!("{src}:/data:ro")).unwrap();
        assert_eq!(
            v,
            Volume {
                source: std::fs::canonicalize(host.path()).unwrap(),
                destination: "/data".into(),
                read_only: true,
            }
        );
        assert!(!parse_volume(&format!("{src}:/data")).unwrap().read_only);
        assert!(!parse_volume(&format!("{src}:/data:rw")).unwrap().read_only);

        let root = rootfs(PASSWD_TEXT, GROUP_TEXT);
        let mut req = request(root.path());
        req.volumes = vec![v];
        let spec = build(&image(json!({"Cmd": ["x"]})), &req).unwrap();
        let mounts = spec.mounts().as_ref().unwrap();
        let last = mounts.last().unwrap();
        assert_eq!(last.destination(), Path::new("/data"));
        assert_eq!(last.typ().as_deref(), Some("bind"));
        assert_eq!(last.options().clone().unwrap(), strings(&["rbind", "ro"]));
    }

    #[test]
    fn bad_volumes_are_errors() {
        let host = tempfile::tempdir().unwrap();
        let src = host.path().to_str().unwrap();
        let missing = host.path().join("missing");
        for (arg, why) in [
            (src.to_string(), "not two or three fields"),
            (format!("{src}:data"), "not an absolute path"),
            (format!("{src}:/"), "container's root"),
            (format!("{src}:/data:rx"), "unknown mode"),
            (format!("{src}:/data:ro:x"), "not two or three fields"),
            (":/data".to_string(), "empty source"),
            (format!("{}:/data", missing.display()), "cannot be used"),
        ] {
            let err = parse_volume(&arg).unwrap_err();
            assert!(matches!(err, SpecError::BadVolume { .. }), "{arg}: {err}");
            assert!(err.to_string().contains(why), "{arg}: {err}");
        }
    }

    #[test]
    fn relative_volume_source_is_made_absolute() {
        // The test's working directory (the crate) exists, so "." resolves.
        let v = parse_volume(".:/src").unwrap();
        assert!(v.source.is_absolute());
        assert_eq!(
            v.source,
            std::env::current_dir().unwrap().canonicalize().unwrap()
        );
    }

    #[test]
    fn open_files_limit_stays_under_lazyctls_own() {
        let root = rootfs(PASSWD_TEXT, GROUP_TEXT);
        let nofile = |ceiling: Option<u64>| {
            let mut req = request(root.path());
            req.nofile_ceiling = ceiling;
            let spec = build(&image(json!({"Cmd": ["x"]})), &req).unwrap();
            let json = serde_json::to_value(&spec).unwrap();
            let r = &json["process"]["rlimits"][0];
            assert_eq!(r["type"], "RLIMIT_NOFILE");
            (r["soft"].as_u64().unwrap(), r["hard"].as_u64().unwrap())
        };
        assert_eq!(nofile(None), (1024, 524_288));
        assert_eq!(nofile(Some(1 << 20)), (1024, 524_288));
        // Regression: a hard limit of 20000 (no CAP_SYS_RESOURCE) made crun and runc fail with
        // "setrlimit RLIMIT_NOFILE: Operation not permitted".
        assert_eq!(nofile(Some(20_000)), (1024, 20_000));
        assert_eq!(nofile(Some(512)), (512, 512));
    }

    #[test]
    fn sandbox_matches_the_docker_defaults() {
        let root = rootfs(PASSWD_TEXT, GROUP_TEXT);
        let spec = build(&image(json!({"Cmd": ["x"]})), &request(root.path())).unwrap();
        let json = serde_json::to_value(&spec).unwrap();
        assert_eq!(json["ociVersion"], OCI_VERSION);
        assert_eq!(json["hostname"], "c1");
        assert_eq!(json["root"]["path"], root.path().to_str().unwrap());
        assert_eq!(json["root"]["readonly"], false);
        assert_eq!(json["process"]["terminal"], false);
        assert_eq!(json["process"]["noNewPrivileges"], true);
        let namespaces: Vec<&str> = json["linux"]["namespaces"]
            .as_array()
            .unwrap()
            .iter()
            .map(|n| n["type"].as_str().unwrap())
            .collect();
        assert_eq!(namespaces, ["pid", "ipc", "uts", "mount", "network"]);
        let destinations: Vec<&str> = json["mounts"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m["destination"].as_str().unwrap())
            .collect();
        assert_eq!(
            destinations,
            [
                "/proc",
                "/dev",
                "/dev/pts",
                "/dev/shm",
                "/dev/mqueue",
                "/sys"
            ]
        );
        assert_eq!(json["mounts"][5]["options"][3], "ro");
        let mut bounding: Vec<String> = json["process"]["capabilities"]["bounding"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c.as_str().unwrap().to_string())
            .collect();
        bounding.sort();
        assert_eq!(bounding.len(), 13);
        assert!(bounding.contains(&"CAP_CHOWN".to_string()));
        assert!(!bounding.contains(&"CAP_NET_RAW".to_string()));
        assert!(!bounding.contains(&"CAP_SYS_ADMIN".to_string()));
        assert_eq!(json["linux"]["maskedPaths"].as_array().unwrap().len(), 10);
        assert_eq!(json["linux"]["readonlyPaths"][3], "/proc/sys");
        // Nothing of the library's example spec leaks in.
        assert!(json
            .get("annotations")
            .is_none_or(|a| a.as_object().unwrap().is_empty()));
        assert!(json["linux"].get("uidMappings").is_none());
    }
}
