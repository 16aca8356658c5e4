//! The fleet benchmark's runner (`bench/fleet.sh` prepares the image and writes the results):
//! for each host count N and each mode (through the tier, or straight to the origin), a new
//! [`Fleet`] of N hosts over the origin registry storage STORAGE, every lazyd empty; all N
//! hosts run `lazyctl warm --hot IMAGE` at the same moment (the image's recorded hot set, as a
//! cold start with a profile fetches it first). Prints one JSON line per case: the origin's
//! egress (reply bytes, all clients), one host's fetched bytes (`lazy_backend_bytes_total`),
//! and each host's time from the common start to the end of its warm.
//!
//! ```text
//! fleet_bench --storage DIR --image REPO:TAG [--hosts 1,5,10,20] [--modes tier,direct]
//!             [--origin-rate 200mbit] [--host-rate 1gbit] [--origin-delay-ms 20] [--slice 128K]
//! ```

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use lazy_tests::fleet::{metric, Fleet, FleetConfig};
use serde_json::json;

struct Args {
    storage: PathBuf,
    image: String,
    hosts: Vec<usize>,
    modes: Vec<String>,
    origin_rate: String,
    host_rate: String,
    origin_delay: Duration,
    /// The tier's slice, and the hosts' `mirror.slice`.
    slice: String,
}

fn parse_args() -> Result<Args> {
    let mut args = Args {
        storage: PathBuf::new(),
        image: String::new(),
        hosts: vec![1, 5, 10, 20],
        modes: vec!["tier".into(), "direct".into()],
        origin_rate: FleetConfig::default().origin_rate,
        host_rate: FleetConfig::default().host_rate,
        origin_delay: FleetConfig::default().origin_delay,
        slice: FleetConfig::default().slice,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let value = it.next().with_context(|| format!("{flag} needs a value"))?;
        match flag.as_str() {
            "--storage" => args.storage = PathBuf::from(value),
            "--image" => args.image = value,
            "--hosts" => {
                args.hosts = value
                    .split(',')
                    .map(str::parse)
                    .collect::<Result<_, _>>()
                    .context("--hosts N,N,...")?
            }
            "--modes" => args.modes = value.split(',').map(String::from).collect(),
            "--origin-rate" => args.origin_rate = value,
            "--slice" => args.slice = value,
            "--host-rate" => args.host_rate = value,
            "--origin-delay-ms" => {
                args.origin_delay =
                    Duration::from_millis(value.parse().context("--origin-delay-ms")?)
            }
            _ => bail!("unknown flag {flag}"),
        }
    }
    ensure!(
        !args.image.is_empty() && args.storage.is_dir(),
        "usage: fleet_bench --storage REGISTRY_STORAGE_DIR --image REPO:TAG [--hosts 1,5,10,20] \
         [--modes tier,direct] [--origin-rate RATE] [--host-rate RATE] [--origin-delay-ms MS] \
         [--slice SIZE]"
    );
    for mode in &args.modes {
        ensure!(
            mode == "tier" || mode == "direct",
            "a mode is tier or direct, not {mode}"
        );
    }
    Ok(args)
}

fn main() -> Result<()> {
    let args = parse_args()?;
    for &hosts in &args.hosts {
        for mode in &args.modes {
            let started = Instant::now();
            let fleet = Fleet::start(FleetConfig {
                hosts,
                tier: mode == "tier",
                origin_rate: args.origin_rate.clone(),
                host_rate: args.host_rate.clone(),
                origin_delay: args.origin_delay,
                slice: args.slice.clone(),
                registry_storage: Some(args.storage.clone()),
                ..FleetConfig::default()
            })?;
            let setup = started.elapsed();
            let image = format!("{}/{}", fleet.registry(), args.image);
            let before = fleet.origin_bytes();
            let warms = fleet.warm_all(&image, true);
            let origin_bytes = fleet.origin_bytes() - before;
            let mut seconds = Vec::with_capacity(hosts);
            for (i, (out, took)) in warms.iter().enumerate() {
                ensure!(
                    out.status.success(),
                    "host {i}: lazyctl warm --hot {image}: {}",
                    String::from_utf8_lossy(&out.stderr)
                );
                seconds.push(took.as_secs_f64());
            }
            let host_bytes: Vec<f64> = fleet
                .hosts()
                .iter()
                .map(|h| {
                    h.metrics()
                        .map(|m| metric(&m, "lazy_backend_bytes_total", ""))
                })
                .collect::<Result<_>>()?;
            let mut sorted = seconds.clone();
            sorted.sort_by(f64::total_cmp);
            let line = json!({
                "hosts": hosts,
                "mode": mode,
                "origin_bytes": origin_bytes,
                "host_bytes": host_bytes[0],
                "host_bytes_max": host_bytes.iter().copied().fold(0.0, f64::max),
                "median_s": median(&sorted),
                "max_s": sorted[sorted.len() - 1],
                "seconds": seconds,
                "setup_s": setup.as_secs_f64(),
                "origin_rate": args.origin_rate,
                "host_rate": args.host_rate,
                "origin_delay_ms": args.origin_delay.as_millis() as u64,
                "slice": args.slice,
            });
            println!("{line}");
            eprintln!("fleet_bench: {line}");
        }
    }
    Ok(())
}

/// The median of sorted, non-empty `values`.
fn median(values: &[f64]) -> f64 {
    let mid = values.len() / 2;
    if values.len() % 2 == 1 {
        values[mid]
    } else {
        (values[mid - 1] + values[mid]) / 2.0
    }
}
