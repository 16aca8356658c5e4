//! Building a lazy image index: the converter adds nodes, links them into directories and
//! registers the chunks and blobs their data lives in; `finish` lays everything out in the
//! format `index.rs` reads (sorted directory entries, deduplicated names, nlink counts,
//! aligned sections, crc32 per section).
//!
//! Inode numbers are assigned in the order nodes are added, so a converter that adds nodes in
//! a fixed walk order produces the same inode numbers for the same image every time.

use std::collections::HashMap;

use crate::error::IndexError;
use crate::format::*;

/// What a node holds besides its metadata.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NodeContent {
    Dir,
    /// Extents sorted by `file_off`; gaps are holes that read as zeros.
    File(Vec<ExtentRecord>),
    Symlink(Vec<u8>),
    /// Devices, fifos and sockets: only metadata.
    Special,
}

/// Metadata and content of one node, before layout.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeSpec {
    /// Full `st_mode`: file type and permission bits.
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub size: u64,
    pub mtime_sec: i64,
    pub mtime_nsec: u32,
    /// Device number in the kernel's encoding (`format::encode_dev`).
    pub rdev: u32,
    pub xattrs: Vec<(Vec<u8>, Vec<u8>)>,
    pub content: NodeContent,
}

impl NodeSpec {
    fn new(mode: u32, content: NodeContent) -> NodeSpec {
        NodeSpec {
            mode,
            uid: 0,
            gid: 0,
            size: 0,
            mtime_sec: 0,
            mtime_nsec: 0,
            rdev: 0,
            xattrs: Vec::new(),
            content,
        }
    }

    pub fn dir(perm: u32) -> NodeSpec {
        Self::new(S_IFDIR | (perm & 0o7777), NodeContent::Dir)
    }

    pub fn file(perm: u32, size: u64, extents: Vec<ExtentRecord>) -> NodeSpec {
        let mut n = Self::new(S_IFREG | (perm & 0o7777), NodeContent::File(extents));
        n.size = size;
        n
    }

    pub fn symlink(target: Vec<u8>) -> NodeSpec {
        let mut n = Self::new(S_IFLNK | 0o777, NodeContent::Symlink(Vec::new()));
        n.size = target.len() as u64;
        n.content = NodeContent::Symlink(target);
        n
    }

    /// A device, fifo or socket; `mode` includes the file type bits.
    pub fn special(mode: u32, rdev: u32) -> NodeSpec {
        let mut n = Self::new(mode, NodeContent::Special);
        n.rdev = rdev;
        n
    }
}

/// Accumulates an image's tree, chunks and blobs, then writes the index.
pub struct IndexWriter {
    chunk_size: u32,
    nodes: Vec<NodeSpec>,
    /// Directory entries per node (only directories have any).
    children: Vec<Vec<(Vec<u8>, u32)>>,
    /// The directory a node was first linked into (0 = not linked yet).
    parents: Vec<u32>,
    chunks: Vec<ChunkRecord>,
    blobs: Vec<BlobRecord>,
}

impl IndexWriter {
    /// A writer holding just a root directory (mode 0755, owned by root).
    pub fn new(chunk_size: u32) -> IndexWriter {
        IndexWriter {
            chunk_size,
            nodes: vec![NodeSpec::dir(0o755)],
            children: vec![Vec::new()],
            parents: vec![1],
            chunks: Vec::new(),
            blobs: Vec::new(),
        }
    }

    /// The root directory's inode number.
    pub fn root(&self) -> u32 {
        1
    }

    /// Replaces the root directory's metadata; it must be a directory.
    pub fn set_root(&mut self, spec: NodeSpec) -> Result<(), IndexError> {
        if spec.mode & S_IFMT != S_IFDIR {
            return Err(IndexError::Corrupt("root must be a directory".into()));
        }
        self.nodes[0] = spec;
        Ok(())
    }

    /// Adds a node not yet linked anywhere; returns its inode number.
    pub fn add_node(&mut self, spec: NodeSpec) -> Result<u32, IndexError> {
        if self.nodes.len() >= u32::MAX as usize - 1 {
            return Err(IndexError::TooLarge("more than 2^32 inodes".into()));
        }
        self.nodes.push(spec);
        self.children.push(Vec::new());
        self.parents.push(0);
        Ok(self.nodes.len() as u32)
    }

    /// Links `ino` into directory `dir` under `name` (a hard link for non-directories).
    pub fn link(&mut self, dir: u32, name: &[u8], ino: u32) -> Result<(), IndexError> {
        let bad = |m: &str| IndexError::Corrupt(m.to_string());
        let d = dir.checked_sub(1).map(|d| d as usize);
        let i = ino.checked_sub(1).map(|i| i as usize);
        let (Some(d), Some(i)) = (d, i) else {
            return Err(bad("inode 0 does not exist"));
        };
        if d >= self.nodes.len() || i >= self.nodes.len() {
            return Err(bad("link names a missing inode"));
        }
        if self.nodes[d].mode & S_IFMT != S_IFDIR {
            return Err(bad("link into a non-directory"));
        }
        if name.is_empty()
            || name == b"."
            || name == b".."
            || name.contains(&b'/')
            || name.contains(&0)
        {
            return Err(IndexError::Corrupt(format!(
                "invalid entry name {:?}",
                String::from_utf8_lossy(name)
            )));
        }
        if name.len() > NAME_MAX {
            return Err(IndexError::Corrupt(format!(
                "entry name longer than {NAME_MAX} bytes: {:?}",
                String::from_utf8_lossy(name)
            )));
        }
        if self.nodes[i].mode & S_IFMT == S_IFDIR && (self.parents[i] != 0 || ino == 1) {
            return Err(bad("a directory can be linked only once"));
        }
        if self.parents[i] == 0 {
            self.parents[i] = dir;
        }
        self.children[d].push((name.to_vec(), ino));
        Ok(())
    }

    /// Adds a node and links it into `dir` under `name`.
    pub fn add_child(&mut self, dir: u32, name: &[u8], spec: NodeSpec) -> Result<u32, IndexError> {
        let ino = self.add_node(spec)?;
        self.link(dir, name, ino)?;
        Ok(ino)
    }

    /// Registers a data blob; returns its index for `ChunkRecord::blob`.
    pub fn add_blob(&mut self, blob: BlobRecord) -> u32 {
        self.blobs.push(blob);
        self.blobs.len() as u32 - 1
    }

    /// Registers a chunk; returns its index for `ExtentRecord::chunk`.
    pub fn add_chunk(&mut self, chunk: ChunkRecord) -> u32 {
        self.chunks.push(chunk);
        self.chunks.len() as u32 - 1
    }

    pub fn inode_count(&self) -> usize {
        self.nodes.len()
    }

    /// Lays out and encodes the index.
    pub fn finish(mut self) -> Result<Vec<u8>, IndexError> {
        let too_large = |what: &str| IndexError::TooLarge(format!("{what} exceed 2^32 records"));
        let mut strings = StringTable::default();
        let mut inodes = Vec::with_capacity(self.nodes.len() * InodeRecord::LEN);
        let mut dirents = Vec::new();
        let mut extents = Vec::new();
        let mut xattrs = Vec::new();
        let mut n_dirents: u64 = 0;
        let mut n_extents: u64 = 0;
        let mut n_xattrs: u64 = 0;

        let mut nlink = vec![0u32; self.nodes.len()];
        nlink[0] = 2;
        for (d, entries) in self.children.iter_mut().enumerate() {
            entries.sort_by(|a, b| a.0.cmp(&b.0));
            if let Some(w) = entries.windows(2).find(|w| w[0].0 == w[1].0) {
                return Err(IndexError::Corrupt(format!(
                    "directory {} has two entries named {:?}",
                    d + 1,
                    String::from_utf8_lossy(&w[0].0)
                )));
            }
            for (_, ino) in entries.iter() {
                let c = *ino as usize - 1;
                if self.nodes[c].mode & S_IFMT == S_IFDIR {
                    nlink[c] = 2;
                    nlink[d] += 1;
                } else {
                    nlink[c] += 1;
                }
            }
        }

        for (i, node) in self.nodes.iter_mut().enumerate() {
            if self.parents[i] == 0 {
                return Err(IndexError::Corrupt(format!(
                    "inode {} is not linked",
                    i + 1
                )));
            }
            let mut rec = InodeRecord {
                mode: node.mode,
                uid: node.uid,
                gid: node.gid,
                nlink: nlink[i],
                size: node.size,
                mtime_sec: node.mtime_sec,
                mtime_nsec: node.mtime_nsec,
                rdev: node.rdev,
                parent: self.parents[i],
                ..Default::default()
            };
            match (&node.content, node.mode & S_IFMT) {
                (NodeContent::Dir, S_IFDIR) => {
                    rec.size = 4096;
                    rec.data_start = u32::try_from(n_dirents).map_err(|_| too_large("dirents"))?;
                    rec.data_count = self.children[i].len() as u32;
                    for (name, ino) in &self.children[i] {
                        let (name_off, name_len) = strings.intern(name)?;
                        DirentRecord {
                            name_off,
                            name_len,
                            ino: *ino,
                        }
                        .encode(&mut dirents);
                    }
                    n_dirents += self.children[i].len() as u64;
                }
                (NodeContent::File(exts), S_IFREG) => {
                    rec.data_start = u32::try_from(n_extents).map_err(|_| too_large("extents"))?;
                    rec.data_count = u32::try_from(exts.len()).map_err(|_| too_large("extents"))?;
                    for e in exts {
                        e.encode(&mut extents);
                    }
                    n_extents += exts.len() as u64;
                }
                (NodeContent::Symlink(target), S_IFLNK) => {
                    let (off, len) = strings.push(target)?;
                    rec.data_start = off;
                    rec.data_count = len;
                    rec.size = target.len() as u64;
                }
                (NodeContent::Special, S_IFCHR | S_IFBLK | S_IFIFO | S_IFSOCK) => {
                    rec.size = 0;
                }
                _ => {
                    return Err(IndexError::Corrupt(format!(
                        "inode {} content does not match its mode {:o}",
                        i + 1,
                        node.mode
                    )))
                }
            }
            node.xattrs.sort();
            rec.xattr_start = u32::try_from(n_xattrs).map_err(|_| too_large("xattrs"))?;
            rec.xattr_count = node.xattrs.len() as u32;
            for (name, value) in &node.xattrs {
                let (name_off, name_len) = strings.intern(name)?;
                let (value_off, value_len) = strings.push(value)?;
                XattrRecord {
                    name_off,
                    name_len,
                    value_off,
                    value_len,
                }
                .encode(&mut xattrs);
            }
            n_xattrs += node.xattrs.len() as u64;
            rec.encode(&mut inodes);
        }

        let mut chunks = Vec::with_capacity(self.chunks.len() * ChunkRecord::LEN);
        for c in &self.chunks {
            c.encode(&mut chunks);
        }
        let mut blobs = Vec::with_capacity(self.blobs.len() * BlobRecord::LEN);
        for b in &self.blobs {
            b.encode(&mut blobs);
        }

        let bodies: [Vec<u8>; 7] = [
            inodes,
            dirents,
            extents,
            chunks,
            blobs,
            xattrs,
            strings.bytes,
        ];
        let mut out = vec![0u8; HEADER_LEN];
        let mut sections = [SectionEntry::default(); 7];
        for (i, body) in bodies.iter().enumerate() {
            while !(out.len() as u64).is_multiple_of(SECTION_ALIGN) {
                out.push(0);
            }
            sections[i] = SectionEntry {
                offset: out.len() as u64,
                len: body.len() as u64,
                crc32: crc32fast::hash(body),
            };
            out.extend_from_slice(body);
        }
        let header = Header {
            version: VERSION,
            chunk_size: self.chunk_size,
            total_len: out.len() as u64,
            sections,
        };
        out[..HEADER_LEN].copy_from_slice(&header.encode());
        Ok(out)
    }
}

/// The string table, with names deduplicated (file names repeat a lot across directories).
#[derive(Default)]
struct StringTable {
    bytes: Vec<u8>,
    interned: HashMap<Vec<u8>, u32>,
}

impl StringTable {
    fn push(&mut self, s: &[u8]) -> Result<(u32, u32), IndexError> {
        let off = u32::try_from(self.bytes.len())
            .ok()
            .filter(|o| o.checked_add(s.len() as u32).is_some() && s.len() <= u32::MAX as usize)
            .ok_or_else(|| IndexError::TooLarge("string table exceeds 4 GiB".into()))?;
        self.bytes.extend_from_slice(s);
        Ok((off, s.len() as u32))
    }

    fn intern(&mut self, s: &[u8]) -> Result<(u32, u32), IndexError> {
        if let Some(off) = self.interned.get(s) {
            return Ok((*off, s.len() as u32));
        }
        let (off, len) = self.push(s)?;
        self.interned.insert(s.to_vec(), off);
        Ok((off, len))
    }
}
