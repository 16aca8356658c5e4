//! The merged filesystem tree of an image, built layer by layer: entries replace or merge
//! with what lower layers left, whiteouts (`.wh.NAME`) and opaque markers (`.wh..wh..opq`)
//! hide lower content, hardlinks share one node. Every directory entry remembers the layer
//! that last (re)created it, so a whiteout hides only lower layers' content whatever order
//! the layer's tar lists it in. Paths are validated here: absolute paths, `..`, and writes
//! through non-directories are errors, never followed.

use std::collections::{BTreeMap, HashMap};

use fusefs::format::{ExtentRecord, S_IFDIR, S_IFLNK, S_IFMT, S_IFREG};
use fusefs::writer::{IndexWriter, NodeSpec};

pub type NodeId = usize;

/// Metadata shared by all node kinds.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Meta {
    /// Full `st_mode` (type and permission bits).
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub mtime_sec: i64,
    pub mtime_nsec: u32,
    pub xattrs: Vec<(Vec<u8>, Vec<u8>)>,
}

#[derive(Debug, Clone)]
pub struct Entry {
    pub node: NodeId,
    /// Layer that last created or re-created this entry.
    pub layer: u32,
}

#[derive(Debug, Clone)]
pub enum Body {
    Dir(BTreeMap<Vec<u8>, Entry>),
    /// Extents name provisional chunk numbers until the chunk table is final.
    File {
        size: u64,
        extents: Vec<ExtentRecord>,
    },
    Symlink(Vec<u8>),
    Special {
        rdev: u32,
    },
}

#[derive(Debug, Clone)]
pub struct Node {
    pub meta: Meta,
    pub body: Body,
}

/// Why a tree operation was refused; the caller adds layer and entry names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TreeError {
    Absolute,
    Escapes,
    NameTooLong,
    /// A path component that must be a directory is not one (or is a symlink).
    NotADirectory(String),
    Missing(String),
    LinkToDirectory,
}

impl std::fmt::Display for TreeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            TreeError::Absolute => write!(f, "absolute path"),
            TreeError::Escapes => write!(f, "path escapes the image root"),
            TreeError::NameTooLong => write!(f, "a path component is longer than 255 bytes"),
            TreeError::NotADirectory(p) => {
                write!(
                    f,
                    "{p:?} is not a directory in the image (writing through it refused)"
                )
            }
            TreeError::Missing(p) => write!(f, "{p:?} does not exist"),
            TreeError::LinkToDirectory => write!(f, "hardlinks to directories are not allowed"),
        }
    }
}

/// Splits a tar path into validated components: "./" and empty components are dropped;
/// absolute paths and ".." are refused.
pub fn components(path: &[u8]) -> Result<Vec<Vec<u8>>, TreeError> {
    if path.first() == Some(&b'/') {
        return Err(TreeError::Absolute);
    }
    let mut out = Vec::new();
    for c in path.split(|b| *b == b'/') {
        match c {
            b"" | b"." => {}
            b".." => return Err(TreeError::Escapes),
            c if c.len() > fusefs::format::NAME_MAX => return Err(TreeError::NameTooLong),
            c => out.push(c.to_vec()),
        }
    }
    Ok(out)
}

fn show(path: &[Vec<u8>]) -> String {
    String::from_utf8_lossy(&path.join(&b'/')).into_owned()
}

pub struct Tree {
    nodes: Vec<Node>,
}

impl Default for Tree {
    fn default() -> Self {
        Self::new()
    }
}

impl Tree {
    pub fn new() -> Tree {
        Tree {
            nodes: vec![Node {
                meta: Meta {
                    mode: S_IFDIR | 0o755,
                    ..Meta::default()
                },
                body: Body::Dir(BTreeMap::new()),
            }],
        }
    }

    pub fn node(&self, id: NodeId) -> &Node {
        &self.nodes[id]
    }

    fn children_mut(&mut self, dir: NodeId) -> &mut BTreeMap<Vec<u8>, Entry> {
        match &mut self.nodes[dir].body {
            Body::Dir(c) => c,
            _ => unreachable!("children_mut is only called on directories"),
        }
    }

    /// Walks to the directory `path` names, creating missing directories (0755, root) as
    /// container runtimes do for layers that omit parents.
    fn dir_at(&mut self, path: &[Vec<u8>], layer: u32) -> Result<NodeId, TreeError> {
        let mut cur = 0;
        for (i, name) in path.iter().enumerate() {
            let next = match self.children_mut(cur).get(name) {
                Some(e) => e.node,
                None => {
                    let id = self.push(Node {
                        meta: Meta {
                            mode: S_IFDIR | 0o755,
                            ..Meta::default()
                        },
                        body: Body::Dir(BTreeMap::new()),
                    });
                    self.children_mut(cur)
                        .insert(name.clone(), Entry { node: id, layer });
                    id
                }
            };
            if !matches!(self.nodes[next].body, Body::Dir(_)) {
                return Err(TreeError::NotADirectory(show(&path[..=i])));
            }
            cur = next;
        }
        Ok(cur)
    }

    fn push(&mut self, node: Node) -> NodeId {
        self.nodes.push(node);
        self.nodes.len() - 1
    }

    /// Adds or replaces the entry at `path`. A directory over a directory merges (new
    /// metadata, lower children kept); anything else replaces the old entry.
    pub fn insert(&mut self, path: &[Vec<u8>], node: Node, layer: u32) -> Result<(), TreeError> {
        let Some((name, parent)) = path.split_last() else {
            if matches!(node.body, Body::Dir(_)) {
                self.nodes[0].meta = node.meta;
                return Ok(());
            }
            return Err(TreeError::NotADirectory("/".into()));
        };
        let dir = self.dir_at(parent, layer)?;
        if let Some(existing) = self.children_mut(dir).get(name).cloned() {
            let both_dirs = matches!(self.nodes[existing.node].body, Body::Dir(_))
                && matches!(node.body, Body::Dir(_));
            if both_dirs {
                self.nodes[existing.node].meta = node.meta;
                self.children_mut(dir).insert(
                    name.clone(),
                    Entry {
                        node: existing.node,
                        layer,
                    },
                );
                return Ok(());
            }
        }
        let id = self.push(node);
        self.children_mut(dir)
            .insert(name.clone(), Entry { node: id, layer });
        Ok(())
    }

    /// Adds `path` as another name of the node at `target`.
    pub fn hardlink(
        &mut self,
        path: &[Vec<u8>],
        target: &[Vec<u8>],
        layer: u32,
    ) -> Result<(), TreeError> {
        let node = self
            .resolve(target)
            .ok_or_else(|| TreeError::Missing(show(target)))?;
        if matches!(self.nodes[node].body, Body::Dir(_)) {
            return Err(TreeError::LinkToDirectory);
        }
        let Some((name, parent)) = path.split_last() else {
            return Err(TreeError::LinkToDirectory);
        };
        let dir = self.dir_at(parent, layer)?;
        self.children_mut(dir)
            .insert(name.clone(), Entry { node, layer });
        Ok(())
    }

    /// The node at `path`, without following symlinks.
    pub fn resolve(&self, path: &[Vec<u8>]) -> Option<NodeId> {
        let mut cur = 0;
        for name in path {
            match &self.nodes[cur].body {
                Body::Dir(c) => cur = c.get(name)?.node,
                _ => return None,
            }
        }
        Some(cur)
    }

    /// `.wh.NAME` in `dir`: hides lower layers' `NAME` (and everything below it).
    pub fn whiteout(&mut self, dir: &[Vec<u8>], name: &[u8], layer: u32) -> Result<(), TreeError> {
        let Some(d) = self.resolve(dir) else {
            return Ok(());
        };
        if !matches!(self.nodes[d].body, Body::Dir(_)) {
            return Err(TreeError::NotADirectory(show(dir)));
        }
        let Some(entry) = self.children_mut(d).get(name).cloned() else {
            return Ok(());
        };
        if entry.layer < layer {
            self.children_mut(d).remove(name);
        } else if matches!(self.nodes[entry.node].body, Body::Dir(_)) {
            // Re-created earlier in this same layer: keep this layer's content, drop the
            // lower content it was merged over.
            self.prune_lower(entry.node, layer);
        }
        Ok(())
    }

    /// `.wh..wh..opq` in `dir`: hides all lower layers' content of `dir`.
    pub fn opaque(&mut self, dir: &[Vec<u8>], layer: u32) -> Result<(), TreeError> {
        let d = self.dir_at(dir, layer)?;
        self.prune_lower(d, layer);
        Ok(())
    }

    /// Removes entries below `dir` created by layers before `layer`.
    fn prune_lower(&mut self, dir: NodeId, layer: u32) {
        let mut stack = vec![dir];
        while let Some(d) = stack.pop() {
            let mut keep_dirs = Vec::new();
            let nodes = &self.nodes;
            let mut children = match &self.nodes[d].body {
                Body::Dir(c) => c.clone(),
                _ => continue,
            };
            children.retain(|_, e| {
                let keep = e.layer >= layer;
                if keep && matches!(nodes[e.node].body, Body::Dir(_)) {
                    keep_dirs.push(e.node);
                }
                keep
            });
            *self.children_mut(d) = children;
            stack.extend(keep_dirs);
        }
    }

    /// Writes the tree into `writer` in depth-first order of sorted names (so inode numbers
    /// are stable for an image), mapping provisional chunk numbers with `chunk_of`.
    pub fn write_index(
        &self,
        writer: &mut IndexWriter,
        chunk_of: &dyn Fn(u32) -> u32,
    ) -> Result<(), fusefs::IndexError> {
        writer.set_root(self.spec(0, chunk_of))?;
        let mut inos: HashMap<NodeId, u32> = HashMap::new();
        // (directory node, its inode) pairs still to write, processed depth first.
        let mut stack: Vec<(NodeId, u32)> = vec![(0, writer.root())];
        while let Some((dir, dir_ino)) = stack.pop() {
            let Body::Dir(children) = &self.nodes[dir].body else {
                continue;
            };
            let mut subdirs = Vec::new();
            for (name, entry) in children {
                if let Some(ino) = inos.get(&entry.node) {
                    writer.link(dir_ino, name, *ino)?;
                    continue;
                }
                let ino = writer.add_child(dir_ino, name, self.spec(entry.node, chunk_of))?;
                inos.insert(entry.node, ino);
                if matches!(self.nodes[entry.node].body, Body::Dir(_)) {
                    subdirs.push((entry.node, ino));
                }
            }
            stack.extend(subdirs.into_iter().rev());
        }
        Ok(())
    }

    fn spec(&self, id: NodeId, chunk_of: &dyn Fn(u32) -> u32) -> NodeSpec {
        let node = &self.nodes[id];
        let m = &node.meta;
        let perm = m.mode & 0o7777;
        let mut spec = match &node.body {
            Body::Dir(_) => NodeSpec::dir(perm),
            Body::File { size, extents } => NodeSpec::file(
                perm,
                *size,
                extents
                    .iter()
                    .map(|e| ExtentRecord {
                        chunk: chunk_of(e.chunk),
                        ..*e
                    })
                    .collect(),
            ),
            Body::Symlink(target) => NodeSpec::symlink(target.clone()),
            Body::Special { rdev } => NodeSpec::special(m.mode, *rdev),
        };
        if !matches!(node.body, Body::Symlink(_)) {
            spec.mode = (spec.mode & S_IFMT) | perm;
        }
        spec.uid = m.uid;
        spec.gid = m.gid;
        spec.mtime_sec = m.mtime_sec;
        spec.mtime_nsec = m.mtime_nsec;
        spec.xattrs = m.xattrs.clone();
        spec
    }

    /// Number of entries reachable from the root (hardlinks counted once per name).
    pub fn entry_count(&self) -> usize {
        let mut n = 0;
        let mut stack = vec![0];
        while let Some(d) = stack.pop() {
            if let Body::Dir(c) = &self.nodes[d].body {
                n += c.len();
                stack.extend(
                    c.values()
                        .filter(|e| matches!(self.nodes[e.node].body, Body::Dir(_)))
                        .map(|e| e.node),
                );
            }
        }
        n
    }
}

/// Node constructors used by the layer and directory readers.
pub fn file_node(meta: Meta, size: u64, extents: Vec<ExtentRecord>) -> Node {
    Node {
        meta: Meta {
            mode: S_IFREG | (meta.mode & 0o7777),
            ..meta
        },
        body: Body::File { size, extents },
    }
}

pub fn dir_node(meta: Meta) -> Node {
    Node {
        meta: Meta {
            mode: S_IFDIR | (meta.mode & 0o7777),
            ..meta
        },
        body: Body::Dir(BTreeMap::new()),
    }
}

pub fn symlink_node(meta: Meta, target: Vec<u8>) -> Node {
    Node {
        meta: Meta {
            mode: S_IFLNK | 0o777,
            ..meta
        },
        body: Body::Symlink(target),
    }
}

/// A device, fifo or socket; `meta.mode` carries the file type.
pub fn special_node(meta: Meta, rdev: u32) -> Node {
    Node {
        meta,
        body: Body::Special { rdev },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> Vec<Vec<u8>> {
        components(s.as_bytes()).unwrap()
    }

    fn file(tag: u32) -> Node {
        file_node(
            Meta {
                mode: 0o644,
                uid: tag,
                ..Meta::default()
            },
            0,
            vec![],
        )
    }

    fn dir() -> Node {
        dir_node(Meta {
            mode: 0o755,
            ..Meta::default()
        })
    }

    #[test]
    fn components_refuse_escapes() {
        assert_eq!(components(b"/etc/passwd"), Err(TreeError::Absolute));
        assert_eq!(components(b"a/../../x"), Err(TreeError::Escapes));
        assert_eq!(
            components(b"./a//b/"),
            Ok(vec![b"a".to_vec(), b"b".to_vec()])
        );
        assert_eq!(components(b"./"), Ok(vec![]));
        assert_eq!(components(&[b'x'; 256]), Err(TreeError::NameTooLong));
    }

    #[test]
    fn whiteout_hides_lower_only_in_any_order() {
        for whiteout_first in [true, false] {
            let mut t = Tree::new();
            t.insert(&p("d"), dir(), 0).unwrap();
            t.insert(&p("d/old"), file(1), 0).unwrap();
            t.insert(&p("f"), file(1), 0).unwrap();
            if whiteout_first {
                t.whiteout(&[], b"d", 1).unwrap();
                t.whiteout(&[], b"f", 1).unwrap();
            }
            t.insert(&p("d"), dir(), 1).unwrap();
            t.insert(&p("d/new"), file(2), 1).unwrap();
            t.insert(&p("f"), file(2), 1).unwrap();
            if !whiteout_first {
                t.whiteout(&[], b"d", 1).unwrap();
                t.whiteout(&[], b"f", 1).unwrap();
            }
            assert!(t.resolve(&p("d/old")).is_none(), "order {whiteout_first}");
            assert!(t.resolve(&p("d/new")).is_some());
            let f = t.resolve(&p("f")).unwrap();
            assert_eq!(t.node(f).meta.uid, 2);
        }
    }

    #[test]
    fn opaque_hides_lower_children_recursively() {
        let mut t = Tree::new();
        t.insert(&p("d/sub/x"), file(1), 0).unwrap();
        t.insert(&p("d/y"), file(1), 0).unwrap();
        t.insert(&p("d/sub"), dir(), 1).unwrap();
        t.insert(&p("d/sub/z"), file(2), 1).unwrap();
        t.opaque(&p("d"), 1).unwrap();
        assert!(t.resolve(&p("d/y")).is_none());
        assert!(t.resolve(&p("d/sub/x")).is_none());
        assert!(t.resolve(&p("d/sub/z")).is_some());
    }

    #[test]
    fn writes_through_files_and_symlinks_are_refused() {
        let mut t = Tree::new();
        t.insert(&p("f"), file(1), 0).unwrap();
        t.insert(&p("l"), symlink_node(Meta::default(), b"/etc".to_vec()), 0)
            .unwrap();
        assert!(matches!(
            t.insert(&p("f/x"), file(1), 0),
            Err(TreeError::NotADirectory(_))
        ));
        assert!(matches!(
            t.insert(&p("l/passwd"), file(1), 0),
            Err(TreeError::NotADirectory(_))
        ));
    }

    #[test]
    fn hardlinks_share_a_node_and_survive_removal_of_one_name() {
        let mut t = Tree::new();
        t.insert(&p("a"), file(1), 0).unwrap();
        t.hardlink(&p("b/c"), &p("a"), 0).unwrap();
        assert_eq!(t.resolve(&p("a")), t.resolve(&p("b/c")));
        t.whiteout(&[], b"a", 1).unwrap();
        assert!(t.resolve(&p("b/c")).is_some());
        assert_eq!(
            t.hardlink(&p("x"), &p("missing"), 1),
            Err(TreeError::Missing("missing".into()))
        );
        t.insert(&p("d"), dir(), 1).unwrap();
        assert_eq!(
            t.hardlink(&p("y"), &p("d"), 1),
            Err(TreeError::LinkToDirectory)
        );
    }
}
