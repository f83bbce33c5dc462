//! Writing a checkpoint folder atomically: everything goes into a hidden
//! staging folder beside the target, which replaces the target only once
//! complete, so an interrupted save never leaves a half-written checkpoint.
//! An existing target is swapped with the staging folder in one step
//! (Linux `renameat2(RENAME_EXCHANGE)`), so there is no moment with
//! neither the old folder nor the new one in place.

use std::path::Path;

use super::checkpoint::CheckpointError;
use super::ModelError;

/// Runs `write` on a fresh staging folder, then renames it to `dir`
/// (replacing an older `dir`). On failure the staging folder is removed
/// and `dir` is left as it was.
pub fn write_atomically(dir: &Path, write: impl FnOnce(&Path) -> std::io::Result<()>) -> Result<(), ModelError> {
    let io = |path: &Path| {
        let path = path.to_owned();
        move |cause| ModelError::Checkpoint(CheckpointError::Io { path, source: cause })
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
    if !dir.exists() {
        return std::fs::rename(&staging, dir).map_err(io(dir));
    }
    if exchange(&staging, dir).is_err() {
        // No atomic exchange here (another OS, or a file system without
        // it): move the old folder aside first, so it is never deleted
        // before the new one is in place.
        let old = parent.join(format!(".{name}.old-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&old);
        std::fs::rename(dir, &old).map_err(io(dir))?;
        std::fs::rename(&staging, dir).map_err(io(dir))?;
        let _ = std::fs::remove_dir_all(&old);
        return Ok(());
    }
    // The staging path now holds the old folder.
    std::fs::remove_dir_all(&staging).map_err(io(&staging))
}

/// Swaps the directory entries `a` and `b` atomically.
#[cfg(target_os = "linux")]
fn exchange(a: &Path, b: &Path) -> std::io::Result<()> {
    use std::os::unix::ffi::OsStrExt;
    let c = |p: &Path| std::ffi::CString::new(p.as_os_str().as_bytes()).map_err(std::io::Error::other);
    let (a, b) = (c(a)?, c(b)?);
    // SAFETY: both paths are NUL-terminated C strings that outlive the call.
    let rc = unsafe { libc::renameat2(libc::AT_FDCWD, a.as_ptr(), libc::AT_FDCWD, b.as_ptr(), libc::RENAME_EXCHANGE) };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// Swaps the directory entries `a` and `b` atomically (not offered here).
#[cfg(not(target_os = "linux"))]
fn exchange(_a: &Path, _b: &Path) -> std::io::Result<()> {
    Err(std::io::Error::from(std::io::ErrorKind::Unsupported))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, Ordering};

    #[test]
    fn a_replaced_folder_is_never_missing() {
        let root = std::env::temp_dir().join(format!("oxtune-staging-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        let dir = root.join("checkpoint-1");
        let write = |n: usize| {
            move |staging: &Path| {
                for i in 0..20 {
                    std::fs::write(staging.join(format!("part-{i}")), vec![0u8; 4096])?;
                }
                std::fs::write(staging.join("marker"), n.to_string())
            }
        };
        write_atomically(&dir, write(0)).unwrap();
        let done = AtomicBool::new(false);
        let missing = std::thread::scope(|scope| {
            let watcher = scope.spawn(|| {
                let mut missing = 0;
                while !done.load(Ordering::Relaxed) {
                    if !dir.join("marker").exists() {
                        missing += 1;
                    }
                }
                missing
            });
            for n in 1..=200 {
                write_atomically(&dir, write(n)).unwrap();
            }
            done.store(true, Ordering::Relaxed);
            watcher.join().unwrap()
        });
        assert_eq!(missing, 0, "the checkpoint was missing {missing} times while being replaced");
        assert_eq!(std::fs::read_to_string(dir.join("marker")).unwrap(), "200");
        let left: Vec<_> = std::fs::read_dir(&root).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(left, vec![std::ffi::OsString::from("checkpoint-1")], "staging folders left behind");
        std::fs::remove_dir_all(&root).unwrap();
    }
}
