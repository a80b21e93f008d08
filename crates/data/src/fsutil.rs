//! Durable file replacement: write a hidden temp file beside the target, fsync it, rename it
//! over the target, fsync the directory. A reader sees the old file or the new, never half.

use std::fs::{self, File};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use crate::{DataError, Result};

/// Marks our temp files, so a later writer can sweep the ones a killed process left.
pub(crate) const TEMP_MARKER: &str = ".tmp-";

/// A hidden name in the same directory (rename is atomic only within one file system).
pub(crate) fn temp_path(target: &Path) -> PathBuf {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let name = target
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or("file");
    let unique = COUNTER.fetch_add(1, Ordering::Relaxed);
    target.with_file_name(format!(
        ".{name}{TEMP_MARKER}{}-{unique}",
        std::process::id()
    ))
}

pub(crate) fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(DataError::io(dir))
}

/// Renames a fully written and synced temp file into place and makes the rename durable.
pub(crate) fn commit(temp: &Path, target: &Path) -> Result<()> {
    fs::rename(temp, target).map_err(DataError::io(target))?;
    sync_dir(target.parent().unwrap_or(Path::new(".")))
}

/// Replaces `target` with `bytes` atomically.
pub fn write_atomic(target: &Path, bytes: &[u8]) -> Result<()> {
    let temp = temp_path(target);
    let written = File::create(&temp)
        .and_then(|mut f| f.write_all(bytes).and_then(|()| f.sync_all()))
        .map_err(DataError::io(&temp));
    if let Err(e) = written {
        let _ = fs::remove_file(&temp);
        return Err(e);
    }
    commit(&temp, target)
}

/// Removes temp files that a killed writer left in `dir` for targets starting with `prefix`.
pub(crate) fn sweep_temp_files(dir: &Path, prefix: &str) -> Result<()> {
    let hidden = format!(".{prefix}");
    for entry in fs::read_dir(dir).map_err(DataError::io(dir))? {
        let entry = entry.map_err(DataError::io(dir))?;
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if name.starts_with(&hidden) && name.contains(TEMP_MARKER) {
            tracing::debug!(file = %entry.path().display(), "removing a stale temp file");
            fs::remove_file(entry.path()).map_err(DataError::io(entry.path()))?;
        }
    }
    Ok(())
}
