//! Fuzzes hot-chunk profiles (`agent::profile::Profile`), which lazyd fetches from registries
//! and buckets other people can write. The input is one profile's JSON, or two separated by a
//! 0xff byte (never part of UTF-8 JSON), which are then merged.
//!
//! Checks: an accepted profile survives `to_bytes` and `from_bytes` unchanged; two accepted
//! profiles merge into one that is itself accepted, whose runs are the sum of theirs, whose
//! entries are the union of their chunks, each once, in rank order.
#![no_main]

use std::collections::HashSet;

use agent::profile::Profile;
use libfuzzer_sys::fuzz_target;

fn parse(bytes: &[u8]) -> Option<Profile> {
    let profile = Profile::from_bytes(bytes).ok()?;
    assert_eq!(Profile::from_bytes(&profile.to_bytes()).unwrap(), profile);
    Some(profile)
}

fuzz_target!(|data: &[u8]| {
    let (first, second) = match data.iter().position(|&b| b == 0xff) {
        Some(at) => (&data[..at], Some(&data[at + 1..])),
        None => (data, None),
    };
    let Some(mut ours) = parse(first) else {
        return;
    };
    let Some(theirs) = second.and_then(parse) else {
        return;
    };
    let chunks: HashSet<String> = ours
        .entries
        .iter()
        .chain(&theirs.entries)
        .map(|e| e.chunk.clone())
        .collect();
    let runs = ours.runs.saturating_add(theirs.runs);
    ours.merge(&theirs);
    let merged = Profile::from_bytes(&ours.to_bytes()).expect("a merged profile is valid");
    assert_eq!(merged.runs, runs);
    assert_eq!(merged.entries.len(), chunks.len());
    assert!(merged.entries.iter().all(|e| chunks.contains(&e.chunk)));
    assert!(merged.entries.windows(2).all(|w| w[0].rank <= w[1].rank));
});
