//! lazyd's supervisor: without systemd, the `lazyd` a user starts is this small parent. It
//! starts the serving lazyd as its child, keeps every mount's /dev/fuse descriptor the child
//! hands it, and when the child exits (a crash, or a restart it was asked for) starts a new one
//! with those descriptors, so the mounts and the containers on them keep working.
//!
//! It speaks to its child the way systemd does (docs/ARCHITECTURE.md, "Mounts that outlive
//! lazyd"), so the server has one protocol for both: the child sends notifications to the
//! datagram socket named by `NOTIFY_SOCKET` (`READY=1`, `FDSTORE=1` with `FDNAME=` and the
//! descriptor, `FDSTOREREMOVE=1`), and gets the stored descriptors back at start in
//! `LISTEN_FDS`, `LISTEN_FDNAMES`, `LISTEN_PID`. Two notifications are lazyd's own:
//! `X_LAZYD_EXIT=1` (the child is stopping for good, do not restart it) and
//! `X_LAZYD_UPGRADE=PATH` (replace the whole lazyd by the binary at PATH).
//!
//! Signals: SIGTERM or SIGINT stop lazyd (the child drains, as a stop without supervisor
//! does; a second one detaches); SIGHUP restarts the child; SIGUSR2 replaces the supervisor
//! and the child by the binary lazyd was started from (an upgrade). The supervisor is one
//! thread: it forks, so nothing else may run in it.

use std::collections::BTreeMap;
use std::ffi::{CString, OsString};
use std::io::IoSliceMut;
use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::{UnixDatagram, UnixStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::socket::{recvmsg, setsockopt, sockopt, ControlMessageOwned, MsgFlags, UnixAddr};
use tracing::{error, info, warn};

use agent::handover::{self, upgrade_target, SUPERVISOR_ENV};

/// The supervisor's notification socket, in the state directory (0700).
pub const SOCKET_FILE: &str = "supervisor.sock";
/// A child that dies sooner than this after its start counts as a failed start.
const QUICK_DEATH: Duration = Duration::from_secs(2);
/// The wait before restarting a child that keeps failing at start, doubled each time.
const FIRST_BACKOFF: Duration = Duration::from_millis(200);
const MAX_BACKOFF: Duration = Duration::from_secs(10);
/// Largest notification read (systemd's own limit is 4 KiB of text).
const MAX_MESSAGE: usize = 16 * 1024;
/// Most descriptors one notification may carry.
const MAX_FDS_PER_MESSAGE: usize = 16;

/// What the supervisor was asked to do, by signal.
#[derive(Default)]
struct Flags {
    stop: Arc<AtomicBool>,
    restart: Arc<AtomicBool>,
    upgrade: Arc<AtomicBool>,
    child: Arc<AtomicBool>,
}

/// Why the running child is going away.
#[derive(Debug, Clone, PartialEq)]
enum Ending {
    /// Not asked to: a crash, or a SIGTERM someone sent it. It is restarted.
    Unasked,
    Restart,
    Upgrade(PathBuf),
    Stop,
}

/// Runs lazyd as supervisor of a serving child: `binary` with `args`, state in `state_dir`.
/// Returns the exit code of the last child when lazyd stops.
pub fn run(binary: &Path, args: &[OsString], state_dir: &Path) -> anyhow::Result<i32> {
    agent::create_private_dir(state_dir)?;
    let socket_path = state_dir.join(SOCKET_FILE);
    if UnixDatagram::unbound()?.connect(&socket_path).is_ok() {
        anyhow::bail!(
            "another lazyd supervises {} (its socket {} answers)",
            state_dir.display(),
            socket_path.display()
        );
    }
    let _ = std::fs::remove_file(&socket_path);
    let socket = UnixDatagram::bind(&socket_path)?;
    setsockopt(&socket, sockopt::PassCred, &true)?;
    socket.set_nonblocking(true)?;

    let flags = Flags::default();
    let (wake_rx, wake_tx) = UnixStream::pair()?;
    wake_rx.set_nonblocking(true)?;
    for (signal, flag) in [
        (libc::SIGTERM, &flags.stop),
        (libc::SIGINT, &flags.stop),
        (libc::SIGHUP, &flags.restart),
        (libc::SIGUSR2, &flags.upgrade),
        (libc::SIGCHLD, &flags.child),
    ] {
        signal_hook::flag::register(signal, flag.clone())?;
        signal_hook::low_level::pipe::register(signal, wake_tx.try_clone()?)?;
    }

    // Descriptors a predecessor (the supervisor this one replaced) passed on.
    let mut held: BTreeMap<String, OwnedFd> = handover::inherited_fds().into_iter().collect();
    if !held.is_empty() {
        info!("holding {} mount(s) handed over at upgrade", held.len());
    }
    let mut child = spawn(binary, args, &socket_path, &held)?;
    let mut started = Instant::now();
    let mut ending = Ending::Unasked;
    let mut backoff = FIRST_BACKOFF;
    let mut quick_deaths = 0u32;
    let mut stops = 0u32;
    // Whether a server ever started: one that fails before it is ready the first time (a
    // busy socket, a locked cache) is not retried; lazyd exits with its status.
    let mut ever_ready = !held.is_empty();
    loop {
        let mut fds = [
            PollFd::new(socket.as_fd(), PollFlags::POLLIN),
            PollFd::new(wake_rx.as_fd(), PollFlags::POLLIN),
        ];
        match poll(&mut fds, PollTimeout::NONE) {
            Ok(_) | Err(nix::errno::Errno::EINTR) => {}
            Err(e) => return Err(e.into()),
        }
        drain(&wake_rx);
        while let Some(message) = receive(&socket, child.id())? {
            ever_ready |= handle(message, &mut held, &mut ending, binary);
        }
        if flags.stop.swap(false, Ordering::SeqCst) {
            stops += 1;
            if stops == 1 {
                info!("stopping lazyd");
            }
            ending = Ending::Stop;
            // The server's own stop: unmount what is idle, serve the rest until released; a
            // second signal detaches them.
            signal(&child, libc::SIGUSR1);
        }
        if flags.restart.swap(false, Ordering::SeqCst) && ending == Ending::Unasked {
            info!(pid = child.id(), "restarting the server");
            ending = Ending::Restart;
            signal(&child, libc::SIGTERM);
        }
        if flags.upgrade.swap(false, Ordering::SeqCst) && ending == Ending::Unasked {
            match upgrade_target(binary) {
                Ok(()) => {
                    ending = Ending::Upgrade(binary.to_path_buf());
                    info!(
                        pid = child.id(),
                        "upgrading: replacing lazyd by {}",
                        binary.display()
                    );
                    signal(&child, libc::SIGTERM);
                }
                Err(e) => error!("not upgrading: {e}"),
            }
        }
        if !flags.child.swap(false, Ordering::SeqCst) {
            continue;
        }
        let Some(status) = child.try_wait()? else {
            continue;
        };
        // Notifications the child sent before it died still count (descriptors above all).
        while let Some(message) = receive(&socket, child.id())? {
            ever_ready |= handle(message, &mut held, &mut ending, binary);
        }
        let code = status.code().unwrap_or(1);
        match std::mem::replace(&mut ending, Ending::Unasked) {
            Ending::Stop => {
                info!("lazyd stopped");
                let _ = std::fs::remove_file(&socket_path);
                return Ok(code);
            }
            Ending::Upgrade(path) => {
                drop(socket);
                let _ = std::fs::remove_file(&socket_path);
                // The binary was checked before the server was stopped (`upgrade_target`);
                // an exec that fails anyway leaves nothing to serve the mounts.
                let err = exec_upgrade(&path, args, &held);
                error!("cannot run {}: {err}", path.display());
                return Err(err.into());
            }
            Ending::Restart => {
                quick_deaths = 0;
                backoff = FIRST_BACKOFF;
            }
            Ending::Unasked if !ever_ready => {
                error!("the server exited at start ({status}); see its messages above");
                let _ = std::fs::remove_file(&socket_path);
                return Ok(code);
            }
            Ending::Unasked => {
                warn!(
                    pid = child.id(),
                    "the server exited ({status}); starting a new one with {} mount(s)",
                    held.len()
                );
                // The first death is restarted at once (readers are waiting); a server that
                // keeps dying soon after its start is restarted ever more slowly.
                if started.elapsed() >= QUICK_DEATH {
                    quick_deaths = 0;
                    backoff = FIRST_BACKOFF;
                } else {
                    quick_deaths += 1;
                    if quick_deaths > 1 {
                        warn!("the server keeps dying; waiting {backoff:?} before the next start");
                        std::thread::sleep(backoff);
                        backoff = (backoff * 2).min(MAX_BACKOFF);
                    }
                }
            }
        }
        child = spawn(binary, args, &socket_path, &held)?;
        started = Instant::now();
    }
}

fn drain(pipe: &UnixStream) {
    let mut buf = [0u8; 64];
    while let Ok(n) = std::io::Read::read(&mut &*pipe, &mut buf) {
        if n == 0 {
            break;
        }
    }
}

fn signal(child: &Child, signal: libc::c_int) {
    // SAFETY: kill has no memory effects; the child is not reaped yet, so its pid is its own.
    unsafe { libc::kill(child.id() as libc::pid_t, signal) };
}

/// A notification: its `KEY=VALUE` lines and the descriptors that came with it.
struct Message {
    fields: BTreeMap<String, String>,
    fds: Vec<OwnedFd>,
}

/// The next notification from the child (`None` when there is none waiting). Notifications
/// from any other process are dropped, with their descriptors.
fn receive(socket: &UnixDatagram, child: u32) -> std::io::Result<Option<Message>> {
    loop {
        let mut buf = vec![0u8; MAX_MESSAGE];
        let mut iov = [IoSliceMut::new(&mut buf)];
        let mut space = nix::cmsg_space!(libc::ucred, [RawFd; MAX_FDS_PER_MESSAGE]);
        let msg = match recvmsg::<UnixAddr>(
            socket.as_raw_fd(),
            &mut iov,
            Some(&mut space),
            MsgFlags::MSG_CMSG_CLOEXEC,
        ) {
            Ok(m) => m,
            Err(nix::errno::Errno::EAGAIN) => return Ok(None),
            Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => return Err(e.into()),
        };
        let mut fds = Vec::new();
        let mut sender = None;
        for cmsg in msg.cmsgs()? {
            match cmsg {
                ControlMessageOwned::ScmRights(raw) => {
                    // SAFETY: the kernel installed these descriptors for this process.
                    fds.extend(
                        raw.into_iter().map(|fd| unsafe {
                            <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd)
                        }),
                    )
                }
                ControlMessageOwned::ScmCredentials(c) => sender = Some(c.pid() as u32),
                _ => {}
            }
        }
        let len = msg.bytes;
        if sender != Some(child) {
            warn!(?sender, "ignoring a notification not sent by the server");
            continue;
        }
        let text = String::from_utf8_lossy(&buf[..len]);
        let fields = text
            .lines()
            .filter_map(|l| l.split_once('='))
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        return Ok(Some(Message { fields, fds }));
    }
}

/// Acts on a notification; returns whether it said the server is ready.
fn handle(
    message: Message,
    held: &mut BTreeMap<String, OwnedFd>,
    ending: &mut Ending,
    own_binary: &Path,
) -> bool {
    let f = &message.fields;
    let name = f.get("FDNAME").cloned();
    if f.get("FDSTORE").map(String::as_str) == Some("1") {
        match (name, message.fds.len()) {
            (Some(name), 1) if valid_name(&name) => {
                let fd = message.fds.into_iter().next().expect("one descriptor");
                held.insert(name, fd);
            }
            (name, n) => warn!(?name, "ignoring FDSTORE with {n} descriptor(s)"),
        }
    } else if f.get("FDSTOREREMOVE").map(String::as_str) == Some("1") {
        if let Some(name) = name {
            held.remove(&name);
        }
    }
    if f.get("X_LAZYD_EXIT").map(String::as_str) == Some("1") {
        *ending = Ending::Stop;
    }
    if let Some(path) = f.get("X_LAZYD_UPGRADE") {
        // Empty: the binary lazyd was started from.
        let path = match path.as_str() {
            "" => own_binary.to_path_buf(),
            p => PathBuf::from(p),
        };
        match upgrade_target(&path) {
            Ok(()) => {
                info!("upgrade asked for: replacing lazyd by {}", path.display());
                *ending = Ending::Upgrade(path);
            }
            Err(e) => error!("not upgrading: {e}"),
        }
    }
    let ready = f.get("READY").map(String::as_str) == Some("1");
    if ready {
        info!("server ready, holding {} mount(s)", held.len());
    }
    ready
}

/// Names as `LISTEN_FDNAMES` can carry them (no ':' separators), at most 255 bytes.
fn valid_name(name: &str) -> bool {
    !name.is_empty() && name.len() <= 255 && name.bytes().all(|b| b.is_ascii_graphic() && b != b':')
}

/// `LISTEN_FDS` and `LISTEN_FDNAMES` for `held` (descriptors 3.. in name order); none at all
/// when nothing is held.
fn set_listen_env(held: &BTreeMap<String, OwnedFd>) {
    if held.is_empty() {
        std::env::remove_var("LISTEN_FDS");
        std::env::remove_var("LISTEN_FDNAMES");
        return;
    }
    std::env::set_var("LISTEN_FDS", held.len().to_string());
    let names: Vec<&str> = held.keys().map(String::as_str).collect();
    std::env::set_var("LISTEN_FDNAMES", names.join(":"));
}

/// Starts the server: `binary args` in a process group of its own (a terminal's Ctrl-C goes
/// to the supervisor only), killed if the supervisor dies, with `held` as descriptors 3.. .
fn spawn(
    binary: &Path,
    args: &[OsString],
    socket: &Path,
    held: &BTreeMap<String, OwnedFd>,
) -> std::io::Result<Child> {
    // The environment is set here, not with Command::env: the child adds LISTEN_PID (its own
    // pid) after the fork, which only works while the command uses this process's environment.
    // SAFETY (set_var/remove_var): the supervisor runs one thread.
    std::env::set_var("NOTIFY_SOCKET", socket);
    std::env::set_var(SUPERVISOR_ENV, std::process::id().to_string());
    set_listen_env(held);
    std::env::remove_var("LISTEN_PID");
    let raw: Vec<RawFd> = held.values().map(|fd| fd.as_raw_fd()).collect();
    let mut command = Command::new(binary);
    command.args(args);
    // SAFETY: between fork and exec the closure calls only async-signal-safe functions, plus
    // setenv, which is safe here because the supervisor has no other thread.
    unsafe {
        command.pre_exec(move || {
            place_fds(&raw)?;
            let pid = CString::new(libc::getpid().to_string()).expect("digits");
            if libc::setenv(c"LISTEN_PID".as_ptr(), pid.as_ptr(), 1) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            if libc::setpgid(0, 0) != 0 || libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let child = command.spawn()?;
    info!(pid = child.id(), mounts = held.len(), "server started");
    Ok(child)
}

/// Moves descriptors `fds` to 3, 4, ... (in order), without close-on-exec.
fn place_fds(fds: &[RawFd]) -> std::io::Result<()> {
    let base = 3 + fds.len() as RawFd;
    let mut moved = Vec::with_capacity(fds.len());
    for &fd in fds {
        // SAFETY: fcntl on descriptors this process holds.
        let copy = unsafe { libc::fcntl(fd, libc::F_DUPFD, base) };
        if copy < 0 {
            return Err(std::io::Error::last_os_error());
        }
        moved.push(copy);
    }
    for (i, &copy) in moved.iter().enumerate() {
        // SAFETY: as above; dup2 leaves the target without close-on-exec.
        if unsafe { libc::dup2(copy, 3 + i as RawFd) } < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: `copy` is a descriptor this function duplicated and nothing else owns.
        unsafe { libc::close(copy) };
    }
    Ok(())
}

/// Replaces this process by `binary` (the upgrade), passing `held` on as a service manager
/// would. Returns only on failure.
fn exec_upgrade(
    binary: &Path,
    args: &[OsString],
    held: &BTreeMap<String, OwnedFd>,
) -> std::io::Error {
    let raw: Vec<RawFd> = held.values().map(|fd| fd.as_raw_fd()).collect();
    if let Err(e) = place_fds(&raw) {
        return e;
    }
    set_listen_env(held);
    std::env::set_var("LISTEN_PID", std::process::id().to_string());
    std::env::remove_var("NOTIFY_SOCKET");
    std::env::remove_var(SUPERVISOR_ENV);
    let mut argv = vec![binary.as_os_str().to_owned()];
    argv.extend(args.iter().cloned());
    let c_argv: Vec<CString> = match argv
        .iter()
        .map(|a| CString::new(a.as_bytes()))
        .collect::<Result<_, _>>()
    {
        Ok(v) => v,
        Err(e) => return std::io::Error::other(e),
    };
    match nix::unistd::execv(&c_argv[0], &c_argv) {
        Err(e) => e.into(),
        Ok(never) => match never {},
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_names_listen_fdnames_can_carry_are_stored() {
        assert!(valid_name("lazyd-mount-12"));
        assert!(!valid_name("a:b"));
        assert!(!valid_name(""));
        assert!(!valid_name("with space"));
        assert!(!valid_name(&"x".repeat(256)));
    }
}
