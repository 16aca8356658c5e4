//! `lazyctl`: convert images to the lazy format and mount them.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use signal_hook::consts::{SIGINT, SIGTERM};
use tools::reference::{SourceRef, StoreRef};
use tools::{ConvertOptions, ConvertReport};

#[derive(Parser)]
#[command(
    name = "lazyctl",
    version,
    about = "Lazy container images and model weights"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Convert an image or directory into a lazy image.
    ///
    /// SRC: oci:PATH[:TAG], oci-archive:PATH, docker-archive:PATH, docker://HOST/REPO:TAG,
    /// path:DIR. DST: dir:PATH[:TAG] (a local lazy-image store; TAG defaults to latest).
    Convert {
        src: String,
        dst: String,
        /// Uncompressed chunk size (bytes; K/M suffixes accepted).
        #[arg(long, default_value = "1M", value_parser = parse_size)]
        chunk_size: u32,
        /// zstd compression level.
        #[arg(long, default_value_t = fusefs::chunk::DEFAULT_ZSTD_LEVEL)]
        level: i32,
        /// Compression threads (default: one per core).
        #[arg(long)]
        jobs: Option<usize>,
        /// Never show a progress bar.
        #[arg(long)]
        no_progress: bool,
    },
    /// Mount a lazy image read-only and serve it until unmounted (foreground).
    Mount {
        /// dir:PATH[:TAG]
        image: String,
        mountpoint: PathBuf,
        /// Do not let other users (e.g. a container's non-root users) use the mount.
        #[arg(long)]
        no_allow_other: bool,
        /// Threads serving reads.
        #[arg(long, default_value_t = 16)]
        read_workers: usize,
    },
    /// Unmount a lazy image mount.
    Umount {
        mountpoint: PathBuf,
        /// Detach now even if files are open (umount -l).
        #[arg(long)]
        lazy: bool,
    },
    /// Show what a lazy image holds.
    Inspect {
        /// dir:PATH[:TAG]
        image: String,
    },
}

/// `info` for operators; fuser's own unmount-on-drop complains at `warn` when the filesystem
/// was already unmounted by `lazyctl umount`, which is the normal way to stop a mount.
const DEFAULT_LOG_FILTER: &str = "info,fuser::mnt=error";

fn parse_size(s: &str) -> Result<u32, String> {
    let (num, mult) = match s.trim().to_ascii_uppercase() {
        t if t.ends_with("KIB") || t.ends_with('K') => (
            t.trim_end_matches("KIB").trim_end_matches('K').to_string(),
            1u64 << 10,
        ),
        t if t.ends_with("MIB") || t.ends_with('M') => (
            t.trim_end_matches("MIB").trim_end_matches('M').to_string(),
            1u64 << 20,
        ),
        t => (t, 1),
    };
    let n: u64 = num.parse().map_err(|_| format!("not a size: {s:?}"))?;
    u32::try_from(n * mult).map_err(|_| format!("size too large: {s:?}"))
}

fn main() -> ExitCode {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(DEFAULT_LOG_FILTER));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("lazyctl: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Convert {
            src,
            dst,
            chunk_size,
            level,
            jobs,
            no_progress,
        } => {
            let src = SourceRef::parse(&src)?;
            let dst = StoreRef::parse(&dst)?;
            let mut opts = ConvertOptions {
                chunk_size,
                level,
                progress: !no_progress,
                ..ConvertOptions::default()
            };
            if let Some(j) = jobs {
                opts.jobs = j;
            }
            let report: ConvertReport = tools::convert(&src, &dst, &opts)?;
            println!("{}", report.summary());
            Ok(())
        }
        Command::Mount {
            image,
            mountpoint,
            no_allow_other,
            read_workers,
        } => mount(&image, &mountpoint, !no_allow_other, read_workers),
        Command::Umount { mountpoint, lazy } => agent::mount::unmount(&mountpoint, lazy)
            .with_context(|| format!("unmounting {}", mountpoint.display())),
        Command::Inspect { image } => inspect(&image),
    }
}

fn mount(
    image: &str,
    mountpoint: &std::path::Path,
    allow_other: bool,
    read_workers: usize,
) -> Result<()> {
    let store = StoreRef::parse(image)?;
    let cfg = fusefs::fuse::MountConfig {
        fs_name: format!("lazyimg:{}", image.trim_start_matches("dir:")),
        allow_other,
        read_workers,
        ..fusefs::fuse::MountConfig::default()
    };
    let mounted = agent::mount::mount_local(&store.path, &store.tag, mountpoint, &cfg)?;
    let source = mounted.source.clone();
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
    let joined = mounted.join();
    handle.close();
    let _ = waiter.join();
    eprintln!("lazyctl: unmounted; {}", source.stats.summary());
    joined.context("FUSE session ended with an error")?;
    Ok(())
}

fn inspect(image: &str) -> Result<()> {
    let r = StoreRef::parse(image)?;
    let store = agent::store::LocalStore::open(&r.path)?;
    let img = store.open_image(&r.tag)?;
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
