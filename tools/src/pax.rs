//! PAX extended headers, parsed from the raw bytes.
//!
//! The `tar` crate splits PAX records at every '\n', so a binary value that contains a newline
//! byte (a `security.capability` mask, any binary `user.*` xattr) makes the whole entry fail
//! as "malformed pax extension". PAX records are length-prefixed (`"%d %s=%s\n"`, the length
//! counting the whole record), so they can be read exactly. To get at the raw bytes, the layer
//! stream passes through a [`HeaderTap`] that records what the tar reader reads *between*
//! entries (headers and extension data, never file contents); [`pax_records_before`] then
//! finds the header chain that ends at an entry's header and returns its PAX data.

use std::cell::RefCell;
use std::io::{self, Read};
use std::rc::Rc;

const BLOCK: u64 = 512;
/// Bytes recorded between two entries at most; more (a non-file entry carrying megabytes of
/// data) stops recording for that gap, and the entry falls back to the tar crate's parser.
const MAX_GAP: usize = 16 << 20;

/// What the tap saw since it was last reset.
#[derive(Default)]
pub struct Tap {
    recording: bool,
    overflow: bool,
    /// Stream offset of `buf[0]`.
    start: u64,
    /// Stream offset of the next byte to be read.
    pos: u64,
    buf: Vec<u8>,
}

impl Tap {
    /// Starts recording a new gap at the current position.
    pub fn reset(&mut self) {
        self.buf.clear();
        self.start = self.pos;
        self.recording = true;
        self.overflow = false;
    }

    /// Stops recording (the entry's own data is being read).
    pub fn pause(&mut self) {
        self.recording = false;
    }
}

/// A reader that records into a shared [`Tap`] while the tap is recording.
pub struct HeaderTap<R> {
    inner: R,
    tap: Rc<RefCell<Tap>>,
}

impl<R: Read> HeaderTap<R> {
    pub fn new(inner: R) -> (HeaderTap<R>, Rc<RefCell<Tap>>) {
        let tap = Rc::new(RefCell::new(Tap {
            recording: true,
            ..Tap::default()
        }));
        (
            HeaderTap {
                inner,
                tap: tap.clone(),
            },
            tap,
        )
    }
}

impl<R: Read> Read for HeaderTap<R> {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(out)?;
        let mut tap = self.tap.borrow_mut();
        if tap.recording && !tap.overflow {
            if tap.buf.len() + n > MAX_GAP {
                tap.overflow = true;
                tap.buf.clear();
            } else {
                tap.buf.extend_from_slice(&out[..n]);
            }
        }
        tap.pos += n as u64;
        Ok(n)
    }
}

fn checksum_ok(h: &[u8]) -> bool {
    let stored = parse_octal(&h[148..156]);
    let sum: u64 = h
        .iter()
        .enumerate()
        .map(|(i, b)| {
            if (148..156).contains(&i) {
                32
            } else {
                *b as u64
            }
        })
        .sum();
    stored == Some(sum)
}

fn parse_octal(field: &[u8]) -> Option<u64> {
    let s: Vec<u8> = field
        .iter()
        .copied()
        .skip_while(|b| *b == b' ')
        .take_while(|b| *b != 0 && *b != b' ')
        .collect();
    if s.is_empty() {
        return None;
    }
    u64::from_str_radix(std::str::from_utf8(&s).ok()?, 8).ok()
}

fn parse_size(field: &[u8]) -> Option<u64> {
    if field[0] & 0x80 != 0 {
        // Base-256: the remaining bits, big-endian.
        let mut v: u64 = (field[0] & 0x7f) as u64;
        for b in &field[1..] {
            v = v.checked_mul(256)?.checked_add(*b as u64)?;
        }
        Some(v)
    } else {
        parse_octal(field)
    }
}

/// One PAX record: key and raw value.
pub type PaxRecord = (Vec<u8>, Vec<u8>);

/// What the recorded gap says about an entry's PAX header.
#[derive(Debug, PartialEq, Eq)]
pub enum PaxLookup {
    /// The raw PAX data of the entry.
    Found(Vec<u8>),
    /// The entry has no PAX header.
    NoPax,
    /// The gap was not recorded or does not parse; fall back to the tar crate.
    Unreadable,
}

/// The PAX data of the entry whose header starts at stream offset `header_pos`, from the
/// bytes recorded since the previous entry.
pub fn pax_records_before(tap: &Tap, header_pos: u64) -> PaxLookup {
    if tap.overflow || header_pos < tap.start || header_pos + BLOCK > tap.pos {
        return PaxLookup::Unreadable;
    }
    let at = |off: u64| -> Option<&[u8]> {
        let i = off.checked_sub(tap.start)? as usize;
        tap.buf.get(i..i + BLOCK as usize)
    };
    // Headers start on 512-byte boundaries of the stream. Try each boundary in the gap as the
    // start of the extension chain; the true one walks, checksum by checksum, to the entry.
    let first = tap.start.div_ceil(BLOCK) * BLOCK;
    let mut candidate = first;
    while candidate <= header_pos {
        let mut off = candidate;
        let mut pax = None;
        let walked = loop {
            if off == header_pos {
                break true;
            }
            let Some(h) = at(off).filter(|h| checksum_ok(h)) else {
                break false;
            };
            let Some(size) = parse_size(&h[124..136]) else {
                break false;
            };
            let data = off + BLOCK;
            // Checked: a size near 2^64 would wrap `next` back to `off`, and the walk would
            // never end.
            let Some(next) = size
                .checked_add(BLOCK - 1)
                .and_then(|s| data.checked_add(s / BLOCK * BLOCK))
                .filter(|n| *n <= header_pos)
            else {
                break false;
            };
            match h[156] {
                b'x' => {
                    let start = (data - tap.start) as usize;
                    pax = tap
                        .buf
                        .get(start..start + size as usize)
                        .map(<[u8]>::to_vec);
                    if pax.is_none() {
                        break false;
                    }
                }
                b'g' | b'L' | b'K' => {}
                _ => break false,
            }
            off = next;
        };
        if walked {
            return pax.map_or(PaxLookup::NoPax, PaxLookup::Found);
        }
        candidate += BLOCK;
    }
    PaxLookup::Unreadable
}

/// Parses PAX records (`"<len> <key>=<value>\n"`, `len` counting the whole record). Values are
/// raw bytes and may contain newlines.
pub fn parse_records(data: &[u8]) -> Result<Vec<PaxRecord>, String> {
    let mut out = Vec::new();
    let mut rest = data;
    while !rest.is_empty() {
        if rest.iter().all(|b| *b == 0) {
            break;
        }
        let space = rest
            .iter()
            .position(|b| *b == b' ')
            .ok_or("PAX record without a length")?;
        let len: usize = std::str::from_utf8(&rest[..space])
            .ok()
            .and_then(|s| s.parse().ok())
            .ok_or("PAX record with a bad length")?;
        if len <= space + 1 || len > rest.len() || rest[len - 1] != b'\n' {
            return Err(format!("PAX record length {len} does not fit the data"));
        }
        let kv = &rest[space + 1..len - 1];
        let eq = kv
            .iter()
            .position(|b| *b == b'=')
            .ok_or("PAX record without '='")?;
        out.push((kv[..eq].to_vec(), kv[eq + 1..].to_vec()));
        rest = &rest[len..];
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(key: &str, value: &[u8]) -> Vec<u8> {
        let body = [key.as_bytes(), b"=", value, b"\n"].concat();
        let mut len = body.len() + 2;
        loop {
            let digits = len.to_string().len();
            if digits + 1 + body.len() == len {
                break;
            }
            len = digits + 1 + body.len();
        }
        [format!("{len} ").as_bytes(), &body].concat()
    }

    #[test]
    fn values_with_newlines_parse() {
        let value = b"a\nb\n12 path=x\n\0\xff";
        let data = [
            record("SCHILY.xattr.user.bin", value),
            record("mtime", b"1.5"),
        ]
        .concat();
        let parsed = parse_records(&data).unwrap();
        assert_eq!(
            parsed[0],
            (b"SCHILY.xattr.user.bin".to_vec(), value.to_vec())
        );
        assert_eq!(parsed[1], (b"mtime".to_vec(), b"1.5".to_vec()));
    }

    #[test]
    fn malformed_records_are_errors() {
        assert!(parse_records(b"99 a=b\n").is_err());
        assert!(parse_records(b"x a=b\n").is_err());
        assert!(parse_records(b"6 ab\nx").is_err());
        assert!(parse_records(b"5 a=b").is_err());
    }

    /// A header whose size is close to 2^64 (base-256) wrapped the walk's next offset back to
    /// itself: an endless loop in release builds, an overflow panic in debug ones.
    #[test]
    fn header_with_a_size_near_2_pow_64_ends_the_walk() {
        let mut h = tar::Header::new_ustar();
        h.set_entry_type(tar::EntryType::XGlobalHeader);
        h.set_size(u64::MAX - 600); // base-256
        h.set_cksum();
        let stream = [h.as_bytes().as_slice(), &[0; 1024]].concat();
        let (mut reader, tap) = HeaderTap::new(&stream[..]);
        io::copy(&mut reader, &mut io::sink()).unwrap();
        // The chain cannot start at the huge header; the entry's own header is all there is.
        assert_eq!(pax_records_before(&tap.borrow(), 512), PaxLookup::NoPax);
    }

    #[test]
    fn tap_finds_pax_data_of_each_entry() {
        let value = b"bin\nary".to_vec();
        let mut builder = tar::Builder::new(Vec::new());
        for (i, name) in ["one", "two"].iter().enumerate() {
            let pax = record("SCHILY.xattr.user.v", &value);
            let mut h = tar::Header::new_ustar();
            h.set_entry_type(tar::EntryType::XHeader);
            h.set_size(pax.len() as u64);
            h.set_cksum();
            builder.append(&h, &pax[..]).unwrap();
            let mut h = tar::Header::new_ustar();
            h.set_path(name).unwrap();
            h.set_size(i as u64 * 700);
            h.set_cksum();
            builder.append(&h, &vec![7u8; i * 700][..]).unwrap();
        }
        let bytes = builder.into_inner().unwrap();
        let (reader, tap) = HeaderTap::new(&bytes[..]);
        let mut archive = tar::Archive::new(reader);
        let mut entries = archive.entries().unwrap();
        let mut seen = 0;
        loop {
            tap.borrow_mut().reset();
            let Some(entry) = entries.next() else { break };
            let mut entry = entry.unwrap();
            tap.borrow_mut().pause();
            let PaxLookup::Found(pax) =
                pax_records_before(&tap.borrow(), entry.raw_header_position())
            else {
                panic!("no PAX data found before entry {seen}");
            };
            assert_eq!(
                parse_records(&pax).unwrap(),
                vec![(b"SCHILY.xattr.user.v".to_vec(), value.clone())]
            );
            io::copy(&mut entry, &mut io::sink()).unwrap();
            seen += 1;
        }
        assert_eq!(seen, 2);
    }
}
