//! The snapshotter's Prometheus metrics (text format, served on `--metrics-address`): requests
//! and failures by gRPC method and the time they took, layers by how they were provided
//! (lazily, reused, or unpacked by containerd), and the snapshots there are by kind (counted
//! from the store when the metrics are read).

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

    /// The Prometheus text exposition, with the snapshots of `store`.
    pub fn render(&self, store: &Store) -> String {
        let mut by_kind: BTreeMap<&str, u64> = [Kind::Active, Kind::View, Kind::Committed]
            .map(|k| (k.as_str(), 0))
            .into();
        let (mut lazy_layers, mut holding) = (0, 0);
        for (_, r) in store.iter() {
            *by_kind.entry(r.kind.as_str()).or_default() += 1;
            lazy_layers += u64::from(r.lazy.is_some());
            holding += u64::from(r.holder.is_some());
        }
        let state = self.state();
        let mut out = String::new();
        let mut family = |name: &str, kind: &str, help: &str, samples: Vec<(String, String)>| {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
            for (labels, value) in samples {
                let _ = writeln!(out, "{name}{labels} {value}");
            }
        };
        let by_method = |value: fn(&Method) -> u64| -> Vec<(String, String)> {
            state
                .methods
                .iter()
                .map(|(name, m)| (format!("{{method=\"{name}\"}}"), value(m).to_string()))
                .collect()
        };
        family(
            "lazy_snapshotter_requests_total",
            "counter",
            "gRPC requests served, by method.",
            by_method(|m| m.requests),
        );
        family(
            "lazy_snapshotter_request_errors_total",
            "counter",
            "gRPC requests answered with an error (AlreadyExists for a skipped layer included), by method.",
            by_method(|m| m.errors),
        );
        let mut histogram = Vec::new();
        for (name, m) in &state.methods {
            let mut cumulative = 0;
            for (i, bound) in BUCKETS.iter().enumerate() {
                cumulative += m.buckets[i];
                histogram.push((
                    format!("_bucket{{method=\"{name}\",le=\"{bound}\"}}"),
                    cumulative.to_string(),
                ));
            }
            histogram.push((
                format!("_bucket{{method=\"{name}\",le=\"+Inf\"}}"),
                m.requests.to_string(),
            ));
            histogram.push((format!("_sum{{method=\"{name}\"}}"), m.seconds.to_string()));
            histogram.push((
                format!("_count{{method=\"{name}\"}}"),
                m.requests.to_string(),
            ));
        }
        family(
            "lazy_snapshotter_request_seconds",
            "histogram",
            "Time to answer a gRPC request, by method.",
            histogram,
        );
        family(
            "lazy_snapshotter_layers_skipped_total",
            "counter",
            "Layer Prepares answered AlreadyExists: lazy (the image has a lazy version) or reused (the layer was there).",
            ["lazy", "reused"]
                .map(|how| {
                    let n = state.layers.get(how).copied().unwrap_or(0);
                    (format!("{{how=\"{how}\"}}"), n.to_string())
                })
                .into(),
        );
        family(
            "lazy_snapshotter_snapshots",
            "gauge",
            "Snapshots there are, by kind.",
            by_kind
                .iter()
                .map(|(kind, n)| (format!("{{kind=\"{kind}\"}}"), n.to_string()))
                .collect(),
        );
        family(
            "lazy_snapshotter_lazy_layers",
            "gauge",
            "Committed layers served lazily (no directory of their own).",
            vec![(String::new(), lazy_layers.to_string())],
        );
        family(
            "lazy_snapshotter_lowers_held",
            "gauge",
            "Snapshots holding a lazy image's mount in lazyd: pulled images' top layers, and the active snapshots and views over them.",
            vec![(String::new(), holding.to_string())],
        );
        out
    }
}
