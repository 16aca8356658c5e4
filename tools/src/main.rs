//! `lazyctl`: convert images to the lazy format and mount them.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use agent::config::{parse_size, DEFAULT_SOCKET};
use agent::remote::ImageLocation;
use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use signal_hook::consts::{SIGINT, SIGTERM};
use tools::client::AgentClient;
use tools::ctl;
use tools::reference::{SourceRef, StoreRef};
use tools::ConvertOptions;

#[derive(Parser)]
#[command(
    name = "lazyctl",
    version,
    about = "Lazy container images and model weights"
)]
struct Cli {
    /// lazyd's control socket.
    #[arg(long, global = true, env = "LAZYD_SOCKET", default_value = DEFAULT_SOCKET)]
    socket: PathBuf,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Convert an image, a directory or an S3 prefix into a lazy image.
    ///
    /// SRC: oci:PATH[:TAG], oci-archive:PATH, docker-archive:PATH, docker://HOST/REPO:TAG,
    /// path:DIR (a plain directory: a rootfs or a model folder), or s3://BUCKET/PREFIX/ (every
    /// object under the prefix as a plain file: keys relative to the prefix become paths, files
    /// 0644 and directories 0755 owned by root, mtimes from LastModified; keys that cannot be
    /// paths, such as a/../b, are refused). DST: dir:PATH[:TAG] (a local lazy-image store; TAG
    /// defaults to latest), docker://HOST/REPO:TAG (pushed as an OCI artifact; when SRC is an
    /// image in the same repository, its manifest becomes the subject so the referrers API
    /// finds the lazy image; convention: TAG-lazy), or s3://BUCKET/PREFIX (a lazy image).
    /// S3 credentials, region and endpoint come from the AWS environment (AWS_ENDPOINT_URL,
    /// AWS_REGION, the default credentials chain).
    Convert {
        src: String,
        dst: String,
        /// Uncompressed chunk size (bytes; K/M suffixes accepted).
        #[arg(long, default_value = "1M", value_parser = parse_chunk_size)]
        chunk_size: u32,
        /// zstd compression level.
        #[arg(long, default_value_t = fusefs::chunk::DEFAULT_ZSTD_LEVEL)]
        level: i32,
        /// Which chunks to compress: `zstd` every chunk (stored raw where zstd saves under
        /// 1/64); `none` no chunk (no compression work at conversion or on reads); `auto`
        /// chunks of model weights and already-compressed files (.safetensors, .bin, .pt,
        /// .gguf, .onnx, .npy, .gz, .zst, .zip, .png, .jpg, .mp4, ...) stored raw, everything
        /// else, and shared chunks of small files, as `zstd`. Defaults to `none` with
        /// --reference, else `auto`.
        #[arg(long, value_name = "auto|zstd|none")]
        compression: Option<tools::compression::Compression>,
        /// Index the objects of an s3://BUCKET/PREFIX/ source in place instead of copying
        /// them: each object is read once (to cut and hash its chunks) and becomes a data blob
        /// of the image stored at its own URL (its chunks are byte ranges of the object,
        /// uncompressed), so only the index, config and manifest are written to DST. lazyd
        /// reads the data from the objects; an object changed or deleted afterwards makes
        /// reads of its file fail (EIO) until the image is converted again.
        #[arg(long)]
        reference: bool,
        /// Compression threads (default: one per core).
        #[arg(long)]
        jobs: Option<usize>,
        /// Never show a progress bar.
        #[arg(long)]
        no_progress: bool,
        /// Lay the data out for this access profile (a profile JSON file as lazyd records
        /// it): in each layer's blob, the file data the profile read comes first, in the order
        /// it was first read (of large files only the parts read), then everything else as
        /// without the flag. The image's files and metadata are the same either way; a start
        /// like the profiled one then reads a few long ranges instead of many scattered ones.
        #[arg(long, value_name = "FILE")]
        profile: Option<PathBuf>,
        #[command(flatten)]
        remote: RemoteArgs,
    },
    /// Copy a lazy image from a local store to a registry, S3 or another store.
    ///
    /// SRC: dir:PATH[:TAG]. DST: docker://HOST/REPO:TAG, s3://BUCKET/PREFIX or dir:PATH[:TAG].
    Push {
        src: String,
        dst: String,
        /// The source image in the destination repository (docker://HOST/REPO:TAG or
        /// @DIGEST): recorded as the lazy image's subject, so the referrers API finds it.
        #[arg(long)]
        subject: Option<String>,
        #[command(flatten)]
        remote: RemoteArgs,
    },
    /// Mount a lazy image read-only through lazyd (or, with --standalone, in this process).
    ///
    /// IMAGE: dir:PATH[:TAG], docker://HOST/REPO:TAG or HOST/REPO:TAG (a lazy image, or an
    /// image that has one: found through the referrers API or the tag TAG-lazy), or
    /// s3://BUCKET/PREFIX. Remote images fetch the manifest and index at mount time and file
    /// data on first read, through the agent's chunk cache.
    Mount {
        image: String,
        mountpoint: PathBuf,
        /// Do not let other users (e.g. a container's non-root users) use the mount.
        #[arg(long)]
        no_allow_other: bool,
        /// Honour the image's setuid/setgid bits and file capabilities (the mount is nosuid
        /// by default: with other users let in, any of them could run the image's setuid-root
        /// binaries as root). For a runtime handed this mount as a container's root; `run`
        /// and --rootfs need no such thing.
        #[arg(long, conflicts_with = "rootfs")]
        suid: bool,
        /// Mount a container's root filesystem instead: a writable overlay (its upper layer in
        /// lazyd's state dir) on the image's shared read-only lazy mount, for runtimes and tools
        /// that make their own bundles. `lazyctl umount DIR` removes it, writes included.
        #[arg(long, conflicts_with = "standalone")]
        rootfs: bool,
        /// With --rootfs: the container's name (default: a random one).
        #[arg(long, requires = "rootfs")]
        name: Option<String>,
        /// Serve the mount from this process, in the foreground, until it is unmounted (no
        /// lazyd needed; for debugging and single mounts).
        #[arg(long)]
        standalone: bool,
        /// Threads serving reads (--standalone).
        #[arg(long, default_value_t = 16)]
        read_workers: usize,
        #[command(flatten)]
        remote: RemoteArgs,
        #[command(flatten)]
        cache: CacheArgs,
    },
    /// Unmount a lazy image mount (lazyd's, or a --standalone one).
    Umount {
        mountpoint: PathBuf,
        /// Detach now even if files are open (umount -l).
        #[arg(long)]
        lazy: bool,
    },
    /// Run a container on a lazy image with crun or runc; exits with the container's status.
    ///
    /// lazyd mounts the image (shared by every container of it) with a writable overlay for
    /// this container; the bundle's config.json comes from the image's config and the flags.
    /// Like `docker run --rm`: the overlay, with everything the container wrote, is removed
    /// when it exits, unless --keep. Stdio is the container's; SIGINT, SIGTERM, SIGHUP,
    /// SIGQUIT, SIGUSR1 and SIGUSR2 are passed on to it. The container shares the host's
    /// network.
    Run(RunArgs),
    /// Replace the running lazyd by a new binary without taking its mounts down.
    ///
    /// The supervisor stops the serving lazyd, runs the new binary with every mount's FUSE
    /// descriptor, and the new lazyd serves them again; requests in flight are resent to it.
    /// Under systemd, install the binary and `systemctl restart lazyd` instead.
    Upgrade {
        /// The new lazyd binary. Default: the path lazyd was started from (where a package
        /// upgrade puts the new version).
        #[arg(long)]
        binary: Option<PathBuf>,
    },
    /// Show lazyd's mounts, warms, cache and fetch counters.
    Status {
        /// Print the agent's JSON status.
        #[arg(long)]
        json: bool,
    },
    /// Fetch a lazy image into lazyd's cache before it is needed.
    ///
    /// Chunks already cached are skipped: a second warm fetches nothing and an interrupted one
    /// continues where it stopped. Afterwards the image mounts and reads with its backend
    /// unreachable.
    Warm {
        image: String,
        /// Only the image's hot set (the chunks its profile names).
        #[arg(long)]
        hot: bool,
        /// Never show a progress bar.
        #[arg(long)]
        no_progress: bool,
    },
    /// Free cache space: drop chunks no remembered image uses.
    Gc {
        /// Also forget images not mounted and not used for this long (e.g. 7d, 12h, 0s).
        #[arg(long, value_parser = humantime::parse_duration)]
        unused_for: Option<std::time::Duration>,
        #[arg(long)]
        json: bool,
    },
    /// Hot-chunk profiles: show, record and push them.
    #[command(subcommand)]
    Profile(ProfileCommand),
    /// Show what a lazy image holds (fetches only its manifest and index).
    Inspect {
        /// dir:PATH[:TAG], docker://HOST/REPO:TAG or s3://BUCKET/PREFIX
        image: String,
        #[command(flatten)]
        remote: RemoteArgs,
    },
}

#[derive(clap::Args)]
struct RunArgs {
    /// dir:PATH[:TAG], docker://HOST/REPO:TAG, HOST/REPO:TAG or s3://BUCKET/PREFIX (as for mount).
    image: String,
    /// The command and its arguments (replace the image's CMD; the ENTRYPOINT stays).
    #[arg(last = true, value_name = "CMD")]
    command: Vec<String>,
    /// The container's name: its runtime id and hostname (default: a random one).
    #[arg(long)]
    name: Option<String>,
    /// Keep the container's upper layer (its writes) and bundle after it exits, and print where.
    #[arg(long)]
    keep: bool,
    /// Set an environment variable (KEY=VALUE; KEY alone passes lazyctl's own value).
    #[arg(short, long, value_name = "KEY=VALUE")]
    env: Vec<String>,
    /// Bind-mount a host path: SRC:DST[:ro|rw] (SRC must exist; DST absolute).
    #[arg(short, long, value_name = "SRC:DST[:ro]")]
    volume: Vec<String>,
    /// Working directory in the container (absolute; default the image's, else /).
    #[arg(short, long, value_name = "DIR")]
    workdir: Option<String>,
    /// User: NAME, UID, NAME:GROUP or UID:GID, resolved in the image's /etc/passwd and
    /// /etc/group (default the image's, else root).
    #[arg(short, long)]
    user: Option<String>,
    /// Replace the image's ENTRYPOINT (and drop its CMD); "" clears it.
    #[arg(long, value_name = "CMD")]
    entrypoint: Option<String>,
    /// OCI runtime: crun, runc, or a path (default: crun, else runc, on PATH).
    #[arg(long, env = "LAZY_RUNTIME", value_name = "crun|runc|PATH")]
    runtime: Option<String>,
    /// The container's network: `none`, a namespace of its own with loopback only (the
    /// default), or `host`, the host's interfaces and ports.
    #[arg(long, value_enum, default_value_t = tools::spec::Network::None)]
    network: tools::spec::Network,
    /// `seccomp=PATH`: a seccomp profile in docker's format instead of the default
    /// (containers-common's, docker's default profile); `seccomp=unconfined`: no filter.
    #[arg(long, value_name = "seccomp=PATH|unconfined")]
    security_opt: Vec<String>,
}

#[derive(Subcommand)]
enum ProfileCommand {
    /// Show the image's profiles (recorded here, and stored beside the image).
    Show {
        image: String,
        /// Print the profiles themselves as JSON.
        #[arg(long)]
        json: bool,
        /// Write the profile (the one recorded here, else the one beside the image) to FILE,
        /// for `lazyctl convert --profile FILE`.
        #[arg(long, value_name = "FILE")]
        output: Option<PathBuf>,
    },
    /// Restart recording the first reads of a live mount (for --window, default the config's
    /// profile.window); run the workload now.
    Record {
        mountpoint: PathBuf,
        #[arg(long, value_parser = humantime::parse_duration)]
        window: Option<std::time::Duration>,
    },
    /// Merge the runs recorded here into the profile stored beside the image and push it.
    Push { image: String },
}

/// How to reach registries and S3. Credentials come from docker's config.json and the AWS
/// environment (AWS_ENDPOINT_URL, AWS_REGION, the default credentials chain).
#[derive(clap::Args)]
struct RemoteArgs {
    /// Seconds to wait for a connection to a registry or S3.
    #[arg(long, default_value_t = 5.0, value_name = "SECS")]
    connect_timeout: f64,
    /// Seconds one request to a registry or S3 may take (retried when transient).
    #[arg(long, default_value_t = 10.0, value_name = "SECS")]
    request_timeout: f64,
}

impl RemoteArgs {
    fn options(&self) -> Result<agent::remote::RemoteOptions> {
        Ok(agent::remote::RemoteOptions {
            connect_timeout: seconds(self.connect_timeout)?,
            read_timeout: seconds(self.request_timeout)?,
            // lazyctl reads with its user's own credentials, for images that user chose.
            external_buckets: vec!["*".to_string()],
            ..agent::remote::RemoteOptions::default()
        })
    }
}

/// The chunk cache and fetcher of a --standalone remote mount.
#[derive(clap::Args)]
#[command(next_help_heading = "Standalone mounts (--standalone)")]
struct CacheArgs {
    /// Chunk cache directory, shared by mounts and kept across restarts.
    #[arg(long, env = "LAZY_CACHE_DIR", default_value = "/var/cache/lazyimg")]
    cache_dir: PathBuf,
    /// Disk budget of the chunk cache (K/M/G suffixes).
    #[arg(long, default_value = "10G", value_parser = parse_size)]
    cache_size: u64,
    /// Seconds a read waits for its data before failing with EIO.
    #[arg(long, default_value_t = 30.0, value_name = "SECS")]
    read_timeout: f64,
    /// Requests in flight per backend.
    #[arg(long, default_value_t = 16)]
    concurrency: usize,
    /// Write the fetch and cache counters to this file (JSON) when the mount ends.
    #[arg(long, value_name = "FILE")]
    metrics_json: Option<PathBuf>,
}

fn seconds(s: f64) -> Result<std::time::Duration> {
    std::time::Duration::try_from_secs_f64(s).map_err(|_| anyhow::anyhow!("not a duration: {s}"))
}

/// `info` for operators; fuser's own unmount-on-drop complains at `warn` when the filesystem
/// was already unmounted by `lazyctl umount`, which is the normal way to stop a mount.
const DEFAULT_LOG_FILTER: &str = "info,fuser::mnt=error";

fn parse_chunk_size(s: &str) -> Result<u32, String> {
    u32::try_from(parse_size(s)?).map_err(|_| format!("size too large: {s:?}"))
}

fn main() -> ExitCode {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(DEFAULT_LOG_FILTER));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let cli = Cli::parse();
    let outcome = match cli.command {
        Command::Run(args) => run_container(&cli.socket, args).map(ExitCode::from),
        command => run(&cli.socket, command).map(|()| ExitCode::SUCCESS),
    };
    match outcome {
        Ok(code) => code,
        Err(e) => {
            eprintln!("lazyctl: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run_container(socket: &std::path::Path, args: RunArgs) -> Result<u8> {
    tools::run::run(
        &client(socket)?,
        &tools::run::RunOptions {
            image: args.image,
            name: args.name,
            keep: args.keep,
            env: args.env,
            volumes: args.volume,
            workdir: args.workdir,
            user: args.user,
            entrypoint: args.entrypoint,
            runtime: args.runtime,
            command: args.command,
            network: args.network,
            security_opt: args.security_opt,
        },
    )
}

fn run(socket: &std::path::Path, command: Command) -> Result<()> {
    match command {
        Command::Convert {
            src,
            dst,
            chunk_size,
            level,
            compression,
            reference,
            jobs,
            no_progress,
            profile,
            remote,
        } => {
            let src = SourceRef::parse(&src)?;
            let profile = match profile {
                Some(path) => {
                    let bytes = std::fs::read(&path)
                        .with_context(|| format!("reading {}", path.display()))?;
                    let profile = agent::profile::Profile::from_bytes(&bytes)
                        .with_context(|| format!("reading profile {}", path.display()))?;
                    Some(Arc::new(profile))
                }
                None => None,
            };
            let dst = ImageLocation::parse(&dst)?;
            let default_compression = if reference {
                tools::compression::Compression::None
            } else {
                tools::compression::Compression::Auto
            };
            let remote_options = remote.options()?;
            let mut opts = ConvertOptions {
                chunk_size,
                level,
                progress: !no_progress,
                profile,
                compression: compression.unwrap_or(default_compression),
                reference,
                remote: remote_options.clone(),
                ..ConvertOptions::default()
            };
            if let Some(j) = jobs {
                opts.jobs = j;
            }
            let (report, pushed) = tools::convert_to(&src, &dst, &opts, &remote_options)?;
            println!("{}", report.summary());
            if let Some(pushed) = pushed {
                println!("{}", pushed.summary());
            }
            Ok(())
        }
        Command::Push {
            src,
            dst,
            subject,
            remote,
        } => {
            let src = StoreRef::parse(&src)?;
            let dst = ImageLocation::parse(&dst)?;
            let report = tools::push(&src, &dst, subject.as_deref(), &remote.options()?)?;
            println!("{}", report.summary());
            Ok(())
        }
        Command::Mount {
            image,
            mountpoint,
            no_allow_other,
            suid,
            standalone: true,
            read_workers,
            remote,
            cache,
            ..
        } => mount(
            &image,
            &mountpoint,
            &remote,
            &cache,
            (!no_allow_other, suid),
            read_workers,
        ),
        Command::Mount {
            image,
            mountpoint,
            rootfs: true,
            name,
            ..
        } => ctl::mount_rootfs(&client(socket)?, &image, &mountpoint, name),
        Command::Mount {
            image,
            mountpoint,
            no_allow_other,
            suid,
            standalone: false,
            ..
        } => ctl::mount(
            &client(socket)?,
            &image,
            &mountpoint,
            no_allow_other.then_some(false),
            suid,
        ),
        Command::Umount { mountpoint, lazy } => ctl::umount(&client(socket)?, &mountpoint, lazy),
        Command::Status { json } => ctl::status(&client(socket)?, json),
        Command::Upgrade { binary } => ctl::upgrade(&client(socket)?, binary.as_deref()),
        Command::Warm {
            image,
            hot,
            no_progress,
        } => ctl::warm(&client(socket)?, &image, hot, !no_progress),
        Command::Gc { unused_for, json } => ctl::gc(&client(socket)?, unused_for, json),
        Command::Profile(ProfileCommand::Show {
            image,
            json,
            output,
        }) => ctl::profile_show(&client(socket)?, &image, json, output.as_deref()),
        Command::Profile(ProfileCommand::Record { mountpoint, window }) => {
            ctl::profile_record(&client(socket)?, &mountpoint, window)
        }
        Command::Profile(ProfileCommand::Push { image }) => {
            ctl::profile_push(&client(socket)?, &image)
        }
        Command::Inspect { image, remote } => inspect(&image, &remote),
        Command::Run(_) => unreachable!("`run` exits with the container's status; see main"),
    }
}

fn client(socket: &std::path::Path) -> Result<AgentClient> {
    AgentClient::new(socket).context("starting a runtime")
}

fn mount(
    image: &str,
    mountpoint: &std::path::Path,
    remote: &RemoteArgs,
    cache: &CacheArgs,
    (allow_other, suid): (bool, bool),
    read_workers: usize,
) -> Result<()> {
    let location = ImageLocation::parse(image)?;
    let cfg = fusefs::fuse::MountConfig {
        fs_name: format!("lazyimg:{}", image.trim_start_matches("dir:")),
        allow_other,
        suid,
        read_workers,
        ..fusefs::fuse::MountConfig::default()
    };
    // The mount's requests, if it reads through the fetcher, run on this runtime until the
    // mount ends.
    let runtime = tools::remote::runtime()?;
    let new_fetcher = || {
        tools::remote::fetcher(
            &cache.cache_dir,
            cache.cache_size,
            agent::fetcher::FetcherConfig {
                request_timeout: seconds(remote.request_timeout)?,
                read_timeout: seconds(cache.read_timeout)?,
                concurrency: cache.concurrency.max(1),
                ..agent::fetcher::FetcherConfig::default()
            },
            runtime.handle().clone(),
        )
    };
    // Opening a remote image keeps its manifest and index in the cache directory, which the
    // fetcher makes first.
    let fetcher = match &location {
        ImageLocation::Dir { .. } => None,
        _ => Some(new_fetcher()?),
    };
    // A local store's `mounted in` counts the open too (the index's digest check is most of it).
    let started = Instant::now();
    let opened = runtime
        .block_on(agent::remote::open_image(
            &location,
            &remote.options()?,
            Some(&cache.cache_dir),
        ))
        .with_context(|| format!("opening {location}"))?;
    // A local store's image is read in place, unless it names blobs kept elsewhere (an image
    // converted with --reference): those go through the fetcher and the cache like S3 images.
    let mounted = match &opened.location {
        ImageLocation::Dir { path, .. } if opened.is_local() => {
            agent::mount::mount_local(path, &opened, mountpoint, &cfg, None, started)?
        }
        _ => {
            let fetcher = fetcher.map_or_else(new_fetcher, Ok)?;
            agent::mount::mount_remote(&opened, &fetcher, mountpoint, &cfg, None)?
        }
    };
    let target = mounted.mountpoint.clone();
    // On SIGINT/SIGTERM, unmount; the session then ends and `join` returns.
    let stopping = Arc::new(AtomicBool::new(false));
    let mut signals = signal_hook::iterator::Signals::new([SIGINT, SIGTERM])
        .context("installing signal handlers")?;
    let handle = signals.handle();
    let flag = stopping.clone();
    let waiter = std::thread::spawn(move || {
        if let Some(sig) = signals.forever().next() {
            flag.store(true, Ordering::SeqCst);
            tracing::info!(signal = sig, "unmounting {}", target.display());
            if let Err(e) = agent::mount::unmount(&target, false) {
                tracing::warn!("unmount failed ({e}); detaching lazily");
                if let Err(e) = agent::mount::unmount(&target, true) {
                    tracing::error!("lazy unmount failed: {e}");
                }
            }
        }
    });
    let source = mounted.source.clone();
    let reader = mounted.reader.clone();
    let fuse_stats = cfg.stats.clone();
    let joined = mounted.join();
    handle.close();
    let _ = waiter.join();
    eprintln!(
        "lazyctl: unmounted; {} bytes read through the mount; {}",
        reader.bytes_served(),
        source.summary()
    );
    let fuse = agent::metrics::FuseSnapshot {
        ops: fuse_stats.snapshot(),
    };
    if let (Some(path), agent::mount::MountSource::Remote(fetcher)) = (&cache.metrics_json, &source)
    {
        let mut snapshot = fetcher.snapshot();
        snapshot.fuse = fuse;
        let mut metrics = serde_json::to_value(snapshot)?;
        metrics["bytes_served"] = reader.bytes_served().into();
        let json = serde_json::to_vec_pretty(&metrics)?;
        std::fs::write(path, json).with_context(|| format!("writing {}", path.display()))?;
    }
    joined.context("FUSE session ended with an error")?;
    Ok(())
}

fn inspect(image: &str, remote: &RemoteArgs) -> Result<()> {
    let location = ImageLocation::parse(image)?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting a runtime")?;
    let img = runtime
        .block_on(agent::remote::open_image(
            &location,
            &remote.options()?,
            None,
        ))
        .with_context(|| format!("opening {location}"))?;
    let idx = &img.index;
    let blobs = idx.blobs()?;
    let stored: u64 = blobs.iter().map(|b| b.size).sum();
    let mut raw = 0u64;
    for i in 0..idx.chunk_count() as u32 {
        raw += idx.chunk(i)?.raw_len as u64;
    }
    println!("manifest:   {}", img.manifest_digest);
    println!(
        "index:      {} ({} bytes)",
        img.manifest.index().digest,
        idx.len()
    );
    println!("inodes:     {}", idx.inode_count());
    println!("chunk size: {}", idx.chunk_size());
    println!(
        "chunks:     {} ({} bytes raw, {} stored)",
        idx.chunk_count(),
        raw,
        stored
    );
    for (b, d) in blobs.iter().zip(img.manifest.blobs()) {
        println!("blob:       {} ({} bytes)", d.digest, b.size);
    }
    if idx.inode_count() == 0 {
        bail!("image has no inodes");
    }
    Ok(())
}
