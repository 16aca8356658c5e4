//! Pieces of the test harness for the shaped-link benchmarks (`bench/remote.sh`,
//! `bench/agent.sh`, `bench/containers.sh`):
//!
//! - `bench_tools debian-layout`: builds (or reuses) the Debian minbase fixture and prints
//!   `LAYOUT_DIR TAG`;
//! - `bench_tools python-layout`: the same for the Debian + python3 fixture;
//! - `bench_tools python-packages-layout`: the same for the Debian + python3 + scientific
//!   Python packages fixture (three layers, over 500 MB unpacked; `bench/containers.sh`);
//! - `bench_tools proxy UPSTREAM DELAY_MS`: runs the delaying TCP proxy in front of UPSTREAM
//!   (`HOST:PORT`), prints its `HOST:PORT` on stdout, and serves until killed.

use std::time::Duration;

use anyhow::{bail, Context, Result};
use lazy_tests::debian;
use lazy_tests::proxy::DelayProxy;

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args
        .iter()
        .map(String::as_str)
        .collect::<Vec<_>>()
        .as_slice()
    {
        ["debian-layout"] => {
            let image = debian::minbase_image(&debian::default_cache_dir())?;
            println!("{} {}", image.dir.display(), image.tag);
            Ok(())
        }
        ["python-layout"] => {
            let image = debian::python_image(&debian::default_python_cache_dir())?;
            println!("{} {}", image.dir.display(), image.tag);
            Ok(())
        }
        ["python-packages-layout"] => {
            let image =
                debian::python_packages_image(&debian::default_python_packages_cache_dir())?;
            println!("{} {}", image.dir.display(), image.tag);
            Ok(())
        }
        ["proxy", upstream, delay_ms] => {
            let delay = Duration::from_millis(delay_ms.parse().context("DELAY_MS")?);
            let proxy = DelayProxy::start(upstream, delay)?;
            println!("{}", proxy.host());
            loop {
                std::thread::park();
            }
        }
        _ => bail!(
            "usage: bench_tools debian-layout | python-layout | python-packages-layout | proxy UPSTREAM DELAY_MS"
        ),
    }
}
