//! Data layout from an access profile (`lazyctl convert --profile`): which bytes of which
//! files were read at start, and in what order, so the packer can write them first.
//!
//! A profile names, per chunk it read, a file and a byte range of it (see
//! `agent::profile::ProfileEntry`). A piece of a file is *hot* when it overlaps a range the
//! profile names for that path; its rank is the position of the first such entry. Small files
//! are one piece (hot as a whole when read at all); large files are cut at fixed offsets, and
//! only their pieces that were read are hot, so a 2 GiB library of which the start read 3 MiB
//! adds 3 MiB to the hot region, not 2 GiB. Paths are compared as the profile writes them
//! (`/a/b`, non-UTF-8 names converted lossily on both sides).

use std::collections::HashMap;

use agent::profile::Profile;

/// Hot byte ranges per path, with their ranks.
#[derive(Debug, Default)]
pub struct HotLayout {
    by_path: HashMap<String, Ranges>,
}

/// A path's hot ranges sorted by start, with the running maximum of their ends so that a query
/// can stop scanning backwards as soon as no earlier range can reach it.
#[derive(Debug, Default)]
struct Ranges {
    /// (start, end, rank) sorted by start.
    ranges: Vec<(u64, u64, u32)>,
    /// `max_end[i]` = largest end among `ranges[..=i]`.
    max_end: Vec<u64>,
}

impl HotLayout {
    pub fn from_profile(profile: &Profile) -> HotLayout {
        let mut by_path: HashMap<String, Ranges> = HashMap::new();
        for (rank, e) in profile.entries.iter().enumerate() {
            let end = e.offset.saturating_add(e.len.into());
            by_path
                .entry(e.path.clone())
                .or_default()
                .ranges
                .push((e.offset, end, rank as u32));
        }
        for r in by_path.values_mut() {
            r.ranges.sort_unstable();
            let mut max = 0;
            r.max_end = r
                .ranges
                .iter()
                .map(|&(_, end, _)| {
                    max = max.max(end);
                    max
                })
                .collect();
        }
        HotLayout { by_path }
    }

    /// The rank of bytes `off..off+len` of the file at `path` (components from the image
    /// root): the first profile entry overlapping them; `None` when none does (cold data).
    pub fn rank(&self, path: &[Vec<u8>], off: u64, len: u64) -> Option<u32> {
        if self.by_path.is_empty() {
            return None;
        }
        let mut shown = String::new();
        for c in path {
            shown.push('/');
            shown.push_str(&String::from_utf8_lossy(c));
        }
        let r = self.by_path.get(&shown)?;
        let end = off.saturating_add(len);
        // Ranges starting before `end`, scanned back while one of them can still reach `off`.
        let candidates = r.ranges.partition_point(|&(start, _, _)| start < end);
        (0..candidates)
            .rev()
            .take_while(|&i| r.max_end[i] > off)
            .filter(|&i| r.ranges[i].1 > off)
            .map(|i| r.ranges[i].2)
            .min()
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use agent::profile::ProfileEntry;

    /// A one-run profile naming `(path, offset, len)` in this order, with made-up digests.
    pub(crate) fn profile(entries: &[(&str, u64, u32)]) -> Profile {
        let mut p = Profile::new(format!("sha256:{}", "1".repeat(64)));
        p.runs = 1;
        p.entries = entries
            .iter()
            .enumerate()
            .map(|(i, &(path, offset, len))| ProfileEntry {
                chunk: format!("{i:064x}"),
                path: path.into(),
                offset,
                len,
                seen: 1,
                rank: i as f64 / entries.len() as f64,
            })
            .collect();
        p
    }

    fn comps(path: &str) -> Vec<Vec<u8>> {
        path.split('/')
            .filter(|c| !c.is_empty())
            .map(|c| c.as_bytes().to_vec())
            .collect()
    }

    #[test]
    fn pieces_overlapping_a_read_range_are_hot_with_its_first_rank() {
        let layout = HotLayout::from_profile(&profile(&[
            ("/lib/big.so", 3 << 20, 1 << 20),
            ("/etc/conf", 0, 100),
            ("/lib/big.so", 0, 1 << 20),
            ("/lib/big.so", 5 << 20, 1 << 20),
        ]));
        let mib = 1u64 << 20;
        let big = comps("/lib/big.so");
        assert_eq!(layout.rank(&big, 0, mib), Some(2));
        assert_eq!(layout.rank(&big, mib, mib), None);
        assert_eq!(layout.rank(&big, 3 * mib, mib), Some(0));
        // A piece of another chunk size covering several read ranges takes the first.
        assert_eq!(layout.rank(&big, 0, 8 * mib), Some(0));
        assert_eq!(layout.rank(&big, 4 * mib, 2 * mib), Some(3));
        assert_eq!(layout.rank(&comps("/etc/conf"), 0, 100), Some(1));
        assert_eq!(layout.rank(&comps("/etc/other"), 0, 100), None);
        assert_eq!(HotLayout::default().rank(&big, 0, mib), None);
    }
}
