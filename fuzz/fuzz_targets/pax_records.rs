//! Fuzzes the converter's own PAX reading (`tools::pax`): the record parser, and the search of
//! the bytes recorded between two tar entries for the extended header that belongs to the
//! second (`pax_records_before`), which walks headers by their checksums and sizes. The input
//! is both the records and the recorded bytes; the latter are tried as is and with every
//! 512-byte block's header checksum made valid, so that the walk gets past the checksum test.
//!
//! Checks: parsed records written back in canonical form parse to the same records; `path`
//! and `linkpath` values the tree accepts (`tools::tree::components`) are relative and never
//! climb out (no `..`, `.` or empty component, none longer than 255 bytes); PAX data found
//! for an entry lies before its header, after the extended header's own.
#![no_main]

use std::cell::RefCell;
use std::io::Read;

use lazy_fuzz::{repair_tar_checksums, TAR_BLOCK as BLOCK};
use libfuzzer_sys::fuzz_target;
use tools::pax::{parse_records, pax_records_before, HeaderTap, PaxLookup, PaxRecord, Tap};
use tools::tree::components;

/// `"<len> <key>=<value>\n"`, `len` counting the whole record.
fn record((key, value): &PaxRecord) -> Vec<u8> {
    let body = [key.as_slice(), b"=", value, b"\n"].concat();
    let mut len = body.len() + 2;
    while (len.to_string().len() + 1 + body.len()) != len {
        len = len.to_string().len() + 1 + body.len();
    }
    [format!("{len} ").as_bytes(), &body].concat()
}

fn records(data: &[u8]) {
    let Ok(parsed) = parse_records(data) else {
        return;
    };
    let written: Vec<u8> = parsed.iter().flat_map(record).collect();
    assert_eq!(parse_records(&written).unwrap(), parsed);
    for (key, value) in &parsed {
        if key != b"path" && key != b"linkpath" {
            continue;
        }
        let Ok(path) = components(value) else {
            continue;
        };
        assert_ne!(value.first(), Some(&b'/'));
        for c in &path {
            assert!(
                !c.is_empty() && c != b"." && c != b".." && c.len() <= 255 && !c.contains(&b'/'),
                "{c:?} from {value:?}"
            );
        }
    }
}

/// Records `data` the way the layer reader does, from stream offset `start` on.
fn tap(data: &[u8], start: usize) -> Tap {
    let (mut reader, tap) = HeaderTap::new(data);
    let mut skipped = vec![0; start];
    reader.read_exact(&mut skipped).unwrap();
    tap.borrow_mut().reset();
    reader.read_to_end(&mut Vec::new()).unwrap();
    drop(reader);
    RefCell::into_inner(std::rc::Rc::into_inner(tap).unwrap())
}

fn lookups(data: &[u8]) {
    for start in [0, BLOCK.min(data.len())] {
        let tap = tap(data, start);
        for header in (0..data.len()).step_by(BLOCK) {
            if let PaxLookup::Found(pax) = pax_records_before(&tap, header as u64) {
                assert!(start + BLOCK + pax.len() <= header, "{} bytes", pax.len());
                records(&pax);
            }
        }
    }
}

fuzz_target!(|data: &[u8]| {
    records(data);
    lookups(data);
    lookups(&repair_tar_checksums(data));
});
