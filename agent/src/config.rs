//! lazyd's configuration: a TOML file where every key has a default, so an empty file (or none)
//! gives a working agent. Sizes are bytes or strings with K/M/G suffixes (`"10G"`), durations
//! are humantime strings (`"30s"`, `"2m"`). Unknown keys are errors, so a typo is reported
//! instead of silently ignored. The reference with every key is in docs/OPERATIONS.md.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Deserializer};
use thiserror::Error;

use crate::error::error_chain;
use crate::fetcher::FetcherConfig;
use crate::mirror::{self, MirrorSpec, Mirrors, Origin};
use crate::remote::RemoteOptions;
use crate::stream::StreamConfig;

/// Where `lazyd` listens and `lazyctl` looks when neither `--socket` nor `LAZYD_SOCKET` says.
pub const DEFAULT_SOCKET: &str = "/run/lazyd/lazyd.sock";
/// The group given the control socket when the config names none and it exists.
pub const DEFAULT_SOCKET_GROUP: &str = "lazyd";
/// Where the packaged unit's config file lives.
pub const DEFAULT_CONFIG: &str = "/etc/lazyd/config.toml";

#[derive(Debug, Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("config file {path}: {message}")]
    Parse { path: PathBuf, message: String },
}

/// The whole configuration file.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AgentConfig {
    /// The control API's unix socket.
    pub socket: PathBuf,
    /// The group the socket is given (mode 0660: its members may use the API). Unset: the
    /// group `lazyd` where it exists (the package makes it), else root's.
    pub socket_group: Option<String>,
    /// The agent's own state: known images, recorded profiles.
    pub state_dir: PathBuf,
    /// The chunk cache (and kept manifests and indexes).
    pub cache_dir: PathBuf,
    /// Disk budget of the chunk cache.
    #[serde(deserialize_with = "size")]
    pub cache_size: u64,
    /// Log filter (tracing-subscriber `EnvFilter` syntax); `RUST_LOG` overrides it.
    pub log: String,
    /// Also serve `GET /metrics` on this TCP address (for Prometheus), besides the socket.
    pub metrics_listen: Option<SocketAddr>,
    pub fetch: FetchConfig,
    pub background: BackgroundConfig,
    pub profile: ProfileConfig,
    pub mount: MountOptions,
    pub stream: StreamOptions,
    /// Mirrors of registries and buckets (`[[mirror]]`, tried in order before the origin).
    pub mirror: Vec<MirrorEntry>,
}

impl Default for AgentConfig {
    fn default() -> Self {
        AgentConfig {
            socket: PathBuf::from(DEFAULT_SOCKET),
            socket_group: None,
            state_dir: PathBuf::from("/var/lib/lazyd"),
            cache_dir: PathBuf::from("/var/cache/lazyimg"),
            cache_size: 10 << 30,
            log: "info,fuser::mnt=error".to_string(),
            metrics_listen: None,
            fetch: FetchConfig::default(),
            background: BackgroundConfig::default(),
            profile: ProfileConfig::default(),
            mount: MountOptions::default(),
            stream: StreamOptions::default(),
            mirror: Vec::new(),
        }
    }
}

/// One `[[mirror]]`: a cache tier that blob reads of a registry or bucket go to first
/// (`crate::mirror`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MirrorEntry {
    /// The registry whose blobs it serves, `host[:port]` as image references name it ...
    pub registry: Option<String>,
    /// ... or the S3 bucket.
    pub bucket: Option<String>,
    /// `http://host[:port]` or `https://host[:port]`.
    pub url: String,
    /// Connecting, and each wait for data, longer than this: the origin is asked instead.
    #[serde(default = "mirror_timeout", deserialize_with = "duration")]
    pub timeout: Duration,
    /// The tier's slice size: requests are cut at its multiples; 0: not cut.
    #[serde(default = "mirror_slice", deserialize_with = "size")]
    pub slice: u64,
    /// How long a mirror that failed is skipped, doubled after each further failure...
    #[serde(default = "mirror_backoff", deserialize_with = "duration")]
    pub backoff: Duration,
    /// ...up to this.
    #[serde(default = "mirror_max_backoff", deserialize_with = "duration")]
    pub max_backoff: Duration,
}

/// Above what a tier's cache lock makes a host wait for a slice another host's request is
/// fetching (nginx re-checks every 500 ms, and the slice itself crosses the origin's link).
fn mirror_timeout() -> Duration {
    Duration::from_secs(5)
}

/// Small enough that a hot set scattered over an image costs the origin little more than its
/// own bytes (docs/BENCHMARKS.md, "Fleet").
fn mirror_slice() -> u64 {
    128 << 10
}

fn mirror_backoff() -> Duration {
    Duration::from_secs(1)
}

fn mirror_max_backoff() -> Duration {
    Duration::from_secs(60)
}

impl MirrorEntry {
    fn spec(&self) -> Result<MirrorSpec, String> {
        let origin = match (&self.registry, &self.bucket) {
            (Some(registry), None) => Origin::Registry(registry.clone()),
            (None, Some(bucket)) => Origin::Bucket(bucket.clone()),
            _ => {
                return Err(format!(
                    "mirror {}: give either registry or bucket, not both or neither",
                    self.url
                ))
            }
        };
        let url = reqwest::Url::parse(&self.url)
            .map_err(|e| format!("mirror {}: not a URL: {e}", self.url))?;
        mirror::check_url(&url).map_err(|reason| format!("mirror {}: {reason}", self.url))?;
        if self.timeout.is_zero() || self.backoff.is_zero() {
            return Err(format!(
                "mirror {}: timeout and backoff must be more than 0",
                self.url
            ));
        }
        if self.max_backoff < self.backoff {
            return Err(format!(
                "mirror {}: max_backoff is shorter than backoff",
                self.url
            ));
        }
        Ok(MirrorSpec {
            origin,
            url,
            timeout: self.timeout,
            slice: self.slice,
            backoff: self.backoff,
            max_backoff: self.max_backoff,
        })
    }
}

/// Requests to registries and S3.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct FetchConfig {
    /// Demand requests in flight per backend (read-ahead, streams and background work have
    /// `stream.requests` slots of their own).
    pub concurrency: usize,
    /// Most bytes of demand requests in flight per backend (one starts anyway when none runs).
    #[serde(deserialize_with = "size")]
    pub demand_bytes: u64,
    #[serde(deserialize_with = "duration")]
    pub connect_timeout: Duration,
    /// Bound on one request; transient failures are retried.
    #[serde(deserialize_with = "duration")]
    pub request_timeout: Duration,
    /// How long a read through a mount waits for its data before it fails with EIO.
    #[serde(deserialize_with = "duration")]
    pub read_timeout: Duration,
    /// Attempts per request, the first included.
    pub max_attempts: u32,
    /// Largest coalesced range request.
    #[serde(deserialize_with = "size")]
    pub max_request_size: u64,
    /// Budget of the decoded-chunk memory cache.
    #[serde(deserialize_with = "size")]
    pub memory_cache: u64,
    /// How long an image opened from a registry or S3 (its reference resolved to a manifest,
    /// and the index fetched) is used again without asking the backend; 0: ask every time.
    /// `lazyctl run` of an image asks twice (root filesystem, then config), and a host that
    /// starts one image's containers one after another asks once per container.
    #[serde(deserialize_with = "duration")]
    pub resolve_ttl: Duration,
    /// Guess what readers read next from the image's layout (the rest of a file or of a
    /// directory just touched) and fetch it, or decode it from the disk cache, ahead of them.
    pub speculate: bool,
    /// Speculative requests in flight per backend (within `stream.requests`).
    pub speculative_requests: usize,
    /// Largest speculative request.
    #[serde(deserialize_with = "size")]
    pub speculative_request_size: u64,
    /// Buckets whose objects an image's blobs may name (`lazyctl convert --reference`),
    /// besides the image's own bucket (`s3://` images); `"*"`: any. lazyd reads them with its
    /// own AWS credentials, so an image from a registry or another bucket must not be able to
    /// point them anywhere.
    pub external_buckets: Vec<String>,
    /// Registries (`host[:port]`, as image references name them) reached over plain http when
    /// https fails, like docker's `insecure-registries`; loopback registries always are.
    pub insecure_registries: Vec<String>,
}

impl Default for FetchConfig {
    fn default() -> Self {
        let f = FetcherConfig::default();
        let r = RemoteOptions::default();
        FetchConfig {
            concurrency: f.concurrency,
            demand_bytes: f.demand_bytes,
            connect_timeout: r.connect_timeout,
            request_timeout: f.request_timeout,
            read_timeout: f.read_timeout,
            max_attempts: f.max_attempts,
            max_request_size: f.max_request_bytes,
            memory_cache: f.memory_budget as u64,
            resolve_ttl: Duration::from_secs(60),
            speculate: true,
            speculative_requests: f.speculative_requests,
            speculative_request_size: f.speculative_request_bytes,
            external_buckets: Vec::new(),
            insecure_registries: Vec::new(),
        }
    }
}

/// Work nobody waits for: the whole image after a mount, warms.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct BackgroundConfig {
    /// Bytes per second the whole-image prefetch after a mount may use (per agent); 0 = no
    /// limit. `lazyctl warm` is work an operator asked for and runs at full speed; a profile's
    /// hot set is fetched at full speed, since a start waits for it.
    #[serde(deserialize_with = "size")]
    pub bandwidth: u64,
    /// When to fetch the whole image (in layout order, up to half of `cache_size`) after
    /// mounting it: `never`, `without-profile` (when the image has no profile) or `always`
    /// (after the profile's hot set).
    pub whole_image: WholeImage,
    /// Background requests (warm, prefetch) in flight per backend: enough to fill the link,
    /// few enough that a demand read shares it with little.
    pub max_requests: usize,
    /// Largest background request.
    #[serde(deserialize_with = "size")]
    pub max_request_size: u64,
}

impl Default for BackgroundConfig {
    fn default() -> Self {
        // About 80 % of a 1 Gbit/s link: a host's hot set arrives in seconds while a container
        // that starts anyway still finds headroom for its own misses.
        let f = FetcherConfig::default();
        BackgroundConfig {
            bandwidth: 0,
            whole_image: WholeImage::WithoutProfile,
            max_requests: f.background_requests,
            max_request_size: f.background_request_bytes,
        }
    }
}

/// `background.whole_image`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum WholeImage {
    Never,
    WithoutProfile,
    Always,
}

/// Hot-chunk profiles.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ProfileConfig {
    /// Record which chunks are read in the first `window` after each mount.
    pub record: bool,
    #[serde(deserialize_with = "duration")]
    pub window: Duration,
    /// Push the merged profile beside the image when a recording ends (needs write access to
    /// the registry or bucket); otherwise it stays local until `lazyctl profile push`.
    pub push: bool,
    /// Prefetch an image's profile (local, else the one beside the image) after mounting it.
    pub prefetch: bool,
    /// Most bytes of the profile's hot set queued or in flight at once. The hot set comes in
    /// the order the start read it, so a reader that needs a chunk finds it on its way in a
    /// request that is nearly done: a window just above the link's bandwidth-delay product
    /// keeps the link full and the order tight (more in flight share the link and all arrive
    /// late). 16 MiB fills 1 Gbit/s at up to 100 ms per request.
    #[serde(deserialize_with = "size")]
    pub prefetch_window: u64,
}

impl Default for ProfileConfig {
    fn default() -> Self {
        ProfileConfig {
            record: true,
            window: Duration::from_secs(30),
            push: false,
            prefetch: true,
            prefetch_window: 16 << 20,
        }
    }
}

/// Defaults for mounts made through the agent.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MountOptions {
    /// Let other users (a container's non-root users) use mounts.
    pub allow_other: bool,
    /// Threads serving reads, per mount.
    pub read_workers: usize,
    /// How long an image's shared container lower stays mounted after its last container is
    /// removed, so the next container of that image finds the kernel's caches (pages,
    /// entries) still full; 0: unmounted with the last container.
    #[serde(deserialize_with = "duration")]
    pub lower_linger: Duration,
    /// Most time opening an image may take (its manifest, referrers and index) before a mount
    /// or a container's create fails with a timeout.
    #[serde(deserialize_with = "duration")]
    pub open_timeout: Duration,
}

impl Default for MountOptions {
    fn default() -> Self {
        MountOptions {
            allow_other: true,
            read_workers: 16,
            lower_linger: Duration::from_secs(600),
            open_timeout: Duration::from_secs(300),
        }
    }
}

/// Streams of model weights and sequential readers ahead of their reads (`agent::stream`).
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct StreamOptions {
    /// Stream the tensors of `*.safetensors` files when they are opened.
    pub safetensors: bool,
    /// Read-ahead, stream and background requests in flight per backend, besides demand ones.
    pub requests: usize,
    /// Most bytes one stream fetches ahead of what its reader has read (capped at a quarter of
    /// `cache_size`).
    #[serde(deserialize_with = "size")]
    pub max_ahead: u64,
    /// Largest read-ahead window of a sequential reader of any file (capped like `max_ahead`).
    #[serde(deserialize_with = "size")]
    pub read_ahead: u64,
    /// Most bytes of the tensor a reader reads that are fetched at once, at demand priority,
    /// when it starts reading it (0: none; the stream brings them in its turn).
    #[serde(deserialize_with = "size")]
    pub tensor_first: u64,
}

impl Default for StreamOptions {
    fn default() -> Self {
        StreamOptions {
            safetensors: true,
            requests: FetcherConfig::default().prefetch_requests,
            max_ahead: crate::stream::DEFAULT_MAX_AHEAD,
            read_ahead: crate::stream::DEFAULT_READ_AHEAD,
            tensor_first: crate::stream::DEFAULT_TENSOR_FIRST,
        }
    }
}

impl AgentConfig {
    /// Reads `path`; a missing file is an error (the caller decides whether one is needed).
    pub fn load(path: &Path) -> Result<AgentConfig, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        AgentConfig::parse(&text).map_err(|message| ConfigError::Parse {
            path: path.to_path_buf(),
            message,
        })
    }

    pub fn parse(text: &str) -> Result<AgentConfig, String> {
        let config: AgentConfig = toml::from_str(text).map_err(|e| e.to_string())?;
        config.check()?;
        Ok(config)
    }

    fn check(&self) -> Result<(), String> {
        if self.fetch.concurrency == 0 {
            return Err("fetch.concurrency must be at least 1".into());
        }
        if self.fetch.max_attempts == 0 {
            return Err("fetch.max_attempts must be at least 1".into());
        }
        if self.fetch.max_request_size < 64 << 10 {
            return Err("fetch.max_request_size must be at least 64K".into());
        }
        if self.fetch.speculative_requests == 0 {
            return Err("fetch.speculative_requests must be at least 1".into());
        }
        if self.fetch.speculative_request_size < 64 << 10 {
            return Err("fetch.speculative_request_size must be at least 64K".into());
        }
        if self.background.max_requests == 0 {
            return Err("background.max_requests must be at least 1".into());
        }
        if self.background.max_request_size < 64 << 10 {
            return Err("background.max_request_size must be at least 64K".into());
        }
        if self.stream.requests == 0 {
            return Err("stream.requests must be at least 1".into());
        }
        if self.mount.read_workers == 0 {
            return Err("mount.read_workers must be at least 1".into());
        }
        if self.cache_size == 0 {
            return Err("cache_size must be more than 0".into());
        }
        self.mirrors()?;
        Ok(())
    }

    /// The `[[mirror]]` entries, checked, with their clients.
    pub fn mirrors(&self) -> Result<Mirrors, String> {
        let specs = self
            .mirror
            .iter()
            .map(MirrorEntry::spec)
            .collect::<Result<Vec<_>, _>>()?;
        Mirrors::new(&specs).map_err(|e| error_chain(&e))
    }

    pub fn fetcher(&self) -> FetcherConfig {
        FetcherConfig {
            request_timeout: self.fetch.request_timeout,
            read_timeout: self.fetch.read_timeout,
            max_attempts: self.fetch.max_attempts,
            max_request_bytes: self.fetch.max_request_size,
            concurrency: self.fetch.concurrency,
            demand_bytes: self.fetch.demand_bytes,
            prefetch_requests: self.stream.requests,
            background_requests: self.background.max_requests,
            speculative_requests: self.fetch.speculative_requests,
            speculative_request_bytes: self.fetch.speculative_request_size,
            background_request_bytes: self.background.max_request_size,
            memory_budget: usize::try_from(self.fetch.memory_cache).unwrap_or(usize::MAX),
            ..FetcherConfig::default()
        }
    }

    /// How streams run with a fetcher of [`AgentConfig::fetcher`] over a cache of `cache_size`.
    pub fn streams(&self) -> StreamConfig {
        let max_ahead = self.stream.max_ahead.min(self.cache_size / 4);
        StreamConfig {
            safetensors: self.stream.safetensors,
            max_ahead,
            ahead_budget: self.cache_size / 4,
            queue_budget: self.stream.requests as u64 * self.fetch.max_request_size,
            read_ahead: self.stream.read_ahead.min(max_ahead),
            first_bytes: self.stream.tensor_first,
        }
    }

    /// How to reach registries and buckets; fails only on `[[mirror]]` entries that
    /// [`AgentConfig::parse`] would refuse.
    pub fn remote(&self) -> Result<RemoteOptions, String> {
        Ok(RemoteOptions {
            connect_timeout: self.fetch.connect_timeout,
            read_timeout: self.fetch.request_timeout,
            external_buckets: self.fetch.external_buckets.clone(),
            insecure_registries: self.fetch.insecure_registries.clone(),
            mirrors: Arc::new(self.mirrors()?),
        })
    }

    /// Where the chunk segments live.
    pub fn chunk_dir(&self) -> PathBuf {
        self.cache_dir.join(crate::remote::CHUNK_DIR)
    }
}

/// Parses a size: a number of bytes with an optional K, M or G suffix (powers of 1024; `KiB`,
/// `MiB`, `GiB` accepted too).
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim().to_ascii_uppercase();
    let (num, shift) = [
        ("GIB", 30),
        ("G", 30),
        ("MIB", 20),
        ("M", 20),
        ("KIB", 10),
        ("K", 10),
    ]
    .iter()
    .find_map(|(suffix, shift)| t.strip_suffix(suffix).map(|n| (n.trim(), *shift)))
    .unwrap_or((t.as_str(), 0));
    let n: u64 = num.parse().map_err(|_| format!("not a size: {s:?}"))?;
    n.checked_mul(1 << shift)
        .ok_or_else(|| format!("size too large: {s:?}"))
}

fn size<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Size {
        Bytes(u64),
        Text(String),
    }
    match Size::deserialize(d)? {
        Size::Bytes(n) => Ok(n),
        Size::Text(s) => parse_size(&s).map_err(serde::de::Error::custom),
    }
}

fn duration<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    let s = String::deserialize(d)?;
    humantime::parse_duration(&s)
        .map_err(|e| serde::de::Error::custom(format!("not a duration: {s:?} ({e})")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_empty_file_gives_the_defaults() {
        let c = AgentConfig::parse("").unwrap();
        assert_eq!(c.socket, PathBuf::from(DEFAULT_SOCKET));
        assert_eq!(c.cache_size, 10 << 30);
        assert_eq!(c.fetch.concurrency, 16);
        assert_eq!(c.fetch.read_timeout, Duration::from_secs(30));
        assert!(c.profile.record && c.profile.prefetch && !c.profile.push);
        assert_eq!(c.background.bandwidth, 0);
        assert_eq!(c.background.whole_image, WholeImage::WithoutProfile);
        assert!(c.fetch.speculate);
        assert_eq!(c.fetch.resolve_ttl, Duration::from_secs(60));
        assert_eq!(c.mount.lower_linger, Duration::from_secs(600));
    }

    #[test]
    fn mirrors_parse_with_defaults_and_bad_ones_are_refused() {
        let c = AgentConfig::parse(
            r#"
            [fetch]
            insecure_registries = ["10.0.0.3:5000"]
            [[mirror]]
            registry = "10.0.0.3:5000"
            url = "http://10.0.0.2:5000"
            [[mirror]]
            bucket = "images"
            url = "https://tier.example.com"
            timeout = "1s"
            slice = "4M"
            backoff = "2s"
            max_backoff = "10s"
            "#,
        )
        .unwrap();
        let remote = c.remote().unwrap();
        assert_eq!(remote.insecure_registries, ["10.0.0.3:5000"]);
        let (mirrors, origins) = remote.mirrors.snapshot();
        assert_eq!(mirrors.len(), 2);
        assert_eq!(origins[0].origin, Origin::Registry("10.0.0.3:5000".into()));
        assert_eq!(origins[1].origin, Origin::Bucket("images".into()));
        let first = c.mirror[0].spec().unwrap();
        assert_eq!(
            (first.timeout, first.slice, first.backoff, first.max_backoff),
            (
                Duration::from_secs(5),
                128 << 10,
                Duration::from_secs(1),
                Duration::from_secs(60)
            )
        );
        assert_eq!(c.mirror[1].spec().unwrap().slice, 4 << 20);
        for (bad, says) in [
            ("url = \"http://t\"", "either registry or bucket"),
            (
                "registry = \"r\"\nbucket = \"b\"\nurl = \"http://t\"",
                "either registry or bucket",
            ),
            ("registry = \"r\"\nurl = \"t:5000\"", "http:// or https://"),
            (
                "registry = \"r\"\nurl = \"http://t/v2\"",
                "must not have a path",
            ),
            ("registry = \"r\"\nurl = \"nonsense\"", "not a URL"),
            (
                "registry = \"r\"\nurl = \"http://t\"\nbackoff = \"1m\"\nmax_backoff = \"1s\"",
                "max_backoff",
            ),
            (
                "registry = \"r\"\nurl = \"http://t\"\nport = 1",
                "unknown field",
            ),
        ] {
            let err = AgentConfig::parse(&format!("[[mirror]]\n{bad}")).unwrap_err();
            assert!(err.contains(says), "{bad}: {err}");
        }
    }

    #[test]
    fn every_section_parses() {
        let c = AgentConfig::parse(
            r#"
            socket = "/tmp/l.sock"
            state_dir = "/tmp/state"
            cache_dir = "/tmp/cache"
            cache_size = "512M"
            log = "debug"
            metrics_listen = "127.0.0.1:9480"
            [fetch]
            concurrency = 32
            connect_timeout = "2s"
            request_timeout = "15s"
            read_timeout = "1m"
            max_attempts = 2
            max_request_size = "4M"
            memory_cache = 1048576
            [background]
            bandwidth = "0"
            max_requests = 8
            max_request_size = "8M"
            [profile]
            record = false
            window = "10s"
            push = true
            prefetch = false
            [mount]
            allow_other = false
            read_workers = 4
            [stream]
            safetensors = false
            requests = 32
            max_ahead = "256M"
            read_ahead = "512M"
            "#,
        )
        .unwrap();
        assert_eq!(c.cache_size, 512 << 20);
        assert_eq!(c.metrics_listen.unwrap().port(), 9480);
        assert_eq!(c.fetch.read_timeout, Duration::from_secs(60));
        assert_eq!(c.fetcher().max_request_bytes, 4 << 20);
        assert_eq!(c.fetcher().memory_budget, 1 << 20);
        assert_eq!(c.remote().unwrap().connect_timeout, Duration::from_secs(2));
        assert_eq!(c.background.bandwidth, 0);
        assert_eq!(c.fetcher().background_requests, 8);
        assert_eq!(c.fetcher().background_request_bytes, 8 << 20);
        assert_eq!(c.profile.window, Duration::from_secs(10));
        assert!(!c.mount.allow_other);
        assert_eq!(c.fetcher().prefetch_requests, 32);
        let s = c.streams();
        assert!(!s.safetensors);
        // A quarter of the cache, the stream's own cap, and read-ahead within it.
        assert_eq!(s.max_ahead, 128 << 20);
        assert_eq!(s.read_ahead, 128 << 20);
        assert_eq!(s.queue_budget, 32 * (4 << 20));
    }

    #[test]
    fn mistakes_are_named() {
        let err = AgentConfig::parse("cache_sise = \"1G\"").unwrap_err();
        assert!(err.contains("cache_sise"), "{err}");
        let err = AgentConfig::parse("cache_size = \"lots\"").unwrap_err();
        assert!(err.contains("not a size"), "{err}");
        let err = AgentConfig::parse("[fetch]\nread_timeout = \"soon\"").unwrap_err();
        assert!(err.contains("not a duration"), "{err}");
        let err = AgentConfig::parse("[fetch]\nconcurrency = 0").unwrap_err();
        assert!(err.contains("concurrency"), "{err}");
    }

    /// packaging/config/lazyd.toml lists every key commented out at its default: uncommented, it
    /// must parse to the defaults (but for `metrics_listen`, which has none, and `socket_group`,
    /// whose default is `lazyd` where that group exists).
    #[test]
    fn the_example_config_states_the_defaults() {
        let example = include_str!("../../packaging/config/lazyd.toml");
        let key = |l: &str| {
            let l = l.trim_start_matches('#');
            (l.starts_with('[') && l.ends_with(']'))
                || l.split_once(" = ").is_some_and(|(k, _)| {
                    !k.is_empty() && k.chars().all(|c| c.is_ascii_lowercase() || c == '_')
                })
        };
        let text: String = example
            .lines()
            .map(|l| {
                if l.starts_with('#') && key(l) {
                    &l[1..]
                } else {
                    l
                }
            })
            .collect::<Vec<_>>()
            .join("\n");
        let mut parsed = AgentConfig::parse(&text).unwrap();
        assert!(
            parsed.metrics_listen.is_some(),
            "metrics_listen is in the example"
        );
        parsed.metrics_listen = None;
        assert_eq!(parsed.socket_group.as_deref(), Some(DEFAULT_SOCKET_GROUP));
        parsed.socket_group = None;
        assert_eq!(
            format!("{parsed:?}"),
            format!("{:?}", AgentConfig::default())
        );
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("10G").unwrap(), 10 << 30);
        assert_eq!(parse_size("1 MiB").unwrap(), 1 << 20);
        assert_eq!(parse_size("64k").unwrap(), 64 << 10);
        assert_eq!(parse_size("123").unwrap(), 123);
        assert!(parse_size("99999999999G").is_err());
        assert!(parse_size("G").is_err());
    }
}
