//! Writing a checkpoint folder atomically: everything goes into a hidden
//! staging folder beside the target, which replaces the target only once
//! complete, so an interrupted save never leaves a half-written checkpoint.

use std::path::Path;

use super::checkpoint::CheckpointError;
use super::ModelError;

/// Runs `write` on a fresh staging folder, then renames it to `dir`
/// (replacing an older `dir`). On failure the staging folder is removed
/// and `dir` is left as it was.
pub fn write_atomically(dir: &Path, write: impl FnOnce(&Path) -> std::io::Result<()>) -> Result<(), ModelError> {
    let io = |path: &Path| {
        let path = path.to_owned();
        move |cause| ModelError::Checkpoint(CheckpointError::Io { path, cause })
    };
    let parent = dir.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    std::fs::create_dir_all(parent).map_err(io(parent))?;
    let name = dir.file_name().and_then(|n| n.to_str()).unwrap_or("checkpoint");
    let staging = parent.join(format!(".{name}.partial-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&staging);
    std::fs::create_dir_all(&staging).map_err(io(&staging))?;
    if let Err(cause) = write(&staging) {
        let _ = std::fs::remove_dir_all(&staging);
        return Err(io(&staging)(cause));
    }
    if dir.exists() {
        std::fs::remove_dir_all(dir).map_err(io(dir))?;
    }
    std::fs::rename(&staging, dir).map_err(io(dir))
}
