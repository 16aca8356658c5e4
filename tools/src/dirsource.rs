//! Reading a plain directory (`path:DIR`: a rootfs or a model folder) into the tree, with the
//! same fidelity as a layer: modes, owners, mtimes, xattrs, hardlinks (by device and inode),
//! devices, fifos, sockets and symlinks. Holes in sparse files read as zeros and are
//! dropped again by the packer's zero-chunk detection.

use std::collections::HashMap;
use std::fs;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

use fusefs::format::{
    encode_dev, S_IFBLK, S_IFCHR, S_IFDIR, S_IFIFO, S_IFLNK, S_IFMT, S_IFREG, S_IFSOCK,
};

use crate::error::ConvertError;
use crate::packer::LayerPacker;
use crate::tree::{dir_node, file_node, special_node, symlink_node, Meta, Tree};

fn meta_of(path: &Path, md: &fs::Metadata) -> Result<Meta, ConvertError> {
    let mut xattrs = Vec::new();
    let names = xattr::list(path).map_err(ConvertError::io(format!(
        "listing xattrs of {}",
        path.display()
    )))?;
    for name in names {
        if let Some(value) = xattr::get(path, &name).map_err(ConvertError::io(format!(
            "reading xattr {name:?} of {}",
            path.display()
        )))? {
            xattrs.push((name.as_bytes().to_vec(), value));
        }
    }
    xattrs.sort();
    Ok(Meta {
        mode: md.mode(),
        uid: md.uid(),
        gid: md.gid(),
        mtime_sec: md.mtime(),
        mtime_nsec: md.mtime_nsec() as u32,
        xattrs,
    })
}

fn major_minor(rdev: u64) -> (u32, u32) {
    (libc::major(rdev), libc::minor(rdev))
}

/// Adds everything under `root` to `tree` as layer 0; the root's own metadata becomes the
/// image root's. Entries are visited in sorted order, so the result is deterministic.
pub fn apply_dir(
    root: &Path,
    tree: &mut Tree,
    packer: &mut LayerPacker,
) -> Result<u64, ConvertError> {
    let md = fs::symlink_metadata(root)
        .map_err(ConvertError::io(format!("reading {}", root.display())))?;
    if md.mode() & S_IFMT != S_IFDIR {
        return Err(ConvertError::Source(format!(
            "{} is not a directory",
            root.display()
        )));
    }
    tree.insert(&[], dir_node(meta_of(root, &md)?), 0)
        .map_err(|e| ConvertError::Source(e.to_string()))?;
    let mut seen: HashMap<(u64, u64), Vec<Vec<u8>>> = HashMap::new();
    let mut count = 0u64;
    // (directory on disk, its path components in the image)
    let mut stack = vec![(root.to_path_buf(), Vec::<Vec<u8>>::new())];
    while let Some((dir, comps)) = stack.pop() {
        let mut names: Vec<_> = fs::read_dir(&dir)
            .map_err(ConvertError::io(format!("listing {}", dir.display())))?
            .map(|e| e.map(|e| e.file_name()))
            .collect::<Result<_, _>>()
            .map_err(ConvertError::io(format!("listing {}", dir.display())))?;
        names.sort();
        let mut subdirs = Vec::new();
        for name in names {
            let path = dir.join(&name);
            let mut entry_comps = comps.clone();
            entry_comps.push(name.as_bytes().to_vec());
            let md = fs::symlink_metadata(&path)
                .map_err(ConvertError::io(format!("reading {}", path.display())))?;
            count += 1;
            let err = |e: crate::tree::TreeError| {
                ConvertError::Source(format!("{}: {e}", path.display()))
            };
            let file_type = md.mode() & S_IFMT;
            if file_type != S_IFDIR && md.nlink() > 1 {
                if let Some(first) = seen.get(&(md.dev(), md.ino())) {
                    tree.hardlink(&entry_comps, first, 0).map_err(err)?;
                    continue;
                }
                seen.insert((md.dev(), md.ino()), entry_comps.clone());
            }
            let meta = meta_of(&path, &md)?;
            let node = match file_type {
                S_IFDIR => {
                    subdirs.push((path.clone(), entry_comps.clone()));
                    dir_node(meta)
                }
                S_IFREG => {
                    let mut f = fs::File::open(&path)
                        .map_err(ConvertError::io(format!("opening {}", path.display())))?;
                    let what = || path.display().to_string();
                    let extents = packer.add_file(&mut f, md.len(), &entry_comps, &what)?;
                    file_node(meta, md.len(), extents)
                }
                S_IFLNK => {
                    let target = fs::read_link(&path)
                        .map_err(ConvertError::io(format!("reading link {}", path.display())))?;
                    symlink_node(meta, target.as_os_str().as_bytes().to_vec())
                }
                S_IFCHR | S_IFBLK => {
                    let (maj, min) = major_minor(md.rdev());
                    special_node(meta, encode_dev(maj, min))
                }
                S_IFIFO | S_IFSOCK => special_node(meta, 0),
                other => {
                    return Err(ConvertError::Source(format!(
                        "{}: unknown file type {other:o}",
                        path.display()
                    )))
                }
            };
            tree.insert(&entry_comps, node, 0).map_err(err)?;
        }
        stack.extend(subdirs.into_iter().rev());
    }
    Ok(count)
}
