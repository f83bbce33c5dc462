//! The web UI's workspace: the one folder that runs launched from the UI
//! may read and write. Every path a request names is resolved against it
//! (relative paths) and must stay inside it once `..` and symbolic links
//! are resolved; anything else is refused with the path named.

use std::io;
use std::path::{Component, Path, PathBuf};

/// A folder that confines the paths of requests.
#[derive(Clone, Debug)]
pub struct Workspace {
    root: PathBuf,
}

impl Workspace {
    /// The workspace at `dir` (created if missing).
    pub fn new(dir: &Path) -> io::Result<Workspace> {
        std::fs::create_dir_all(dir)?;
        Ok(Workspace { root: dir.canonicalize()? })
    }

    /// The workspace folder (absolute, symbolic links resolved).
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// `value` (relative to the workspace, or absolute) as an absolute path
    /// inside the workspace; an error naming it when it leads outside.
    /// The path need not exist yet (an output folder).
    pub fn resolve(&self, value: &str) -> Result<PathBuf, String> {
        let outside = || format!("`{value}` is outside the workspace {}", self.root.display());
        if value.is_empty() {
            return Err("an empty path".into());
        }
        let given = Path::new(value);
        let joined = if given.is_absolute() { given.to_path_buf() } else { self.root.join(given) };
        let mut normal = PathBuf::new();
        for component in joined.components() {
            match component {
                Component::ParentDir => {
                    if !normal.pop() {
                        return Err(outside());
                    }
                }
                Component::CurDir => {}
                other => normal.push(other),
            }
        }
        // Symbolic links: resolve the longest part that exists.
        let mut existing = normal.clone();
        let mut missing = Vec::new();
        while !existing.exists() {
            match existing.file_name() {
                Some(name) => missing.push(name.to_owned()),
                None => return Err(outside()),
            }
            existing.pop();
        }
        let mut real = existing.canonicalize().map_err(|e| format!("`{value}`: {e}"))?;
        real.extend(missing.iter().rev());
        if !real.starts_with(&self.root) {
            return Err(outside());
        }
        Ok(real)
    }

    /// `path` relative to the workspace, for display (as given when outside).
    pub fn relative(&self, path: &Path) -> String {
        path.strip_prefix(&self.root).unwrap_or(path).display().to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::Workspace;

    #[cfg(unix)]
    #[test]
    fn paths_stay_inside_the_workspace() {
        let dir = std::env::temp_dir().join(format!("oxtune-webui-ws-{}", std::process::id()));
        let ws = Workspace::new(&dir.join("ws")).unwrap();
        std::fs::create_dir_all(ws.root().join("data")).unwrap();
        assert_eq!(ws.resolve("data/x.jsonl").unwrap(), ws.root().join("data/x.jsonl"));
        assert_eq!(ws.resolve("runs/new/deeper").unwrap(), ws.root().join("runs/new/deeper"));
        assert_eq!(ws.resolve("data/../runs").unwrap(), ws.root().join("runs"));
        assert!(ws.resolve("../outside").unwrap_err().contains("outside the workspace"));
        assert!(ws.resolve("data/../../x").unwrap_err().contains("outside"));
        assert!(ws.resolve("/etc/passwd").unwrap_err().contains("outside"));
        // A link inside that points outside is followed, and refused.
        std::os::unix::fs::symlink(&dir, ws.root().join("escape")).unwrap();
        assert!(ws.resolve("escape/file").unwrap_err().contains("outside"));
        let absolute_inside = ws.root().join("data").display().to_string();
        assert!(ws.resolve(&absolute_inside).is_ok());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
