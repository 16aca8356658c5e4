//! The `lazyctl` commands that drive lazyd: each sends one request over the control socket
//! and prints what came back, for people (plain lines) or programs (`--json`).

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use agent::api::{
    GcReport, GcRequest, MountInfo, MountRequest, ProfileReport, ProfileRequest, RecordRequest,
    RootfsInfo, RootfsRequest, Status, UmountRequest, WarmEvent, WarmRequest,
};
use agent::fetcher::WarmProgress;
use anyhow::{bail, Context, Result};

use crate::client::{AgentClient, ClientError};
use crate::progress::Progress;

/// Mounts through the agent; `allow_other` overrides the agent's `mount.allow_other`; `suid`
/// lets the image's setuid bits work (the mount is `nosuid` otherwise).
pub fn mount(
    client: &AgentClient,
    image: &str,
    mountpoint: &Path,
    allow_other: Option<bool>,
    suid: bool,
) -> Result<()> {
    let mountpoint = absolute(mountpoint)?;
    let info: MountInfo = client.post(
        "/v1/mounts",
        &MountRequest {
            image: image.to_string(),
            mountpoint,
            allow_other,
            suid,
        },
    )?;
    println!(
        "mounted {} at {} ({} files, {})",
        info.image,
        info.mountpoint.display(),
        info.files,
        info.manifest_digest
    );
    Ok(())
}

/// Mounts a container's root filesystem (a writable overlay on the image's shared lazy mount)
/// at `target`, for runtimes and tools that make their own bundles.
pub fn mount_rootfs(
    client: &AgentClient,
    image: &str,
    target: &Path,
    name: Option<String>,
) -> Result<()> {
    let info: RootfsInfo = client.post(
        "/v1/rootfs",
        &RootfsRequest {
            image: image.to_string(),
            name,
            target: Some(absolute(target)?),
        },
    )?;
    println!(
        "mounted a root filesystem of {} at {} ({})",
        info.image,
        info.rootfs.display(),
        info.manifest_digest
    );
    println!("name:  {}", info.name);
    println!("upper: {}", info.upper.display());
    println!(
        "remove it (and its writes) with `lazyctl umount {}`",
        info.rootfs.display()
    );
    Ok(())
}

/// Unmounts through the agent; a mount the agent does not know (a `--standalone` one, or one
/// left by an agent that is gone) is unmounted directly.
pub fn umount(client: &AgentClient, mountpoint: &Path, lazy: bool) -> Result<()> {
    let mountpoint = absolute(mountpoint)?;
    let req = UmountRequest {
        mountpoint: mountpoint.clone(),
        lazy,
    };
    match client.post::<_, serde_json::Value>("/v1/umount", &req) {
        Ok(_) => Ok(()),
        Err(e @ ClientError::Unreachable { .. }) => {
            tracing::debug!("{e}; unmounting directly");
            direct_unmount(&mountpoint, lazy)
        }
        Err(e) if e.is_not_found() => direct_unmount(&mountpoint, lazy),
        Err(e) => Err(e.into()),
    }
}

fn direct_unmount(mountpoint: &Path, lazy: bool) -> Result<()> {
    agent::mount::unmount(mountpoint, lazy)
        .with_context(|| format!("unmounting {}", mountpoint.display()))
}

/// How long `upgrade` waits for the new lazyd to answer.
const UPGRADE_TIMEOUT: Duration = Duration::from_secs(60);

/// Replaces the running lazyd by `binary` (by default the binary it was started from) and waits
/// until the new one answers; its mounts are served throughout.
pub fn upgrade(client: &AgentClient, binary: Option<&Path>) -> Result<()> {
    let req = agent::api::UpgradeRequest {
        binary: binary.map(absolute).transpose()?,
    };
    let started: agent::api::UpgradeStarted = client.post("/v1/upgrade", &req)?;
    let deadline = std::time::Instant::now() + UPGRADE_TIMEOUT;
    loop {
        std::thread::sleep(Duration::from_millis(50));
        if let Ok(status) = client.get::<Status>("/v1/status") {
            if status.pid != started.pid {
                println!(
                    "lazyd upgraded: pid {} -> {} ({}), {} mount(s) served throughout",
                    started.pid,
                    status.pid,
                    status.binary.display(),
                    status.mounts.len()
                );
                return Ok(());
            }
        }
        if std::time::Instant::now() > deadline {
            anyhow::bail!(
                "the new lazyd did not answer within {UPGRADE_TIMEOUT:?}; see lazyd's log"
            );
        }
    }
}

pub fn status(client: &AgentClient, json: bool) -> Result<()> {
    let status: Status = client.get("/v1/status")?;
    if json {
        println!("{}", serde_json::to_string_pretty(&status)?);
        return Ok(());
    }
    println!(
        "lazyd {} (pid {}), up {}{}",
        status.version,
        status.pid,
        humantime::format_duration(Duration::from_secs(status.uptime_secs as u64)),
        if status.shutting_down {
            ", shutting down"
        } else {
            ""
        }
    );
    let holder = match (status.holder.as_str(), status.supervisor_pid) {
        ("supervisor", Some(pid)) => format!("its supervisor (pid {pid})"),
        ("systemd", _) => "systemd's descriptor store".to_string(),
        _ => "nobody: they end with this process".to_string(),
    };
    println!(
        "mounts kept across restarts by {holder}; {} restart(s) so far",
        status.restarts
    );
    if let Some(cache) = &status.metrics.cache {
        println!(
            "cache: {} ({} of {} used, {} chunks)",
            status.cache_dir.display(),
            bytes(cache.bytes_used),
            bytes(cache.budget_bytes),
            cache.entries
        );
    }
    println!("mounts: {}", status.mounts.len());
    for m in &status.mounts {
        let mut profile = String::new();
        if m.profile.recording {
            profile.push_str(&format!(
                ", recording ({} chunks)",
                m.profile.recorded_chunks
            ));
        }
        if let Some(source) = &m.profile.prefetch_source {
            profile.push_str(&format!(
                ", prefetched {} hot chunks ({source} profile)",
                m.profile.prefetch_chunks
            ));
        }
        println!(
            "  {}  {}  {} files, {} read, mounted {} ago, {} restart(s) survived{}",
            m.mountpoint.display(),
            m.image,
            m.files,
            bytes(m.bytes_served),
            humantime::format_duration(Duration::from_secs(m.mounted_secs as u64)),
            m.restarts_survived,
            profile
        );
    }
    if !status.containers.is_empty() {
        println!("containers: {}", status.containers.len());
        for c in &status.containers {
            println!(
                "  {}  {}  rootfs {}, upper {}",
                c.name,
                c.image,
                c.rootfs.display(),
                c.upper.display()
            );
        }
    }
    if !status.lower_holders.is_empty() {
        println!("lower holders: {}", status.lower_holders.len());
        for h in &status.lower_holders {
            println!("  {}  {}  lower {}", h.holder, h.image, h.lower.display());
        }
    }
    for w in &status.warms {
        println!(
            "warming {}{}: {} of {} fetched",
            w.image,
            if w.hot { " (hot set)" } else { "" },
            bytes(w.progress.fetched_bytes + w.progress.cached_bytes),
            bytes(w.progress.total_bytes)
        );
    }
    println!("images known: {}", status.images.len());
    println!("{}", status.metrics.summary());
    Ok(())
}

pub fn warm(client: &AgentClient, image: &str, hot: bool, show_progress: bool) -> Result<()> {
    let fetched = Arc::new(AtomicU64::new(0));
    let mut bar: Option<Progress> = None;
    let mut outcome: Option<Result<(WarmProgress, f64), String>> = None;
    client.post_stream(
        "/v1/warm",
        &WarmRequest {
            image: image.to_string(),
            hot,
        },
        |event: WarmEvent| match event {
            WarmEvent::Started { progress, .. } => {
                fetched.store(progress.fetched_bytes, Ordering::Relaxed);
                let to_fetch = progress.total_bytes.saturating_sub(progress.cached_bytes);
                bar = Some(Progress::start(
                    show_progress,
                    &format!("warming {image}"),
                    to_fetch,
                    fetched.clone(),
                ));
            }
            WarmEvent::Progress { progress } => {
                fetched.store(progress.fetched_bytes, Ordering::Relaxed);
            }
            WarmEvent::Done { progress, seconds } => outcome = Some(Ok((progress, seconds))),
            WarmEvent::Failed { error, progress } => {
                fetched.store(progress.fetched_bytes, Ordering::Relaxed);
                outcome = Some(Err(error));
            }
        },
    )?;
    drop(bar);
    match outcome {
        Some(Ok((p, seconds))) => {
            println!(
                "warmed {image}{}: {} chunks, {} fetched in {:.1} s ({:.1} MB/s), {} already cached",
                if hot { " (hot set)" } else { "" },
                p.total_chunks,
                bytes(p.fetched_bytes),
                seconds,
                p.fetched_bytes as f64 / seconds.max(1e-3) / 1e6,
                bytes(p.cached_bytes)
            );
            Ok(())
        }
        Some(Err(error)) => bail!("warming {image}: {error}"),
        None => bail!("warming {image}: lazyd ended the warm without a result (did it stop?)"),
    }
}

pub fn gc(client: &AgentClient, unused_for: Option<Duration>, json: bool) -> Result<()> {
    let report: GcReport = client.post(
        "/v1/gc",
        &GcRequest {
            unused_for_secs: unused_for.map(|d| d.as_secs()),
        },
    )?;
    if json {
        println!("{}", serde_json::to_string_pretty(&report)?);
        return Ok(());
    }
    for image in &report.forgotten_images {
        println!("forgot {image}");
    }
    println!(
        "removed {} cached chunks ({} freed), {} kept indexes; kept {} chunks",
        report.cache.removed_chunks,
        bytes(report.cache.freed_bytes),
        report.removed_indexes,
        report.cache.kept_chunks
    );
    Ok(())
}

/// Shows the image's profiles; with `output`, also writes the one that applies (recorded here,
/// else beside the image) as a profile file.
pub fn profile_show(
    client: &AgentClient,
    image: &str,
    json: bool,
    output: Option<&Path>,
) -> Result<()> {
    let report: ProfileReport = client.post(
        "/v1/profile/show",
        &ProfileRequest {
            image: image.to_string(),
        },
    )?;
    if let Some(path) = output {
        let Some(profile) = report.local.as_ref().or(report.remote.as_ref()) else {
            bail!("{image} has no profile to write (none recorded here, none beside the image)");
        };
        std::fs::write(path, profile.to_bytes())
            .with_context(|| format!("writing {}", path.display()))?;
    }
    if json {
        println!("{}", serde_json::to_string_pretty(&report)?);
        return Ok(());
    }
    print_profile_report(&report);
    Ok(())
}

pub fn profile_record(
    client: &AgentClient,
    mountpoint: &Path,
    window: Option<Duration>,
) -> Result<()> {
    let info: MountInfo = client.post(
        "/v1/profile/record",
        &RecordRequest {
            mountpoint: absolute(mountpoint)?,
            window_secs: window.map(|w| w.as_secs_f64()),
        },
    )?;
    println!(
        "recording first reads of {} at {}{}",
        info.image,
        info.mountpoint.display(),
        window.map_or(String::new(), |w| format!(
            " for {}",
            humantime::format_duration(w)
        ))
    );
    Ok(())
}

pub fn profile_push(client: &AgentClient, image: &str) -> Result<()> {
    let report: ProfileReport = client.post(
        "/v1/profile/push",
        &ProfileRequest {
            image: image.to_string(),
        },
    )?;
    print_profile_report(&report);
    Ok(())
}

fn print_profile_report(r: &ProfileReport) {
    println!("image:   {} ({})", r.image, r.manifest_digest);
    for (name, profile) in [("local", &r.local), ("remote", &r.remote)] {
        match profile {
            Some(p) => println!(
                "{name}:{} {} chunks from {} run(s)",
                " ".repeat(7 - name.len()),
                p.entries.len(),
                p.runs
            ),
            None => println!("{name}:{} none", " ".repeat(7 - name.len())),
        }
    }
    println!(
        "pending: {} run(s) recorded here, not pushed",
        r.pending_runs
    );
    if r.image_bytes > 0 {
        println!(
            "hot set: {} of {} stored ({:.1} %)",
            bytes(r.hot_bytes),
            bytes(r.image_bytes),
            r.hot_bytes as f64 * 100.0 / r.image_bytes as f64
        );
    }
    if let Some(to) = &r.pushed_to {
        println!("pushed:  {to}");
    }
    if let Some(p) = r.local.as_ref().or(r.remote.as_ref()) {
        let mut files: Vec<&str> = Vec::new();
        for e in &p.entries {
            if files.last() != Some(&e.path.as_str()) && !files.contains(&e.path.as_str()) {
                files.push(&e.path);
            }
        }
        println!("first files read:");
        for f in files.iter().take(10) {
            println!("  {f}");
        }
        if files.len() > 10 {
            println!("  ... {} more", files.len() - 10);
        }
    }
}

fn absolute(path: &Path) -> Result<std::path::PathBuf> {
    std::path::absolute(path).with_context(|| format!("resolving {}", path.display()))
}

/// Bytes in binary units, for people.
fn bytes(n: u64) -> String {
    indicatif::HumanBytes(n).to_string()
}
