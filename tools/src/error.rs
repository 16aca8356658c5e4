//! Errors of conversion: each names the layer and entry it is about and, where there is one,
//! the fix.

use thiserror::Error;

#[derive(Debug, Error)]
pub enum ConvertError {
    #[error("{context}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "layer {layer}: entry {entry:?} has an absolute path; layer tars must use relative paths"
    )]
    AbsolutePath { layer: String, entry: String },
    #[error("layer {layer}: entry {entry:?} escapes the image root with '..'")]
    EscapesRoot { layer: String, entry: String },
    #[error("layer {layer}: hardlink {entry:?} -> {target:?} points outside the image")]
    LinkOutsideTree {
        layer: String,
        entry: String,
        target: String,
    },
    #[error("layer {layer}: hardlink {entry:?} -> {target:?}: {reason}")]
    BadHardlink {
        layer: String,
        entry: String,
        target: String,
        reason: String,
    },
    #[error("layer {layer}: entry {entry:?}: {reason}")]
    BadEntry {
        layer: String,
        entry: String,
        reason: String,
    },
    #[error("layer {layer}: the layer is not a readable tar stream ({compression}): {reason}")]
    CorruptLayer {
        layer: String,
        compression: &'static str,
        reason: String,
    },
    #[error("layer {layer} does not match its digest: the manifest says {expected}, the content hashes to {actual}; the source image is corrupt or was modified")]
    LayerDigest {
        layer: String,
        expected: String,
        actual: String,
    },
    #[error("{0}")]
    Source(String),
    #[error("bad image reference {reference:?}: {reason}")]
    BadReference { reference: String, reason: String },
    #[error(transparent)]
    Index(#[from] fusefs::IndexError),
    #[error(transparent)]
    Store(#[from] agent::store::StoreError),
}

impl ConvertError {
    pub fn io(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> ConvertError {
        let context = context.into();
        move |source| ConvertError::Io { context, source }
    }
}
