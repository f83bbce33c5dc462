//! Images in chat requests. An `image_url` part carries a `data:` URL
//! (base64), or — only when the server was started with
//! `--allow-local-files` — a local path or `file://` URL; remote URLs are
//! refused (the server fetches nothing). Inline images are checked (size
//! in bytes, then their header's width × height, before any pixel is
//! decoded) and written to a private folder for the model plugin to read,
//! and removed once the request's prompt is encoded.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use base64::Engine as _;
use oxtune_engine::media::{MediaKind, MediaRef};
use serde_json::Value;

use crate::worker::{Encoded, Request};
use crate::{ApiError, AppState};

/// Where inline images wait while the worker reads them.
pub struct ImageStore {
    dir: PathBuf,
    next: AtomicU64,
}

impl Default for ImageStore {
    fn default() -> Self {
        ImageStore::new()
    }
}

impl ImageStore {
    /// A store in a folder of the system's temporary folder, private to
    /// this process.
    pub fn new() -> ImageStore {
        let dir = std::env::temp_dir().join(format!("oxtune-serve-{}", std::process::id()));
        ImageStore { dir, next: AtomicU64::new(0) }
    }

    fn write(&self, bytes: &[u8]) -> std::io::Result<PathBuf> {
        std::fs::create_dir_all(&self.dir)?;
        let path = self.dir.join(format!("image-{}", self.next.fetch_add(1, Ordering::Relaxed)));
        std::fs::write(&path, bytes)?;
        Ok(path)
    }
}

/// What a server accepts as images.
#[derive(Clone, Copy, Debug)]
pub struct ImageLimits {
    /// Whether parts may name files on the server's disk.
    pub allow_local_files: bool,
    /// Largest image in bytes.
    pub max_bytes: usize,
    /// Largest image in pixels (width × height).
    pub max_pixels: u64,
}

/// The images of one request, in order; inline ones are deleted when this
/// is dropped.
#[derive(Default)]
pub struct RequestImages {
    refs: Vec<MediaRef>,
    written: Vec<PathBuf>,
}

impl Drop for RequestImages {
    fn drop(&mut self) {
        for path in &self.written {
            let _ = std::fs::remove_file(path);
        }
    }
}

impl RequestImages {
    /// Whether the request has no image.
    pub fn is_empty(&self) -> bool {
        self.refs.is_empty()
    }

    /// Adds the image of an `image_url` part (`url`: its `image_url`, a
    /// string or `{"url": ...}`); `param` names the part in errors.
    pub fn push(&mut self, store: &ImageStore, limits: ImageLimits, url: &Value, param: &str) -> Result<(), ApiError> {
        let url = match url {
            Value::String(s) => s.as_str(),
            other => other
                .get("url")
                .and_then(Value::as_str)
                .ok_or_else(|| ApiError::invalid(param, "`image_url` must be a URL string or an object with `url`"))?,
        };
        let path = if let Some(data) = url.strip_prefix("data:") {
            let bytes = decode_data_url(data, limits.max_bytes).map_err(|m| ApiError::invalid(param, m))?;
            check_dimensions(&bytes, limits.max_pixels).map_err(|m| ApiError::invalid(param, m))?;
            let path = store.write(&bytes).map_err(|e| {
                ApiError::new(axum::http::StatusCode::INTERNAL_SERVER_ERROR, "server_error", None, e.to_string())
            })?;
            self.written.push(path.clone());
            path
        } else if url.starts_with("http://") || url.starts_with("https://") {
            return Err(ApiError::invalid(param, "remote image URLs are not fetched by this server; send a data: URL"));
        } else if !limits.allow_local_files {
            return Err(ApiError::invalid(
                param,
                "local image files are not allowed (start the server with --allow-local-files); send a data: URL",
            ));
        } else {
            let path = PathBuf::from(url.strip_prefix("file://").unwrap_or(url));
            check_file(&path, limits).map_err(|m| ApiError::invalid(param, m))?;
            path
        };
        self.refs.push(MediaRef { kind: MediaKind::Image, sources: vec![path] });
        Ok(())
    }

    /// Has the worker render `messages` (with one `<image>` tag per image)
    /// and prepare the images with the model plugin.
    pub(crate) async fn encode(self, state: &AppState, messages: Vec<Value>) -> Result<Encoded, ApiError> {
        let (reply, answer) = tokio::sync::oneshot::channel();
        let request = Request::Encode { messages, media: self.refs.clone(), reply };
        let gone = || {
            ApiError::new(
                axum::http::StatusCode::INTERNAL_SERVER_ERROR,
                "server_error",
                None,
                "the model worker has stopped",
            )
        };
        state.queue.ask(request).map_err(|_| gone())?;
        let encoded = answer.await.map_err(|_| gone())?;
        encoded.map_err(|m| ApiError::invalid("messages", m))
    }
}

/// The bytes of a `data:[type][;base64],DATA` URL (after `data:`).
fn decode_data_url(data: &str, max_bytes: usize) -> Result<Vec<u8>, String> {
    let (header, payload) = data.split_once(',').ok_or("a data: URL needs a comma before its data")?;
    if !header.ends_with(";base64") {
        return Err("a data: URL must be base64 (`data:image/png;base64,...`)".into());
    }
    let kind = header.trim_end_matches(";base64");
    if !(kind.is_empty() || kind.starts_with("image/")) {
        return Err(format!("a data: URL of type `{kind}` is not an image"));
    }
    if payload.len() / 4 * 3 > max_bytes + 3 {
        return Err(format!("the image is over this server's limit of {max_bytes} bytes"));
    }
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(payload.trim())
        .map_err(|e| format!("the data: URL is not valid base64: {e}"))?;
    if bytes.len() > max_bytes {
        return Err(format!("the image is over this server's limit of {max_bytes} bytes"));
    }
    Ok(bytes)
}

/// Reads an image's width and height from its header alone and checks them.
fn check_dimensions(bytes: &[u8], max_pixels: u64) -> Result<(), String> {
    let reader = image::ImageReader::new(std::io::Cursor::new(bytes))
        .with_guessed_format()
        .map_err(|e| format!("the image cannot be read: {e}"))?;
    let (width, height) =
        reader.into_dimensions().map_err(|e| format!("the image is not a PNG, JPEG or WebP image: {e}"))?;
    if width as u64 * height as u64 > max_pixels {
        return Err(format!("the image is {width}×{height}, over this server's limit of {max_pixels} pixels"));
    }
    Ok(())
}

fn check_file(path: &Path, limits: ImageLimits) -> Result<(), String> {
    let size = std::fs::metadata(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?.len();
    if size > limits.max_bytes as u64 {
        return Err(format!("{} is over this server's limit of {} bytes", path.display(), limits.max_bytes));
    }
    let bytes = std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    check_dimensions(&bytes, limits.max_pixels).map_err(|m| format!("{}: {m}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::decode_data_url;

    #[test]
    fn data_urls_are_checked() {
        assert_eq!(decode_data_url("image/png;base64,aGk=", 10).unwrap(), b"hi");
        assert!(decode_data_url("image/png;base64,@@@", 10).unwrap_err().contains("base64"));
        assert!(decode_data_url("image/png,hi", 10).unwrap_err().contains("base64"));
        assert!(decode_data_url("text/plain;base64,aGk=", 10).unwrap_err().contains("not an image"));
        assert!(decode_data_url("image/png;base64,aGVsbG8gd29ybGQ=", 4).unwrap_err().contains("limit"));
    }
}
