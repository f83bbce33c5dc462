//! Media items in plain Rust: what the host asks a model plugin to
//! preprocess ([`MediaRequest`]) and what it gets back ([`PreparedMedia`]:
//! pixel rows, grids and placeholder tokens), converted to and from the
//! ABI's types. The preprocessing itself is plugin code (the
//! `oxtune-helpers-vision` crate has Qwen's); the host never looks inside.

use abi_stable::std_types::RVec;

use crate::abi;
use crate::{Error, Result};

/// What kind of media an item is.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum MediaKind {
    /// One still image.
    Image,
    /// A sequence of frames.
    Video,
}

/// One image or video to preprocess, as the host passes it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MediaRequest {
    /// Image or video.
    pub kind: MediaKind,
    /// An image's file; a video's frame files, or one folder of frames.
    pub sources: Vec<String>,
}

impl MediaRequest {
    /// Reads the ABI form.
    pub fn from_abi(item: &abi::MediaItem) -> Result<MediaRequest> {
        let kind = match item.kind.as_str() {
            "image" => MediaKind::Image,
            "video" => MediaKind::Video,
            other => return Err(Error::new(format!("unknown media kind `{other}` (expected image or video)"))),
        };
        Ok(MediaRequest { kind, sources: item.sources.iter().map(|s| s.to_string()).collect() })
    }
}

/// A media item as model inputs (see [`abi::PreparedMedia`]).
#[derive(Clone, Debug, PartialEq)]
pub struct PreparedMedia {
    /// The forward input the pixel rows go to (`pixel_values`).
    pub pixels_input: String,
    /// `[rows, features]` row-major.
    pub pixels: Vec<f32>,
    /// Features per row.
    pub features: usize,
    /// The forward input the grid goes to (`image_grid_thw`).
    pub grid_input: String,
    /// The grid (`[t, h, w]` in patches).
    pub grid: Vec<usize>,
    /// The placeholder token the host repeats once per vision token.
    pub placeholder_token: u32,
    /// `[axes][tokens]` positions relative to the item's first token.
    pub positions: Vec<Vec<u32>>,
    /// The index of the request this input belongs to.
    pub request: usize,
    /// The prompt text of the request's tag (first input of a request
    /// only); `None`: the model's usual placeholder.
    pub prompt_text: Option<String>,
}

impl PreparedMedia {
    /// Reads the ABI form (the host's side of the call).
    pub fn from_abi(p: &abi::PreparedMedia) -> PreparedMedia {
        let axes = p.axes.max(1) as usize;
        let per_axis = (p.positions.len() / axes).max(1);
        PreparedMedia {
            pixels_input: p.pixels_input.to_string(),
            pixels: p.pixels.to_vec(),
            features: p.features as usize,
            grid_input: p.grid_input.to_string(),
            grid: p.grid.iter().map(|&g| g as usize).collect(),
            placeholder_token: p.placeholder_token,
            positions: p.positions.chunks(per_axis).map(<[u32]>::to_vec).collect(),
            request: p.request as usize,
            prompt_text: Some(p.prompt_text.to_string()).filter(|t| !t.is_empty()),
        }
    }

    /// The ABI form.
    pub fn to_abi(&self) -> abi::PreparedMedia {
        abi::PreparedMedia {
            pixels_input: self.pixels_input.as_str().into(),
            pixels: RVec::from(self.pixels.as_slice()),
            features: self.features as u64,
            grid_input: self.grid_input.as_str().into(),
            grid: self.grid.iter().map(|&g| g as u64).collect(),
            placeholder_token: self.placeholder_token,
            axes: self.positions.len() as u32,
            positions: self.positions.iter().flatten().copied().collect(),
            request: self.request as u32,
            prompt_text: self.prompt_text.as_deref().unwrap_or_default().into(),
        }
    }
}
