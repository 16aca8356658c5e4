//! Fuzzes how `lazyctl convert s3://BUCKET/PREFIX/` turns a listing's object keys into paths in
//! the image (`tools::s3source::map_keys`), and the `s3://` location parser
//! (`agent::s3::S3Location`). The input's first line is the location after `s3://`; each
//! further line is one object: its first byte is the object's size, the rest its key. Keys are
//! sorted, as the listing returns them.
//!
//! Checks: a location that parses prints back as itself. Mapped keys: every path component is
//! a name a directory can hold (not empty, `.` or `..`, no `/` or NUL, at most 255 bytes), and
//! the components (with a trailing `/` for directory markers) spell the key after the prefix;
//! no file is also a directory or the parent of another path, no two objects are the same file;
//! only the markers of the prefix itself are left out.
#![no_main]

use std::collections::HashSet;

use agent::s3::{ListedObject, S3Location};
use fusefs::format::NAME_MAX;
use libfuzzer_sys::fuzz_target;
use tools::s3source::map_keys;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let mut lines = text.split('\n');
    let location = lines.next().unwrap_or_default();
    // The prefix the converter lists: `PREFIX/` of a valid location; any text otherwise.
    let prefix = match S3Location::parse(&format!("s3://{location}")) {
        Ok(parsed) => {
            assert_eq!(S3Location::parse(&parsed.to_string()).unwrap(), parsed);
            match parsed.prefix() {
                "" => String::new(),
                p => format!("{p}/"),
            }
        }
        Err(_) => location.to_string(),
    };
    let mut objects: Vec<ListedObject> = lines
        .filter_map(|line| {
            let size = *line.as_bytes().first()?;
            Some(ListedObject {
                key: line.get(1..)?.to_string(),
                size: u64::from(size),
                last_modified: None,
                etag: None,
            })
        })
        .collect();
    objects.sort_by(|a, b| a.key.cmp(&b.key));
    let listed = objects.len();
    let prefix_markers = objects
        .iter()
        .filter(|o| {
            o.size == 0
                && ((!prefix.is_empty() && o.key == prefix) || o.key == format!("{prefix}/"))
        })
        .count();
    let Ok(mapped) = map_keys(objects, &prefix, "s3://fuzz/") else {
        return;
    };
    assert_eq!(mapped.len() + prefix_markers, listed);
    let mut files = HashSet::new();
    let mut dirs = HashSet::new();
    for object in &mapped {
        for c in &object.path {
            assert!(
                !c.is_empty()
                    && c != b"."
                    && c != b".."
                    && c.len() <= NAME_MAX
                    && !c.contains(&b'/')
                    && !c.contains(&0),
                "{c:?}"
            );
        }
        let mut spelled = object.path.join(&b'/');
        if object.is_dir {
            spelled.push(b'/');
            assert_eq!(object.listed.size, 0);
        }
        assert_eq!(
            object.listed.key.as_bytes(),
            [prefix.as_bytes(), &spelled].concat()
        );
        for i in 1..object.path.len() {
            dirs.insert(object.path[..i].to_vec());
        }
        if object.is_dir {
            dirs.insert(object.path.clone());
        } else {
            assert!(
                files.insert(object.path.clone()),
                "{:?} twice",
                object.listed.key
            );
        }
    }
    assert!(
        files.is_disjoint(&dirs),
        "a path is both a file and a directory"
    );
});
