//! Counters of the FUSE operations a mount answers: how many of each kind reached the daemon
//! and how long they took there (from the session thread taking the request to the reply,
//! queueing for a read worker included). Every operation counted here is a round trip between
//! the kernel and the daemon; the ones the kernel answers from its own caches (cached entries,
//! attributes, negative entries and pages; opens and closes once the daemon said it does not
//! need them) never show up, which is what makes these counters the place to look when a
//! mount is slower than local disk.
//!
//! One [`OpStats`] may be shared by several mounts (lazyd sums all of its mounts); the
//! counters are relaxed atomics, read as a whole only for display.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use serde::{Deserialize, Serialize};

/// The kinds of FUSE request the adapter answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Op {
    Lookup,
    /// Lookups answered "no such entry" (also counted in `Lookup`); the kernel caches each
    /// answer as a negative entry.
    LookupMissing,
    Getattr,
    Readlink,
    Open,
    Release,
    Read,
    Flush,
    Opendir,
    Readdir,
    Readdirplus,
    Ioctl,
    Statfs,
    Getxattr,
    Listxattr,
    Access,
}

impl Op {
    pub const ALL: [Op; 16] = [
        Op::Lookup,
        Op::LookupMissing,
        Op::Getattr,
        Op::Readlink,
        Op::Open,
        Op::Release,
        Op::Read,
        Op::Flush,
        Op::Opendir,
        Op::Readdir,
        Op::Readdirplus,
        Op::Ioctl,
        Op::Statfs,
        Op::Getxattr,
        Op::Listxattr,
        Op::Access,
    ];

    /// The name used in metrics labels and status output.
    pub fn name(self) -> &'static str {
        match self {
            Op::Lookup => "lookup",
            Op::LookupMissing => "lookup_missing",
            Op::Getattr => "getattr",
            Op::Readlink => "readlink",
            Op::Open => "open",
            Op::Release => "release",
            Op::Read => "read",
            Op::Flush => "flush",
            Op::Opendir => "opendir",
            Op::Readdir => "readdir",
            Op::Readdirplus => "readdirplus",
            Op::Ioctl => "ioctl",
            Op::Statfs => "statfs",
            Op::Getxattr => "getxattr",
            Op::Listxattr => "listxattr",
            Op::Access => "access",
        }
    }

    fn slot(self) -> usize {
        self as usize
    }
}

/// Count and total time of each [`Op`].
#[derive(Debug, Default)]
pub struct OpStats {
    counts: [AtomicU64; Op::ALL.len()],
    nanos: [AtomicU64; Op::ALL.len()],
}

/// One kind's figures, as [`OpStats::snapshot`] reports them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OpCount {
    pub op: Op,
    pub count: u64,
    /// Time spent answering them, in seconds.
    pub seconds: f64,
}

impl OpStats {
    /// Counts one `op` that took from `started` until now.
    pub fn record(&self, op: Op, started: Instant) {
        let nanos = u64::try_from(started.elapsed().as_nanos()).unwrap_or(u64::MAX);
        self.counts[op.slot()].fetch_add(1, Ordering::Relaxed);
        self.nanos[op.slot()].fetch_add(nanos, Ordering::Relaxed);
    }

    /// How many `op`s were answered so far.
    pub fn count(&self, op: Op) -> u64 {
        self.counts[op.slot()].load(Ordering::Relaxed)
    }

    /// Every kind with at least one operation, in [`Op::ALL`] order.
    pub fn snapshot(&self) -> Vec<OpCount> {
        Op::ALL
            .iter()
            .filter_map(|&op| {
                let count = self.count(op);
                (count > 0).then(|| OpCount {
                    op,
                    count,
                    seconds: self.nanos[op.slot()].load(Ordering::Relaxed) as f64 / 1e9,
                })
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_op_has_its_own_slot_and_name() {
        for (i, op) in Op::ALL.iter().enumerate() {
            assert_eq!(op.slot(), i);
        }
        let names: std::collections::HashSet<_> = Op::ALL.iter().map(|o| o.name()).collect();
        assert_eq!(names.len(), Op::ALL.len());
    }

    #[test]
    fn snapshot_lists_only_kinds_that_happened() {
        let stats = OpStats::default();
        let t = Instant::now();
        stats.record(Op::Lookup, t);
        stats.record(Op::Lookup, t);
        stats.record(Op::Ioctl, t);
        let snap = stats.snapshot();
        assert_eq!(
            snap.iter().map(|c| (c.op, c.count)).collect::<Vec<_>>(),
            vec![(Op::Lookup, 2), (Op::Ioctl, 1)]
        );
        assert!(snap.iter().all(|c| c.seconds >= 0.0));
    }
}
