//! The `checkpoint-<step>` folders of an output directory: finding the
//! latest one to resume from, and keeping only the newest few.

use std::path::{Path, PathBuf};

/// The `checkpoint-<step>` folders in `dir`, oldest first.
pub fn list(dir: &Path) -> Vec<(usize, PathBuf)> {
    let Ok(entries) = std::fs::read_dir(dir) else { return Vec::new() };
    let mut found: Vec<(usize, PathBuf)> = entries
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let step = e.file_name().to_str()?.strip_prefix("checkpoint-")?.parse().ok()?;
            e.path().is_dir().then(|| (step, e.path()))
        })
        .collect();
    found.sort();
    found
}

/// The newest checkpoint in `dir`, if any.
pub fn latest(dir: &Path) -> Option<PathBuf> {
    list(dir).pop().map(|(_, path)| path)
}

/// Removes all but the newest `keep` checkpoints of `dir`. The checkpoint a
/// run resumed from is not kept once newer ones exist: it is in memory, and
/// keeping it would leave more than `keep` folders after an interrupted run.
pub fn prune(dir: &Path, keep: usize) -> std::io::Result<()> {
    let all = list(dir);
    let excess = all.len().saturating_sub(keep.max(1));
    for (_, path) in all.into_iter().take(excess) {
        std::fs::remove_dir_all(&path)?;
    }
    Ok(())
}
