//! The snapshotter's Prometheus metrics (text format, served on `--metrics-address`): requests
//! and failures by gRPC method and the time they took, layers by how they were provided
//! (lazily, reused, or unpacked by containerd), and the snapshots there are by kind.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::Mutex;
use std::time::Duration;

use crate::store::{Kind, Store};

/// Upper bounds of the request-duration histogram, in seconds.
const BUCKETS: [f64; 10] = [0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0, 30.0];

#[derive(Default)]
struct Method {
    requests: u64,
    errors: u64,
    /// Non-cumulative counts per bucket of [`BUCKETS`], then the count above the last.
    buckets: [u64; BUCKETS.len() + 1],
    seconds: f64,
}

#[derive(Default)]
struct State {
    methods: BTreeMap<&'static str, Method>,
    layers: BTreeMap<&'static str, u64>,
    snapshots: BTreeMap<&'static str, u64>,
    lazy_layers: u64,
    holding: u64,
}

#[derive(Default)]
pub struct Metrics(Mutex<State>);

impl Metrics {
    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        agent::sync::lock(&self.0)
    }

    /// A finished request of `method`.
    pub fn request(&self, method: &'static str, took: Duration, failed: bool) {
        let mut state = self.state();
        let m = state.methods.entry(method).or_default();
        m.requests += 1;
        m.errors += u64::from(failed);
        let secs = took.as_secs_f64();
        m.seconds += secs;
        let bucket = BUCKETS
            .iter()
            .position(|&b| secs <= b)
            .unwrap_or(BUCKETS.len());
        m.buckets[bucket] += 1;
    }

    /// A layer Prepare answered without unpacking: `lazy` or `reused`.
    pub fn layer(&self, how: &'static str) {
        *self.state().layers.entry(how).or_default() += 1;
    }

    /// Counts the snapshots by kind (after every change).
    pub fn set_snapshots(&self, store: &Store) {
        let mut by_kind = BTreeMap::new();
        let (mut lazy, mut holding) = (0, 0);
        for (_, r) in store.iter() {
            *by_kind.entry(r.kind.as_str()).or_insert(0) += 1;
            lazy += u64::from(r.lazy.is_some());
            holding += u64::from(r.holder.is_some());
        }
        for kind in [Kind::Active, Kind::View, Kind::Committed] {
            by_kind.entry(kind.as_str()).or_insert(0);
        }
        let mut state = self.state();
        state.snapshots = by_kind;
        state.lazy_layers = lazy;
        state.holding = holding;
    }

    /// The Prometheus text exposition.
    pub fn render(&self) -> String {
        let state = self.state();
        let mut out = String::new();
        let _ = writeln!(
            out,
            "# HELP lazy_snapshotter_requests_total gRPC requests served, by method.\n# TYPE lazy_snapshotter_requests_total counter"
        );
        for (name, m) in &state.methods {
            let _ = writeln!(
                out,
                "lazy_snapshotter_requests_total{{method=\"{name}\"}} {}",
                m.requests
            );
        }
        let _ = writeln!(
            out,
            "# HELP lazy_snapshotter_request_errors_total gRPC requests answered with an error (AlreadyExists for a skipped layer included), by method.\n# TYPE lazy_snapshotter_request_errors_total counter"
        );
        for (name, m) in &state.methods {
            let _ = writeln!(
                out,
                "lazy_snapshotter_request_errors_total{{method=\"{name}\"}} {}",
                m.errors
            );
        }
        let _ = writeln!(
            out,
            "# HELP lazy_snapshotter_request_seconds Time to answer a gRPC request, by method.\n# TYPE lazy_snapshotter_request_seconds histogram"
        );
        for (name, m) in &state.methods {
            let mut cumulative = 0;
            for (i, bound) in BUCKETS.iter().enumerate() {
                cumulative += m.buckets[i];
                let _ = writeln!(
                    out,
                    "lazy_snapshotter_request_seconds_bucket{{method=\"{name}\",le=\"{bound}\"}} {cumulative}"
                );
            }
            let _ = writeln!(
                out,
                "lazy_snapshotter_request_seconds_bucket{{method=\"{name}\",le=\"+Inf\"}} {}\nlazy_snapshotter_request_seconds_sum{{method=\"{name}\"}} {}\nlazy_snapshotter_request_seconds_count{{method=\"{name}\"}} {}",
                m.requests, m.seconds, m.requests
            );
        }
        let _ = writeln!(
            out,
            "# HELP lazy_snapshotter_layers_skipped_total Layer Prepares answered AlreadyExists: lazy (the image has a lazy version) or reused (the layer was there).\n# TYPE lazy_snapshotter_layers_skipped_total counter"
        );
        for how in ["lazy", "reused"] {
            let n = state.layers.get(how).copied().unwrap_or(0);
            let _ = writeln!(
                out,
                "lazy_snapshotter_layers_skipped_total{{how=\"{how}\"}} {n}"
            );
        }
        let _ = writeln!(
            out,
            "# HELP lazy_snapshotter_snapshots Snapshots there are, by kind.\n# TYPE lazy_snapshotter_snapshots gauge"
        );
        for (kind, n) in &state.snapshots {
            let _ = writeln!(out, "lazy_snapshotter_snapshots{{kind=\"{kind}\"}} {n}");
        }
        let _ = writeln!(
            out,
            "# HELP lazy_snapshotter_lazy_layers Committed layers served lazily (no directory of their own).\n# TYPE lazy_snapshotter_lazy_layers gauge\nlazy_snapshotter_lazy_layers {}",
            state.lazy_layers
        );
        let _ = writeln!(
            out,
            "# HELP lazy_snapshotter_lowers_held Active snapshots and views holding a lazy image's mount in lazyd.\n# TYPE lazy_snapshotter_lowers_held gauge\nlazy_snapshotter_lowers_held {}",
            state.holding
        );
        out
    }
}
