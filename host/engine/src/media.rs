//! Images and videos as a model consumes them: what the model plugin says
//! about its media ([`MediaSpec`]), the items a row refers to
//! ([`MediaRef`]), the plugin's preprocessed items ([`MediaInput`]) and a
//! row's laid-out media and positions ([`RowMedia`]), and how a batch of
//! rows becomes the forward pass's `position_ids` and pixel inputs
//! ([`batch_inputs`]). Finding media in dataset rows and expanding
//! placeholders is `oxtune-data`'s job. Nothing here is model-specific.

use std::collections::BTreeMap;
use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};
use serde_json::Value;

use crate::model::{LoadedModel, ModelError};

/// How a model reads media, from its plugin (`ModelInstance::media_spec`).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct MediaSpec {
    /// Rows of `position_ids` (3 for M-RoPE).
    pub position_axes: usize,
    /// The text one image becomes in a prompt.
    pub image_placeholder: Option<String>,
    /// The text one video becomes in a prompt.
    pub video_placeholder: Option<String>,
    /// Parameter-name prefixes of the model's parts (`vit`, `aligner`,
    /// `llm`), for the `--freeze-*` flags.
    pub parts: BTreeMap<String, Vec<String>>,
}

impl MediaSpec {
    /// Reads the plugin's JSON.
    pub fn from_json(v: &Value) -> MediaSpec {
        let text = |k: &str| v.get(k).and_then(Value::as_str).map(str::to_owned);
        let parts = v
            .get("parts")
            .and_then(Value::as_object)
            .map(|o| {
                o.iter()
                    .map(|(k, list)| {
                        let prefixes = list.as_array().map(|a| a.iter().filter_map(Value::as_str).map(str::to_owned));
                        (k.clone(), prefixes.map(Iterator::collect).unwrap_or_default())
                    })
                    .collect()
            })
            .unwrap_or_default();
        MediaSpec {
            position_axes: v.get("position_axes").and_then(Value::as_u64).unwrap_or(1).max(1) as usize,
            image_placeholder: text("image_placeholder"),
            video_placeholder: text("video_placeholder"),
            parts,
        }
    }

    /// Whether parameter `name` belongs to part `part`.
    pub fn in_part(&self, part: &str, name: &str) -> bool {
        self.parts.get(part).is_some_and(|prefixes| {
            prefixes.iter().any(|p| name == p || name.strip_prefix(p.as_str()).is_some_and(|r| r.starts_with('.')))
        })
    }
}

/// Forward inputs by name (`pixel_values`, `image_grid_thw`, ...).
pub type NamedInputs = Vec<(String, Tensor)>;

/// Image or video.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum MediaKind {
    /// A still image.
    Image,
    /// Frames.
    Video,
}

impl MediaKind {
    /// The name in rows and in the plugin API.
    pub fn as_str(self) -> &'static str {
        match self {
            MediaKind::Image => "image",
            MediaKind::Video => "video",
        }
    }

    /// The tag that marks the item's place in message text (`<image>`).
    pub fn tag(self) -> &'static str {
        match self {
            MediaKind::Image => "<image>",
            MediaKind::Video => "<video>",
        }
    }
}

/// One media item a row refers to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MediaRef {
    /// Image or video.
    pub kind: MediaKind,
    /// The image file; a video's frame files or frame folder.
    pub sources: Vec<PathBuf>,
}

/// A media item preprocessed by the model plugin: pixel rows, grid,
/// placeholder token and per-token positions (the plugin API's type).
pub type MediaInput = oxtune_plugin_api::media::PreparedMedia;

/// The media of one encoded row: the prepared items in token order and
/// the row's positions on every axis.
#[derive(Clone, Debug, PartialEq)]
pub struct RowMedia {
    /// Items in the order their placeholders appear.
    pub items: Vec<MediaInput>,
    /// `[axes][tokens]` position of every token of the row.
    pub positions: Vec<Vec<u32>>,
    /// Where the pixels come from when they are not held: the row's media
    /// files (in the order they were prepared) and the preprocessing
    /// options. See [`RowMedia::release_pixels`].
    pub sources: Option<(Vec<MediaRef>, Value)>,
}

impl RowMedia {
    /// Drops the pixel rows, keeping the token layout and where the pixels
    /// come from: a training set holds its rows for the whole run, and
    /// f32 pixels are ~4.8 MB per 448×448 image. [`with_pixels`] reads
    /// them again for each batch.
    pub fn release_pixels(&mut self, media: Vec<MediaRef>, options: Value) {
        self.items.iter_mut().for_each(|item| item.pixels = Vec::new());
        self.sources = Some((media, options));
    }
}

/// `media` with its pixel rows, read again through the model plugin if they
/// were released; the files must still give the grids the row was laid
/// out for.
pub fn with_pixels<'a>(model: &LoadedModel, media: &'a RowMedia) -> Result<std::borrow::Cow<'a, RowMedia>, ModelError> {
    let Some((refs, options)) = media.sources.as_ref().filter(|_| media.items.iter().any(|i| i.pixels.is_empty()))
    else {
        return Ok(std::borrow::Cow::Borrowed(media));
    };
    let mut prepared = model.prepare_media(refs, options)?;
    // Prepared in row order per kind; the row holds them in token order.
    let changed = |message: String| ModelError::Media { model: model.dir().to_owned(), message };
    let mut items = Vec::with_capacity(media.items.len());
    for held in &media.items {
        let at = prepared
            .iter()
            .position(|p| p.placeholder_token == held.placeholder_token)
            .ok_or_else(|| changed("the row's media changed since it was encoded".into()))?;
        let fresh = prepared.remove(at);
        if fresh.grid != held.grid {
            return Err(changed(format!(
                "a media file of the row changed since the row was encoded (grid {:?}, was {:?})",
                fresh.grid, held.grid
            )));
        }
        items.push(fresh);
    }
    Ok(std::borrow::Cow::Owned(RowMedia { items, ..media.clone() }))
}

/// Positions `0..len` on every axis (a row without media).
pub fn text_positions(len: usize, axes: usize) -> Vec<Vec<u32>> {
    vec![(0..len as u32).collect(); axes]
}

/// The `position_ids` (`[axes, batch, width]`; `[batch, width]` for a
/// one-axis model, and `None` when it has one axis and no row has media) and the media inputs of a batch of rows
/// padded to `width` (on the left when `left_pad`). Pixel rows of the same
/// input are concatenated in row order; grids are stacked.
pub fn batch_inputs(
    rows: &[(usize, Option<&RowMedia>)],
    width: usize,
    left_pad: bool,
    axes: usize,
    device: &Device,
) -> candle_core::Result<(Option<Tensor>, NamedInputs)> {
    if axes <= 1 && rows.iter().all(|(_, m)| m.is_none()) {
        return Ok((None, Vec::new()));
    }
    let mut positions = vec![0u32; axes * rows.len() * width];
    for (b, (len, media)) in rows.iter().enumerate() {
        let own = match media {
            Some(m) => m.positions.clone(),
            None => text_positions(*len, axes),
        };
        let pad = if left_pad { width - len } else { 0 };
        for (axis, p) in own.iter().enumerate().take(axes) {
            let start = (axis * rows.len() + b) * width + pad;
            positions[start..start + p.len()].copy_from_slice(p);
        }
    }
    let positions = match axes {
        1 => Tensor::from_vec(positions, (rows.len(), width), device)?,
        _ => Tensor::from_vec(positions, (axes, rows.len(), width), device)?,
    };
    let mut pixels: BTreeMap<String, (Vec<f32>, usize)> = BTreeMap::new();
    let mut grids: BTreeMap<String, Vec<u32>> = BTreeMap::new();
    for item in rows.iter().filter_map(|(_, m)| *m).flat_map(|m| &m.items) {
        let entry = pixels.entry(item.pixels_input.clone()).or_insert((Vec::new(), item.features));
        if entry.1 != item.features {
            candle_core::bail!("media items of `{}` differ in features per row", item.pixels_input);
        }
        entry.0.extend_from_slice(&item.pixels);
        grids.entry(item.grid_input.clone()).or_default().extend(item.grid.iter().map(|&g| g as u32));
    }
    let mut inputs = Vec::new();
    for (name, (values, features)) in pixels {
        let rows = values.len() / features.max(1);
        inputs.push((name, Tensor::from_vec(values, (rows, features), device)?));
    }
    for (name, values) in grids {
        let n = values.len() / 3;
        inputs.push((name, Tensor::from_vec(values, (n, 3), device)?.to_dtype(DType::U32)?));
    }
    Ok((Some(positions), inputs))
}
