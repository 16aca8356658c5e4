//! Hot-chunk profiles: which chunks a container reads in its first seconds, in the order it
//! first reads them, kept beside the image so the next mount on any host can prefetch them (in
//! that order, below demand priority) and the converter can lay them out first.
//!
//! - [`Recorder`] notes first accesses of chunks (by chunk table index) for a bounded window
//!   after a mount starts; [`RecordingSource`] wraps a mount's [`ChunkSource`] to feed it (real
//!   reads only, not read-ahead hints). [`Recorder::profile`] turns what it saw into a
//!   [`Profile`] of one run, resolving each chunk to its digest and a file that holds it.
//! - A [`Profile`] is JSON (schema [`PROFILE_SCHEMA_VERSION`], see [`Profile`]), keyed by the lazy
//!   manifest digest of the image it was recorded on, its entries by chunk *digest*: a profile
//!   applies to any image that has the same chunks, a re-conversion of the same source
//!   included ([`Profile::chunks`]). Profiles of several runs are merged by mean rank
//!   ([`Profile::merge`]). Parsing is strict and bounded: profiles come from registries and
//!   buckets other people can write.
//! - Storage beside the image ([`push_profile`], [`fetch_profile`]): in a registry an OCI
//!   artifact (artifactType [`PROFILE_ARTIFACT_TYPE`], the empty config, one layer holding the
//!   JSON, `subject` = the lazy image's manifest), found through the referrers API or its
//!   tag-schema fallback exactly as the lazy image is, the newest (annotation
//!   `org.opencontainers.image.created`) winning; in S3 `PREFIX/profile.json`; in a `dir:` store
//!   `STORE/profiles/sha256-<hex>.json`. The agent's own copies: [`load_local`], [`save_local`].

use std::collections::{BTreeMap, HashMap, HashSet};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant, SystemTime};

use fusefs::format::{
    DirentRecord, ExtentRecord, Section, MAX_CHUNK_SIZE, PATH_MAX, S_IFDIR, S_IFMT, S_IFREG,
};
use fusefs::index::ROOT_INO;
use fusefs::manifest::{is_sha256_digest, MEDIA_TYPE_OCI_MANIFEST};
use fusefs::{ChunkRef, ChunkSource, Index, IndexError, SourceError};
use serde::{Deserialize, Serialize};
use thiserror::Error;
use tracing::{debug, info, warn};

use crate::blobstore::{BlobError, BlobStore};
use crate::registry::{Reference, Referrer, RegistryClient, RegistryError};
use crate::remote::{registry_client, s3_store, ImageLocation, OpenedImage, RemoteOptions};
use crate::s3::{S3Error, S3Store};
use crate::store::sha256_digest;

/// `artifactType` of a profile manifest in a registry.
pub const PROFILE_ARTIFACT_TYPE: &str = "application/vnd.lazyimg.profile.v1";
/// Media type of the profile JSON (the artifact's one layer).
pub const PROFILE_MEDIA_TYPE: &str = "application/vnd.lazyimg.profile.v1+json";
/// The version of the JSON schema this build writes and reads.
pub const PROFILE_SCHEMA_VERSION: u32 = 1;
/// Most entries a profile may hold: a chunk each, so 1 Mi entries is 1 TiB of data at the
/// default 1 MiB chunk size, far more than any start reads; it bounds what a hostile profile
/// makes a mount prefetch and hold in memory.
pub const MAX_ENTRIES: usize = 1 << 20;
/// Largest profile accepted: [`MAX_ENTRIES`] entries of about 250 bytes (a 64-digit chunk
/// digest, a path of typical length, numbers).
pub const MAX_PROFILE_BYTES: u64 = 256 << 20;
/// Media type of the OCI empty descriptor (the config of an artifact that has none).
const MEDIA_TYPE_EMPTY: &str = "application/vnd.oci.empty.v1+json";
/// The empty config's content, `{}`.
const EMPTY_CONFIG: &[u8] = b"{}";
/// OCI annotation holding when the profile was pushed (RFC 3339); the newest profile wins.
pub const ANNOTATION_CREATED: &str = "org.opencontainers.image.created";
/// Folder of profiles in a `dir:` store.
const DIR_PROFILES: &str = "profiles";

#[derive(Debug, Error)]
pub enum ProfileError {
    #[error("profile is {len} bytes, over the {MAX_PROFILE_BYTES}-byte limit; it is not a profile lazyd wrote")]
    TooLarge { len: u64 },
    #[error("profile is not valid JSON: {0}")]
    Json(#[source] serde_json::Error),
    #[error("profile schema version {found} is not supported (this build reads version {PROFILE_SCHEMA_VERSION}); record the profile again")]
    Version { found: u32 },
    #[error("invalid profile: {0}")]
    Invalid(String),
    #[error("{location}: not a profile artifact: {reason}")]
    BadArtifact { location: String, reason: String },
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Registry(#[from] RegistryError),
    #[error(transparent)]
    S3(#[from] S3Error),
    #[error(transparent)]
    Blob(#[from] BlobError),
}

impl ProfileError {
    /// Whether retrying can help (network and I/O failures only).
    pub fn is_permanent(&self) -> bool {
        match self {
            ProfileError::Io { .. } => false,
            ProfileError::Registry(e) => e.is_permanent(),
            ProfileError::S3(e) => e.is_permanent(),
            ProfileError::Blob(e) => e.is_permanent(),
            ProfileError::TooLarge { .. }
            | ProfileError::Json(_)
            | ProfileError::Version { .. }
            | ProfileError::Invalid(_)
            | ProfileError::BadArtifact { .. } => true,
        }
    }
}

fn io_error(path: &Path) -> impl FnOnce(std::io::Error) -> ProfileError + '_ {
    move |source| ProfileError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// The chunks a workload read first, in order. As JSON (one line, shown wrapped):
///
/// ```json
/// {"schema_version":1,
///  "image":"sha256:3f9c…",
///  "runs":2,
///  "entries":[
///   {"chunk":"9a0b…","path":"/usr/bin/python3.11","offset":0,"len":1048576,"seen":2,"rank":0.0},
///   {"chunk":"77e1…","path":"/usr/lib/python3.11/os.py","offset":0,"len":39504,"seen":1,"rank":0.5}]}
/// ```
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Profile {
    schema_version: u32,
    /// `sha256:<hex>` of the lazy image manifest the profile was recorded on (merged profiles:
    /// the one merged into).
    pub image: String,
    /// Recorded runs merged into this profile.
    pub runs: u32,
    /// Chunks in the order to fetch them (first accessed first); one entry per chunk digest.
    pub entries: Vec<ProfileEntry>,
}

/// One chunk of a profile.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ProfileEntry {
    /// blake3 of the chunk's content (lower-case hex): its digest in every image.
    pub chunk: String,
    /// A file whose data is in the chunk, as `/a/b`: the first such file in tree order, which
    /// for a chunk shared by small files is not necessarily the one that was read (a chunk
    /// source does not see files). Names that are not UTF-8 are shown lossily.
    pub path: String,
    /// Offset in `path` of the first byte of it that the chunk holds.
    pub offset: u64,
    /// Bytes of `path` the chunk holds from `offset` on.
    pub len: u32,
    /// Runs (of `runs`) that read the chunk.
    pub seen: u32,
    /// Where in a run the chunk was first read, as a fraction of that run's chunks (0 = the
    /// first), averaged over the `seen` runs that read it: the merge order.
    pub rank: f64,
}

/// Only the version, read first so that a profile of another schema gets a clear error rather
/// than one about its fields.
#[derive(Deserialize)]
struct SchemaVersion {
    schema_version: u32,
}

impl Profile {
    /// An empty profile of image `image` (a manifest digest) with no runs: what runs are merged
    /// into.
    pub fn new(image: impl Into<String>) -> Profile {
        Profile {
            schema_version: PROFILE_SCHEMA_VERSION,
            image: image.into(),
            runs: 0,
            entries: Vec::new(),
        }
    }

    /// Parses and checks a profile: its size and schema version, then every field (digests,
    /// paths, counts, ranks, no chunk listed twice).
    pub fn from_bytes(bytes: &[u8]) -> Result<Profile, ProfileError> {
        if bytes.len() as u64 > MAX_PROFILE_BYTES {
            return Err(ProfileError::TooLarge {
                len: bytes.len() as u64,
            });
        }
        let version: SchemaVersion = serde_json::from_slice(bytes).map_err(ProfileError::Json)?;
        if version.schema_version != PROFILE_SCHEMA_VERSION {
            return Err(ProfileError::Version {
                found: version.schema_version,
            });
        }
        let profile: Profile = serde_json::from_slice(bytes).map_err(ProfileError::Json)?;
        profile.validate()?;
        Ok(profile)
    }

    /// The profile as compact JSON (what [`Profile::from_bytes`] reads).
    pub fn to_bytes(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("a profile serializes")
    }

    fn validate(&self) -> Result<(), ProfileError> {
        let invalid = |m: String| Err(ProfileError::Invalid(m));
        if !is_sha256_digest(&self.image) {
            return invalid(format!(
                "image {:?} is not a sha256:<64 hex> manifest digest",
                self.image
            ));
        }
        if self.entries.len() > MAX_ENTRIES {
            return invalid(format!(
                "{} entries, over the limit of {MAX_ENTRIES}",
                self.entries.len()
            ));
        }
        let mut chunks = HashSet::with_capacity(self.entries.len());
        for (i, e) in self.entries.iter().enumerate() {
            let bad = |what: String| invalid(format!("entry {i} (chunk {:?}): {what}", e.chunk));
            if parse_chunk_digest(&e.chunk).is_none() {
                return bad("the chunk is not 64 lower-case hex digits".into());
            }
            if !chunks.insert(e.chunk.as_str()) {
                return bad("the chunk is listed twice".into());
            }
            if !e.path.starts_with('/') || e.path.len() > PATH_MAX || e.path.contains('\0') {
                return bad(format!(
                    "path must be absolute, at most {PATH_MAX} bytes, without NUL"
                ));
            }
            if e.len == 0 || e.len > MAX_CHUNK_SIZE || e.offset.checked_add(e.len.into()).is_none()
            {
                return bad(format!("len {} is outside 1..={MAX_CHUNK_SIZE}", e.len));
            }
            if e.seen == 0 || e.seen > self.runs {
                return bad(format!("seen {} is outside 1..={}", e.seen, self.runs));
            }
            if !(0.0..=1.0).contains(&e.rank) {
                return bad(format!("rank {} is outside 0..=1", e.rank));
            }
        }
        Ok(())
    }

    /// Adds the runs of `other` to this profile: the union of both entry lists, ordered by each
    /// chunk's mean rank over the runs that read it (every run weighs alike, whatever its
    /// length; ties keep this profile's order, then `other`'s), `runs` and `seen` summed.
    ///
    /// Entries are matched by chunk digest, not by image: `image` stays this profile's, and
    /// merging a profile recorded on an earlier conversion of the same source carries over
    /// every chunk that did not change (the others are skipped when applied). Merging profiles
    /// of unrelated images is allowed but pointless. At most [`MAX_ENTRIES`] entries are kept
    /// (the latest-read ones are dropped).
    pub fn merge(&mut self, other: &Profile) {
        let mut at: HashMap<String, usize> = self
            .entries
            .iter()
            .enumerate()
            .map(|(i, e)| (e.chunk.clone(), i))
            .collect();
        for theirs in &other.entries {
            match at.get(&theirs.chunk) {
                Some(&i) => {
                    let ours = &mut self.entries[i];
                    let total = f64::from(ours.seen) + f64::from(theirs.seen);
                    ours.rank = (ours.rank * f64::from(ours.seen)
                        + theirs.rank * f64::from(theirs.seen))
                        / total;
                    ours.seen = ours.seen.saturating_add(theirs.seen);
                }
                None => {
                    at.insert(theirs.chunk.clone(), self.entries.len());
                    self.entries.push(theirs.clone());
                }
            }
        }
        self.runs = self.runs.saturating_add(other.runs);
        // Stable: equal ranks keep the order built above.
        self.entries.sort_by(|a, b| a.rank.total_cmp(&b.rank));
        self.entries.truncate(MAX_ENTRIES);
    }

    /// The profile's chunks that `index` has, in profile order, each once; entries whose digest
    /// the image does not have are skipped.
    pub fn chunks(&self, index: &Index) -> Vec<ChunkRef> {
        let mut by_digest: HashMap<[u8; 32], u32> = HashMap::with_capacity(index.chunk_count());
        for i in 0..index.chunk_count() as u32 {
            if let Ok(record) = index.chunk(i) {
                by_digest.entry(record.digest).or_insert(i);
            }
        }
        let mut taken = HashSet::new();
        let mut out = Vec::new();
        for entry in &self.entries {
            let Some(digest) = parse_chunk_digest(&entry.chunk) else {
                continue;
            };
            let Some(&i) = by_digest.get(&digest) else {
                continue;
            };
            let Ok(chunk) = index.chunk_ref(i) else {
                continue;
            };
            if taken.insert(i) {
                out.push(chunk);
            }
        }
        out
    }

    /// Stored (compressed) bytes of [`Profile::chunks`]: what prefetching the profile fetches.
    pub fn stored_bytes(&self, index: &Index) -> u64 {
        self.chunks(index)
            .iter()
            .map(|c| u64::from(c.record.comp_len))
            .sum()
    }
}

/// The 32 bytes of a 64-digit lower-case hex chunk digest.
fn parse_chunk_digest(s: &str) -> Option<[u8; 32]> {
    if s.len() != 64 || !s.bytes().all(|c| matches!(c, b'0'..=b'9' | b'a'..=b'f')) {
        return None;
    }
    let mut out = [0u8; 32];
    hex::decode_to_slice(s, &mut out).ok()?;
    Some(out)
}

// ---------------------------------------------------------------- recording

/// Records the first access of each chunk, in order, for a window of time after it starts.
/// Cheap on the read path: one relaxed atomic load once the window is over, else one mutex.
pub struct Recorder {
    /// Set once a call sees the window is over, so later calls skip the lock.
    done: AtomicBool,
    state: Mutex<RecorderState>,
}

struct RecorderState {
    started: Instant,
    window: Duration,
    seen: HashSet<u32>,
    /// Chunk table indexes in first-access order.
    order: Vec<u32>,
}

impl Recorder {
    /// A recorder that records from now for `window`.
    pub fn new(window: Duration) -> Arc<Recorder> {
        Arc::new(Recorder {
            done: AtomicBool::new(false),
            state: Mutex::new(RecorderState {
                started: Instant::now(),
                window,
                seen: HashSet::new(),
                order: Vec::new(),
            }),
        })
    }

    fn state(&self) -> std::sync::MutexGuard<'_, RecorderState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Forgets what was recorded and records again from now for `window` (a new run).
    pub fn restart(&self, window: Duration) {
        let mut state = self.state();
        state.started = Instant::now();
        state.window = window;
        state.seen.clear();
        state.order.clear();
        self.done.store(false, Ordering::Relaxed);
    }

    /// Whether the window is still open.
    pub fn is_recording(&self) -> bool {
        if self.done.load(Ordering::Relaxed) {
            return false;
        }
        let state = self.state();
        state.started.elapsed() < state.window
    }

    /// Notes an access of `chunk` (only its first access counts), if the window is open.
    pub fn record(&self, chunk: &ChunkRef) {
        if self.done.load(Ordering::Relaxed) {
            return;
        }
        let mut state = self.state();
        if state.started.elapsed() >= state.window || state.order.len() >= MAX_ENTRIES {
            self.done.store(true, Ordering::Relaxed);
            return;
        }
        if state.seen.insert(chunk.index) {
            state.order.push(chunk.index);
        }
    }

    /// How many chunks were recorded so far.
    pub fn len(&self) -> usize {
        self.state().order.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Chunk table indexes recorded so far, in first-access order.
    pub fn recorded(&self) -> Vec<u32> {
        self.state().order.clone()
    }

    /// The profile of what was recorded (one run) on image `image` (its manifest digest),
    /// resolved through `index`: each chunk's digest, and a file holding it (see
    /// [`ProfileEntry::path`]). Chunks `index` does not have, or that no file uses, are left
    /// out.
    pub fn profile(&self, image: &str, index: &Index) -> Profile {
        let order = self.recorded();
        let wanted: HashSet<u32> = order.iter().copied().collect();
        let places = match chunk_places(index, &wanted) {
            Ok(places) => places,
            Err(e) => {
                warn!("cannot resolve the recorded chunks through the index: {e}");
                HashMap::new()
            }
        };
        let n = order.len().max(1) as f64;
        let mut entries = Vec::with_capacity(order.len());
        let mut chunks = HashSet::new();
        for (i, c) in order.iter().enumerate() {
            let (Some(place), Ok(record)) = (places.get(c), index.chunk(*c)) else {
                continue;
            };
            let chunk = hex::encode(record.digest);
            // Two table entries of one digest (an image need not dedup) are one chunk.
            if !chunks.insert(chunk.clone()) {
                continue;
            }
            entries.push(ProfileEntry {
                chunk,
                path: place.path.clone(),
                offset: place.offset,
                len: place.len,
                seen: 1,
                rank: i as f64 / n,
            });
        }
        Profile {
            schema_version: PROFILE_SCHEMA_VERSION,
            image: image.to_string(),
            runs: 1,
            entries,
        }
    }
}

/// Where a chunk's data is used: the first file (in tree order) with an extent in it.
struct Place {
    path: String,
    offset: u64,
    len: u32,
}

/// The first file of each chunk in `wanted`, walking the tree depth first in name order.
fn chunk_places(index: &Index, wanted: &HashSet<u32>) -> Result<HashMap<u32, Place>, IndexError> {
    let mut places = HashMap::with_capacity(wanted.len());
    if wanted.is_empty() {
        return Ok(places);
    }
    let mut files_done = HashSet::new();
    // (directory inode, its path); a valid index's directories form a tree (checked when it
    // was opened), so this ends.
    let mut stack = vec![(ROOT_INO, String::new())];
    while let Some((dir, dir_path)) = stack.pop() {
        let inode = index.inode(dir)?;
        let mut subdirs = Vec::new();
        for d in inode.data_start..inode.data_start + inode.data_count {
            let entry: DirentRecord = index.record(Section::Dirents, d as usize)?;
            let name = index.string(entry.name_off, entry.name_len)?;
            let path = format!("{dir_path}/{}", String::from_utf8_lossy(name));
            let child = index.inode(entry.ino.into())?;
            match child.mode & S_IFMT {
                S_IFDIR => subdirs.push((u64::from(entry.ino), path)),
                S_IFREG if files_done.insert(entry.ino) => {
                    for e in child.data_start..child.data_start + child.data_count {
                        let ext: ExtentRecord = index.record(Section::Extents, e as usize)?;
                        if wanted.contains(&ext.chunk) && !places.contains_key(&ext.chunk) {
                            places.insert(
                                ext.chunk,
                                Place {
                                    path: path.clone(),
                                    offset: ext.file_off,
                                    len: ext.len,
                                },
                            );
                        }
                    }
                }
                _ => {}
            }
        }
        if places.len() == wanted.len() {
            break;
        }
        stack.extend(subdirs.into_iter().rev());
    }
    Ok(places)
}

/// A [`ChunkSource`] that tells a [`Recorder`] about every chunk read through it (not about
/// read-ahead hints, which are guesses) and forwards everything to `inner`.
pub struct RecordingSource {
    inner: Arc<dyn ChunkSource>,
    recorder: Arc<Recorder>,
}

impl RecordingSource {
    pub fn new(inner: Arc<dyn ChunkSource>, recorder: Arc<Recorder>) -> RecordingSource {
        RecordingSource { inner, recorder }
    }

    pub fn recorder(&self) -> &Arc<Recorder> {
        &self.recorder
    }
}

impl ChunkSource for RecordingSource {
    fn chunk(&self, chunk: &ChunkRef) -> Result<Arc<Vec<u8>>, SourceError> {
        self.recorder.record(chunk);
        self.inner.chunk(chunk)
    }

    fn chunk_in_memory(&self, chunk: &ChunkRef) -> Option<Arc<Vec<u8>>> {
        let hit = self.inner.chunk_in_memory(chunk)?;
        self.recorder.record(chunk);
        Some(hit)
    }

    fn read_ahead(&self, chunks: &[ChunkRef]) {
        self.inner.read_ahead(chunks)
    }

    fn speculate(&self, chunks: &[ChunkRef]) {
        self.inner.speculate(chunks)
    }
}

// ---------------------------------------------------------------- storage

/// `sha256-<hex>.json` for a manifest digest, checked so it cannot name another path.
fn file_name(image: &str) -> Result<String, ProfileError> {
    if !is_sha256_digest(image) {
        return Err(ProfileError::Invalid(format!(
            "image {image:?} is not a sha256:<64 hex> manifest digest"
        )));
    }
    Ok(format!("{}.json", image.replacen(':', "-", 1)))
}

/// Reads and parses the profile file at `path`; `None` when there is none.
fn read_file(path: &Path) -> Result<Option<Profile>, ProfileError> {
    let file = match std::fs::File::open(path) {
        Ok(file) => file,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io_error(path)(e)),
    };
    let len = file.metadata().map_err(io_error(path))?.len();
    if len > MAX_PROFILE_BYTES {
        return Err(ProfileError::TooLarge { len });
    }
    let mut bytes = Vec::with_capacity(len as usize);
    // Bounded again: the file may grow after the check.
    file.take(MAX_PROFILE_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(io_error(path))?;
    Profile::from_bytes(&bytes).map(Some)
}

/// Writes `profile` to `path` atomically (a temporary file in the same folder, renamed).
fn write_file(path: &Path, profile: &Profile) -> Result<(), ProfileError> {
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).map_err(io_error(dir))?;
    let mut tmp = tempfile::NamedTempFile::new_in(dir).map_err(io_error(dir))?;
    tmp.write_all(&profile.to_bytes()).map_err(io_error(path))?;
    tmp.as_file().sync_all().map_err(io_error(path))?;
    tmp.persist(path).map_err(|e| io_error(path)(e.error))?;
    Ok(())
}

/// The agent's own copy of the profile of `image` (a manifest digest) in `dir`
/// (`dir/sha256-<hex>.json`); `None` when there is none.
pub fn load_local(dir: &Path, image: &str) -> Result<Option<Profile>, ProfileError> {
    read_file(&dir.join(file_name(image)?))
}

/// Keeps `profile` in `dir` as `sha256-<hex>.json` (of its image), replacing what was there.
pub fn save_local(dir: &Path, profile: &Profile) -> Result<(), ProfileError> {
    write_file(&dir.join(file_name(&profile.image)?), profile)
}

/// Deletes the agent's copy of the profile of `image` in `dir`, if there is one.
pub fn remove_local(dir: &Path, image: &str) -> Result<(), ProfileError> {
    let path = dir.join(file_name(image)?);
    match std::fs::remove_file(&path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(io_error(&path)(e)),
        _ => Ok(()),
    }
}

/// The profile stored beside `image`, `None` when it has none. In a registry, the newest of
/// its profile referrers.
pub async fn fetch_profile(
    image: &OpenedImage,
    opts: &RemoteOptions,
) -> Result<Option<Profile>, ProfileError> {
    match &image.location {
        ImageLocation::Dir { path, .. } => read_file(&dir_profile_path(path, image)?),
        ImageLocation::Registry(r) => {
            let client = registry_client(&r.registry, opts)?;
            // The profile's blob through the image's store: a mirror serves it to a fleet.
            let blobs = image.store.as_ref();
            fetch_from_registry(&client, blobs, &r.repository, &image.manifest_digest).await
        }
        ImageLocation::S3(l) => {
            let s3 = s3_store(l, opts, 3).await?;
            fetch_from_s3(&s3).await
        }
    }
}

/// Stores `profile` beside `image` (see the module docs); returns where it went.
pub async fn push_profile(
    image: &OpenedImage,
    profile: &Profile,
    opts: &RemoteOptions,
) -> Result<String, ProfileError> {
    profile.validate()?;
    let where_to = match &image.location {
        ImageLocation::Dir { path, .. } => {
            let file = dir_profile_path(path, image)?;
            write_file(&file, profile)?;
            file.display().to_string()
        }
        ImageLocation::Registry(r) => {
            let client = registry_client(&r.registry, opts)?;
            let digest =
                push_to_registry(&client, &r.repository, &image.manifest_digest, profile).await?;
            format!("docker://{}/{}@{digest}", r.registry, r.repository)
        }
        ImageLocation::S3(l) => {
            let s3 = s3_store(l, opts, 3).await?;
            push_to_s3(&s3, profile).await?
        }
    };
    info!(
        image = %image.location,
        entries = profile.entries.len(),
        runs = profile.runs,
        "profile stored at {where_to}"
    );
    Ok(where_to)
}

fn dir_profile_path(store: &Path, image: &OpenedImage) -> Result<PathBuf, ProfileError> {
    Ok(store
        .join(DIR_PROFILES)
        .join(file_name(&image.manifest_digest)?))
}

async fn fetch_from_s3(s3: &S3Store) -> Result<Option<Profile>, ProfileError> {
    let key = s3.location().profile_key();
    match s3.get_object(&key, MAX_PROFILE_BYTES).await? {
        Some(bytes) => Profile::from_bytes(&bytes).map(Some),
        None => Ok(None),
    }
}

async fn push_to_s3(s3: &S3Store, profile: &Profile) -> Result<String, ProfileError> {
    let key = s3.location().profile_key();
    s3.put_bytes(&key, profile.to_bytes()).await?;
    Ok(s3.location().object_url(&key))
}

/// The profile artifact manifest: what a registry stores and the referrers list describes.
#[derive(Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct ArtifactManifest {
    schema_version: u32,
    media_type: String,
    artifact_type: String,
    config: fusefs::manifest::Descriptor,
    layers: Vec<fusefs::manifest::Descriptor>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    subject: Option<fusefs::manifest::Descriptor>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    annotations: Option<BTreeMap<String, String>>,
}

/// Pushes `profile` into `repo` as an artifact whose subject is the lazy manifest `subject`;
/// returns the artifact's manifest digest.
async fn push_to_registry(
    client: &RegistryClient,
    repo: &str,
    subject: &str,
    profile: &Profile,
) -> Result<String, ProfileError> {
    // The subject's size is part of its descriptor: take it from the registry, which also
    // checks the lazy image is in this repository.
    let lazy = client
        .get_manifest(repo, &Reference::Digest(subject.to_string()))
        .await?;
    let json = profile.to_bytes();
    let json_digest = sha256_digest(&json);
    let config_digest = sha256_digest(EMPTY_CONFIG);
    client
        .push_blob_bytes(repo, &config_digest, EMPTY_CONFIG)
        .await?;
    client.push_blob_bytes(repo, &json_digest, &json).await?;
    let descriptor = |media_type: &str, digest: String, size: usize| fusefs::manifest::Descriptor {
        media_type: media_type.to_string(),
        digest,
        size: size as u64,
        urls: None,
        annotations: None,
    };
    let created = humantime::format_rfc3339_nanos(SystemTime::now()).to_string();
    let manifest = ArtifactManifest {
        schema_version: 2,
        media_type: MEDIA_TYPE_OCI_MANIFEST.to_string(),
        artifact_type: PROFILE_ARTIFACT_TYPE.to_string(),
        config: descriptor(MEDIA_TYPE_EMPTY, config_digest, EMPTY_CONFIG.len()),
        layers: vec![descriptor(PROFILE_MEDIA_TYPE, json_digest, json.len())],
        subject: Some(descriptor(&lazy.media_type, lazy.digest, lazy.bytes.len())),
        annotations: Some(BTreeMap::from([(ANNOTATION_CREATED.to_string(), created)])),
    };
    let bytes = serde_json::to_vec(&manifest).expect("a manifest serializes");
    let reference = Reference::Digest(sha256_digest(&bytes));
    let pushed = client
        .put_manifest(repo, &reference, MEDIA_TYPE_OCI_MANIFEST, &bytes)
        .await?;
    if !pushed.subject_accepted {
        debug!(
            repo,
            "registry has no referrers API; updating the tag-schema index"
        );
        let referrer = Referrer::of_manifest(MEDIA_TYPE_OCI_MANIFEST, &bytes);
        client
            .add_referrer_fallback(repo, subject, &referrer)
            .await?;
    }
    Ok(pushed.digest)
}

/// The newest profile artifact referring to `subject` in `repo`, `None` when there is none; its
/// blob is read from `blobs` (the image's store, mirrors included) and checked against its
/// digest.
async fn fetch_from_registry(
    client: &RegistryClient,
    blobs: &dyn BlobStore,
    repo: &str,
    subject: &str,
) -> Result<Option<Profile>, ProfileError> {
    let referrers = client
        .referrers(repo, subject, Some(PROFILE_ARTIFACT_TYPE))
        .await?;
    let created = |r: &Referrer| {
        r.annotations
            .as_ref()
            .and_then(|a| a.get(ANNOTATION_CREATED))
            .and_then(|t| humantime::parse_rfc3339(t).ok())
    };
    // Newest by `created`; without one, oldest; equal: the one listed last.
    let Some(newest) = referrers
        .iter()
        .enumerate()
        .max_by_key(|(i, r)| (created(r), *i))
        .map(|(_, r)| r)
    else {
        return Ok(None);
    };
    let location = format!("docker://{}/{repo}@{}", client.registry(), newest.digest);
    let bad = |reason: String| ProfileError::BadArtifact {
        location: location.clone(),
        reason,
    };
    let manifest = client
        .get_manifest(repo, &Reference::Digest(newest.digest.clone()))
        .await?;
    let artifact: ArtifactManifest = serde_json::from_slice(&manifest.bytes)
        .map_err(|e| bad(format!("manifest is not an OCI manifest: {e}")))?;
    if artifact.artifact_type != PROFILE_ARTIFACT_TYPE {
        return Err(bad(format!("artifactType is {:?}", artifact.artifact_type)));
    }
    let [layer] = artifact.layers.as_slice() else {
        return Err(bad(format!(
            "{} layers, expected one",
            artifact.layers.len()
        )));
    };
    if layer.media_type != PROFILE_MEDIA_TYPE {
        return Err(bad(format!("layer media type is {:?}", layer.media_type)));
    }
    if layer.size > MAX_PROFILE_BYTES {
        return Err(ProfileError::TooLarge { len: layer.size });
    }
    let bytes = blobs.read_blob(&layer.digest, MAX_PROFILE_BYTES).await?;
    if sha256_digest(&bytes) != layer.digest {
        return Err(bad(format!(
            "its blob does not match its digest {}",
            layer.digest
        )));
    }
    let profile = Profile::from_bytes(&bytes)?;
    if profile.image != subject {
        // Entries are by chunk digest, so it still applies to what this image shares with it.
        debug!(
            %location,
            recorded_on = %profile.image,
            "the profile was recorded on another image"
        );
    }
    debug!(%location, entries = profile.entries.len(), "found a profile");
    Ok(Some(profile))
}

#[cfg(test)]
mod tests {
    use super::*;
    use fusefs::chunk::encode_chunk;
    use fusefs::format::{BlobRecord, ChunkRecord};
    use fusefs::manifest::{
        Descriptor, LazyManifest, MEDIA_TYPE_BLOB, MEDIA_TYPE_INDEX, MEDIA_TYPE_OCI_CONFIG,
    };
    use fusefs::writer::{IndexWriter, NodeSpec};

    use crate::remote::open_image;
    use crate::store::LocalStore;

    const IMAGE: &str = "sha256:1111111111111111111111111111111111111111111111111111111111111111";

    fn digest_hex(n: u8) -> String {
        format!("{n:02x}").repeat(32)
    }

    fn entry(chunk: u8, rank: f64) -> ProfileEntry {
        ProfileEntry {
            chunk: digest_hex(chunk),
            path: format!("/f{chunk}"),
            offset: 0,
            len: 100,
            seen: 1,
            rank,
        }
    }

    /// One run that read `chunks` in this order.
    fn run(chunks: &[u8]) -> Profile {
        let n = chunks.len() as f64;
        Profile {
            runs: 1,
            entries: chunks
                .iter()
                .enumerate()
                .map(|(i, c)| entry(*c, i as f64 / n))
                .collect(),
            ..Profile::new(IMAGE)
        }
    }

    fn order(p: &Profile) -> Vec<String> {
        p.entries.iter().map(|e| e.path.clone()).collect()
    }

    #[test]
    fn round_trips_through_json() {
        let mut p = run(&[3, 1, 2]);
        p.entries[1].path = "/usr/lib/libc.so.6".into();
        p.entries[1].offset = 1 << 20;
        let bytes = p.to_bytes();
        assert_eq!(Profile::from_bytes(&bytes).unwrap(), p);
        let text = String::from_utf8(bytes).unwrap();
        assert!(
            text.starts_with(r#"{"schema_version":1,"image":"sha256:"#),
            "{text}"
        );
    }

    #[test]
    fn every_truncation_is_an_error() {
        let bytes = run(&[1, 2]).to_bytes();
        for len in 0..bytes.len() {
            let err = Profile::from_bytes(&bytes[..len]).unwrap_err();
            assert!(matches!(err, ProfileError::Json(_)), "{len}: {err}");
        }
    }

    #[test]
    fn hostile_profiles_are_refused_with_the_reason() {
        let good = run(&[1, 2]);
        let reject = |p: &Profile, expect: &str| {
            let err = Profile::from_bytes(&p.to_bytes()).unwrap_err();
            assert!(err.to_string().contains(expect), "{err} lacks {expect:?}");
            assert!(err.is_permanent());
        };
        let mut p = good.clone();
        p.image = "sha256:../../etc/passwd".into();
        reject(&p, "is not a sha256:<64 hex> manifest digest");
        let mut p = good.clone();
        p.entries[1].chunk = "ABC".into();
        reject(
            &p,
            "entry 1 (chunk \"ABC\"): the chunk is not 64 lower-case hex digits",
        );
        let mut p = good.clone();
        p.entries[1].chunk = p.entries[0].chunk.clone();
        reject(&p, "the chunk is listed twice");
        let mut p = good.clone();
        p.entries[0].path = "relative/path".into();
        reject(&p, "path must be absolute");
        let mut p = good.clone();
        p.entries[0].path = format!("/{}", "a".repeat(PATH_MAX));
        reject(&p, "path must be absolute, at most 4096 bytes");
        let mut p = good.clone();
        p.entries[0].seen = 2;
        reject(&p, "seen 2 is outside 1..=1");
        let mut p = good.clone();
        p.entries[0].len = 0;
        reject(&p, "len 0 is outside");
        let mut p = good.clone();
        p.entries[0].offset = u64::MAX;
        reject(&p, "len 100 is outside");
        let mut p = good.clone();
        p.entries[0].rank = 1.5;
        reject(&p, "rank 1.5 is outside 0..=1");

        // Another schema version: said so, before its fields are looked at.
        let text = String::from_utf8(good.to_bytes()).unwrap();
        let v2 = text.replace(r#""schema_version":1"#, r#""schema_version":2,"new":[]"#);
        let err = Profile::from_bytes(v2.as_bytes()).unwrap_err();
        assert!(matches!(err, ProfileError::Version { found: 2 }), "{err}");
        // Unknown fields, wrong types, nesting bombs, garbage: JSON errors, no panic.
        let extra = text.replace(r#""runs":1"#, r#""runs":1,"extra":true"#);
        let err = Profile::from_bytes(extra.as_bytes()).unwrap_err();
        assert!(err.to_string().contains("unknown field `extra`"), "{err}");
        let negative = text.replace(r#""runs":1"#, r#""runs":-1"#);
        assert!(matches!(
            Profile::from_bytes(negative.as_bytes()),
            Err(ProfileError::Json(_))
        ));
        let bomb = format!("{}{}", "[".repeat(100_000), "]".repeat(100_000));
        assert!(matches!(
            Profile::from_bytes(bomb.as_bytes()),
            Err(ProfileError::Json(_))
        ));
        for junk in [&b""[..], b"null", b"{}", b"\xff\xfe", b"[1,2]"] {
            assert!(Profile::from_bytes(junk).is_err());
        }

        // Size and count limits. Zeroed pages are not touched by the size check.
        let huge = vec![0u8; MAX_PROFILE_BYTES as usize + 1];
        let err = Profile::from_bytes(&huge).unwrap_err();
        assert!(matches!(err, ProfileError::TooLarge { .. }), "{err}");
        let mut p = good;
        p.entries = vec![entry(1, 0.0); MAX_ENTRIES + 1];
        let err = p.validate().unwrap_err();
        assert!(
            err.to_string()
                .contains(&format!("{} entries, over the limit", MAX_ENTRIES + 1)),
            "{err}"
        );
    }

    #[test]
    fn merge_orders_by_mean_rank_over_the_runs_that_read_each_chunk() {
        // Run 1 reads 1 2 3 4; run 2 reads 2 1 5; run 3 reads 5 only (a short run weighs like
        // a long one: its only chunk has rank 0).
        let mut merged = Profile::new(IMAGE);
        merged.merge(&run(&[1, 2, 3, 4]));
        assert_eq!(merged, run(&[1, 2, 3, 4]));
        merged.merge(&run(&[2, 1, 5]));
        // 1: (0 + 1/3)/2 = 0.167, 2: (0.25 + 0)/2 = 0.125, 3: 0.5, 4: 0.75, 5: 0.667.
        assert_eq!(order(&merged), ["/f2", "/f1", "/f3", "/f5", "/f4"]);
        merged.merge(&run(&[5]));
        // 5: (2/3 + 0)/2 = 0.333.
        assert_eq!(order(&merged), ["/f2", "/f1", "/f5", "/f3", "/f4"]);
        assert_eq!(merged.runs, 3);
        let seen: Vec<u32> = merged.entries.iter().map(|e| e.seen).collect();
        assert_eq!(seen, [2, 2, 2, 1, 1]);
        // Still a valid profile.
        assert_eq!(Profile::from_bytes(&merged.to_bytes()).unwrap(), merged);
        // Merging is by mean, so the order in which runs are merged does not matter.
        let mut other = Profile::new(IMAGE);
        for r in [run(&[5]), run(&[2, 1, 5]), run(&[1, 2, 3, 4])] {
            other.merge(&r);
        }
        assert_eq!(order(&other), order(&merged));
    }

    fn chunk_ref(index: u32) -> ChunkRef {
        ChunkRef {
            index,
            record: ChunkRecord::default(),
            blob_digest: String::new(),
        }
    }

    #[test]
    fn recorder_keeps_first_accesses_in_order() {
        let recorder = Recorder::new(Duration::from_secs(60));
        for i in [7, 3, 7, 9, 3, 1] {
            recorder.record(&chunk_ref(i));
        }
        assert_eq!(recorder.recorded(), [7, 3, 9, 1]);
        assert!(recorder.is_recording());
    }

    #[test]
    fn recorder_stops_after_its_window_and_restarts() {
        let recorder = Recorder::new(Duration::from_millis(100));
        recorder.record(&chunk_ref(1));
        std::thread::sleep(Duration::from_millis(150));
        assert!(!recorder.is_recording());
        recorder.record(&chunk_ref(2));
        assert_eq!(recorder.recorded(), [1]);
        recorder.restart(Duration::from_secs(60));
        assert!(recorder.is_recording());
        recorder.record(&chunk_ref(2));
        assert_eq!(recorder.recorded(), [2]);
    }

    /// Counts what reaches it.
    #[derive(Default)]
    struct Counting {
        chunks: Mutex<Vec<u32>>,
        hinted: Mutex<Vec<u32>>,
    }

    impl ChunkSource for Counting {
        fn chunk(&self, chunk: &ChunkRef) -> Result<Arc<Vec<u8>>, SourceError> {
            self.chunks.lock().unwrap().push(chunk.index);
            Ok(Arc::new(vec![chunk.index as u8]))
        }
        fn read_ahead(&self, chunks: &[ChunkRef]) {
            self.hinted
                .lock()
                .unwrap()
                .extend(chunks.iter().map(|c| c.index));
        }
    }

    #[test]
    fn recording_source_records_reads_but_not_read_ahead() {
        let inner = Arc::new(Counting::default());
        let recorder = Recorder::new(Duration::from_secs(60));
        let source = RecordingSource::new(inner.clone(), recorder.clone());
        source.read_ahead(&[chunk_ref(5), chunk_ref(6)]);
        for i in [2, 0, 2] {
            assert_eq!(*source.chunk(&chunk_ref(i)).unwrap(), vec![i as u8]);
        }
        assert_eq!(recorder.recorded(), [2, 0]);
        assert_eq!(*inner.chunks.lock().unwrap(), [2, 0, 2]);
        assert_eq!(*inner.hinted.lock().unwrap(), [5, 6]);
    }

    // ------------------------------------------------------------ a small real image

    /// Chunk size of the test image (the smallest the format allows).
    const CS: usize = 4096;

    /// `len` bytes that do not repeat within a chunk, different for each `seed`.
    fn bytes_of(seed: u8, len: usize) -> Vec<u8> {
        lazy_tests::pseudo_random_bytes(seed.into(), len)
    }

    /// An image (index, data blob) of `/bin/app` (3 chunks: 0, 1, 2), `/etc/a.conf` and
    /// `/etc/b.conf` (sharing chunk 3) and `/lib/x` (chunk 4).
    fn image_bytes() -> (Vec<u8>, Vec<u8>) {
        let app = bytes_of(1, 2 * CS + 1808);
        let a = bytes_of(2, 100);
        let b = bytes_of(3, 200);
        let x = bytes_of(4, 3000);
        let raws = [
            app[..CS].to_vec(),
            app[CS..2 * CS].to_vec(),
            app[2 * CS..].to_vec(),
            [a.clone(), b.clone()].concat(),
            x.clone(),
        ];
        let mut blob = Vec::new();
        let mut records = Vec::new();
        for raw in &raws {
            let e = encode_chunk(raw, 3).unwrap();
            records.push(ChunkRecord {
                blob: 0,
                flags: e.flags,
                comp_off: blob.len() as u64,
                comp_len: e.stored.len() as u32,
                raw_len: e.raw_len,
                crc32: e.crc32,
                digest: e.digest,
            });
            blob.extend_from_slice(&e.stored);
        }
        let mut sha = [0u8; 32];
        hex::decode_to_slice(&sha256_digest(&blob)[7..], &mut sha).unwrap();
        let mut w = IndexWriter::new(CS as u32);
        w.add_blob(BlobRecord {
            sha256: sha,
            size: blob.len() as u64,
        });
        for r in records {
            w.add_chunk(r);
        }
        let ext = |file_off: u64, chunk: u32, chunk_off: u32, len: usize| ExtentRecord {
            file_off,
            chunk,
            chunk_off,
            len: len as u32,
        };
        let root = w.root();
        let bin = w.add_child(root, b"bin", NodeSpec::dir(0o755)).unwrap();
        let etc = w.add_child(root, b"etc", NodeSpec::dir(0o755)).unwrap();
        let lib = w.add_child(root, b"lib", NodeSpec::dir(0o755)).unwrap();
        let app_extents = vec![
            ext(0, 0, 0, CS),
            ext(CS as u64, 1, 0, CS),
            ext(2 * CS as u64, 2, 0, 1808),
        ];
        w.add_child(
            bin,
            b"app",
            NodeSpec::file(0o755, app.len() as u64, app_extents),
        )
        .unwrap();
        w.add_child(
            etc,
            b"b.conf",
            NodeSpec::file(0o644, 200, vec![ext(0, 3, 100, 200)]),
        )
        .unwrap();
        w.add_child(
            etc,
            b"a.conf",
            NodeSpec::file(0o644, 100, vec![ext(0, 3, 0, 100)]),
        )
        .unwrap();
        w.add_child(
            lib,
            b"x",
            NodeSpec::file(0o644, 3000, vec![ext(0, 4, 0, 3000)]),
        )
        .unwrap();
        (w.finish().unwrap(), blob)
    }

    /// A `dir:` store holding the test image as `latest`.
    fn store_with_image(dir: &Path) -> LocalStore {
        let (index, blob) = image_bytes();
        let store = LocalStore::create(dir).unwrap();
        let config =
            br#"{"architecture":"amd64","os":"linux","rootfs":{"type":"layers","diff_ids":[]}}"#;
        let desc = |media_type: &str, bytes: &[u8]| Descriptor {
            media_type: media_type.into(),
            digest: store.put_blob(bytes).unwrap(),
            size: bytes.len() as u64,
            urls: None,
            annotations: None,
        };
        let manifest = LazyManifest::new(
            desc(MEDIA_TYPE_OCI_CONFIG, config),
            desc(MEDIA_TYPE_INDEX, &index),
            vec![desc(MEDIA_TYPE_BLOB, &blob)],
        );
        store.put_manifest("latest", &manifest).unwrap();
        store
    }

    fn recorded_run(index: &Index, image: &str, chunks: &[u32]) -> Profile {
        let recorder = Recorder::new(Duration::from_secs(60));
        for &c in chunks {
            recorder.record(&chunk_ref(c));
        }
        recorder.profile(image, index)
    }

    #[test]
    fn recorded_chunks_resolve_to_digests_and_files_and_back() {
        let (bytes, _) = image_bytes();
        let index = Index::from_bytes(bytes).unwrap();
        // 99 is not in the image: left out.
        let p = recorded_run(&index, IMAGE, &[4, 3, 99, 1]);
        let places: Vec<(&str, u64, u32)> = p
            .entries
            .iter()
            .map(|e| (e.path.as_str(), e.offset, e.len))
            .collect();
        assert_eq!(
            places,
            [
                ("/lib/x", 0, 3000),
                // Shared chunk: the first file in name order.
                ("/etc/a.conf", 0, 100),
                ("/bin/app", CS as u64, CS as u32),
            ]
        );
        let ranks: Vec<f64> = p.entries.iter().map(|e| e.rank).collect();
        assert_eq!(ranks, [0.0, 0.25, 0.75]);
        for (e, c) in p.entries.iter().zip([4, 3, 1]) {
            assert_eq!(e.chunk, hex::encode(index.chunk(c).unwrap().digest));
        }
        assert_eq!(Profile::from_bytes(&p.to_bytes()).unwrap(), p);

        // Back to chunk refs, in profile order; a digest the image lacks is skipped.
        let mut applied = p.clone();
        applied.entries.insert(1, entry(0xee, 0.1));
        let refs = applied.chunks(&index);
        assert_eq!(refs.iter().map(|c| c.index).collect::<Vec<_>>(), [4, 3, 1]);
        let blob = format!("sha256:{}", hex::encode(index.blobs().unwrap()[0].sha256));
        assert!(refs.iter().all(|c| c.blob_digest == blob));
        let stored: u64 = [4, 3, 1]
            .iter()
            .map(|&c| u64::from(index.chunk(c).unwrap().comp_len))
            .sum();
        assert_eq!(applied.stored_bytes(&index), stored);
    }

    #[test]
    fn local_copies_are_kept_by_image_digest() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(load_local(dir.path(), IMAGE).unwrap(), None);
        let p = run(&[1, 2]);
        save_local(dir.path(), &p).unwrap();
        let file = dir.path().join(format!("sha256-{}.json", &IMAGE[7..]));
        assert!(file.is_file());
        assert_eq!(load_local(dir.path(), IMAGE).unwrap(), Some(p.clone()));
        let mut p2 = p.clone();
        p2.merge(&run(&[3]));
        save_local(dir.path(), &p2).unwrap();
        assert_eq!(load_local(dir.path(), IMAGE).unwrap(), Some(p2));
        assert!(load_local(dir.path(), "sha256:../../x").is_err());
        std::fs::write(&file, b"{\"schema_version\":1").unwrap();
        let err = load_local(dir.path(), IMAGE).unwrap_err();
        assert!(matches!(err, ProfileError::Json(_)), "{err}");
    }

    #[tokio::test]
    async fn dir_store_keeps_profiles_beside_the_image() {
        let dir = tempfile::tempdir().unwrap();
        store_with_image(dir.path());
        let location = ImageLocation::parse(&format!("dir:{}", dir.path().display())).unwrap();
        let opts = RemoteOptions::default();
        let image = open_image(&location, &opts, None).await.unwrap();
        assert_eq!(fetch_profile(&image, &opts).await.unwrap(), None);
        let p = recorded_run(&image.index, &image.manifest_digest, &[2, 0]);
        let at = push_profile(&image, &p, &opts).await.unwrap();
        let expected = dir
            .path()
            .join("profiles")
            .join(format!("sha256-{}.json", &image.manifest_digest[7..]));
        assert_eq!(at, expected.display().to_string());
        assert_eq!(fetch_profile(&image, &opts).await.unwrap(), Some(p));
    }

    /// Against the real Debian `docker-registry` (no referrers API: the tag-schema fallback).
    #[tokio::test]
    #[cfg_attr(
        not(feature = "system-tests"),
        ignore = "needs docker-registry (scripts/setup.sh installs it)"
    )]
    async fn registry_keeps_profiles_as_referrers_of_the_lazy_image_newest_first() {
        use crate::push::push_image;
        use crate::registry::{referrers_tag, ClientOptions};
        use lazy_tests::registry::LocalRegistry;

        let registry = LocalRegistry::start().unwrap();
        let dir = tempfile::tempdir().unwrap();
        let store = store_with_image(dir.path());
        let location =
            ImageLocation::parse(&format!("docker://{}/test/prof:v1-lazy", registry.host()))
                .unwrap();
        let opts = RemoteOptions::default();
        push_image(&store, "latest", &location, None, &opts)
            .await
            .unwrap();
        let image = open_image(&location, &opts, None).await.unwrap();
        assert_eq!(fetch_profile(&image, &opts).await.unwrap(), None);

        let first = recorded_run(&image.index, &image.manifest_digest, &[4, 3]);
        let at = push_profile(&image, &first, &opts).await.unwrap();
        assert!(
            at.starts_with(&format!("docker://{}/test/prof@sha256:", registry.host())),
            "{at}"
        );
        assert_eq!(
            fetch_profile(&image, &opts).await.unwrap(),
            Some(first.clone())
        );
        let mut second = first.clone();
        second.merge(&recorded_run(&image.index, &image.manifest_digest, &[1, 4]));
        push_profile(&image, &second, &opts).await.unwrap();
        assert_eq!(fetch_profile(&image, &opts).await.unwrap(), Some(second));

        // What the registry holds: two artifacts in the lazy image's referrers tag, each an
        // OCI manifest with the empty config, one JSON layer and the lazy image as subject.
        let client = RegistryClient::new(&registry.host(), ClientOptions::default()).unwrap();
        let listed = client
            .referrers("test/prof", &image.manifest_digest, None)
            .await
            .unwrap();
        assert_eq!(listed.len(), 2, "{listed:?}");
        assert!(listed
            .iter()
            .all(|r| r.artifact_type.as_deref() == Some(PROFILE_ARTIFACT_TYPE)));
        let tag = referrers_tag(&image.manifest_digest).unwrap();
        assert!(client
            .get_manifest("test/prof", &Reference::Tag(tag))
            .await
            .is_ok());
        let m = client
            .get_manifest("test/prof", &Reference::Digest(listed[0].digest.clone()))
            .await
            .unwrap();
        let artifact: serde_json::Value = serde_json::from_slice(&m.bytes).unwrap();
        assert_eq!(artifact["config"]["mediaType"], MEDIA_TYPE_EMPTY);
        assert_eq!(artifact["config"]["size"], 2);
        assert_eq!(artifact["layers"][0]["mediaType"], PROFILE_MEDIA_TYPE);
        assert_eq!(
            artifact["subject"]["digest"],
            image.manifest_digest.as_str()
        );
        let created = artifact["annotations"][ANNOTATION_CREATED]
            .as_str()
            .unwrap();
        assert!(humantime::parse_rfc3339(created).is_ok(), "{created}");
    }

    /// Against moto (`PREFIX/profile.json`).
    #[tokio::test]
    #[cfg_attr(
        not(feature = "system-tests"),
        ignore = "needs moto_server (scripts/setup.sh installs it)"
    )]
    async fn s3_keeps_the_profile_under_the_image_prefix() {
        use crate::s3::{S3Location, S3Options};
        use lazy_tests::s3::{MotoServer, ACCESS_KEY_ID, REGION, SECRET_ACCESS_KEY};

        let moto = MotoServer::start();
        moto.create_bucket("images");
        let location = S3Location::parse("s3://images/app/v1").unwrap();
        let s3 = S3Store::connect(
            location,
            &S3Options {
                max_attempts: 1,
                endpoint_url: Some(moto.endpoint()),
                region: Some(REGION.into()),
                credentials: Some((ACCESS_KEY_ID.into(), SECRET_ACCESS_KEY.into())),
                ..S3Options::default()
            },
        )
        .await
        .unwrap();
        assert_eq!(fetch_from_s3(&s3).await.unwrap(), None);
        let p = run(&[1, 2, 3]);
        let at = push_to_s3(&s3, &p).await.unwrap();
        assert_eq!(at, "s3://images/app/v1/profile.json");
        assert_eq!(fetch_from_s3(&s3).await.unwrap(), Some(p));
        s3.put_bytes("app/v1/profile.json", b"[1,2".to_vec())
            .await
            .unwrap();
        let err = fetch_from_s3(&s3).await.unwrap_err();
        assert!(matches!(err, ProfileError::Json(_)), "{err}");
    }
}
