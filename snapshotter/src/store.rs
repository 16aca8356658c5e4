//! The snapshots' metadata, kept in `ROOT/metadata.redb` (redb: an embedded, crash-safe
//! key-value store) so that it survives restarts of the snapshotter: every change is one
//! committed transaction before containerd hears of it. The whole set is also held in memory
//! (a host has hundreds or thousands of snapshots, not millions), so that walking a parent chain
//! or finding a layer by its label costs no disk read.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::time::SystemTime;

use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};

/// Snapshot name → its record (JSON).
const SNAPSHOTS: TableDefinition<'_, &str, &[u8]> = TableDefinition::new("snapshots");
/// `next_id` → the id the next snapshot gets (ids name the snapshots' directories).
const COUNTERS: TableDefinition<'_, &str, u64> = TableDefinition::new("counters");
const NEXT_ID: &str = "next_id";

/// A snapshot's kind, as containerd's API names them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    View,
    Active,
    Committed,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::View => "view",
            Kind::Active => "active",
            Kind::Committed => "committed",
        }
    }
}

/// One snapshot.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Record {
    /// Names its directory, `ROOT/snapshots/ID` (`fs`, and `work` for active snapshots).
    pub id: u64,
    pub kind: Kind,
    /// The parent's name; empty for none.
    pub parent: String,
    pub labels: HashMap<String, String>,
    pub created: SystemTime,
    pub updated: SystemTime,
    /// A committed layer of a lazy image: it has no directory, its content is in lazyd's mount
    /// of the image.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lazy: Option<LazyLayer>,
    /// An active snapshot or a view over a lazy image: the name under which it holds the
    /// image's shared read-only mount in lazyd (`POST /v1/lower`), released on removal.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub holder: Option<String>,
    /// Disk use of a committed snapshot, measured when it was committed.
    #[serde(default)]
    pub usage: Usage,
}

/// A layer of a lazy image, committed without content.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LazyLayer {
    /// The lazy image, pinned to its manifest digest (lazyd's `pinned` reference).
    pub image: String,
    /// The image's reference as containerd pulled it.
    pub pulled_as: String,
    /// Whether this is the image's top layer: only then is lazyd's mount of the image this
    /// snapshot's whole tree (its layers and all below). A layer below the top has no tree of
    /// its own.
    pub top: bool,
}

/// Bytes and inodes used, as containerd's `Usage` counts them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Usage {
    pub size: i64,
    pub inodes: i64,
}

#[derive(Debug, thiserror::Error)]
#[error("the snapshotter's metadata store {path}: {message}")]
pub struct StoreError {
    path: String,
    message: String,
}

/// The records, on disk and in memory.
pub struct Store {
    db: Database,
    path: String,
    records: BTreeMap<String, Record>,
    next_id: u64,
}

impl Store {
    /// Opens (or creates) the store at `path` and loads every record.
    pub fn open(path: &Path) -> Result<Store, StoreError> {
        let display = path.display().to_string();
        let err = |e: &dyn std::fmt::Display| StoreError {
            path: display.clone(),
            message: e.to_string(),
        };
        let db = Database::create(path).map_err(|e| err(&e))?;
        let txn = db.begin_write().map_err(|e| err(&e))?;
        {
            txn.open_table(SNAPSHOTS).map_err(|e| err(&e))?;
            txn.open_table(COUNTERS).map_err(|e| err(&e))?;
        }
        txn.commit().map_err(|e| err(&e))?;
        let mut records = BTreeMap::new();
        let txn = db.begin_read().map_err(|e| err(&e))?;
        let table = txn.open_table(SNAPSHOTS).map_err(|e| err(&e))?;
        for entry in table.iter().map_err(|e| err(&e))? {
            let (name, bytes) = entry.map_err(|e| err(&e))?;
            let record: Record = serde_json::from_slice(bytes.value()).map_err(|e| {
                err(&format!(
                    "the record of snapshot {:?} is unreadable: {e}",
                    name.value()
                ))
            })?;
            records.insert(name.value().to_string(), record);
        }
        let counters = txn.open_table(COUNTERS).map_err(|e| err(&e))?;
        let stored_next = counters
            .get(NEXT_ID)
            .map_err(|e| err(&e))?
            .map_or(1, |v| v.value());
        // Never hand out an id a record has, whatever the counter says.
        let next_id = records
            .values()
            .map(|r| r.id + 1)
            .max()
            .unwrap_or(1)
            .max(stored_next);
        Ok(Store {
            db,
            path: display,
            records,
            next_id,
        })
    }

    pub fn get(&self, name: &str) -> Option<&Record> {
        self.records.get(name)
    }

    pub fn iter(&self) -> impl Iterator<Item = (&String, &Record)> {
        self.records.iter()
    }

    pub fn len(&self) -> usize {
        self.records.len()
    }

    /// Whether any snapshot has `name` as its parent.
    pub fn has_children(&self, name: &str) -> bool {
        self.records.values().any(|r| r.parent == name)
    }

    /// The id the next snapshot gets; counted as used at once (on disk with the next change).
    pub fn take_id(&mut self) -> u64 {
        let id = self.next_id;
        self.next_id += 1;
        id
    }

    /// Writes `changes` (a record to put, or `None` to delete the name) in one transaction,
    /// then applies them in memory. On error nothing changed.
    pub fn apply(&mut self, changes: Vec<(String, Option<Record>)>) -> Result<(), StoreError> {
        let err = |e: &dyn std::fmt::Display| StoreError {
            path: self.path.clone(),
            message: e.to_string(),
        };
        let txn = self.db.begin_write().map_err(|e| err(&e))?;
        {
            let mut table = txn.open_table(SNAPSHOTS).map_err(|e| err(&e))?;
            for (name, record) in &changes {
                match record {
                    Some(r) => {
                        let bytes = serde_json::to_vec(r).map_err(|e| err(&e))?;
                        table
                            .insert(name.as_str(), bytes.as_slice())
                            .map_err(|e| err(&e))?;
                    }
                    None => {
                        table.remove(name.as_str()).map_err(|e| err(&e))?;
                    }
                }
            }
            let mut counters = txn.open_table(COUNTERS).map_err(|e| err(&e))?;
            counters
                .insert(NEXT_ID, self.next_id)
                .map_err(|e| err(&e))?;
        }
        txn.commit().map_err(|e| err(&e))?;
        for (name, record) in changes {
            match record {
                Some(r) => self.records.insert(name, r),
                None => self.records.remove(&name),
            };
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(id: u64, kind: Kind, parent: &str) -> Record {
        Record {
            id,
            kind,
            parent: parent.into(),
            labels: HashMap::from([("a".to_string(), "b".to_string())]),
            created: SystemTime::now(),
            updated: SystemTime::now(),
            lazy: None,
            holder: None,
            usage: Usage::default(),
        }
    }

    #[test]
    fn records_and_ids_survive_reopening() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("metadata.redb");
        {
            let mut store = Store::open(&path).unwrap();
            let a = store.take_id();
            let b = store.take_id();
            store
                .apply(vec![
                    ("a".into(), Some(record(a, Kind::Committed, ""))),
                    ("b".into(), Some(record(b, Kind::Active, "a"))),
                ])
                .unwrap();
            store.apply(vec![("b".into(), None)]).unwrap();
            let c = store.take_id();
            assert_eq!((a, b, c), (1, 2, 3));
        }
        let mut store = Store::open(&path).unwrap();
        assert_eq!(store.len(), 1);
        let a = store.get("a").unwrap();
        assert_eq!(
            (a.id, a.kind, a.labels["a"].as_str()),
            (1, Kind::Committed, "b")
        );
        assert!(!store.has_children("a"));
        // An id taken but never written with a record is free again (its directory, if one was
        // made, is an orphan the snapshotter replaces).
        assert_eq!(store.take_id(), 3);
    }
}
