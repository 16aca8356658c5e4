//! Running `lazyctl` and holding a live FUSE mount for the length of a test.
//!
//! [`Mounted`] starts `lazyctl mount --standalone dir:STORE MNT` (which stays in the foreground until the
//! file system is unmounted), waits until `/proc/self/mountinfo` shows a `fuse*` mount at MNT,
//! and on drop unmounts with `lazyctl umount MNT`, waits for the child, and falls back to
//! SIGTERM, SIGKILL and `umount -l` so a failing test never leaves a mount behind. The child's
//! stdout and stderr go to files (a pipe nobody reads would block a chatty daemon); they are
//! shown when the mount fails to come up and when a test panics while holding the mount.
//!
//! The binary is `$LAZYCTL` or `lazyctl` next to the test executable's `deps/` directory (the
//! `target/<profile>/` that `cargo build -p tools --bin lazyctl` fills).
//! [`require_root_and_fuse`] makes a missing precondition fail loudly: these tests never skip.

use std::ffi::{OsStr, OsString};
use std::fs::{self, File};
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::thread::sleep;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};

/// How long a mount may take to appear: a cold daemon start plus reading the index.
pub const MOUNT_TIMEOUT: Duration = Duration::from_secs(20);
/// How long the child may take to exit after `lazyctl umount`, and again after SIGTERM.
const EXIT_TIMEOUT: Duration = Duration::from_secs(10);
/// Poll interval while waiting for a mount or an exit.
const POLL: Duration = Duration::from_millis(20);

/// The `lazyctl` binary under test: `$LAZYCTL`, else `lazyctl` in the `target/<profile>/`
/// directory holding this test executable. Panics with the build command if it is missing.
pub fn lazyctl_path() -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    match lazyctl_candidate(std::env::var_os("LAZYCTL"), &exe) {
        (path, _) if path.is_file() => path,
        (path, true) => panic!("LAZYCTL={} does not name a file", path.display()),
        (path, false) => panic!(
            "lazyctl not found at {}: build it first with `cargo build -p tools --bin lazyctl` \
             (add --release for a release test run) or set LAZYCTL=/path/to/lazyctl",
            path.display()
        ),
    }
}

/// Where `lazyctl` should be, and whether the environment said so.
fn lazyctl_candidate(env: Option<OsString>, test_exe: &Path) -> (PathBuf, bool) {
    if let Some(path) = env {
        return (PathBuf::from(path), true);
    }
    // Test binaries live in target/<profile>/deps/, binaries in target/<profile>/.
    let mut dir = test_exe.parent().unwrap_or(Path::new(".")).to_path_buf();
    if dir.file_name() == Some(OsStr::new("deps")) {
        dir.pop();
    }
    (dir.join("lazyctl"), false)
}

/// Runs `lazyctl ARGS...` to completion and returns its status and output.
pub fn lazyctl<I, S>(args: I) -> Output
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    let path = lazyctl_path();
    let args: Vec<OsString> = args
        .into_iter()
        .map(|a| a.as_ref().to_os_string())
        .collect();
    Command::new(&path)
        .args(&args)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {} {args:?}: {e}", path.display()))
}

/// Runs `lazyctl ARGS...`, panics with its output unless it succeeded, returns the output.
pub fn lazyctl_ok<I, S>(args: I) -> Output
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    let args: Vec<OsString> = args
        .into_iter()
        .map(|a| a.as_ref().to_os_string())
        .collect();
    let output = lazyctl(&args);
    assert!(
        output.status.success(),
        "lazyctl {args:?} failed with {}:\n--- stdout ---\n{}--- stderr ---\n{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    output
}

/// Panics unless this process is root: the reference unpack, devices, ownership and
/// `trusted.*` xattrs all need it.
pub fn require_root() {
    // SAFETY: geteuid has no preconditions and cannot fail.
    let euid = unsafe { libc::geteuid() };
    assert_eq!(
        euid, 0,
        "these tests must run as root (euid is {euid}): they mount FUSE file systems, create \
         devices and set ownership; run them in the privileged test container or with sudo"
    );
}

/// Panics unless `runtime` is on PATH.
pub fn require_runtime(runtime: &str) {
    let found = std::env::var_os("PATH")
        .is_some_and(|path| std::env::split_paths(&path).any(|dir| dir.join(runtime).is_file()));
    assert!(
        found,
        "{runtime} is not on PATH: apt-get install -y crun runc (scripts/setup.sh does)"
    );
}

/// Panics, naming what is missing, unless this process is root and `/dev/fuse` is a usable
/// character device. Call it first in every test that mounts.
pub fn require_root_and_fuse() {
    require_root();
    use std::os::unix::fs::FileTypeExt;
    let meta = fs::metadata("/dev/fuse").unwrap_or_else(|e| {
        panic!(
            "/dev/fuse is missing ({e}): load the fuse module, or run \
                                    the container with --device /dev/fuse --cap-add SYS_ADMIN"
        )
    });
    assert!(
        meta.file_type().is_char_device(),
        "/dev/fuse is not a character device"
    );
    if let Err(e) = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/fuse")
    {
        panic!("/dev/fuse cannot be opened ({e}): is the device cgroup allowing it?");
    }
}

/// `work/name`, created: an empty directory to mount on.
pub fn mountpoint(work: &Path, name: &str) -> PathBuf {
    let p = work.join(name);
    fs::create_dir_all(&p).unwrap();
    p
}

/// One line of `/proc/self/mountinfo`, the fields the harness needs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MountInfo {
    /// Where it is mounted, unescaped.
    pub mount_point: PathBuf,
    /// `fuse`, `fuse.lazyfs`, `ext4`, ...
    pub fs_type: String,
    /// The mount source (`dir:/path` or whatever the file system reported), unescaped.
    pub source: String,
    /// The per-mount options (`ro,nosuid,nodev,relatime`).
    pub options: String,
}

/// Parses `/proc/self/mountinfo` text.
pub fn parse_mountinfo(text: &str) -> Vec<MountInfo> {
    text.lines()
        .filter_map(|line| {
            let fields: Vec<&str> = line.split(' ').collect();
            let separator = fields.iter().position(|&f| f == "-")?;
            Some(MountInfo {
                mount_point: PathBuf::from(OsStr::from_bytes(&unescape_mount_field(
                    fields.get(4)?,
                ))),
                fs_type: fields.get(separator + 1)?.to_string(),
                source: String::from_utf8_lossy(&unescape_mount_field(fields.get(separator + 2)?))
                    .into_owned(),
                options: fields.get(5)?.to_string(),
            })
        })
        .collect()
}

/// The kernel writes space, tab, newline and backslash in mountinfo as `\ooo` octal escapes.
fn unescape_mount_field(field: &str) -> Vec<u8> {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\' && i + 4 <= bytes.len() {
            let octal = std::str::from_utf8(&bytes[i + 1..i + 4]).unwrap_or("");
            if let Ok(value) = u8::from_str_radix(octal, 8) {
                out.push(value);
                i += 4;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    out
}

/// The mounts at `path` (canonicalised), newest last.
pub fn mounts_at(path: &Path) -> io::Result<Vec<MountInfo>> {
    let text = fs::read_to_string("/proc/self/mountinfo")?;
    Ok(parse_mountinfo(&text)
        .into_iter()
        .filter(|m| m.mount_point == path)
        .collect())
}

/// Whether a FUSE file system (`fuse`, `fuse.*`, `fuseblk`) is mounted at `path` now.
pub fn is_fuse_mounted(path: &Path) -> io::Result<bool> {
    Ok(mounts_at(path)?
        .iter()
        .any(|m| m.fs_type.starts_with("fuse")))
}

/// A `lazyctl mount` child and the FUSE mount it serves; unmounts on drop.
///
/// ```no_run
/// # use lazy_tests::mount::{require_root_and_fuse, Mounted};
/// # use std::path::Path;
/// require_root_and_fuse();
/// let mount = Mounted::new(Path::new("/tmp/store"), Path::new("/tmp/mnt")).unwrap();
/// let hostname = std::fs::read(mount.path().join("etc/hostname")).unwrap();
/// mount.unmount().unwrap(); // or just drop it
/// ```
pub struct Mounted {
    child: Child,
    mountpoint: PathBuf,
    /// The program and leading arguments that unmount: `[lazyctl, "umount"]`.
    umount: Vec<OsString>,
    logs: tempfile::TempDir,
    finished: bool,
}

impl Mounted {
    /// Runs `lazyctl mount dir:STORE MNT` and waits for the mount.
    pub fn new(store: &Path, mountpoint: &Path) -> Result<Mounted> {
        let mut source = OsString::from("dir:");
        source.push(store);
        Mounted::with_args(&[source], mountpoint)
    }

    /// Runs `lazyctl mount --standalone ARGS... MNT` (e.g. extra flags before the store) and
    /// waits.
    pub fn with_args(args: &[OsString], mountpoint: &Path) -> Result<Mounted> {
        let lazyctl = lazyctl_path().into_os_string();
        let mut command = vec![lazyctl.clone(), "mount".into(), "--standalone".into()];
        command.extend(args.iter().cloned());
        Mounted::spawn(
            &command,
            &[lazyctl, "umount".into()],
            mountpoint,
            MOUNT_TIMEOUT,
        )
    }

    /// Runs `command` with MNT appended and waits up to `timeout` for a FUSE mount at MNT;
    /// `umount` with MNT appended unmounts it. Whatever the command, it must stay in the
    /// foreground while the mount lives.
    pub fn spawn(
        command: &[OsString],
        umount: &[OsString],
        mountpoint: &Path,
        timeout: Duration,
    ) -> Result<Mounted> {
        ensure!(
            !command.is_empty() && !umount.is_empty(),
            "empty mount or umount command"
        );
        let mountpoint = fs::canonicalize(mountpoint)
            .with_context(|| format!("mount point {} must exist", mountpoint.display()))?;
        ensure!(
            !is_fuse_mounted(&mountpoint)?,
            "{} already has a FUSE mount (left over from an earlier run? umount -l it)",
            mountpoint.display()
        );
        let logs = tempfile::Builder::new()
            .prefix("lazy-mount-log-")
            .tempdir()?;
        let child = Command::new(&command[0])
            .args(&command[1..])
            .arg(&mountpoint)
            .stdin(Stdio::null())
            .stdout(File::create(logs.path().join("stdout"))?)
            .stderr(File::create(logs.path().join("stderr"))?)
            .spawn()
            .with_context(|| format!("starting {command:?}"))?;
        let mut mounted = Mounted {
            child,
            mountpoint,
            umount: umount.to_vec(),
            logs,
            finished: false,
        };

        let start = Instant::now();
        loop {
            if let Some(status) = mounted.child.try_wait()? {
                mounted.finished = true;
                bail!(
                    "{command:?} exited with {status} before {} was mounted; its output:\n{}",
                    mounted.mountpoint.display(),
                    mounted.output()
                );
            }
            if is_fuse_mounted(&mounted.mountpoint)? {
                return Ok(mounted);
            }
            if start.elapsed() > timeout {
                // Drop cleans up the child (and a mount that shows up late).
                bail!(
                    "{} was not mounted within {timeout:?} by {command:?}; its output so far:\n{}",
                    mounted.mountpoint.display(),
                    mounted.output()
                );
            }
            sleep(POLL);
        }
    }

    /// The mount point (canonical).
    pub fn path(&self) -> &Path {
        &self.mountpoint
    }

    /// The process id of the mounting child (to signal or kill it in a test).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The child's stdout and stderr so far.
    pub fn output(&self) -> String {
        let read = |name: &str| {
            fs::read(self.logs.path().join(name))
                .map(|b| String::from_utf8_lossy(&b).into_owned())
                .unwrap_or_default()
        };
        format!(
            "--- stdout ---\n{}--- stderr ---\n{}",
            read("stdout"),
            read("stderr")
        )
    }

    /// Unmounts with `lazyctl umount MNT`, and checks that it succeeded, that the child exited
    /// by itself within 10 s, and that the mount is gone. Returns the child's exit status.
    pub fn unmount(mut self) -> Result<ExitStatus> {
        let output = run_with_timeout(
            Command::new(&self.umount[0])
                .args(&self.umount[1..])
                .arg(&self.mountpoint),
            EXIT_TIMEOUT,
        )?;
        ensure!(
            output.status.success(),
            "{:?} {} failed with {}: {}{}",
            self.umount,
            self.mountpoint.display(),
            output.status,
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        let status = wait_timeout(&mut self.child, EXIT_TIMEOUT)?;
        let Some(status) = status else {
            bail!(
                "the mount child did not exit within {EXIT_TIMEOUT:?} of a successful umount; \
                 its output:\n{}",
                self.output()
            );
        };
        self.finished = true;
        ensure!(
            !is_fuse_mounted(&self.mountpoint)?,
            "{} is still mounted after umount and child exit",
            self.mountpoint.display()
        );
        Ok(status)
    }

    /// Sends `signal` to the mount child and checks that it unmounts and exits by itself
    /// within 10 s. Returns the child's exit status.
    pub fn signal_and_wait(mut self, signal: libc::c_int) -> Result<ExitStatus> {
        // SAFETY: kill(2) on our own child, not reaped yet (`finished` is false), so the pid
        // still names it.
        let rc = unsafe { libc::kill(self.child.id() as libc::pid_t, signal) };
        ensure!(rc == 0, "kill failed: {}", io::Error::last_os_error());
        let status = wait_timeout(&mut self.child, EXIT_TIMEOUT)?;
        let Some(status) = status else {
            bail!(
                "the mount child did not exit within {EXIT_TIMEOUT:?} of signal {signal}; \
                 its output:\n{}",
                self.output()
            );
        };
        self.finished = true;
        ensure!(
            !is_fuse_mounted(&self.mountpoint)?,
            "{} is still mounted after signal {signal} and child exit",
            self.mountpoint.display()
        );
        Ok(status)
    }

    /// Best-effort teardown for drop: never panics, escalates until the mount is gone.
    fn teardown(&mut self) -> Vec<String> {
        let mut notes = Vec::new();
        let mounted = is_fuse_mounted(&self.mountpoint).unwrap_or(true);
        if mounted {
            let umount = Command::new(&self.umount[0])
                .args(&self.umount[1..])
                .arg(&self.mountpoint)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .and_then(|mut c| wait_timeout(&mut c, EXIT_TIMEOUT).map(|s| (c, s)));
            match umount {
                Ok((_, Some(status))) if status.success() => {}
                Ok((mut c, None)) => {
                    let _ = c.kill();
                    let _ = c.wait();
                    notes.push(format!("{:?} hung", self.umount));
                }
                Ok((_, Some(status))) => notes.push(format!("{:?} failed: {status}", self.umount)),
                Err(e) => notes.push(format!("{:?} could not run: {e}", self.umount)),
            }
        }
        if !self.finished {
            match wait_timeout(&mut self.child, EXIT_TIMEOUT) {
                Ok(Some(_)) => {}
                _ => {
                    notes.push("mount child still running: SIGTERM".into());
                    // SAFETY: kill(2) on our own child's pid; the child has not been reaped
                    // (try_wait returned None), so the pid is still ours.
                    unsafe { libc::kill(self.child.id() as libc::pid_t, libc::SIGTERM) };
                    if !matches!(wait_timeout(&mut self.child, EXIT_TIMEOUT), Ok(Some(_))) {
                        notes.push("mount child ignored SIGTERM: SIGKILL".into());
                        let _ = self.child.kill();
                        let _ = self.child.wait();
                    }
                }
            }
            self.finished = true;
        }
        if is_fuse_mounted(&self.mountpoint).unwrap_or(false) {
            notes.push("still mounted: umount -l".into());
            let _ = Command::new("umount")
                .arg("-l")
                .arg(&self.mountpoint)
                .status();
        }
        notes
    }
}

impl Drop for Mounted {
    fn drop(&mut self) {
        let notes = self.teardown();
        if std::thread::panicking() || !notes.is_empty() {
            eprintln!(
                "lazy-tests: mount at {} torn down{}{}; mount child output:\n{}",
                self.mountpoint.display(),
                if notes.is_empty() { "" } else { ": " },
                notes.join("; "),
                self.output()
            );
        }
    }
}

/// Waits up to `timeout` for `child`; `None` if it is still running.
fn wait_timeout(child: &mut Child, timeout: Duration) -> io::Result<Option<ExitStatus>> {
    let start = Instant::now();
    loop {
        if let Some(status) = child.try_wait()? {
            return Ok(Some(status));
        }
        if start.elapsed() > timeout {
            return Ok(None);
        }
        sleep(POLL);
    }
}

/// Runs `command` to completion, killing it after `timeout`.
fn run_with_timeout(command: &mut Command, timeout: Duration) -> Result<Output> {
    let dir = tempfile::tempdir()?;
    let mut child = command
        .stdin(Stdio::null())
        .stdout(File::create(dir.path().join("out"))?)
        .stderr(File::create(dir.path().join("err"))?)
        .spawn()
        .with_context(|| format!("starting {command:?}"))?;
    let Some(status) = wait_timeout(&mut child, timeout)? else {
        let _ = child.kill();
        let _ = child.wait();
        bail!("{command:?} did not finish within {timeout:?}");
    };
    Ok(Output {
        status,
        stdout: fs::read(dir.path().join("out"))?,
        stderr: fs::read(dir.path().join("err"))?,
    })
}

/// A size-limited tmpfs mounted over a directory (a small disk that fills up), unmounted when
/// dropped, even if the test fails.
pub struct TmpfsMount(PathBuf);

impl TmpfsMount {
    /// Mounts a tmpfs of `size` (`mount -o size=`, e.g. `16m`) on `dir`. Needs root.
    pub fn new(dir: &Path, size: &str) -> Result<TmpfsMount> {
        let status = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir)
            .status()
            .context("running mount")?;
        ensure!(
            status.success(),
            "mount -t tmpfs on {} failed: {status}",
            dir.display()
        );
        Ok(TmpfsMount(dir.to_path_buf()))
    }
}

impl Drop for TmpfsMount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

/// An ext4 file system in a sparse image file, loop-mounted over a directory with
/// `errors=remount-ro`: [`Ext4Loop::fail`] makes it report an error, as a failing disk does, and
/// the kernel turns it read-only at once, under processes that hold files open for writing (which
/// `mount -o remount,ro` refuses with EBUSY). Unmounted when dropped, even if the test fails.
pub struct Ext4Loop {
    dir: PathBuf,
    /// The loop device's name (`loop3`), under `/sys/fs/ext4/`.
    device: String,
}

impl Ext4Loop {
    /// Makes a `size`-byte ext4 file system in `image` and mounts it on `dir`. Needs root.
    pub fn new(image: &Path, dir: &Path, size: u64) -> Result<Ext4Loop> {
        File::create(image)?.set_len(size)?;
        let status = Command::new("mkfs.ext4")
            .args(["-q", "-F"])
            .arg(image)
            .status()
            .context("running mkfs.ext4 (apt-get install e2fsprogs)")?;
        ensure!(
            status.success(),
            "mkfs.ext4 {} failed: {status}",
            image.display()
        );
        let status = Command::new("mount")
            .args(["-o", "loop,errors=remount-ro"])
            .arg(image)
            .arg(dir)
            .status()
            .context("running mount")?;
        ensure!(
            status.success(),
            "mount -o loop {} failed: {status}",
            image.display()
        );
        // Unmounted on drop if what follows fails.
        let mut mounted = Ext4Loop {
            device: String::new(),
            dir: dir.canonicalize()?,
        };
        let source = mounts_at(&mounted.dir)?
            .pop()
            .map(|m| m.source)
            .context("the loop mount is not in mountinfo")?;
        mounted.device = source
            .strip_prefix("/dev/")
            .with_context(|| format!("loop mount source {source:?} is not a device"))?
            .to_string();
        Ok(mounted)
    }

    /// Reports an error on the file system (ext4's `trigger_fs_error`): from then on it is
    /// read-only.
    pub fn fail(&self) -> Result<()> {
        let trigger = format!("/sys/fs/ext4/{}/trigger_fs_error", self.device);
        fs::write(&trigger, "lazy-tests: simulated disk error")
            .with_context(|| format!("writing {trigger}"))?;
        ensure!(
            self.is_read_only()?,
            "{} is still writable",
            self.dir.display()
        );
        Ok(())
    }

    /// Whether the file system refuses writes now. Tried with a write: ext4 marks an error
    /// remount in its own flags (`emergency_ro`), which `statvfs` does not report.
    pub fn is_read_only(&self) -> Result<bool> {
        let probe = self.dir.join(".lazy-tests-write-probe");
        match File::create(&probe) {
            Ok(_) => {
                fs::remove_file(&probe)?;
                Ok(false)
            }
            Err(e) if e.raw_os_error() == Some(libc::EROFS) => Ok(true),
            Err(e) => Err(e).with_context(|| format!("creating {}", probe.display())),
        }
    }
}

impl Drop for Ext4Loop {
    fn drop(&mut self) {
        // The loop device goes with the mount (mount -o loop sets autoclear).
        let _ = Command::new("umount").arg("-l").arg(&self.dir).status();
    }
}

/// Stored bytes of a lazy image's data blobs, from `lazyctl inspect IMAGE` (run with `env`,
/// e.g. an S3 endpoint).
pub fn stored_bytes(image: &str, env: &[(String, String)]) -> u64 {
    let out = Command::new(lazyctl_path())
        .args(["inspect", image])
        .envs(env.iter().map(|(k, v)| (k, v)))
        .output()
        .unwrap_or_else(|e| panic!("cannot run lazyctl inspect: {e}"));
    assert!(out.status.success(), "lazyctl inspect {image}: {out:?}");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    text.lines()
        .find_map(|l| l.strip_prefix("chunks:"))
        .and_then(|l| l.split(", ").nth(1))
        .and_then(|l| l.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no stored size in inspect output:\n{text}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn mountinfo_lines_are_parsed_and_unescaped() {
        let text = "22 27 0:21 / /proc rw,relatime - proc proc rw\n\
                    90 27 0:55 / /tmp/with\\040space\\134x rw,nosuid - fuse.lazy dir:/s\\040t rw\n\
                    91 27 0:56 / /mnt rw shared:5 master:1 - fuse fuse rw,user_id=0\n";
        let mounts = parse_mountinfo(text);
        assert_eq!(mounts.len(), 3);
        assert_eq!(mounts[1].mount_point, Path::new("/tmp/with space\\x"));
        assert_eq!(mounts[1].fs_type, "fuse.lazy");
        assert_eq!(mounts[1].source, "dir:/s t");
        // Optional fields before the separator do not shift the fs type.
        assert_eq!(mounts[2].fs_type, "fuse");
        assert_eq!(mounts[2].mount_point, Path::new("/mnt"));
    }

    #[test]
    fn the_root_mount_is_found_and_is_not_fuse() {
        assert!(!mounts_at(Path::new("/")).unwrap().is_empty());
        assert!(!is_fuse_mounted(Path::new("/")).unwrap());
    }

    /// A stand-in for `lazyctl` that serves `mount dir:SRC MNT` with bindfs in the foreground.
    fn fake_lazyctl(dir: &Path, mount_body: &str) -> PathBuf {
        let script = dir.join("fake-lazyctl");
        fs::write(
            &script,
            format!(
                "#!/bin/sh\nset -e\ncase \"$1\" in\n\
                 mount) {mount_body} ;;\n\
                 umount) exec umount \"$2\" ;;\n\
                 *) echo \"unknown command $1\" >&2; exit 2 ;;\nesac\n"
            ),
        )
        .unwrap();
        fs::set_permissions(&script, fs::Permissions::from_mode(0o755)).unwrap();
        script
    }

    fn require_bindfs() {
        let found = Command::new("bindfs").arg("--version").output().is_ok();
        assert!(
            found,
            "the mount guard's own tests need bindfs: apt-get install -y bindfs"
        );
    }

    #[test]
    #[cfg_attr(
        not(feature = "system-tests"),
        ignore = "needs root: mounts FUSE or a tmpfs"
    )]
    fn mounted_guard_waits_for_the_mount_and_unmounts_on_drop() {
        require_root_and_fuse();
        require_bindfs();
        let dir = tempfile::tempdir().unwrap();
        let (source, mnt) = (dir.path().join("source"), dir.path().join("mnt"));
        fs::create_dir_all(&source).unwrap();
        fs::create_dir_all(&mnt).unwrap();
        fs::write(source.join("hello"), "world\n").unwrap();
        // bindfs -f stays in the foreground like `lazyctl mount`; the sleep makes the mount
        // appear late, so the guard really has to wait for it.
        let fake = fake_lazyctl(
            dir.path(),
            "src=${2#dir:}; sleep 0.3; exec bindfs -f \"$src\" \"$3\"",
        );
        let command = [
            fake.clone().into_os_string(),
            "mount".into(),
            source_arg(&source),
        ];
        let umount = [fake.into_os_string(), "umount".into()];

        let mount = Mounted::spawn(&command, &umount, &mnt, MOUNT_TIMEOUT).unwrap();
        assert_eq!(fs::read(mount.path().join("hello")).unwrap(), b"world\n");
        let canonical = mount.path().to_path_buf();
        assert!(is_fuse_mounted(&canonical).unwrap());
        drop(mount);
        assert!(!is_fuse_mounted(&canonical).unwrap(), "drop must unmount");

        let mount = Mounted::spawn(&command, &umount, &mnt, MOUNT_TIMEOUT).unwrap();
        let status = mount.unmount().unwrap();
        assert!(
            status.success(),
            "bindfs exits cleanly after umount: {status}"
        );
        assert!(!is_fuse_mounted(&canonical).unwrap());
    }

    #[test]
    fn mounted_guard_reports_a_child_that_exits_early_with_its_stderr() {
        let dir = tempfile::tempdir().unwrap();
        let mnt = dir.path().join("mnt");
        fs::create_dir_all(&mnt).unwrap();
        let fake = fake_lazyctl(dir.path(), "echo 'store is corrupt: bad magic' >&2; exit 3");
        let command = [
            fake.clone().into_os_string(),
            "mount".into(),
            "dir:/nowhere".into(),
        ];
        let umount = [fake.into_os_string(), "umount".into()];
        let error = Mounted::spawn(&command, &umount, &mnt, MOUNT_TIMEOUT)
            .err()
            .unwrap();
        let message = format!("{error:#}");
        assert!(message.contains("exit status: 3"), "{message}");
        assert!(message.contains("store is corrupt: bad magic"), "{message}");
    }

    #[test]
    fn mounted_guard_times_out_and_kills_a_child_that_never_mounts() {
        let dir = tempfile::tempdir().unwrap();
        let mnt = dir.path().join("mnt");
        fs::create_dir_all(&mnt).unwrap();
        let fake = fake_lazyctl(dir.path(), "echo starting; exec sleep 600");
        let command = [
            fake.clone().into_os_string(),
            "mount".into(),
            "dir:/nowhere".into(),
        ];
        let umount = [fake.into_os_string(), "umount".into()];
        let start = Instant::now();
        let error = Mounted::spawn(&command, &umount, &mnt, Duration::from_millis(300))
            .err()
            .unwrap();
        let message = format!("{error:#}");
        assert!(message.contains("was not mounted within"), "{message}");
        assert!(
            message.contains("starting"),
            "the child's stdout is shown: {message}"
        );
        // umount fails (nothing mounted), SIGTERM ends the sleep: well under EXIT_TIMEOUT * 2.
        assert!(
            start.elapsed() < Duration::from_secs(15),
            "took {:?}",
            start.elapsed()
        );
    }

    #[test]
    fn lazyctl_is_found_next_to_deps_or_where_the_environment_says() {
        let exe = Path::new("/w/target/debug/deps/e2e-0123abcd");
        assert_eq!(
            lazyctl_candidate(None, exe),
            (PathBuf::from("/w/target/debug/lazyctl"), false)
        );
        let example = Path::new("/w/target/release/examples/tool");
        assert_eq!(
            lazyctl_candidate(None, example),
            (PathBuf::from("/w/target/release/examples/lazyctl"), false)
        );
        assert_eq!(
            lazyctl_candidate(Some("/opt/lazyctl".into()), exe),
            (PathBuf::from("/opt/lazyctl"), true)
        );
    }

    fn source_arg(source: &Path) -> OsString {
        let mut arg = OsString::from("dir:");
        arg.push(source);
        arg
    }
}
