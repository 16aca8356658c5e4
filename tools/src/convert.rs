//! `lazyctl convert`: source image (or directory) -> lazy image in a local store.
//!
//! Layers are converted in order. Each becomes one data blob (its chunks, written by the
//! packer) while its entries are merged into one tree; a layer's blob is moved into the store
//! only after the layer's digest checked out. Then the tree becomes the index, and the
//! manifest naming config, index and blobs is stored and tagged. Nothing is tagged unless
//! every step succeeded, so a failed conversion leaves the store as it was (plus, at most,
//! complete blobs no manifest names yet).
//!
//! With `--reference` (an `s3://` source only), nothing is packed: the objects are indexed in
//! place (`s3source::index_objects`) and the manifest names them as external blobs, so only the
//! index, config and manifest are stored.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use agent::profile::Profile;
use agent::remote::RemoteOptions;
use agent::store::LocalStore;
use fusefs::format::BlobRecord;
use fusefs::manifest::{
    Descriptor, LazyManifest, ANNOTATION_SOURCE, ANNOTATION_SOURCE_LAYER, MEDIA_TYPE_BLOB,
    MEDIA_TYPE_INDEX, MEDIA_TYPE_OCI_CONFIG,
};
use fusefs::writer::IndexWriter;
use tracing::info;

use crate::compression::Compression;
use crate::error::ConvertError;
use crate::image::{self, Expected, SourceLayer};
use crate::layer::{apply_tar, decompress, open_blob, HashingReader};
use crate::layout::HotLayout;
use crate::packer::{ChunkTable, FinishedBlob, LayerPacker};
use crate::progress::Progress;
use crate::reference::{SourceRef, StoreRef};
use crate::source;
use crate::tree::Tree;

/// Knobs of a conversion.
#[derive(Debug, Clone)]
pub struct ConvertOptions {
    /// Uncompressed chunk size in bytes.
    pub chunk_size: u32,
    /// zstd level.
    pub level: i32,
    /// Compression threads.
    pub jobs: usize,
    /// Show a progress bar on a terminal.
    pub progress: bool,
    /// An access profile: the data it read is written first in each layer's blob, in the
    /// order it was read (see `layout`). The image's content is the same either way.
    pub profile: Option<Arc<Profile>>,
    /// Which chunks are compressed (`--compression`).
    pub compression: Compression,
    /// Index an `s3://` source's objects in place instead of copying them (`--reference`).
    pub reference: bool,
    /// Timeouts for reading an `s3://` source.
    pub remote: RemoteOptions,
}

impl Default for ConvertOptions {
    fn default() -> Self {
        ConvertOptions {
            chunk_size: fusefs::format::DEFAULT_CHUNK_SIZE,
            level: fusefs::chunk::DEFAULT_ZSTD_LEVEL,
            jobs: std::thread::available_parallelism().map_or(2, |n| n.get()),
            progress: true,
            profile: None,
            compression: Compression::Auto,
            reference: false,
            remote: RemoteOptions::default(),
        }
    }
}

/// What a conversion produced.
#[derive(Debug, Clone)]
pub struct ConvertReport {
    pub manifest_digest: String,
    pub layers: usize,
    pub entries: usize,
    pub inodes: usize,
    /// Uncompressed file bytes read.
    pub input_bytes: u64,
    /// Bytes of all data blobs.
    pub stored_bytes: u64,
    pub index_bytes: u64,
    pub chunks: usize,
    pub deduplicated_chunks: u64,
    pub seconds: f64,
}

impl ConvertReport {
    pub fn summary(&self) -> String {
        format!(
            "converted {} layer(s), {} entries, {:.1} MiB of file data -> {:.1} MiB in {} chunks ({} deduplicated) + {:.1} KiB index in {:.2} s ({:.0} MB/s); manifest {}",
            self.layers,
            self.entries,
            self.input_bytes as f64 / (1 << 20) as f64,
            self.stored_bytes as f64 / (1 << 20) as f64,
            self.chunks,
            self.deduplicated_chunks,
            self.index_bytes as f64 / 1024.0,
            self.seconds,
            self.input_bytes as f64 / 1e6 / self.seconds.max(1e-9),
            self.manifest_digest
        )
    }
}

fn validate(src: &SourceRef, opts: &ConvertOptions) -> Result<(), ConvertError> {
    use fusefs::format::{MAX_CHUNK_SIZE, MIN_CHUNK_SIZE};
    if opts.reference {
        if !matches!(src, SourceRef::S3 { .. }) {
            return Err(ConvertError::Source(
                "--reference indexes existing S3 objects in place: the source must be                  s3://BUCKET/PREFIX/; drop --reference to copy other sources into the image"
                    .into(),
            ));
        }
        if opts.compression != Compression::None {
            return Err(ConvertError::Source(format!(
                "--reference keeps the objects as they are (uncompressed): --compression {}                  cannot apply; drop it or pass --compression none",
                opts.compression
            )));
        }
        if opts.profile.is_some() {
            return Err(ConvertError::Source(
                "--reference keeps the objects as they are: --profile cannot reorder them;                  drop one of the two"
                    .into(),
            ));
        }
    }
    if !(MIN_CHUNK_SIZE..=MAX_CHUNK_SIZE).contains(&opts.chunk_size) {
        return Err(ConvertError::Source(format!(
            "chunk size {} is outside {MIN_CHUNK_SIZE}..={MAX_CHUNK_SIZE} bytes",
            opts.chunk_size
        )));
    }
    Ok(())
}

/// Converts `src` into the store `dst`.
pub fn convert(
    src: &SourceRef,
    dst: &StoreRef,
    opts: &ConvertOptions,
) -> Result<ConvertReport, ConvertError> {
    validate(src, opts)?;
    let started = Instant::now();
    let store = LocalStore::create(&dst.path)?;
    let input = Arc::new(AtomicU64::new(0));
    let mut tree = Tree::new();
    let mut table = ChunkTable::default();
    let mut blobs: Vec<(Descriptor, BlobRecord)> = Vec::new();
    let layout = opts
        .profile
        .as_ref()
        .map(|p| Arc::new(HotLayout::from_profile(p)));

    let (config, source_name) = match src {
        SourceRef::Path { dir } => {
            let _progress = Progress::start(opts.progress, "converting", 0, input.clone());
            let packer = start_packer(&store, table, 0, opts, &input, &layout)?;
            let (packer, result) = run(packer, |p| crate::dirsource::apply_dir(dir, &mut tree, p));
            result?;
            let (t, blob) = packer.finish()?;
            table = t;
            blobs.push(commit(&store, blob, None)?);
            (directory_config(), format!("path:{}", dir.display()))
        }
        SourceRef::S3 { location } => {
            let objects = crate::s3source::ObjectSource::open(location, &opts.remote)?;
            let _progress = Progress::start(opts.progress, "converting", 0, input.clone());
            if opts.reference {
                let indexed =
                    crate::s3source::index_objects(&objects, &mut tree, opts.chunk_size, &input)?;
                table = indexed.table;
                blobs = indexed.blobs;
            } else {
                let packer = start_packer(&store, table, 0, opts, &input, &layout)?;
                let (packer, result) = run(packer, |p| {
                    crate::s3source::apply_objects(&objects, &mut tree, p)
                });
                result?;
                let (t, blob) = packer.finish()?;
                table = t;
                blobs.push(commit(&store, blob, None)?);
            }
            (directory_config(), format!("{location}/"))
        }
        other => {
            let image = source::open(other)?;
            let total: u64 = image.layers.iter().map(|l| l.size).sum();
            let read = Arc::new(AtomicU64::new(0));
            let _progress = Progress::start(opts.progress, "converting", total, read.clone());
            for (i, layer) in image.layers.iter().enumerate() {
                let packer = start_packer(&store, table, i as u32, opts, &input, &layout)?;
                let (t, blob) = convert_layer(layer, i as u32, &mut tree, packer, &read)?;
                table = t;
                let source_digest = match &layer.expected {
                    Expected::Blob(d) | Expected::Uncompressed(d) => d.clone(),
                };
                blobs.push(commit(&store, blob, Some(source_digest))?);
            }
            (image.config, source_name(other))
        }
    };

    let mut writer = IndexWriter::new(opts.chunk_size);
    for (_, record) in &blobs {
        writer.add_blob(*record);
    }
    for record in &table.records {
        writer.add_chunk(*record);
    }
    tree.write_index(&mut writer, &|p| table.resolve(p))?;
    let inodes = writer.inode_count();
    let index = writer.finish()?;
    let index_digest = store.put_blob(&index)?;
    let config_digest = store.put_blob(&config)?;
    let mut manifest = LazyManifest::new(
        Descriptor {
            media_type: MEDIA_TYPE_OCI_CONFIG.to_string(),
            digest: config_digest,
            size: config.len() as u64,
            urls: None,
            annotations: None,
        },
        Descriptor {
            media_type: MEDIA_TYPE_INDEX.to_string(),
            digest: index_digest,
            size: index.len() as u64,
            urls: None,
            annotations: None,
        },
        blobs.iter().map(|(d, _)| d.clone()).collect(),
    );
    manifest.annotations = Some(BTreeMap::from([(
        ANNOTATION_SOURCE.to_string(),
        source_name,
    )]));
    let manifest_digest = store.put_manifest(&dst.tag, &manifest)?;
    let report = ConvertReport {
        manifest_digest,
        layers: blobs.len(),
        entries: tree.entry_count(),
        inodes,
        input_bytes: input.load(Ordering::Relaxed),
        // Objects indexed in place (`--reference`) are not stored by the image.
        stored_bytes: blobs
            .iter()
            .filter(|(d, _)| d.external_url().is_none())
            .map(|(d, _)| d.size)
            .sum(),
        index_bytes: index.len() as u64,
        chunks: table.records.len(),
        deduplicated_chunks: table.deduplicated,
        seconds: started.elapsed().as_secs_f64(),
    };
    tracing::debug!("{}", report.summary());
    Ok(report)
}

fn source_name(src: &SourceRef) -> String {
    match src {
        SourceRef::Oci { path, tag } => match tag {
            Some(t) => format!("oci:{}:{t}", path.display()),
            None => format!("oci:{}", path.display()),
        },
        SourceRef::OciArchive { path } => format!("oci-archive:{}", path.display()),
        SourceRef::DockerArchive { path } => format!("docker-archive:{}", path.display()),
        SourceRef::Docker { reference } => format!("docker://{reference}"),
        SourceRef::Path { dir } => format!("path:{}", dir.display()),
        SourceRef::S3 { location } => format!("{location}/"),
    }
}

/// Runs `f` with the packer; if `f` fails, the packer is still shut down cleanly.
fn run<T>(
    mut packer: LayerPacker,
    f: impl FnOnce(&mut LayerPacker) -> Result<T, ConvertError>,
) -> (LayerPacker, Result<T, ConvertError>) {
    let r = f(&mut packer);
    (packer, r)
}

fn start_packer(
    store: &LocalStore,
    table: ChunkTable,
    blob_index: u32,
    opts: &ConvertOptions,
    input: &Arc<AtomicU64>,
    layout: &Option<Arc<HotLayout>>,
) -> Result<LayerPacker, ConvertError> {
    Ok(LayerPacker::start(
        table,
        blob_index,
        store.temp_file()?,
        opts.chunk_size,
        opts.level,
        opts.jobs,
        input.clone(),
    )
    .with_layout(layout.clone())
    .with_compression(opts.compression))
}

/// Counts bytes read from a layer blob for the progress bar.
struct Counting<R> {
    inner: R,
    counter: Arc<AtomicU64>,
}

impl<R: std::io::Read> std::io::Read for Counting<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.counter.fetch_add(n as u64, Ordering::Relaxed);
        Ok(n)
    }
}

fn convert_layer(
    layer: &SourceLayer,
    index: u32,
    tree: &mut Tree,
    packer: LayerPacker,
    read: &Arc<AtomicU64>,
) -> Result<(ChunkTable, FinishedBlob), ConvertError> {
    let label = match &layer.expected {
        Expected::Blob(d) | Expected::Uncompressed(d) => d.clone(),
    };
    let file = open_blob(&layer.path)?;
    let counted = Counting {
        inner: file,
        counter: read.clone(),
    };
    // One digest is checked: of the blob as stored, or (docker-archive) of the tar inside.
    let uncompressed = matches!(layer.expected, Expected::Uncompressed(_));
    let mut raw = HashingReader::with_hash(
        std::io::BufReader::with_capacity(1 << 20, counted),
        !uncompressed,
    );
    let (packer, result) = run(packer, |packer| {
        let (compression, stream) = decompress(std::io::BufReader::new(&mut raw), &label)?;
        let mut plain = HashingReader::with_hash(stream, uncompressed);
        let stats = apply_tar(&mut plain, index, &label, compression, tree, packer)?;
        let plain_digest = plain.finish().map_err(|e| ConvertError::CorruptLayer {
            layer: label.clone(),
            compression: compression.name(),
            reason: e.to_string(),
        })?;
        Ok((stats, plain_digest))
    });
    let finished = packer.finish();
    let (stats, plain_digest) = result?;
    let blob_digest = raw
        .finish()
        .map_err(ConvertError::io(format!("reading layer {label}")))?;
    let (expected, actual) = match &layer.expected {
        Expected::Blob(d) => (d, blob_digest),
        Expected::Uncompressed(d) => (d, plain_digest),
    };
    let actual = actual.unwrap_or_default();
    if *expected != actual {
        return Err(ConvertError::LayerDigest {
            layer: label,
            expected: expected.clone(),
            actual,
        });
    }
    info!(
        layer = %label,
        entries = stats.entries,
        whiteouts = stats.whiteouts,
        "layer converted"
    );
    finished
}

fn commit(
    store: &LocalStore,
    blob: FinishedBlob,
    source_layer: Option<String>,
) -> Result<(Descriptor, BlobRecord), ConvertError> {
    let digest = blob.digest.clone();
    let size = blob.size;
    store.commit_blob(blob.file, &digest)?;
    let mut sha256 = [0u8; 32];
    hex::decode_to_slice(&digest[7..], &mut sha256)
        .map_err(|e| ConvertError::Source(format!("bad blob digest {digest}: {e}")))?;
    Ok((
        Descriptor {
            media_type: MEDIA_TYPE_BLOB.to_string(),
            digest,
            size,
            urls: None,
            annotations: source_layer
                .map(|s| BTreeMap::from([(ANNOTATION_SOURCE_LAYER.to_string(), s)])),
        },
        BlobRecord { sha256, size },
    ))
}

/// The image config of a directory source: a minimal OCI config for this host's platform.
fn directory_config() -> Vec<u8> {
    let (os, arch) = image::host_platform();
    serde_json::to_vec(&serde_json::json!({
        "architecture": arch,
        "os": os,
        "config": {},
        "rootfs": {"type": "layers", "diff_ids": []},
    }))
    .expect("static json")
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::path::Path;

    use agent::local::LocalChunkSource;
    use fusefs::reader::{Attr, FileKind};
    use fusefs::ImageReader;

    use super::*;

    const CS: usize = 4096;

    /// A directory of 40 small cold files, two hot ones of 3000 bytes (no two fit one chunk),
    /// a 5-chunk file of which the profile read the third chunk, and a hot file read first.
    fn source_dir(dir: &Path) {
        std::fs::create_dir_all(dir.join("a")).unwrap();
        std::fs::create_dir_all(dir.join("z")).unwrap();
        for i in 0..40 {
            let bytes = lazy_tests::pseudo_random_bytes(i, 500);
            std::fs::write(dir.join(format!("a/f{i:02}")), bytes).unwrap();
        }
        for (path, seed) in [("a/hot10", 100), ("a/hot33", 101), ("z/late.txt", 102)] {
            std::fs::write(dir.join(path), lazy_tests::pseudo_random_bytes(seed, 3000)).unwrap();
        }
        let big = lazy_tests::pseudo_random_bytes(103, 5 * CS + 100);
        std::fs::write(dir.join("big.bin"), big).unwrap();
        std::os::unix::fs::symlink("a/f01", dir.join("link")).unwrap();
    }

    fn hot_profile() -> Profile {
        crate::layout::tests::profile(&[
            ("/z/late.txt", 0, 3000),
            ("/big.bin", 2 * CS as u64, CS as u32),
            ("/a/hot33", 0, 3000),
            ("/a/hot10", 0, 3000),
        ])
    }

    fn convert_dir(src: &Path, store: &Path, profile: Option<Profile>) -> ConvertReport {
        let opts = ConvertOptions {
            chunk_size: CS as u32,
            jobs: 2,
            progress: false,
            profile: profile.map(Arc::new),
            ..ConvertOptions::default()
        };
        let src = SourceRef::Path {
            dir: src.to_path_buf(),
        };
        let dst = StoreRef {
            path: store.to_path_buf(),
            tag: "latest".into(),
        };
        convert(&src, &dst, &opts).unwrap()
    }

    /// Every path with its attributes and content (file bytes or link target), and, for
    /// regular files, where each of its extents' chunks is stored (`comp_off`).
    type Tree = BTreeMap<String, (Attr, Vec<u8>)>;

    fn read_tree(store: &Path) -> (Tree, ImageReader) {
        let store = LocalStore::open(store).unwrap();
        let image = store.open_image("latest").unwrap();
        let source = LocalChunkSource::new(&store, &image.index, 1 << 20).unwrap();
        let reader = ImageReader::new(image.index, Arc::new(source)).unwrap();
        let mut tree = Tree::new();
        let mut stack = vec![(reader.root_ino(), String::new())];
        while let Some((dir, path)) = stack.pop() {
            let mut children = Vec::new();
            reader
                .readdir(dir, 2, |e| {
                    children.push((e.ino, String::from_utf8_lossy(e.name).into_owned()));
                    true
                })
                .unwrap();
            for (ino, name) in children {
                let path = format!("{path}/{name}");
                let attr = reader.getattr(ino).unwrap();
                let content = match attr.kind {
                    FileKind::Regular => reader.read(ino, 0, attr.size as u32).unwrap(),
                    FileKind::Symlink => reader.readlink(ino).unwrap().to_vec(),
                    FileKind::Directory => {
                        stack.push((ino, path.clone()));
                        Vec::new()
                    }
                    _ => Vec::new(),
                };
                tree.insert(path, (attr, content));
            }
        }
        (tree, reader)
    }

    /// Where the chunk holding byte `off` of `path` is stored in its blob.
    fn stored_at(reader: &ImageReader, tree: &Tree, path: &str, off: u64) -> u64 {
        let ino = tree[path].0.ino;
        let (_, pieces) = reader.plan_read(ino, off, 1).unwrap();
        let chunk = reader.index().chunk_ref(pieces[0].1.chunk).unwrap();
        chunk.record.comp_off
    }

    #[test]
    fn profile_layout_puts_hot_data_first_and_keeps_the_tree() {
        let scratch = tempfile::tempdir().unwrap();
        let src = scratch.path().join("src");
        source_dir(&src);
        let plain = convert_dir(&src, &scratch.path().join("plain"), None);
        let laid_out = convert_dir(&src, &scratch.path().join("hot"), Some(hot_profile()));

        let (plain_tree, _) = read_tree(&scratch.path().join("plain"));
        let (tree, reader) = read_tree(&scratch.path().join("hot"));
        assert_eq!(tree.len(), 47);
        // Same paths, inode numbers, attributes and bytes: only the layout differs.
        assert_eq!(tree, plain_tree);
        assert_eq!(laid_out.stored_bytes, plain.stored_bytes);
        assert_ne!(laid_out.manifest_digest, plain.manifest_digest);

        // The hot chunks first, in profile order; everything else after them.
        let hot: Vec<u64> = [
            ("/z/late.txt", 0),
            ("/big.bin", 2 * CS as u64),
            ("/a/hot33", 0),
            ("/a/hot10", 0),
        ]
        .iter()
        .map(|&(path, off)| stored_at(&reader, &tree, path, off))
        .collect();
        assert_eq!(hot[0], 0);
        assert!(hot.windows(2).all(|w| w[0] < w[1]), "{hot:?}");
        let first_cold = (0..5)
            .filter(|&c| c != 2)
            .map(|c| stored_at(&reader, &tree, "/big.bin", (c * CS) as u64))
            .chain((0..40).map(|i| stored_at(&reader, &tree, &format!("/a/f{i:02}"), 0)))
            .min()
            .unwrap();
        assert!(first_cold > hot[3], "{first_cold} <= {hot:?}");

        // A profile that names nothing in the image changes nothing, byte for byte.
        let mut unrelated = hot_profile();
        for e in &mut unrelated.entries {
            e.path = format!("/elsewhere{}", e.path);
        }
        let same = convert_dir(&src, &scratch.path().join("same"), Some(unrelated));
        assert_eq!(same.manifest_digest, plain.manifest_digest);
    }
}
