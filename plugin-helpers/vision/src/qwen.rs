//! What the Qwen-VL family shares outside the towers: the media tokens and
//! placeholder text, preprocessing through [`ProcessorConfig`], the M-RoPE
//! positions of placeholder tokens, and reading the `config.json` layout
//! (`text_config` + `vision_config`, or the older flat form).

use serde_json::Value;

use oxtune_helpers_decoder::{ConfigReader, DecoderConfig};
use oxtune_plugin_api::graph::Tensor;
use oxtune_plugin_api::media::{MediaKind, MediaRequest, PreparedMedia};
use oxtune_plugin_api::nn::rope_inv_freq;
use oxtune_plugin_api::{Error, Result};

use crate::layers::multi_axis_rotary;
use crate::processor::ProcessorConfig;

/// The Qwen-VL media conventions of one checkpoint.
#[derive(Clone, Debug)]
pub struct QwenMedia {
    /// `<|image_pad|>`.
    pub image_token: u32,
    /// `<|video_pad|>`.
    pub video_token: u32,
    /// Vision patch side.
    pub patch_size: usize,
    /// Patches merged per side into one token.
    pub merge_size: usize,
    /// Frames per temporal patch.
    pub temporal_patch_size: usize,
    /// Qwen2.5-VL: video time positions advance by this many per second
    /// (`tokens_per_second`); `None` numbers temporal patches 0, 1, 2...
    pub tokens_per_second: Option<f64>,
    /// Whether the model reads videos.
    pub reads_video: bool,
    /// Qwen3-VL's videos: each temporal patch a token group of its own
    /// with its time written in the prompt, and one pixel budget for all
    /// frames.
    pub timestamped_video: bool,
    /// Parameter-name prefixes of the vision tower (`vit`), the merger(s)
    /// (`aligner`) and the language model (`llm`), for the host's
    /// `--freeze-vit` / `--freeze-aligner` / `--freeze-llm`.
    pub parts: Value,
}

fn token(config: &Value, key: &str, default: u32) -> u32 {
    config.get(key).and_then(Value::as_u64).map_or(default, |v| v as u32)
}

impl QwenMedia {
    /// Reads the token ids and patch geometry from `config.json`.
    pub fn from_config(config: &Value, vision: &Value) -> Result<QwenMedia> {
        let v = ConfigReader::new(vision);
        Ok(QwenMedia {
            image_token: token(config, "image_token_id", 151655),
            video_token: token(config, "video_token_id", 151656),
            patch_size: v.usize_or("patch_size", 14)?,
            merge_size: v.usize_or("spatial_merge_size", 2)?,
            temporal_patch_size: v.usize_or("temporal_patch_size", 2)?,
            tokens_per_second: v.get("tokens_per_second").and_then(Value::as_f64),
            reads_video: true,
            timestamped_video: false,
            parts: Value::Null,
        })
    }

    /// The model's media settings for the host (see `ModelInstance::media_spec`).
    pub fn spec(&self) -> Value {
        let mut spec = serde_json::json!({
            "position_axes": 3,
            "image_placeholder": "<|vision_start|><|image_pad|><|vision_end|>",
        });
        spec["parts"] = self.parts.clone();
        if self.reads_video {
            spec["video_placeholder"] = "<|vision_start|><|video_pad|><|vision_end|>".into();
        }
        spec
    }

    /// Preprocesses every item and lays out its placeholder tokens.
    pub fn prepare(&self, items: &[MediaRequest], options: &Value) -> Result<Vec<PreparedMedia>> {
        let mut cfg = ProcessorConfig::from_json(options, self.patch_size, self.merge_size, self.temporal_patch_size)?;
        cfg.budget_covers_all_frames = self.timestamped_video;
        let mut out = Vec::new();
        for (request, item) in items.iter().enumerate() {
            out.extend(self.prepare_one(request, item, &cfg)?);
        }
        Ok(out)
    }

    fn prepare_one(&self, request: usize, item: &MediaRequest, cfg: &ProcessorConfig) -> Result<Vec<PreparedMedia>> {
        let features = 3 * cfg.temporal_patch_size * cfg.patch_size * cfg.patch_size;
        let input = |pixels: Vec<f32>, grid: [usize; 3], time_step: f64, token: u32| {
            let video = token == self.video_token;
            PreparedMedia {
                pixels_input: if video { "pixel_values_videos" } else { "pixel_values" }.into(),
                pixels,
                features,
                grid_input: if video { "video_grid_thw" } else { "image_grid_thw" }.into(),
                grid: grid.to_vec(),
                placeholder_token: token,
                positions: token_positions(grid, cfg.merge_size, time_step),
                request,
                prompt_text: None,
            }
        };
        match item.kind {
            MediaKind::Image => {
                let [path] = item.sources.as_slice() else {
                    return Err(Error::new(format!("an image is one file, not {}", item.sources.len())));
                };
                let (pixels, grid) = cfg.image(std::path::Path::new(path))?;
                Ok(vec![input(pixels, grid, 0.0, self.image_token)])
            }
            MediaKind::Video if !self.reads_video => Err(Error::new("this model plugin does not read videos")),
            MediaKind::Video if self.timestamped_video => {
                // Qwen3-VL: each temporal patch is its own group of tokens,
                // announced by its time in the prompt ("<0.5 seconds>").
                let (pixels, [t, h, w], kept) = cfg.video(&item.sources)?;
                let rows = pixels.len() / t;
                let mut groups = Vec::with_capacity(t);
                // The groups stand inside the template's own vision start
                // and end, as transformers 5's processor expands them
                // (`<|vision_start|><0.2 seconds><|vision_start|>…<|vision_end|>…<|vision_end|>`).
                let mut text = String::from("<|vision_start|>");
                for (g, seconds) in group_timestamps(&kept, cfg.fps, cfg.temporal_patch_size).iter().enumerate() {
                    text.push_str(&format!("<{seconds:.1} seconds><|vision_start|><|video_pad|><|vision_end|>"));
                    let part = pixels[g * rows..(g + 1) * rows].to_vec();
                    groups.push(input(part, [1, h, w], 1.0, self.video_token));
                }
                text.push_str("<|vision_end|>");
                groups[0].prompt_text = Some(text);
                Ok(groups)
            }
            MediaKind::Video => {
                // Qwen2.5-VL spaces temporal patches by their duration
                // (temporal_patch_size / fps seconds) in tokens_per_second.
                let (pixels, grid, _) = cfg.video(&item.sources)?;
                let time_step =
                    self.tokens_per_second.map_or(1.0, |tps| cfg.temporal_patch_size as f64 / cfg.fps * tps);
                Ok(vec![input(pixels, grid, time_step, self.video_token)])
            }
        }
    }
}

/// `[t, h, w]` positions of the tokens of a grid (`[t, h, w]` in patches,
/// merged by `merge` per side): time `index · time_step` (truncated), row,
/// column.
fn token_positions(grid: [usize; 3], merge: usize, time_step: f64) -> Vec<Vec<u32>> {
    let (t, h, w) = (grid[0], grid[1] / merge, grid[2] / merge);
    let mut positions: Vec<Vec<u32>> = (0..3).map(|_| Vec::with_capacity(t * h * w)).collect();
    for ti in 0..t {
        for y in 0..h {
            for x in 0..w {
                positions[0].push((ti as f64 * time_step) as u32);
                positions[1].push(y as u32);
                positions[2].push(x as u32);
            }
        }
    }
    positions
}

/// The time of each temporal patch of frames `kept` (indices into a video
/// at `fps`): the mean of its first and last frame's times, the last patch
/// padded with its last frame (transformers' `_calculate_timestamps`).
pub fn group_timestamps(kept: &[usize], fps: f64, group: usize) -> Vec<f64> {
    let mut indices = kept.to_vec();
    while !indices.len().is_multiple_of(group) {
        indices.push(*indices.last().expect("a video has frames"));
    }
    indices.chunks(group).map(|c| (c[0] as f64 / fps + c[c.len() - 1] as f64 / fps) / 2.0).collect()
}

/// The language model's part of a VL `config.json` (`text_config`, or the
/// whole config in the older flat layout), with an `mrope` rope type
/// turned into the default one (M-RoPE only changes which position each
/// frequency reads) and the M-RoPE sections returned.
pub fn text_config(config: &Value) -> Result<(Value, Vec<usize>, bool)> {
    let mut text = config.get("text_config").cloned().unwrap_or_else(|| config.clone());
    let mut sections = Vec::new();
    let mut interleaved = false;
    for key in ["rope_parameters", "rope_scaling"] {
        if let Some(Value::Object(params)) = text.get_mut(key) {
            if let Some(s) = params.get("mrope_section").and_then(Value::as_array) {
                sections = s.iter().filter_map(Value::as_u64).map(|v| v as usize).collect();
            }
            interleaved |= params.get("mrope_interleaved").and_then(Value::as_bool).unwrap_or(false);
            for type_key in ["rope_type", "type"] {
                if params.get(type_key).and_then(Value::as_str) == Some("mrope") {
                    params.insert(type_key.into(), "default".into());
                }
            }
        }
    }
    if sections.len() != 3 {
        return Err(Error::new("config.json: the text model's rope parameters need a 3-entry `mrope_section`"));
    }
    Ok((text, sections, interleaved))
}

/// Which position axis (0 time, 1 height, 2 width) each rotary frequency
/// reads: consecutive sections (Qwen2.5-VL), or interleaved `t h w t h w…`
/// within the sections' extents (Qwen3-VL).
pub fn mrope_axes(sections: &[usize], half: usize, interleaved: bool) -> Result<Vec<usize>> {
    if sections.iter().sum::<usize>() != half {
        return Err(Error::new(format!("config.json: `mrope_section` {sections:?} must sum to head_dim / 2 = {half}")));
    }
    Ok((0..half)
        .map(|i| {
            if interleaved {
                match i % 3 {
                    1 if i < 3 * sections[1] => 1,
                    2 if i < 3 * sections[2] => 2,
                    _ => 0,
                }
            } else if i < sections[0] {
                0
            } else if i < sections[0] + sections[1] {
                1
            } else {
                2
            }
        })
        .collect())
}

/// The decoder config, frequencies and M-RoPE axis map of a VL text model.
pub fn language_model(config: &Value, prefix: &str) -> Result<(DecoderConfig, Vec<f32>, Vec<usize>)> {
    let (text, sections, interleaved) = text_config(config)?;
    let mut cfg = DecoderConfig::from_hf_config(&text)?;
    cfg.prefix = prefix.to_owned();
    let inv_freq = cfg.rope.inv_freq(0);
    let axes = mrope_axes(&sections, inv_freq.len(), interleaved)?;
    Ok((cfg, inv_freq, axes))
}

/// The inverse frequencies of a vision tower's 2-D rotary embedding
/// (transformers' `VisionRotaryEmbedding(head_dim / 2)`): half the
/// rotated features turn with the patch row, half with its column.
pub fn vision_inv_freq(head_dim: usize, theta: f64) -> Vec<f32> {
    rope_inv_freq(head_dim / 2, theta)
}

/// The size of a Qwen ViT (`vision_config`): blocks, width, heads, and
/// the patches merged per side into one language-model token.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VisionShape {
    /// Transformer blocks.
    pub depth: usize,
    /// Width of the patch rows.
    pub hidden: usize,
    /// Attention heads.
    pub heads: usize,
    /// Patches merged per side.
    pub merge: usize,
}

impl VisionShape {
    /// Reads `depth`, `hidden_size`, `num_heads` and `spatial_merge_size`
    /// (defaults: the family's released sizes), checking the head split.
    pub fn from_config(vision: &Value, default_depth: usize, default_hidden: usize) -> Result<VisionShape> {
        let r = ConfigReader::new(vision);
        let shape = VisionShape {
            depth: r.usize_or("depth", default_depth)?,
            hidden: r.usize_or("hidden_size", default_hidden)?,
            heads: r.usize_or("num_heads", 16)?,
            merge: r.usize_or("spatial_merge_size", 2)?,
        };
        if shape.heads == 0 || !shape.hidden.is_multiple_of(shape.heads) {
            return Err(Error::new("config.json: vision `hidden_size` must be a multiple of `num_heads`"));
        }
        Ok(shape)
    }

    /// Features per head.
    pub fn head_dim(&self) -> usize {
        self.hidden / self.heads
    }
}

/// The language model's M-RoPE tables for `position_ids`: `[3, batch,
/// seq]`, or `[batch, seq]` text positions (the host's, for rows without
/// media), which every axis then shares.
pub fn mrope_tables(positions: &Tensor, inv_freq: &[f32], axes: &[usize]) -> Result<(Tensor, Tensor)> {
    let shared;
    let axes = if positions.dims()?.len() == 2 {
        shared = vec![0; axes.len()];
        &shared
    } else {
        axes
    };
    multi_axis_rotary(positions, inv_freq, axes)
}

/// The grids of an `*_grid_thw` input (`[items, 3]`).
pub fn read_grids(grid: &Tensor) -> Result<Vec<[usize; 3]>> {
    let values = grid.to_vec_f32()?;
    if values.len() % 3 != 0 {
        return Err(Error::new("a grid input must be [items, 3]"));
    }
    Ok(values.chunks(3).map(|g| [g[0] as usize, g[1] as usize, g[2] as usize]).collect())
}

/// The frame segments of vision rows: every temporal patch of every item
/// attends within itself (`h·w` rows each).
pub fn frame_segments(grids: &[[usize; 3]]) -> Vec<usize> {
    grids.iter().flat_map(|&[t, h, w]| std::iter::repeat_n(h * w, t)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frame_group_times_average_first_and_last_frame() {
        // Frames 0, 1, 2 at 2 fps; the last group padded with frame 2.
        assert_eq!(group_timestamps(&[0, 1, 2], 2.0, 2), vec![0.25, 1.0]);
        assert_eq!(group_timestamps(&[0, 4, 8, 12], 4.0, 2), vec![0.5, 2.5]);
    }

    #[test]
    fn mrope_axis_maps() {
        assert_eq!(mrope_axes(&[2, 3, 3], 8, false).unwrap(), vec![0, 0, 1, 1, 1, 2, 2, 2]);
        assert_eq!(mrope_axes(&[2, 3, 3], 8, true).unwrap(), vec![0, 1, 2, 0, 1, 2, 0, 1]);
        // Qwen3-VL's real layout: 24 + 20 + 20 = 64.
        let axes = mrope_axes(&[24, 20, 20], 64, true).unwrap();
        assert_eq!((0..3).map(|a| axes.iter().filter(|&&x| x == a).count()).collect::<Vec<_>>(), vec![24, 20, 20]);
        assert!(mrope_axes(&[2, 3, 4], 8, false).is_err());
    }
}
