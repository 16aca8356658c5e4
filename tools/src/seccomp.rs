//! The seccomp filter of `lazyctl run`'s containers: the profile docker and podman apply by
//! default, read from the file containers-common installs (`DEFAULT_PROFILE`, the same one
//! podman reads), and turned into the runtime spec's `linux.seccomp` for this machine's
//! architecture and the container's capabilities, as docker and podman do.
//!
//! The profile's format (docker's `seccomp.json`): a default action, the architectures
//! (`archMap`: each native one with its compatible sub-architectures), and rules, each naming
//! syscalls with an action and argument conditions, and applying only where its `includes`
//! hold (every listed capability granted, the architecture listed, a minimum kernel) and its
//! `excludes` do not (no listed capability granted, the architecture not listed).

use std::collections::HashSet;
use std::path::Path;

use oci_spec::runtime::{
    Arch, Capability, LinuxSeccomp, LinuxSeccompAction, LinuxSeccompArg, LinuxSeccompBuilder,
    LinuxSyscall, LinuxSyscallBuilder,
};
use serde::Deserialize;
use thiserror::Error;

/// Where containers-common (Debian: golang-github-containers-common, which skopeo and podman
/// pull in) installs the default profile.
pub const DEFAULT_PROFILE: &str = "/usr/share/containers/seccomp.json";

/// A profile larger than this is not a seccomp profile (docker's is about 20 KB).
const MAX_PROFILE_BYTES: u64 = 4 << 20;

#[derive(Debug, Error)]
pub enum SeccompError {
    #[error("reading the seccomp profile {path}: {source}{hint}")]
    Read {
        path: String,
        source: std::io::Error,
        hint: &'static str,
    },
    #[error("the seccomp profile {path} is not valid: {reason}")]
    Invalid { path: String, reason: String },
}

/// The profile file, as docker and containers-common write it.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Profile {
    default_action: LinuxSeccompAction,
    #[serde(default)]
    default_errno_ret: Option<u32>,
    /// Older profiles list architectures without sub-architectures.
    #[serde(default)]
    architectures: Vec<Arch>,
    #[serde(default)]
    arch_map: Vec<ArchMap>,
    #[serde(default)]
    syscalls: Vec<Rule>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct ArchMap {
    architecture: Arch,
    #[serde(default)]
    sub_architectures: Vec<Arch>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Rule {
    #[serde(default)]
    names: Vec<String>,
    /// Profiles before docker 1.13 name one syscall per rule.
    #[serde(default)]
    name: Option<String>,
    action: LinuxSeccompAction,
    #[serde(default)]
    errno_ret: Option<u32>,
    #[serde(default)]
    args: Option<Vec<LinuxSeccompArg>>,
    #[serde(default)]
    includes: Filter,
    #[serde(default)]
    excludes: Filter,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Filter {
    /// Capability names, `CAP_...`.
    #[serde(default)]
    caps: Vec<String>,
    /// Go's architecture names (`amd64`, `arm64`, ...).
    #[serde(default)]
    arches: Vec<String>,
    /// `MAJOR.MINOR`.
    #[serde(default)]
    min_kernel: Option<String>,
}

/// Reads a profile file (the default one when `path` is `None`).
pub fn load(path: Option<&Path>) -> Result<Profile, SeccompError> {
    let file = path.unwrap_or(Path::new(DEFAULT_PROFILE));
    let shown = file.display().to_string();
    let hint = if path.is_none() {
        " (install containers-common, Debian's golang-github-containers-common, or pass \
         --security-opt seccomp=PATH or seccomp=unconfined)"
    } else {
        ""
    };
    let read_error = |source| SeccompError::Read {
        path: shown.clone(),
        source,
        hint,
    };
    let meta = std::fs::metadata(file).map_err(read_error)?;
    if !meta.is_file() || meta.len() > MAX_PROFILE_BYTES {
        return Err(SeccompError::Invalid {
            path: shown,
            reason: format!("not a regular file of at most {MAX_PROFILE_BYTES} bytes"),
        });
    }
    let bytes = std::fs::read(file).map_err(read_error)?;
    serde_json::from_slice(&bytes).map_err(|e| SeccompError::Invalid {
        path: shown,
        reason: e.to_string(),
    })
}

/// This machine's architecture as Go (and so the profile's `arches`) names it.
pub fn native_arch() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "x86" => "386",
        "aarch64" => "arm64",
        "powerpc64" if cfg!(target_endian = "little") => "ppc64le",
        "powerpc64" => "ppc64",
        "loongarch64" => "loong64",
        other => other,
    }
}

/// libseccomp's name of the architecture Go calls `arch`.
fn scmp_arch(arch: &str) -> Option<Arch> {
    Some(match arch {
        "amd64" => Arch::ScmpArchX86_64,
        "386" => Arch::ScmpArchX86,
        "arm64" => Arch::ScmpArchAarch64,
        "arm" => Arch::ScmpArchArm,
        "ppc64le" => Arch::ScmpArchPpc64le,
        "ppc64" => Arch::ScmpArchPpc64,
        "s390x" => Arch::ScmpArchS390x,
        "riscv64" => Arch::ScmpArchRiscv64,
        "loong64" => Arch::ScmpArchLoongarch64,
        "mips64le" => Arch::ScmpArchMipsel64,
        "mips64" => Arch::ScmpArchMips64,
        _ => return None,
    })
}

/// The running kernel's (major, minor), from uname.
pub fn kernel_version() -> Option<(u32, u32)> {
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").ok()?;
    parse_version(release.trim())
}

fn parse_version(v: &str) -> Option<(u32, u32)> {
    let mut parts = v.split(['.', '-']);
    let major = parts.next()?.parse().ok()?;
    let minor = parts
        .next()?
        .chars()
        .take_while(char::is_ascii_digit)
        .collect::<String>()
        .parse()
        .ok()?;
    Some((major, minor))
}

/// The runtime spec's filter for a container with `capabilities` on `arch` (Go's name) and
/// `kernel`, as docker builds it from the same profile.
pub fn to_spec(
    profile: &Profile,
    capabilities: &HashSet<Capability>,
    arch: &str,
    kernel: Option<(u32, u32)>,
) -> Result<LinuxSeccomp, oci_spec::OciSpecError> {
    // `CAP_...`, as the profile names them (serde's names; strum's lack the prefix).
    let granted: HashSet<String> = capabilities
        .iter()
        .filter_map(|c| serde_json::to_value(c).ok()?.as_str().map(String::from))
        .collect();
    // The native architecture and its compatible ones only, as docker does: a runtime's
    // libseccomp refuses architectures the kernel cannot run.
    let mut architectures = profile.architectures.clone();
    let native = scmp_arch(arch);
    for map in profile
        .arch_map
        .iter()
        .filter(|m| Some(m.architecture) == native)
    {
        architectures.push(map.architecture);
        architectures.extend(&map.sub_architectures);
    }
    let mut syscalls: Vec<LinuxSyscall> = Vec::new();
    for rule in &profile.syscalls {
        if !applies(rule, &granted, arch, kernel) {
            continue;
        }
        let names: Vec<String> = rule.names.iter().chain(&rule.name).cloned().collect();
        let mut syscall = LinuxSyscallBuilder::default()
            .names(names)
            .action(rule.action);
        if let Some(errno) = rule.errno_ret {
            syscall = syscall.errno_ret(errno);
        }
        if let Some(args) = rule.args.clone().filter(|a| !a.is_empty()) {
            syscall = syscall.args(args);
        }
        syscalls.push(syscall.build()?);
    }
    let mut seccomp = LinuxSeccompBuilder::default()
        .default_action(profile.default_action)
        .architectures(architectures)
        .syscalls(syscalls);
    if let Some(errno) = profile.default_errno_ret {
        seccomp = seccomp.default_errno_ret(errno);
    }
    seccomp.build()
}

fn applies(rule: &Rule, granted: &HashSet<String>, arch: &str, kernel: Option<(u32, u32)>) -> bool {
    let (inc, exc) = (&rule.includes, &rule.excludes);
    let arch_listed = |f: &Filter| f.arches.iter().any(|a| a == arch);
    if !inc.arches.is_empty() && !arch_listed(inc) {
        return false;
    }
    if !inc.caps.iter().all(|c| granted.contains(c)) {
        return false;
    }
    if let Some(min) = inc.min_kernel.as_deref() {
        // A kernel that cannot be read is taken as too old: the rule (an allowance for newer
        // syscalls) is left out, and the default action answers them.
        match (parse_version(min), kernel) {
            (Some(min), Some(running)) if running >= min => {}
            _ => return false,
        }
    }
    if arch_listed(exc) || exc.caps.iter().any(|c| granted.contains(c)) {
        return false;
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    fn profile(json: serde_json::Value) -> Profile {
        serde_json::from_value(json).unwrap()
    }

    fn caps(list: &[Capability]) -> HashSet<Capability> {
        list.iter().copied().collect()
    }

    fn names(spec: &LinuxSeccomp) -> Vec<(String, LinuxSeccompAction)> {
        spec.syscalls()
            .as_deref()
            .unwrap_or_default()
            .iter()
            .flat_map(|s| s.names().iter().map(move |n| (n.clone(), s.action())))
            .collect()
    }

    #[test]
    fn rules_apply_by_capability_architecture_and_kernel() {
        let p = profile(serde_json::json!({
            "defaultAction": "SCMP_ACT_ERRNO",
            "defaultErrnoRet": 1,
            "archMap": [{"architecture": "SCMP_ARCH_X86_64",
                         "subArchitectures": ["SCMP_ARCH_X86", "SCMP_ARCH_X32"]},
                        {"architecture": "SCMP_ARCH_AARCH64",
                         "subArchitectures": ["SCMP_ARCH_ARM"]}],
            "syscalls": [
                {"names": ["read", "write"], "action": "SCMP_ACT_ALLOW"},
                {"names": ["chroot"], "action": "SCMP_ACT_ALLOW",
                 "includes": {"caps": ["CAP_SYS_CHROOT"]}},
                {"names": ["ptrace"], "action": "SCMP_ACT_ALLOW",
                 "includes": {"caps": ["CAP_SYS_PTRACE"]}},
                {"names": ["arch_prctl"], "action": "SCMP_ACT_ALLOW",
                 "includes": {"arches": ["amd64", "x32"]}},
                {"names": ["s390_runtime_instr"], "action": "SCMP_ACT_ALLOW",
                 "includes": {"arches": ["s390x"]}},
                {"names": ["socket"], "action": "SCMP_ACT_ERRNO", "errnoRet": 1,
                 "excludes": {"caps": ["CAP_AUDIT_WRITE"]},
                 "args": [{"index": 0, "value": 16, "op": "SCMP_CMP_EQ"}]},
                {"names": ["clone3"], "action": "SCMP_ACT_ERRNO", "errnoRet": 38,
                 "excludes": {"caps": ["CAP_SYS_ADMIN"], "arches": ["s390x"]}},
                {"names": ["futex_waitv"], "action": "SCMP_ACT_ALLOW",
                 "includes": {"minKernel": "5.16"}},
                {"name": "old_style", "action": "SCMP_ACT_ALLOW"}
            ]
        }));
        let spec = to_spec(&p, &caps(&[Capability::SysChroot]), "amd64", Some((6, 1))).unwrap();
        assert_eq!(spec.default_action(), LinuxSeccompAction::ScmpActErrno);
        assert_eq!(spec.default_errno_ret(), Some(1));
        assert_eq!(
            spec.architectures().as_deref(),
            Some(&[Arch::ScmpArchX86_64, Arch::ScmpArchX86, Arch::ScmpArchX32][..])
        );
        let allowed: Vec<String> = names(&spec)
            .into_iter()
            .filter(|(_, a)| *a == LinuxSeccompAction::ScmpActAllow)
            .map(|(n, _)| n)
            .collect();
        assert_eq!(
            allowed,
            [
                "read",
                "write",
                "chroot",
                "arch_prctl",
                "futex_waitv",
                "old_style"
            ]
        );
        let socket = spec
            .syscalls()
            .as_deref()
            .unwrap()
            .iter()
            .find(|s| s.names() == &["socket"])
            .expect("socket is filtered without CAP_AUDIT_WRITE");
        assert_eq!(socket.errno_ret(), Some(1));
        assert_eq!(socket.args().as_deref().unwrap()[0].value(), 16);
        assert!(names(&spec).iter().any(|(n, _)| n == "clone3"));

        let old_kernel = to_spec(&p, &HashSet::new(), "amd64", Some((5, 10))).unwrap();
        assert!(!names(&old_kernel).iter().any(|(n, _)| n == "futex_waitv"));
        assert!(!names(&old_kernel).iter().any(|(n, _)| n == "chroot"));
        let privileged = caps(&[Capability::AuditWrite, Capability::SysAdmin]);
        let more = to_spec(&p, &privileged, "s390x", None).unwrap();
        let more = names(&more);
        assert!(!more.iter().any(|(n, _)| n == "socket" || n == "clone3"));
        assert!(more.iter().any(|(n, _)| n == "s390_runtime_instr"));
        assert!(
            !more.iter().any(|(n, _)| n == "futex_waitv"),
            "kernel unknown"
        );
    }

    #[test]
    #[cfg_attr(
        not(feature = "system-tests"),
        ignore = "needs containers-common (/usr/share/containers/seccomp.json)"
    )]
    fn the_installed_default_profile_denies_what_the_capabilities_do_not_cover() {
        // containers-common is installed by scripts/setup.sh; this reads the real file. Its
        // profile (podman's, derived from docker's) denies the calls no capability guards and
        // those whose capability the container lacks; mount, ptrace and unshare it leaves to
        // the capabilities (no SYS_ADMIN, no SYS_PTRACE here).
        let p = load(None).unwrap();
        let granted = caps(&crate::spec::DEFAULT_CAPABILITIES);
        let spec = to_spec(&p, &granted, native_arch(), kernel_version()).unwrap();
        assert_eq!(spec.default_action(), LinuxSeccompAction::ScmpActErrno);
        let allowed: HashSet<String> = names(&spec)
            .into_iter()
            .filter(|(_, a)| *a == LinuxSeccompAction::ScmpActAllow)
            .map(|(n, _)| n)
            .collect();
        for call in ["read", "openat", "execve", "clone", "chroot", "setuid"] {
            assert!(allowed.contains(call), "{call} is allowed");
        }
        for call in [
            "kexec_load",
            "init_module",
            "bpf",
            "acct",
            "settimeofday",
            "open_by_handle_at",
            "perf_event_open",
        ] {
            assert!(!allowed.contains(call), "{call} is denied");
        }
    }

    #[test]
    fn bad_profiles_are_clear_errors() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("missing.json");
        let err = load(Some(&missing)).unwrap_err().to_string();
        assert!(err.contains("missing.json"), "{err}");
        let bad = dir.path().join("bad.json");
        std::fs::write(&bad, br#"{"defaultAction": "SCMP_ACT_EXPLODE"}"#).unwrap();
        let err = load(Some(&bad)).unwrap_err().to_string();
        assert!(err.contains("not valid"), "{err}");
        let err = load(Some(dir.path())).unwrap_err().to_string();
        assert!(err.contains("not a regular file"), "{err}");
    }

    #[test]
    fn kernel_versions_parse() {
        assert_eq!(parse_version("6.18.0-1-amd64"), Some((6, 18)));
        assert_eq!(parse_version("5.4"), Some((5, 4)));
        assert_eq!(parse_version("4.19rc1"), Some((4, 19)));
        assert_eq!(parse_version("x"), None);
    }
}
