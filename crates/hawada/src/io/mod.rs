//! Strict file I/O: safetensors tensors, JSON configs, GGUF and ONNX weights. Builds no module.

pub mod gguf;
pub mod json;
pub mod onnx;
pub mod safetensors;

use crate::error::{Error, Result};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};

/// Writes `bytes` to `path` atomically: a temporary file in the same folder, then a rename, so a
/// crash or a full disk mid-write leaves the previous file intact. The temporary name is unique
/// to this process and write (`<name>.<pid>.<n>.tmp`): two writers never share one.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    static WRITES: AtomicU64 = AtomicU64::new(0);
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = path.with_file_name(format!(
        "{name}.{}.{}.tmp",
        std::process::id(),
        WRITES.fetch_add(1, Ordering::Relaxed)
    ));
    std::fs::write(&tmp, bytes).map_err(|e| Error::io(&tmp, e))?;
    std::fs::rename(&tmp, path).map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        Error::io(path, e)
    })
}
