//! A fleet on one machine: N hosts, each with its own `lazyd`, cold-starting images from one
//! origin (a registry and, optionally, S3), directly or through a caching tier (nginx rendered
//! from `packaging/tier/`), each piece in its own network namespace:
//!
//! ```text
//!   host h0 (10.77.0.10, lazyd) --veth, 1 Gbit/s toward the host--+
//!   host h1 (10.77.0.11, lazyd) --veth, ...                       +-- bridge br0 (its own netns)
//!   tier    (10.77.0.2,  nginx :5000 registry, :9000 S3) --veth--+
//!   origin  (10.77.0.3,  :5000 -> docker-registry, :9000 -> moto) --veth, shaped (origin_rate)
//! ```
//!
//! The origin's servers listen on its loopback; a [`DelayProxy`] per server listens on the
//! origin's address, adds a delay per request (a far origin's round trip), logs every request
//! (client, path, `Range`) and counts the reply bytes per client: the origin's egress. Its link
//! is shaped with `tc htb` on the origin's side of its veth (netem is not available here).
//!
//! Namespaces without `ip netns exec` (which also makes a private mount namespace, hiding
//! lazyd's FUSE mounts from the test): [`in_netns`] runs a closure on a thread that has joined
//! the namespace with `setns(2)`; the processes that thread spawns (lazyd, nginx, the servers)
//! and the threads it starts (the proxies') live in that network namespace and in the test's
//! mount namespace. lazyd's socket, cache, state and mounts are on the shared filesystem, so
//! `lazyctl --socket` from the test reaches it and the test reads its mounts.
//!
//! Names carry the test's pid and a sequence number (`lazyfleet-PID-SEQ-ROLE`), so concurrent
//! fleets never collide; [`Fleet::start`] first removes what fleets of dead processes left
//! (namespaces, the processes in them, mounts, directories), and dropping a fleet removes its
//! own.

use std::fs;
use std::net::{IpAddr, Ipv4Addr, TcpStream};
use std::os::fd::AsRawFd;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Barrier, Mutex};
use std::thread::sleep;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};

use crate::agent::Lazyd;
use crate::mount::{is_fuse_mounted, lazyctl, lazyctl_path, parse_mountinfo, stored_bytes};
use crate::oci::LayoutInfo;
use crate::proxy::{DelayProxy, ProxiedRequest};
use crate::reference::{run, skopeo_copy};
use crate::registry::LocalRegistry;
use crate::s3::MotoServer;

/// What every fleet's names start with.
const PREFIX: &str = "lazyfleet-";
/// The fleet's subnet, a /24 inside its own bridge namespace (so fleets may share it).
const SUBNET: [u8; 3] = [10, 77, 0];
const TIER_IP: Ipv4Addr = Ipv4Addr::new(SUBNET[0], SUBNET[1], SUBNET[2], 2);
const ORIGIN_IP: Ipv4Addr = Ipv4Addr::new(SUBNET[0], SUBNET[1], SUBNET[2], 3);
/// Host `i` is `10.77.0.(FIRST_HOST + i)`.
const FIRST_HOST: usize = 10;
/// Ports of the registry and S3, at the origin and at the tier alike.
const REGISTRY_PORT: u16 = 5000;
const S3_PORT: u16 = 9000;
/// The origin's S3 bucket.
pub const BUCKET: &str = "fleet";
/// How long nginx may take to listen, and to stop.
const TIER_TIMEOUT: Duration = Duration::from_secs(10);
const POLL: Duration = Duration::from_millis(20);
/// The tier's templates: `nginx.conf` and the `*.conf` files it includes from its directory.
const TIER_TEMPLATES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../packaging/tier");

/// Tells fleets of one process apart.
static SEQUENCE: AtomicU32 = AtomicU32::new(0);

/// How to build a fleet.
#[derive(Debug, Clone)]
pub struct FleetConfig {
    pub hosts: usize,
    /// Whether there is a tier and the hosts' lazyd use it as their mirror.
    pub tier: bool,
    /// Whether the origin also serves S3 (moto) and the tier mirrors its bucket.
    pub s3: bool,
    /// `tc` rate of each host's link, toward the host.
    pub host_rate: String,
    /// `tc` rate of the origin's link, out of the origin.
    pub origin_rate: String,
    /// Added to each request to the origin.
    pub origin_delay: Duration,
    /// The tier's slice (nginx `slice`, lazyd's `mirror.slice`).
    pub slice: String,
    /// The tier's cache size (nginx `max_size`).
    pub tier_cache_size: String,
    /// lazyd's mirror settings: `timeout`, `backoff`, `max_backoff`.
    pub mirror_timeout: String,
    pub mirror_backoff: String,
    pub mirror_max_backoff: String,
    /// Sections added to each lazyd's config (`[profile]`, ...; not `[fetch]`, written here).
    pub lazyd_config: String,
    /// Lines added to `[fetch]` of each lazyd's config.
    pub fetch_config: String,
    /// Registry storage the origin serves (images pushed before); a new empty one if `None`.
    pub registry_storage: Option<PathBuf>,
}

impl Default for FleetConfig {
    fn default() -> FleetConfig {
        FleetConfig {
            hosts: 4,
            tier: true,
            s3: false,
            host_rate: "1gbit".into(),
            // A registry or bucket in another region or behind a shared uplink: slower than one
            // host's link, so that N hosts fetching without a tier queue on it.
            origin_rate: "200mbit".into(),
            origin_delay: Duration::from_millis(20),
            slice: "128K".into(),
            tier_cache_size: "4g".into(),
            mirror_timeout: "2s".into(),
            mirror_backoff: "1s".into(),
            mirror_max_backoff: "30s".into(),
            lazyd_config: String::new(),
            fetch_config: String::new(),
            registry_storage: None,
        }
    }
}

/// Runs `f` on a thread that has joined the network namespace `/run/netns/NAME`; what it
/// spawns lives there (see the module documentation).
pub fn in_netns<T: Send>(name: &str, f: impl FnOnce() -> Result<T> + Send) -> Result<T> {
    let path = Path::new("/run/netns").join(name);
    std::thread::scope(|scope| {
        scope
            .spawn(|| {
                let ns =
                    fs::File::open(&path).with_context(|| format!("opening {}", path.display()))?;
                // SAFETY: setns(2) with a descriptor we own, on this thread only (a network
                // namespace may be joined by one thread of a multi-threaded process).
                if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                    return Err(std::io::Error::last_os_error())
                        .with_context(|| format!("joining {}", path.display()));
                }
                f()
            })
            .join()
            .map_err(|_| anyhow::anyhow!("a thread in network namespace {name} panicked"))?
    })
}

/// A network namespace, deleted (with the processes in it) on drop.
struct Netns {
    name: String,
}

impl Netns {
    fn create(name: String) -> Result<Netns> {
        run(Command::new("ip").args(["netns", "add", &name]))?;
        let ns = Netns { name };
        ns.ip(&["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    /// `ip -n NAME ARGS...`.
    fn ip(&self, args: &[&str]) -> Result<()> {
        run(Command::new("ip").args(["-n", &self.name]).args(args))
    }

    /// `tc -n NAME ARGS...`.
    fn tc(&self, args: &[&str]) -> Result<()> {
        run(Command::new("tc").args(["-n", &self.name]).args(args))
    }

    /// Limits what `dev` sends to `rate` (one htb class that all traffic falls into).
    fn shape(&self, dev: &str, rate: &str) -> Result<()> {
        self.tc(&[
            "qdisc", "add", "dev", dev, "root", "handle", "1:", "htb", "default", "1",
        ])?;
        self.tc(&[
            "class", "add", "dev", dev, "parent", "1:", "classid", "1:1", "htb", "rate", rate,
            "ceil", rate,
        ])
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        kill_processes_in(&self.name);
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

/// SIGKILLs every process in network namespace `name` (`ip netns pids`): what a fleet started
/// there and did not stop.
fn kill_processes_in(name: &str) {
    let Ok(out) = Command::new("ip").args(["netns", "pids", name]).output() else {
        return;
    };
    for pid in String::from_utf8_lossy(&out.stdout).split_whitespace() {
        if let Ok(pid) = pid.parse::<libc::pid_t>() {
            // SAFETY: kill(2) of a process in a namespace this harness made.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
    }
}

/// The pid in a name `lazyfleet-PID-...`, if it is one.
fn owner_pid(name: &str) -> Option<u32> {
    name.strip_prefix(PREFIX)?.split('-').next()?.parse().ok()
}

/// Removes what fleets of processes that no longer run left behind: their namespaces (and the
/// processes in them), mounts and directories.
fn clean_leftovers() -> Result<()> {
    let dead = |name: &str| {
        owner_pid(name).is_some_and(|pid| !Path::new(&format!("/proc/{pid}")).exists())
    };
    if let Ok(entries) = fs::read_dir("/run/netns") {
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if dead(&name) {
                eprintln!("fleet: removing network namespace {name} of a dead run");
                drop(Netns { name });
            }
        }
    }
    for entry in fs::read_dir(std::env::temp_dir())?.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if dead(&name) {
            eprintln!("fleet: removing {} of a dead run", entry.path().display());
            unmount_below(&entry.path())?;
            fs::remove_dir_all(entry.path())
                .with_context(|| format!("removing {}", entry.path().display()))?;
        }
    }
    Ok(())
}

/// Lazily unmounts every mount at or below `root`, deepest first.
fn unmount_below(root: &Path) -> Result<()> {
    let mut below: Vec<PathBuf> = parse_mountinfo(&fs::read_to_string("/proc/self/mountinfo")?)
        .into_iter()
        .map(|m| m.mount_point)
        .filter(|p| p.starts_with(root))
        .collect();
    below.sort_by_key(|p| std::cmp::Reverse(p.as_os_str().len()));
    for mount_point in below {
        run(Command::new("umount").arg("-l").arg(&mount_point))?;
    }
    Ok(())
}

/// Creates `dir` (and parents) readable by everyone: nginx's workers run as `nobody`.
fn create_open_dir(dir: &Path) -> Result<()> {
    fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    fs::set_permissions(dir, fs::Permissions::from_mode(0o755))?;
    Ok(())
}

/// Whether something accepts TCP connections at `address` from the calling thread's namespace.
fn listening(address: (Ipv4Addr, u16)) -> bool {
    TcpStream::connect_timeout(&address.into(), Duration::from_millis(200)).is_ok()
}

/// The first `@NAME@` (capitals, digits and `_`) left in `text` outside `#` comment lines.
fn placeholder_in(text: &str) -> Option<&str> {
    text.lines()
        .filter(|line| !line.trim_start().starts_with('#'))
        .find_map(|line| {
            line.match_indices('@').find_map(|(at, _)| {
                let rest = &line[at + 1..];
                let end = rest
                    .find(|c: char| !(c.is_ascii_uppercase() || c.is_ascii_digit() || c == '_'))?;
                (end > 0 && rest[end..].starts_with('@')).then(|| &line[at..at + end + 2])
            })
        })
}

/// One host: a namespace and its `lazyd`.
pub struct Host {
    pub ip: Ipv4Addr,
    pub lazyd: Lazyd,
    /// Where the test mounts images for this host.
    pub mnt: PathBuf,
    ns: Netns,
}

impl Host {
    /// The host's Prometheus metrics (`GET /metrics` on lazyd's socket).
    pub fn metrics(&self) -> Result<String> {
        let (code, body) = self.lazyd.http_get("/metrics")?;
        ensure!(code == 200, "GET /metrics: HTTP {code}: {body}");
        Ok(body)
    }

    /// The namespace's name (`ip netns`).
    pub fn netns(&self) -> &str {
        &self.ns.name
    }
}

/// The sum of the samples of metric `name` whose labels contain `labels` (`""`: all of them),
/// from Prometheus text; 0 when there is none.
pub fn metric(text: &str, name: &str, labels: &str) -> f64 {
    text.lines()
        .filter(|line| !line.starts_with('#'))
        .filter_map(|line| {
            let (series, value) = line.rsplit_once(' ')?;
            let (family, rest) = series.split_once('{').unwrap_or((series, ""));
            (family == name && rest.contains(labels)).then(|| value.parse::<f64>().ok())?
        })
        .fold(0.0, |sum, value| sum + value)
}

/// The caching tier: nginx in its namespace.
struct Tier {
    dir: PathBuf,
    /// Behind a lock so that a test can stop the tier while warms borrow the fleet.
    nginx: Mutex<Option<Child>>,
    ns: Netns,
}

impl Tier {
    /// Renders the templates of `packaging/tier/` (every `*.conf`) into `dir`, with the cache
    /// in `dir/cache` and the logs in `dir/logs`.
    fn render(dir: &Path, config: &FleetConfig) -> Result<()> {
        create_open_dir(&dir.join("logs"))?;
        let registry_origin = format!("http://{ORIGIN_IP}:{REGISTRY_PORT}");
        let s3_origin = format!("http://{ORIGIN_IP}:{S3_PORT}");
        let values = [
            ("@CACHE_DIR@", dir.join("cache").display().to_string()),
            ("@CACHE_SIZE@", config.tier_cache_size.clone()),
            ("@SLICE@", config.slice.clone()),
            ("@RUN_DIR@", dir.display().to_string()),
            ("@REGISTRY_LISTEN@", format!("{TIER_IP}:{REGISTRY_PORT}")),
            ("@REGISTRY_ORIGIN@", registry_origin),
            ("@S3_LISTEN@", format!("{TIER_IP}:{S3_PORT}")),
            ("@S3_ORIGIN@", s3_origin),
            ("@S3_ORIGIN_HOST@", format!("{ORIGIN_IP}:{S3_PORT}")),
        ];
        let mut rendered = 0;
        for entry in fs::read_dir(TIER_TEMPLATES)
            .with_context(|| format!("reading the tier templates in {TIER_TEMPLATES}"))?
        {
            let template = entry?.path();
            if template.extension().is_none_or(|e| e != "conf") {
                continue;
            }
            let mut text = fs::read_to_string(&template)
                .with_context(|| format!("reading the tier template {}", template.display()))?;
            for (placeholder, value) in &values {
                text = text.replace(placeholder, value);
            }
            if let Some(unknown) = placeholder_in(&text) {
                bail!(
                    "{} has a placeholder this harness does not fill: {unknown}",
                    template.display()
                );
            }
            fs::write(
                dir.join(template.file_name().context("a template has no name")?),
                text,
            )?;
            rendered += 1;
        }
        ensure!(
            dir.join("nginx.conf").is_file(),
            "no nginx.conf among the {rendered} templates in {TIER_TEMPLATES}"
        );
        Ok(())
    }

    /// Starts nginx; returns once it listens.
    fn start(&self) -> Result<()> {
        let mut nginx = self.nginx.lock().unwrap();
        ensure!(nginx.is_none(), "the tier already runs");
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("nginx.out"))?;
        let dir = &self.dir;
        let child = in_netns(&self.ns.name, || {
            Command::new("nginx")
                .arg("-p")
                .arg(dir)
                .arg("-c")
                .arg(dir.join("nginx.conf"))
                // In the foreground, so that this child is nginx's master.
                .args(["-g", "daemon off;"])
                .stdin(Stdio::null())
                .stdout(log.try_clone()?)
                .stderr(log)
                .spawn()
                .context("starting nginx (apt-get install nginx; scripts/setup.sh does)")
        })?;
        let running = nginx.insert(child);
        let start = Instant::now();
        while !in_netns(&self.ns.name, || Ok(listening((TIER_IP, REGISTRY_PORT))))? {
            if let Some(status) = running.try_wait()? {
                *nginx = None;
                bail!("nginx exited with {status}:\n{}", self.log());
            }
            ensure!(
                start.elapsed() < TIER_TIMEOUT,
                "nginx did not listen within {TIER_TIMEOUT:?}:\n{}",
                self.log()
            );
            sleep(POLL);
        }
        Ok(())
    }

    /// Stops nginx (SIGTERM: its master stops the workers; then whatever is left in the
    /// namespace is killed). The cache stays for the next start.
    fn stop(&self) -> Result<()> {
        let Some(mut nginx) = self.nginx.lock().unwrap().take() else {
            return Ok(());
        };
        // SAFETY: kill(2) of our child, not yet reaped.
        unsafe { libc::kill(nginx.id() as libc::pid_t, libc::SIGTERM) };
        let start = Instant::now();
        while nginx.try_wait()?.is_none() {
            if start.elapsed() > TIER_TIMEOUT {
                let _ = nginx.kill();
                let _ = nginx.wait();
                break;
            }
            sleep(POLL);
        }
        kill_processes_in(&self.ns.name);
        Ok(())
    }

    /// nginx's output and error log so far.
    fn log(&self) -> String {
        ["nginx.out", "logs/error.log"]
            .iter()
            .map(|f| fs::read_to_string(self.dir.join(f)).unwrap_or_default())
            .collect::<Vec<_>>()
            .join("\n")
    }
}

impl Drop for Tier {
    fn drop(&mut self) {
        let _ = self.stop();
    }
}

/// The origin: a registry and optionally moto, each behind a delaying, logging proxy.
struct Origin {
    registry: LocalRegistry,
    moto: Option<MotoServer>,
    /// In front of the registry, then of moto; dropped in the namespace (see [`DelayProxy`]).
    proxies: Vec<DelayProxy>,
    ns: Netns,
}

impl Drop for Origin {
    fn drop(&mut self) {
        let proxies = std::mem::take(&mut self.proxies);
        let _ = in_netns(&self.ns.name, move || {
            drop(proxies);
            Ok(())
        });
    }
}

/// An image published at the origin.
#[derive(Debug, Clone)]
pub struct Published {
    /// The lazy image as the hosts name it: `10.77.0.3:5000/REPO:TAG-lazy`, `s3://fleet/PREFIX`.
    pub reference: String,
    /// The bytes of its chunks as stored (`lazyctl inspect`): what a whole-image warm fetches,
    /// besides the index.
    pub stored_bytes: u64,
}

/// A fleet (see the module documentation); dropping it stops everything and removes it.
pub struct Fleet {
    hosts: Vec<Host>,
    tier: Option<Tier>,
    origin: Origin,
    /// Dropped after the members: deleting it removes the bridge and the veths' ends.
    _bridge: Netns,
    dir: PathBuf,
    config: FleetConfig,
}

impl Fleet {
    /// Builds the namespaces and links, starts the origin, the tier (if configured) and every
    /// host's lazyd.
    pub fn start(config: FleetConfig) -> Result<Fleet> {
        crate::mount::require_root();
        ensure!(
            (1..=200).contains(&config.hosts),
            "a fleet has 1 to 200 hosts"
        );
        clean_leftovers()?;
        let name = format!(
            "{PREFIX}{}-{}",
            std::process::id(),
            SEQUENCE.fetch_add(1, Ordering::Relaxed)
        );
        let dir = std::env::temp_dir().join(&name);
        create_open_dir(&dir)?;
        let bridge = Netns::create(format!("{name}-br"))?;
        bridge.ip(&["link", "add", "br0", "type", "bridge"])?;
        bridge.ip(&["link", "set", "br0", "up"])?;
        // Member `port` of the bridge: a namespace with `eth0` at `ip`.
        let member = |role: &str, port: &str, ip: Ipv4Addr| -> Result<Netns> {
            let ns = Netns::create(format!("{name}-{role}"))?;
            bridge.ip(&[
                "link", "add", port, "type", "veth", "peer", "name", "eth0", "netns", &ns.name,
            ])?;
            bridge.ip(&["link", "set", port, "master", "br0", "up"])?;
            ns.ip(&["addr", "add", &format!("{ip}/24"), "dev", "eth0"])?;
            ns.ip(&["link", "set", "eth0", "up"])?;
            Ok(ns)
        };

        let origin_ns = member("origin", "origin", ORIGIN_IP)?;
        origin_ns.shape("eth0", &config.origin_rate)?;
        let origin = in_netns(&origin_ns.name, || {
            let registry = match &config.registry_storage {
                Some(storage) => LocalRegistry::serve(storage)?,
                None => LocalRegistry::start()?,
            };
            let mut proxies = vec![DelayProxy::start_on(
                &format!("{ORIGIN_IP}:{REGISTRY_PORT}"),
                &registry.host(),
                config.origin_delay,
            )?];
            let moto = if config.s3 {
                let moto = MotoServer::start();
                moto.create_bucket(BUCKET);
                proxies.push(DelayProxy::start_on(
                    &format!("{ORIGIN_IP}:{S3_PORT}"),
                    &format!("127.0.0.1:{}", moto.port()),
                    config.origin_delay,
                )?);
                Some(moto)
            } else {
                None
            };
            Ok((registry, moto, proxies))
        })?;
        let origin = Origin {
            registry: origin.0,
            moto: origin.1,
            proxies: origin.2,
            ns: origin_ns,
        };

        let tier = if config.tier {
            let tier_dir = dir.join("tier");
            create_open_dir(&tier_dir)?;
            Tier::render(&tier_dir, &config)?;
            let tier = Tier {
                dir: tier_dir,
                nginx: Mutex::new(None),
                ns: member("tier", "tier", TIER_IP)?,
            };
            tier.start()?;
            Some(tier)
        } else {
            None
        };

        let mut hosts = Vec::with_capacity(config.hosts);
        for i in 0..config.hosts {
            let ip = Ipv4Addr::new(SUBNET[0], SUBNET[1], SUBNET[2], (FIRST_HOST + i) as u8);
            let port = format!("h{i}");
            let ns = member(&port, &port, ip)?;
            bridge.shape(&port, &config.host_rate)?;
            let root = dir.join(&port);
            let mnt = dir.join("mnt").join(&port);
            fs::create_dir_all(&mnt)?;
            let lazyd_config = host_config(&config);
            let env = host_env(&config);
            let lazyd = in_netns(&ns.name, || Lazyd::start_in(&root, &lazyd_config, &env))?;
            hosts.push(Host { ip, lazyd, mnt, ns });
        }
        Ok(Fleet {
            hosts,
            tier,
            origin,
            _bridge: bridge,
            dir,
            config,
        })
    }

    pub fn hosts(&self) -> &[Host] {
        &self.hosts
    }

    pub fn hosts_mut(&mut self) -> &mut [Host] {
        &mut self.hosts
    }

    /// The fleet's scratch directory (the hosts' lazyd roots, the tier's files, mount points).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The origin registry as the hosts reach it (`10.77.0.3:5000`).
    pub fn registry(&self) -> String {
        format!("{ORIGIN_IP}:{REGISTRY_PORT}")
    }

    /// The tier's registry mirror URL, as lazyd's config names it (its metrics label it
    /// `mirror="URL/"`, the URL normalized).
    pub fn registry_mirror(&self) -> String {
        format!("http://{TIER_IP}:{REGISTRY_PORT}")
    }

    /// The tier's S3 mirror URL.
    pub fn s3_mirror(&self) -> String {
        format!("http://{TIER_IP}:{S3_PORT}")
    }

    /// The tier's address (the client the origin sees for what the tier fetches).
    pub fn tier_ip(&self) -> IpAddr {
        TIER_IP.into()
    }

    /// Pushes `image` to the origin registry as `REPO:TAG` (`repo_tag`) and converts it there to
    /// `REPO:TAG-lazy` with `lazyctl convert CONVERT_ARGS...`.
    pub fn publish_registry(
        &self,
        image: &LayoutInfo,
        repo_tag: &str,
        convert_args: &[&str],
    ) -> Result<Published> {
        let source = format!("docker://{}/{repo_tag}", self.origin.registry.host());
        let lazy = format!("{source}-lazy");
        let stored = in_netns(&self.origin.ns.name, || {
            skopeo_copy(&image.oci_ref(), &source)?;
            let out = lazyctl(
                [
                    &["convert", "--no-progress"],
                    convert_args,
                    &[&source, &lazy],
                ]
                .concat(),
            );
            ensure!(
                out.status.success(),
                "lazyctl convert {source} {lazy}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            Ok(stored_bytes(&lazy, &[]))
        })?;
        Ok(Published {
            reference: format!("{}/{repo_tag}-lazy", self.registry()),
            stored_bytes: stored,
        })
    }

    /// Converts `image` into the origin's bucket under `prefix` with `lazyctl convert
    /// CONVERT_ARGS...`.
    pub fn publish_s3(
        &self,
        image: &LayoutInfo,
        prefix: &str,
        convert_args: &[&str],
    ) -> Result<Published> {
        let moto = self
            .origin
            .moto
            .as_ref()
            .context("this fleet has no S3 (FleetConfig::s3)")?;
        let destination = format!("s3://{BUCKET}/{prefix}");
        let stored = in_netns(&self.origin.ns.name, || {
            let out = Command::new(lazyctl_path())
                .args(["convert", "--no-progress"])
                .args(convert_args)
                .arg(image.oci_ref())
                .arg(&destination)
                .envs(moto.env())
                .output()?;
            ensure!(
                out.status.success(),
                "lazyctl convert {} {destination}: {}",
                image.oci_ref(),
                String::from_utf8_lossy(&out.stderr)
            );
            Ok(stored_bytes(&destination, &moto.env()))
        })?;
        Ok(Published {
            reference: destination,
            stored_bytes: stored,
        })
    }

    /// Every request the origin served so far (registry, then S3), in arrival order per server.
    pub fn origin_requests(&self) -> Vec<ProxiedRequest> {
        self.origin
            .proxies
            .iter()
            .flat_map(DelayProxy::requests)
            .collect()
    }

    /// Bytes the origin sent so far (HTTP replies, headers included), to everyone.
    pub fn origin_bytes(&self) -> u64 {
        self.origin.proxies.iter().map(DelayProxy::bytes_sent).sum()
    }

    /// Bytes the origin sent so far to `client`.
    pub fn origin_bytes_to(&self, client: IpAddr) -> u64 {
        self.origin
            .proxies
            .iter()
            .map(|p| p.bytes_sent_to(client))
            .sum()
    }

    /// Stops the tier (nginx); its cache is kept. Mirrors then fail to connect.
    pub fn stop_tier(&self) -> Result<()> {
        self.tier.as_ref().context("this fleet has no tier")?.stop()
    }

    /// Starts the tier again.
    pub fn start_tier(&self) -> Result<()> {
        self.tier
            .as_ref()
            .context("this fleet has no tier")?
            .start()
    }

    /// `lazyctl warm --no-progress [--hot] IMAGE` on every host at the same moment (the
    /// commands start together after a barrier); returns each host's output and the time from
    /// the common start to its end.
    pub fn warm_all(&self, image: &str, hot: bool) -> Vec<(Output, Duration)> {
        let barrier = Barrier::new(self.hosts.len());
        std::thread::scope(|scope| {
            let warms: Vec<_> = self
                .hosts
                .iter()
                .map(|host| {
                    let barrier = &barrier;
                    scope.spawn(move || {
                        let mut command = Command::new(lazyctl_path());
                        command
                            .arg("--socket")
                            .arg(host.lazyd.socket())
                            .args(["warm", "--no-progress"]);
                        if hot {
                            command.arg("--hot");
                        }
                        command.arg(image).stdin(Stdio::null());
                        barrier.wait();
                        let start = Instant::now();
                        let out = command.output().expect("running lazyctl warm");
                        (out, start.elapsed())
                    })
                })
                .collect();
            warms
                .into_iter()
                .map(|w| w.join().expect("a warm thread panicked"))
                .collect()
        })
    }

    pub fn config(&self) -> &FleetConfig {
        &self.config
    }
}

/// A host's lazyd config: the test's sections, `[fetch]` (the origin registry over plain
/// http), and the tier's mirrors.
fn host_config(config: &FleetConfig) -> String {
    let mut text = format!(
        "{}\n[fetch]\ninsecure_registries = [\"{ORIGIN_IP}:{REGISTRY_PORT}\"]\n{}\n",
        config.lazyd_config, config.fetch_config
    );
    if config.tier {
        let mirror = |key: &str, value: &str, port: u16| {
            format!(
                "[[mirror]]\n{key} = \"{value}\"\nurl = \"http://{TIER_IP}:{port}\"\n\
                 timeout = \"{}\"\nslice = \"{}\"\nbackoff = \"{}\"\nmax_backoff = \"{}\"\n",
                config.mirror_timeout,
                config.slice,
                config.mirror_backoff,
                config.mirror_max_backoff
            )
        };
        text += &mirror(
            "registry",
            &format!("{ORIGIN_IP}:{REGISTRY_PORT}"),
            REGISTRY_PORT,
        );
        if config.s3 {
            text += &mirror("bucket", BUCKET, S3_PORT);
        }
    }
    text
}

/// A host's lazyd environment: S3 at the origin, with moto's test credentials.
fn host_env(config: &FleetConfig) -> Vec<(String, String)> {
    if !config.s3 {
        return Vec::new();
    }
    [
        ("AWS_ENDPOINT_URL", format!("http://{ORIGIN_IP}:{S3_PORT}")),
        ("AWS_ACCESS_KEY_ID", crate::s3::ACCESS_KEY_ID.into()),
        ("AWS_SECRET_ACCESS_KEY", crate::s3::SECRET_ACCESS_KEY.into()),
        ("AWS_REGION", crate::s3::REGION.into()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect()
}

impl Drop for Fleet {
    fn drop(&mut self) {
        if std::thread::panicking() {
            if let Some(tier) = &self.tier {
                eprintln!("--- tier log ({}) ---\n{}", tier.dir.display(), tier.log());
            }
        }
        // Hosts first (lazyd unmounts its mounts), then the tier, the origin, the bridge.
        self.hosts.clear();
        self.tier = None;
        for mnt in fs::read_dir(self.dir.join("mnt"))
            .into_iter()
            .flatten()
            .flatten()
        {
            if is_fuse_mounted(&mnt.path()).unwrap_or(false) {
                let _ = Command::new("umount").arg("-l").arg(mnt.path()).status();
            }
        }
        let _ = fs::remove_dir_all(&self.dir);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metric_sums_the_series_whose_labels_match() {
        let text = "# HELP lazy_mirror_bytes_total x\n\
                    lazy_mirror_bytes_total{mirror=\"http://a:1\"} 10\n\
                    lazy_mirror_bytes_total{mirror=\"http://b:2\"} 5\n\
                    lazy_mirror_bytes_total_other 7\n\
                    lazy_up 1\n";
        assert_eq!(metric(text, "lazy_mirror_bytes_total", ""), 15.0);
        assert_eq!(
            metric(text, "lazy_mirror_bytes_total", "mirror=\"http://b:2\""),
            5.0
        );
        assert_eq!(metric(text, "lazy_up", ""), 1.0);
        assert_eq!(metric(text, "lazy_missing", ""), 0.0);
    }

    #[test]
    fn placeholder_in_finds_capital_names_between_at_signs() {
        assert_eq!(placeholder_in("listen @S3_LISTEN@;"), Some("@S3_LISTEN@"));
        assert_eq!(placeholder_in("error_page 502 = @fallback; a@b.c"), None);
        assert_eq!(placeholder_in("@@ @A"), None);
        assert_eq!(placeholder_in("# replace the @TOKENS@\nlisten 80;"), None);
    }

    #[test]
    fn owner_pid_reads_fleet_names_only() {
        assert_eq!(owner_pid("lazyfleet-123-0-h1"), Some(123));
        assert_eq!(owner_pid("lazyfleet-x-0"), None);
        assert_eq!(owner_pid("other-123"), None);
    }

    #[test]
    fn host_config_names_the_mirrors_only_with_a_tier() {
        let with = host_config(&FleetConfig {
            s3: true,
            ..FleetConfig::default()
        });
        assert!(
            with.contains("insecure_registries = [\"10.77.0.3:5000\"]"),
            "{with}"
        );
        assert!(with.contains("registry = \"10.77.0.3:5000\"\nurl = \"http://10.77.0.2:5000\""));
        assert!(with.contains("bucket = \"fleet\"\nurl = \"http://10.77.0.2:9000\""));
        let without = host_config(&FleetConfig {
            tier: false,
            ..FleetConfig::default()
        });
        assert!(!without.contains("[[mirror]]"), "{without}");
    }
}
