//! Property tests: any tree written with `IndexWriter` reads back identically through
//! `ImageReader` (metadata, names, links, xattrs), and any byte range of any file reads back
//! exactly, whatever the chunk size, packing of small files, holes and read alignment.

use std::collections::BTreeMap;
use std::ops::Range;
use std::sync::{Arc, Mutex};

use fusefs::chunk::{decode_chunk, encode_chunk};
use fusefs::format::*;
use fusefs::reader::FileKind;
use fusefs::writer::{IndexWriter, NodeSpec};
use fusefs::{ChunkRef, ChunkSource, ImageReader, Index, OpenFile, OpenObserver, SourceError};
use proptest::prelude::*;

/// One in-memory blob; chunks are decoded with the real checks. Records read-ahead hints,
/// guesses and the chunks it was asked for; as an observer, watches the opens and reads of
/// `*.safetensors` files; holds the chunks of `in_memory` "in memory".
struct MemSource {
    blob: Vec<u8>,
    hints: Mutex<Vec<u32>>,
    guesses: Mutex<Vec<u32>>,
    asked: Mutex<Vec<u32>>,
    in_memory: Mutex<std::collections::HashSet<u32>>,
    /// Files opened (with the name they resolve to), released and read, in order.
    opened: Mutex<Vec<(OpenFile, Option<Vec<u8>>)>>,
    released: Mutex<Vec<u64>>,
    read: Mutex<Vec<(u64, Range<u64>)>>,
}

impl MemSource {
    fn decode(&self, c: &ChunkRef) -> Result<Arc<Vec<u8>>, SourceError> {
        let start = c.record.comp_off as usize;
        let stored = &self.blob[start..start + c.record.comp_len as usize];
        Ok(Arc::new(decode_chunk(&c.record, stored)?))
    }
}

impl ChunkSource for MemSource {
    fn chunk(&self, c: &ChunkRef) -> Result<Arc<Vec<u8>>, SourceError> {
        self.asked.lock().unwrap().push(c.index);
        self.decode(c)
    }

    fn chunk_in_memory(&self, c: &ChunkRef) -> Option<Arc<Vec<u8>>> {
        if !self.in_memory.lock().unwrap().contains(&c.index) {
            return None;
        }
        self.decode(c).ok()
    }

    fn read_ahead(&self, chunks: &[ChunkRef]) {
        self.hints
            .lock()
            .unwrap()
            .extend(chunks.iter().map(|c| c.index));
    }

    fn speculate(&self, chunks: &[ChunkRef]) {
        self.guesses
            .lock()
            .unwrap()
            .extend(chunks.iter().map(|c| c.index));
    }
}

impl OpenObserver for MemSource {
    fn watches(&self, name: &[u8]) -> bool {
        name.ends_with(b".safetensors")
    }

    fn opened(&self, file: OpenFile) {
        let name = file.name();
        self.opened.lock().unwrap().push((file, name));
    }

    fn released(&self, ino: u64) {
        self.released.lock().unwrap().push(ino);
    }

    fn read(&self, ino: u64, range: Range<u64>) -> bool {
        self.read.lock().unwrap().push((ino, range));
        false
    }
}

/// A reader of `index` over `source`, which also observes its opens.
fn observed(index: Arc<Index>, source: Arc<MemSource>) -> ImageReader {
    ImageReader::new(index, source.clone())
        .and_then(|reader| reader.with_observer(source))
        .unwrap()
}

/// Packs files the way the converter does: small files share chunks, large files start a
/// fresh chunk and are cut at fixed offsets, zero chunks become holes.
struct Packer {
    chunk_size: usize,
    blob: Vec<u8>,
    chunks: Vec<ChunkRecord>,
    buf: Vec<u8>,
}

impl Packer {
    fn emit(&mut self, raw: &[u8]) -> u32 {
        let e = encode_chunk(raw, 1).unwrap();
        self.chunks.push(ChunkRecord {
            blob: 0,
            flags: e.flags,
            comp_off: self.blob.len() as u64,
            comp_len: e.stored.len() as u32,
            raw_len: e.raw_len,
            crc32: e.crc32,
            digest: e.digest,
        });
        self.blob.extend_from_slice(&e.stored);
        self.chunks.len() as u32 - 1
    }

    fn flush(&mut self) {
        if !self.buf.is_empty() {
            let b = std::mem::take(&mut self.buf);
            self.emit(&b);
        }
    }

    fn add(&mut self, data: &[u8]) -> Vec<ExtentRecord> {
        if data.is_empty() {
            return vec![];
        }
        if data.len() < self.chunk_size {
            if self.buf.len() + data.len() > self.chunk_size {
                self.flush();
            }
            let off = self.buf.len() as u32;
            self.buf.extend_from_slice(data);
            // The chunk number is the one `flush` will give the buffer.
            return vec![ExtentRecord {
                file_off: 0,
                chunk: self.chunks.len() as u32,
                chunk_off: off,
                len: data.len() as u32,
            }];
        }
        self.flush();
        let mut out = vec![];
        for (i, piece) in data.chunks(self.chunk_size).enumerate() {
            if piece.iter().all(|b| *b == 0) {
                continue;
            }
            let chunk = self.emit(piece);
            out.push(ExtentRecord {
                file_off: (i * self.chunk_size) as u64,
                chunk,
                chunk_off: 0,
                len: piece.len() as u32,
            });
        }
        out
    }
}

#[derive(Debug, Clone)]
enum Kind {
    File(Vec<u8>),
    Symlink(Vec<u8>),
    Fifo,
    Dev(u32, u32),
}

#[derive(Debug, Clone)]
struct Entry {
    dir: usize,
    name: Vec<u8>,
    kind: Kind,
    mode: u32,
    uid: u32,
    mtime: (i64, u32),
    xattrs: BTreeMap<Vec<u8>, Vec<u8>>,
    /// Also link this file under this name in the root (hardlink).
    link_as: Option<Vec<u8>>,
}

fn name() -> impl Strategy<Value = Vec<u8>> {
    // Mostly ASCII, sometimes non-UTF-8 bytes; never '/', NUL, "." or "..".
    proptest::collection::vec(prop_oneof![8 => b'a'..=b'e', 1 => 0x80u8..=0xff], 1..6)
}

fn content(chunk_size: usize) -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        Just(vec![]),
        proptest::collection::vec(any::<u8>(), 1..chunk_size),
        (1usize..4 * chunk_size, any::<u8>(), any::<bool>()).prop_map(move |(len, seed, holes)| {
            (0..len)
                .map(|i| {
                    if holes && (i / chunk_size) % 2 == 1 {
                        0
                    } else {
                        (i as u8).wrapping_mul(31).wrapping_add(seed) | 1
                    }
                })
                .collect()
        }),
    ]
}

fn entry(chunk_size: usize, dirs: usize) -> impl Strategy<Value = Entry> {
    let kind = prop_oneof![
        4 => content(chunk_size).prop_map(Kind::File),
        1 => proptest::collection::vec(b'a'..=b'z', 1..40).prop_map(Kind::Symlink),
        1 => Just(Kind::Fifo),
        1 => (0u32..4096, 0u32..1 << 20).prop_map(|(a, b)| Kind::Dev(a, b)),
    ];
    (
        0..dirs,
        name(),
        kind,
        0u32..0o7777,
        any::<u32>(),
        (any::<i32>(), 0u32..1_000_000_000),
        proptest::collection::btree_map(
            proptest::collection::vec(b'a'..=b'z', 1..8)
                .prop_map(|n| [b"user.".to_vec(), n].concat()),
            proptest::collection::vec(any::<u8>(), 0..16),
            0..3,
        ),
        proptest::option::weighted(0.2, name().prop_map(|n| [b"hl-".to_vec(), n].concat())),
    )
        .prop_map(
            |(dir, name, kind, mode, uid, (s, ns), xattrs, link_as)| Entry {
                dir,
                name,
                kind,
                mode,
                uid,
                mtime: (s as i64, ns),
                xattrs,
                link_as,
            },
        )
}

struct Built {
    reader: ImageReader,
    source: Arc<MemSource>,
    /// Expected files: inode -> content, collected while building.
    files: Vec<(u64, Vec<u8>)>,
    entries: Vec<(Vec<Vec<u8>>, Entry)>,
}

fn build(chunk_size: usize, entries: Vec<Entry>) -> Built {
    let mut w = IndexWriter::new(chunk_size as u32);
    let mut packer = Packer {
        chunk_size,
        blob: vec![],
        chunks: vec![],
        buf: vec![],
    };
    // Three directories: the root, d1 (in the root) and d2 (in d1).
    let d1 = w.add_child(w.root(), b"d1", NodeSpec::dir(0o750)).unwrap();
    let d2 = w.add_child(d1, b"d2", NodeSpec::dir(0o700)).unwrap();
    let dirs = [
        (w.root(), vec![]),
        (d1, vec![b"d1".to_vec()]),
        (d2, vec![b"d1".to_vec(), b"d2".to_vec()]),
    ];
    let mut taken: std::collections::HashSet<(u32, Vec<u8>)> = Default::default();
    taken.insert((w.root(), b"d1".to_vec()));
    taken.insert((d1, b"d2".to_vec()));
    let mut files = vec![];
    let mut kept = vec![];
    for e in entries {
        let (dir_ino, dir_path) = &dirs[e.dir];
        if !taken.insert((*dir_ino, e.name.clone())) {
            continue;
        }
        let mut spec = match &e.kind {
            Kind::File(data) => {
                let ext = packer.add(data);
                NodeSpec::file(e.mode, data.len() as u64, ext)
            }
            Kind::Symlink(t) => NodeSpec::symlink(t.clone()),
            Kind::Fifo => NodeSpec::special(S_IFIFO | e.mode, 0),
            Kind::Dev(a, b) => NodeSpec::special(S_IFCHR | e.mode, encode_dev(*a, *b)),
        };
        spec.uid = e.uid;
        spec.mtime_sec = e.mtime.0;
        spec.mtime_nsec = e.mtime.1;
        spec.xattrs = e.xattrs.clone().into_iter().collect();
        let ino = w.add_child(*dir_ino, &e.name, spec).unwrap();
        if let Kind::File(data) = &e.kind {
            files.push((ino as u64, data.clone()));
        }
        if let (Some(alias), Kind::File(_)) = (&e.link_as, &e.kind) {
            if taken.insert((w.root(), alias.clone())) {
                w.link(w.root(), alias, ino).unwrap();
            }
        }
        let mut path = dir_path.clone();
        path.push(e.name.clone());
        kept.push((path, e));
    }
    packer.flush();
    w.add_blob(BlobRecord {
        sha256: [1; 32],
        size: packer.blob.len() as u64,
    });
    for c in &packer.chunks {
        w.add_chunk(*c);
    }
    let index = Index::from_bytes(w.finish().unwrap()).unwrap();
    let source = Arc::new(MemSource {
        blob: packer.blob,
        hints: Mutex::new(Vec::new()),
        guesses: Mutex::new(Vec::new()),
        asked: Mutex::new(Vec::new()),
        in_memory: Mutex::new(Default::default()),
        opened: Mutex::new(Vec::new()),
        released: Mutex::new(Vec::new()),
        read: Mutex::new(Vec::new()),
    });
    let reader = observed(index, source.clone());
    Built {
        reader,
        source,
        files,
        entries: kept,
    }
}

fn lookup_path(r: &ImageReader, path: &[Vec<u8>]) -> u64 {
    let mut ino = r.root_ino();
    for c in path {
        ino = r.lookup(ino, c).unwrap().ino;
    }
    ino
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn tree_round_trips(chunk_pow in 12u32..15, entries in proptest::collection::vec(entry(1 << 14, 3), 0..40)) {
        let chunk_size = 1usize << chunk_pow;
        let b = build(chunk_size, entries);
        let r = &b.reader;
        for (path, e) in &b.entries {
            let ino = lookup_path(r, path);
            let a = r.getattr(ino).unwrap();
            prop_assert_eq!(a.uid, e.uid);
            prop_assert_eq!((a.mtime_sec, a.mtime_nsec), e.mtime);
            match &e.kind {
                Kind::File(data) => {
                    prop_assert_eq!(a.kind, FileKind::Regular);
                    prop_assert_eq!(a.perm as u32, e.mode);
                    prop_assert_eq!(a.size, data.len() as u64);
                    let whole = r.read(ino, 0, data.len() as u32 + 10).unwrap();
                    prop_assert_eq!(&whole, data);
                    let expected_links = if e.link_as.is_some() { 2 } else { 1 };
                    prop_assert!(a.nlink >= 1 && a.nlink <= expected_links);
                }
                Kind::Symlink(t) => {
                    prop_assert_eq!(a.kind, FileKind::Symlink);
                    prop_assert_eq!(r.readlink(ino).unwrap(), &t[..]);
                }
                Kind::Fifo => prop_assert_eq!(a.kind, FileKind::Fifo),
                Kind::Dev(maj, min) => {
                    prop_assert_eq!(a.kind, FileKind::CharDevice);
                    prop_assert_eq!(decode_dev(a.rdev), (*maj, *min));
                }
            }
            let mut listed = vec![];
            for (n, v) in &e.xattrs {
                prop_assert_eq!(r.getxattr(ino, n).unwrap(), &v[..]);
                listed.extend_from_slice(n);
                listed.push(0);
            }
            prop_assert_eq!(r.listxattr(ino).unwrap(), listed);
            prop_assert!(r.getxattr(ino, b"user.missing-attr").is_err());
        }
        // readdir of every directory is sorted, complete and resumable at any offset.
        for dir in [r.root_ino(), lookup_path(r, &[b"d1".to_vec()])] {
            let mut all = vec![];
            r.readdir(dir, 0, |e| { all.push((e.name.to_vec(), e.next_offset)); true }).unwrap();
            prop_assert_eq!(&all[0].0, b".");
            prop_assert_eq!(&all[1].0, b"..");
            let names: Vec<_> = all[2..].iter().map(|e| e.0.clone()).collect();
            let mut sorted = names.clone();
            sorted.sort();
            prop_assert_eq!(&names, &sorted);
            for (i, (_, next)) in all.iter().enumerate() {
                let mut rest = vec![];
                r.readdir(dir, *next, |e| { rest.push(e.name.to_vec()); true }).unwrap();
                let expected: Vec<_> = all[i + 1..].iter().map(|e| e.0.clone()).collect();
                prop_assert_eq!(rest, expected);
            }
        }
    }

    #[test]
    fn any_byte_range_reads_exactly(
        chunk_pow in 12u32..14,
        sizes in proptest::collection::vec(0usize..20_000, 1..8),
        reads in proptest::collection::vec((any::<u64>(), 0u32..40_000), 1..20),
    ) {
        let chunk_size = 1usize << chunk_pow;
        let entries: Vec<Entry> = sizes.iter().enumerate().map(|(i, s)| Entry {
            dir: i % 3,
            name: format!("f{i}").into_bytes(),
            kind: Kind::File((0..*s).map(|j| if (j / 3000) % 3 == 2 { 0 } else { (j * 7 + i) as u8 }).collect()),
            mode: 0o644,
            uid: 0,
            mtime: (0, 0),
            xattrs: BTreeMap::new(),
            link_as: None,
        }).collect();
        let b = build(chunk_size, entries);
        for (ino, data) in &b.files {
            for (off, size) in &reads {
                let off = off % (data.len() as u64 + 100);
                let got = b.reader.read(*ino, off, *size).unwrap();
                let start = (off as usize).min(data.len());
                let end = (start + *size as usize).min(data.len());
                prop_assert_eq!(&got[..], &data[start..end]);
            }
        }
    }
}

#[test]
fn lookups_of_missing_names_and_wrong_types_fail_cleanly() {
    let b = build(
        4096,
        vec![Entry {
            dir: 0,
            name: b"file".to_vec(),
            kind: Kind::File(b"x".to_vec()),
            mode: 0o644,
            uid: 0,
            mtime: (0, 0),
            xattrs: BTreeMap::new(),
            link_as: None,
        }],
    );
    let r = &b.reader;
    let file = r.lookup(1, b"file").unwrap().ino;
    assert_eq!(r.lookup(1, b"nope").unwrap_err().errno(), libc::ENOENT);
    assert!(r.lookup(file, b"x").is_err());
    assert!(r.readlink(file).is_err());
    assert!(r.getattr(0).is_err());
    assert!(r.getattr(u64::MAX).is_err());
    assert!(r.read(1, 0, 10).is_err());
    assert!(r.open(file, true).is_err());
    assert_eq!(
        r.lookup(lookup_path(r, &[b"d1".to_vec()]), b"..")
            .unwrap()
            .ino,
        1
    );
}

#[test]
fn sequential_reads_hint_the_chunks_ahead_and_random_reads_do_not() {
    let chunk = 1 << 16;
    let data: Vec<u8> = (0..256 * chunk).map(|i| (i * 7 % 251) as u8).collect();
    let b = build(
        chunk,
        vec![Entry {
            dir: 0,
            name: b"big".to_vec(),
            kind: Kind::File(data.clone()),
            mode: 0o644,
            uid: 0,
            mtime: (0, 0),
            xattrs: BTreeMap::new(),
            link_as: None,
        }],
    );
    let r = &b.reader;
    let ino = r.lookup(1, b"big").unwrap().ino;
    // Scattered reads: no hints.
    for off in [200 * chunk, 3 * chunk, 120 * chunk, 60 * chunk] {
        assert_eq!(
            r.read(ino, off as u64, 4096).unwrap(),
            &data[off..off + 4096]
        );
    }
    assert!(b.source.hints.lock().unwrap().is_empty());
    // A sequential reader: hints start with its second read, run ahead of the read position,
    // and never repeat a chunk.
    for off in (0..8 * chunk).step_by(1 << 14) {
        assert_eq!(
            r.read(ino, off as u64, 1 << 14).unwrap(),
            &data[off..off + (1 << 14)]
        );
    }
    let hints = b.source.hints.lock().unwrap().clone();
    assert!(!hints.is_empty());
    let mut sorted = hints.clone();
    sorted.sort_unstable();
    sorted.dedup();
    assert_eq!(
        sorted.len(),
        hints.len(),
        "a chunk was hinted twice: {hints:?}"
    );
    assert!(
        *hints.iter().max().unwrap() >= 8 + 32,
        "read-ahead window did not grow: {hints:?}"
    );
}

fn file_entry(dir: usize, name: &[u8], data: Vec<u8>) -> Entry {
    Entry {
        dir,
        name: name.to_vec(),
        kind: Kind::File(data),
        mode: 0o644,
        uid: 0,
        mtime: (0, 0),
        xattrs: BTreeMap::new(),
        link_as: None,
    }
}

#[test]
fn the_source_hears_of_first_opens_and_last_releases_with_name_chunks_and_bytes() {
    let chunk = 1 << 12;
    let data: Vec<u8> = (0..10 * chunk + 100)
        .map(|i| (i * 13 % 251) as u8)
        .collect();
    let mut entries = vec![file_entry(1, b"model.safetensors", data.clone())];
    for i in 0..20 {
        entries.push(file_entry(
            1,
            format!("f{i:02}").as_bytes(),
            vec![i as u8; 10],
        ));
    }
    entries.push(Entry {
        kind: Kind::Fifo,
        ..file_entry(1, b"pipe", vec![])
    });
    let b = build(chunk, entries);
    let reader = Arc::new(observed(b.reader.index().clone(), b.source.clone()));
    let d1 = reader.lookup(1, b"d1").unwrap().ino;
    let ino = reader.lookup(d1, b"model.safetensors").unwrap().ino;
    let pipe = reader.lookup(d1, b"pipe").unwrap().ino;

    reader.opened(ino);
    reader.opened(ino);
    reader.opened(pipe);
    reader.opened(d1);
    {
        let opened = b.source.opened.lock().unwrap();
        assert_eq!(opened.len(), 1, "one event for the file's first open only");
        let (file, name) = &opened[0];
        assert_eq!(name.as_deref(), Some(&b"model.safetensors"[..]));
        assert_eq!((file.ino, file.size), (ino, data.len() as u64));
        // Its chunks, in file order, cover exactly the asked range.
        let chunks = file.chunks(chunk as u64 / 2..3 * chunk as u64 + 7).unwrap();
        assert_eq!(chunks.len(), 4);
        assert_eq!(chunks[0].0.start, chunk as u64 / 2);
        assert_eq!(chunks[3].0.end, 3 * chunk as u64 + 7);
        assert!(chunks.windows(2).all(|w| w[0].0.end == w[1].0.start));
        let all = file.chunks(0..u64::MAX).unwrap();
        assert_eq!(all.len(), 11);
        assert_eq!(all.last().unwrap().0.end, data.len() as u64);
        // Its bytes, through the given source.
        let got = file.read(b.source.as_ref(), 5, 3 * chunk as u32).unwrap();
        assert_eq!(got, &data[5..5 + 3 * chunk]);
    }
    assert_eq!(reader.open_file_count(), 1);
    reader.released(ino);
    assert!(
        b.source.released.lock().unwrap().is_empty(),
        "one handle left"
    );
    reader.released(ino);
    reader.released(ino);
    assert_eq!(*b.source.released.lock().unwrap(), vec![ino]);

    // Going away releases what is still open; the handle then fails cleanly.
    reader.opened(ino);
    reader.release_all();
    assert_eq!(*b.source.released.lock().unwrap(), vec![ino, ino]);
    assert_eq!(reader.open_file_count(), 0);
    let file = b.source.opened.lock().unwrap()[0].0.clone();
    drop(reader);
    assert!(file.chunks(0..10).is_err());
    assert!(file.name().is_none());
}

/// A source that wraps another (as the agent's profile recorder does) and forwards chunks
/// only.
struct Plain(Arc<MemSource>);

impl ChunkSource for Plain {
    fn chunk(&self, c: &ChunkRef) -> Result<Arc<Vec<u8>>, SourceError> {
        self.0.chunk(c)
    }
}

#[test]
fn only_the_files_an_observer_watches_reach_it_whatever_wraps_the_source() {
    let b = build(1 << 12, vec![file_entry(1, b"plain", vec![1; 100])]);
    assert!(
        !b.reader.watches_opens(),
        "no safetensors file: the kernel may open files alone"
    );
    let b = build(
        1 << 12,
        vec![
            file_entry(1, b"plain", vec![1; 100]),
            file_entry(2, b"w.safetensors", vec![2; 100]),
        ],
    );
    assert!(b.reader.watches_opens());
    let unobserved = ImageReader::new(b.reader.index().clone(), b.source.clone()).unwrap();
    assert!(!unobserved.watches_opens(), "a reader with no observer");
    // The observer is given beside a source that wraps its own: it hears of everything.
    let reader = ImageReader::new(b.reader.index().clone(), Arc::new(Plain(b.source.clone())))
        .and_then(|reader| reader.with_observer(b.source.clone()))
        .unwrap();
    let reader = Arc::new(reader);
    let d1 = reader.lookup(1, b"d1").unwrap().ino;
    let d2 = reader.lookup(d1, b"d2").unwrap().ino;
    let plain = reader.lookup(d1, b"plain").unwrap().ino;
    let watched = reader.lookup(d2, b"w.safetensors").unwrap().ino;
    reader.opened(plain);
    assert_eq!(reader.read(plain, 0, 100).unwrap(), vec![1; 100]);
    assert!(
        b.source.opened.lock().unwrap().is_empty() && b.source.read.lock().unwrap().is_empty(),
        "an unwatched file's open and read"
    );
    reader.opened(watched);
    assert_eq!(reader.read(watched, 10, 50).unwrap(), vec![2; 50]);
    reader.released(watched);
    assert_eq!(b.source.opened.lock().unwrap().len(), 1);
    assert_eq!(*b.source.read.lock().unwrap(), vec![(watched, 10..60)]);
    assert_eq!(*b.source.released.lock().unwrap(), vec![watched]);
}

#[test]
fn an_image_says_whether_it_has_extended_attributes() {
    let b = build(1 << 12, vec![file_entry(1, b"f", vec![1; 10])]);
    assert!(!b.reader.has_xattrs());
    let mut e = file_entry(1, b"f", vec![1; 10]);
    e.xattrs.insert(b"user.a".to_vec(), b"1".to_vec());
    let b = build(1 << 12, vec![e]);
    assert!(b.reader.has_xattrs());
}

#[test]
fn reads_of_one_chunk_held_in_memory_are_answered_without_blocking_and_the_rest_are_deferred() {
    let chunk = 1 << 12;
    let big: Vec<u8> = (0..3 * chunk).map(|i| (i * 7 % 251) as u8).collect();
    let b = build(
        chunk,
        vec![
            file_entry(1, b"small", b"packed small file".to_vec()),
            file_entry(1, b"big", big.clone()),
        ],
    );
    let r = &b.reader;
    let d1 = r.lookup(1, b"d1").unwrap().ino;
    let small = r.lookup(d1, b"small").unwrap().ino;
    let big_ino = r.lookup(d1, b"big").unwrap().ino;
    // Nothing in memory: every read is deferred to `read`.
    assert!(r.read_from_memory(small, 0, 4096).is_none());
    assert!(r.read_from_memory(big_ino, 0, 100).is_none());
    // Held: the read is answered, byte for byte, without asking the source's `chunk`.
    b.source.in_memory.lock().unwrap().extend(0..8);
    let got = r.read_from_memory(small, 7, 4096).unwrap().unwrap();
    assert_eq!(got, b"small file");
    let got = r.read_from_memory(big_ino, 100, 200).unwrap().unwrap();
    assert_eq!(got, &big[100..300]);
    // Past the end: empty, at once.
    assert!(r
        .read_from_memory(small, 1000, 10)
        .unwrap()
        .unwrap()
        .is_empty());
    // Two chunks: deferred, even when both are held.
    assert!(r.read_from_memory(big_ino, chunk as u64 - 10, 20).is_none());
    assert!(b.source.asked.lock().unwrap().is_empty());
}

/// Waits until the source has heard at least `n` guesses; panics after 5 s.
fn wait_for_guesses(source: &MemSource, n: usize) -> Vec<u32> {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    loop {
        let guesses = source.guesses.lock().unwrap().clone();
        if guesses.len() >= n {
            return guesses;
        }
        assert!(std::time::Instant::now() < deadline, "guesses: {guesses:?}");
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
}

#[test]
fn first_touches_guess_a_package_a_file_read_and_nothing_twice() {
    let chunk = 1 << 12;
    let big: Vec<u8> = (0..20 * chunk).map(|i| (i * 7 % 251) as u8 | 1).collect();
    let mut entries = vec![file_entry(2, b"big", big.clone())];
    for i in 0..30 {
        entries.push(file_entry(
            2,
            format!("m{i:02}.py").as_bytes(),
            vec![i as u8 | 1; 500],
        ));
    }
    let b = build(chunk, entries);
    let reader = ImageReader::new(b.reader.index().clone(), b.source.clone())
        .unwrap()
        .with_speculation(true)
        .unwrap();
    let all_chunks = reader.index().chunk_count() as u32;
    let settle = || std::thread::sleep(std::time::Duration::from_millis(100));
    // Lookups guess nothing.
    let d1 = reader.lookup(1, b"d1").unwrap().ino;
    let d2 = reader.lookup(d1, b"d2").unwrap().ino;
    let m00 = reader.lookup(d2, b"m00.py").unwrap().ino;
    let _ = reader.lookup(d2, b"missing");
    settle();
    assert!(b.source.guesses.lock().unwrap().is_empty());
    // The first two files read from the directory guess nothing more (a small file has no
    // other chunks)...
    assert_eq!(reader.read(m00, 0, 4096).unwrap(), vec![1u8; 500]);
    let m01 = reader.lookup(d2, b"m01.py").unwrap().ino;
    assert_eq!(reader.read(m01, 0, 4096).unwrap(), vec![1u8; 500]);
    settle();
    assert!(b.source.guesses.lock().unwrap().is_empty());
    // ...a third one guesses the whole (small) directory: every chunk, each once.
    let m02 = reader.lookup(d2, b"m02.py").unwrap().ino;
    assert_eq!(reader.read(m02, 0, 4096).unwrap(), vec![2u8 | 1; 500]);
    let guesses = wait_for_guesses(&b.source, all_chunks as usize);
    let mut sorted = guesses.clone();
    sorted.sort_unstable();
    assert_eq!(sorted, (0..all_chunks).collect::<Vec<_>>(), "{guesses:?}");
    // A first read in the middle of a big file guesses the chunks after it (and a few
    // before), at once; a second read of the file, nothing.
    let big_ino = reader.lookup(d2, b"big").unwrap().ino;
    settle();
    b.source.guesses.lock().unwrap().clear();
    b.source.asked.lock().unwrap().clear();
    let got = reader.read(big_ino, 8 * chunk as u64, 100).unwrap();
    assert_eq!(got, &big[8 * chunk..8 * chunk + 100]);
    let guesses = b.source.guesses.lock().unwrap().clone();
    let read_chunk = b.source.asked.lock().unwrap()[0];
    assert!(
        !guesses.contains(&read_chunk),
        "the read's own chunk: {guesses:?}"
    );
    assert!(guesses.contains(&(read_chunk + 1)) && guesses.contains(&(read_chunk - 1)));
    assert!(guesses.len() <= 16, "{guesses:?}");
    let _ = reader.read(big_ino, 0, 100).unwrap();
    assert_eq!(b.source.guesses.lock().unwrap().len(), guesses.len());
}

#[test]
fn a_watched_file_read_guesses_nothing_its_observer_streams_it() {
    let chunk = 1 << 12;
    let weights: Vec<u8> = (0..20 * chunk).map(|i| (i * 13 % 251) as u8 | 1).collect();
    let b = build(
        chunk,
        vec![file_entry(2, b"model.safetensors", weights.clone())],
    );
    let reader = observed(b.reader.index().clone(), b.source.clone())
        .with_speculation(true)
        .unwrap();
    let d1 = reader.lookup(1, b"d1").unwrap().ino;
    let d2 = reader.lookup(d1, b"d2").unwrap().ino;
    let ino = reader.lookup(d2, b"model.safetensors").unwrap().ino;
    let got = reader.read(ino, 8 * chunk as u64, 100).unwrap();
    assert_eq!(got, &weights[8 * chunk..8 * chunk + 100]);
    std::thread::sleep(std::time::Duration::from_millis(100));
    assert!(b.source.guesses.lock().unwrap().is_empty());
}
