//! The Qwen3-VL architecture (`Qwen3VLForConditionalGeneration`) as a
//! plugin the host loads at run time.
//!
//! Vision tower: 16-pixel patches embedded by a stride-equals-kernel
//! `Conv3d` with bias, plus learned position embeddings (a square table
//! bilinearly interpolated to each image's grid), 2-D rotary positions,
//! LayerNorm blocks with a GELU MLP attending over each whole frame, and
//! the patch merger. DeepStack: the outputs of `deepstack_visual_indexes`
//! blocks pass through their own mergers and are added to the vision
//! tokens' hidden states after the first language-model layers.
//! Language model: Qwen3 (q/k norms) with interleaved M-RoPE. Videos: each
//! temporal patch is a token group of its own, announced by its time in
//! the prompt (`<0.5 seconds>`), with one pixel budget for all frames.

use oxtune_helpers_decoder::{ConfigReader, Decoder, DecoderConfig, Rotary};
use oxtune_helpers_vision::layers::{
    add_rows, patch_coordinates, patch_embed, rotary_tables, scatter_rows, token_positions, vision_attention,
    vision_rotary_angles,
};
use oxtune_helpers_vision::qwen::{
    frame_segments, language_model, mrope_tables, read_grids, vision_inv_freq, QwenMedia, VisionShape,
};
use oxtune_plugin_api::media::{MediaRequest, PreparedMedia};
use oxtune_plugin_api::nn::{LayerNorm, Linear};
use oxtune_plugin_api::serde_json::Value;
use oxtune_plugin_api::{
    constant, declare_plugin, scope, weight, DType, Descriptor, Error, Inputs, Modality, Model, ModelArchitecture,
    Plugin, Result, Tensor,
};

/// The vision tower's settings (`vision_config`).
#[derive(Clone, Debug)]
struct VisionConfig {
    shape: VisionShape,
    /// Side of the square position-embedding table.
    grid_side: usize,
    deepstack_layers: Vec<usize>,
}

impl VisionConfig {
    fn from_config(v: &Value) -> Result<VisionConfig> {
        let r = ConfigReader::new(v);
        let positions = r.usize_or("num_position_embeddings", 2304)?;
        let grid_side = (positions as f64).sqrt().round() as usize;
        if grid_side * grid_side != positions {
            return Err(Error::new("config.json: vision `num_position_embeddings` must be a square"));
        }
        let deepstack_layers = r
            .get("deepstack_visual_indexes")
            .and_then(Value::as_array)
            .map(|a| a.iter().filter_map(Value::as_u64).map(|i| i as usize).collect())
            .unwrap_or_default();
        if let Some(act) = r.get("hidden_act").and_then(Value::as_str) {
            if act != "gelu_pytorch_tanh" {
                return Err(Error::new(format!("config.json: vision `hidden_act` `{act}` is not supported")));
            }
        }
        Ok(VisionConfig { shape: VisionShape::from_config(v, 27, 1152)?, grid_side, deepstack_layers })
    }
}

/// `torch.linspace(0, end, steps)` in f32, as transformers computes it.
fn linspace(end: f32, steps: usize) -> Vec<f32> {
    if steps == 1 {
        return vec![0.0];
    }
    let step = end / (steps - 1) as f32;
    (0..steps).map(|i| if i < steps / 2 { step * i as f32 } else { end - step * (steps - 1 - i) as f32 }).collect()
}

/// The four corner indices and bilinear weights of every patch's position
/// embedding, in the processor's patch order (`fast_pos_embed_interpolate`).
fn interpolation(grids: &[[usize; 3]], merge: usize, side: usize) -> ([Vec<f32>; 4], [Vec<f32>; 4]) {
    let (mut idx, mut wts): ([Vec<f32>; 4], [Vec<f32>; 4]) = Default::default();
    for &[t, h, w] in grids {
        let (hs, ws) = (linspace((side - 1) as f32, h), linspace((side - 1) as f32, w));
        for &(r, c) in &patch_coordinates(&[[t, h, w]], merge) {
            let (y, x) = (hs[r], ws[c]);
            let (y0, x0) = (y as usize, x as usize);
            let (y1, x1) = ((y0 + 1).min(side - 1), (x0 + 1).min(side - 1));
            let (dy, dx) = (y - y0 as f32, x - x0 as f32);
            let corners = [(y0, x0), (y0, x1), (y1, x0), (y1, x1)];
            let weights = [(1.0 - dy) * (1.0 - dx), (1.0 - dy) * dx, dy * (1.0 - dx), dy * dx];
            for k in 0..4 {
                idx[k].push((corners[k].0 * side + corners[k].1) as f32);
                wts[k].push(weights[k]);
            }
        }
    }
    (idx, wts)
}

/// The vision tower, mergers and DeepStack mergers.
struct VisionTower {
    cfg: VisionConfig,
    prefix: String,
}

impl VisionTower {
    fn position_embeddings(&self, grids: &[[usize; 3]]) -> Result<Tensor> {
        let table = weight(&format!("{}.pos_embed.weight", self.prefix))?;
        let (idx, wts) = interpolation(grids, self.cfg.shape.merge, self.cfg.grid_side);
        let mut sum: Option<Tensor> = None;
        for k in 0..4 {
            let n = idx[k].len();
            let rows = table.index_select(&constant(idx[k].clone(), &[n], DType::U32)?, 0)?;
            let term = rows.mul(&constant(wts[k].clone(), &[n, 1], DType::F32)?.to_dtype(rows.dtype()?)?)?;
            sum = Some(match sum {
                Some(s) => s.add(&term)?,
                None => term,
            });
        }
        sum.ok_or_else(|| Error::new("no vision patches"))
    }

    fn block(&self, i: usize, x: &Tensor, rotary: (&Tensor, &Tensor), segments: &[usize]) -> Result<Tensor> {
        let p = format!("{}.blocks.{i}", self.prefix);
        let h = LayerNorm::new(format!("{p}.norm1"), 1e-6).forward(x)?;
        let x = x.add(&vision_attention(&format!("{p}.attn"), &h, self.cfg.shape.heads, rotary, segments)?)?;
        let h = LayerNorm::new(format!("{p}.norm2"), 1e-6).forward(&x)?;
        let h = Linear::new(format!("{p}.mlp.linear_fc1")).forward(&h)?.gelu()?;
        x.add(&Linear::new(format!("{p}.mlp.linear_fc2")).forward(&h)?)
    }

    /// A patch merger: 2×2 patches → one row, normalised before
    /// (`merger`) or after (`deepstack_merger_list.N`) the regrouping.
    fn merge(&self, prefix: &str, x: &Tensor, norm_after: bool) -> Result<Tensor> {
        let unit = (self.cfg.shape.merge * self.cfg.shape.merge) as i64;
        let rows = (x.dim(0)? as i64) / unit;
        let width = unit * self.cfg.shape.hidden as i64;
        let norm = LayerNorm::new(format!("{prefix}.norm"), 1e-6);
        let x = if norm_after {
            norm.forward(&x.reshape(&[rows, width])?)?
        } else {
            norm.forward(x)?.reshape(&[rows, width])?
        };
        let x = Linear::new(format!("{prefix}.linear_fc1")).forward(&x)?.gelu_erf()?;
        Linear::new(format!("{prefix}.linear_fc2")).forward(&x)
    }

    /// Language-model rows and the DeepStack rows, one set per chosen layer.
    fn forward(&self, pixels: &Tensor, grids: &[[usize; 3]]) -> Result<(Tensor, Vec<Tensor>)> {
        let c = &self.cfg;
        let x = patch_embed(&format!("{}.patch_embed.proj", self.prefix), pixels)?;
        let n = x.dim(0)?;
        let coords = patch_coordinates(grids, c.shape.merge);
        if coords.len() != n {
            return Err(Error::new(format!("the grid describes {} patches but pixel rows number {n}", coords.len())));
        }
        let mut x = x.add(&self.position_embeddings(grids)?)?;
        let angles = vision_rotary_angles(&coords, &vision_inv_freq(c.shape.head_dim(), 10000.0));
        let (cos, sin) = rotary_tables(&angles, n, c.shape.head_dim() / 2)?;
        let segments = frame_segments(grids);
        let mut deepstack = Vec::new();
        for i in 0..c.shape.depth {
            // Each block's intermediates are released as it ends.
            x = scope(|| self.block(i, &x, (&cos, &sin), &segments))?;
            if let Some(j) = c.deepstack_layers.iter().position(|&l| l == i) {
                deepstack.push(self.merge(&format!("{}.deepstack_merger_list.{j}", self.prefix), &x, true)?);
            }
        }
        Ok((self.merge(&format!("{}.merger", self.prefix), &x, false)?, deepstack))
    }
}

/// A loaded Qwen3-VL.
struct Qwen3Vl {
    text: DecoderConfig,
    inv_freq: Vec<f32>,
    axes: Vec<usize>,
    vision: VisionConfig,
    media: QwenMedia,
}

impl Model for Qwen3Vl {
    fn forward(&self, inputs: &Inputs) -> Result<Tensor> {
        let decoder = Decoder::new(self.text.clone());
        let tower = VisionTower { cfg: self.vision.clone(), prefix: "model.visual".to_owned() };
        let ids = inputs.get("input_ids")?;
        let mut x = decoder.embed(&ids)?;
        // Per media kind: the token positions and the DeepStack rows to add there.
        let mut deepstack: Vec<(Vec<usize>, Vec<Tensor>)> = Vec::new();
        for (pixels, grid, token) in [
            ("pixel_values", "image_grid_thw", self.media.image_token),
            ("pixel_values_videos", "video_grid_thw", self.media.video_token),
        ] {
            if let Some(pixels) = inputs.try_get(pixels) {
                let (rows, stack) = tower.forward(&pixels, &read_grids(&inputs.get(grid)?)?)?;
                let positions = token_positions(&ids, token)?;
                x = scatter_rows(&x, &positions, &rows)?;
                deepstack.push((positions, stack));
            }
        }
        let (cos, sin) = mrope_tables(&inputs.get("position_ids")?, &self.inv_freq, &self.axes)?;
        decoder.forward_embeddings(x, &Rotary::Tables(cos, sin), |layer, mut x| {
            for (positions, stack) in &deepstack {
                if let Some(rows) = stack.get(layer) {
                    x = add_rows(&x, positions, rows)?;
                }
            }
            Ok(x)
        })
    }

    fn media_spec(&self) -> Option<Value> {
        Some(self.media.spec())
    }

    fn prepare_media(&self, items: &[MediaRequest], options: &Value) -> Result<Vec<PreparedMedia>> {
        self.media.prepare(items, options)
    }
}

/// `Qwen3VLForConditionalGeneration`.
pub struct Qwen3VlArchitecture;

impl ModelArchitecture for Qwen3VlArchitecture {
    fn descriptor(&self) -> Descriptor {
        Descriptor::model("qwen3_vl", env!("CARGO_PKG_VERSION"))
            .description(
                "Qwen3-VL: ViT with interpolated position embeddings, DeepStack, interleaved M-RoPE Qwen3 decoder",
            )
            .architectures(&["Qwen3VLForConditionalGeneration"])
            .model_types(&["qwen3_vl"])
            .modality(Modality::VISION_LANGUAGE)
    }

    fn load(&self, config: &Value) -> Result<Box<dyn Model>> {
        let vision_json = config.get("vision_config").cloned().unwrap_or(Value::Null);
        let (mut text, inv_freq, axes) = language_model(config, "model.language_model")?;
        text.qk_norm = true;
        if let Some(tie) = config.get("tie_word_embeddings").and_then(Value::as_bool) {
            text.tie_word_embeddings = tie;
        }
        let mut media = QwenMedia::from_config(config, &vision_json)?;
        media.timestamped_video = true;
        media.parts = oxtune_plugin_api::serde_json::json!({
            "vit": ["model.visual.patch_embed", "model.visual.pos_embed", "model.visual.blocks"],
            "aligner": ["model.visual.merger", "model.visual.deepstack_merger_list"],
            "llm": ["model.language_model", "lm_head"],
        });
        Ok(Box::new(Qwen3Vl { text, inv_freq, axes, vision: VisionConfig::from_config(&vision_json)?, media }))
    }
}

fn plugin() -> Plugin {
    Plugin::new("oxtune-plugin-qwen3-vl", env!("CARGO_PKG_VERSION")).model(Qwen3VlArchitecture)
}

declare_plugin!(plugin);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn linspace_matches_torch_at_both_ends() {
        assert_eq!(linspace(7.0, 4), vec![0.0, 7.0 / 3.0, 7.0 - 7.0 / 3.0, 7.0]);
        assert_eq!(linspace(7.0, 1), vec![0.0]);
    }

    #[test]
    fn interpolation_weights_sum_to_one() {
        let (idx, wts) = interpolation(&[[1, 4, 6]], 2, 8);
        for p in 0..24 {
            let total: f32 = (0..4).map(|k| wts[k][p]).sum();
            assert!((total - 1.0).abs() < 1e-6);
            assert!((0..4).all(|k| idx[k][p] < 64.0));
        }
        // The first patch sits on the table's corner.
        assert_eq!((idx[0][0], wts[0][0]), (0.0, 1.0));
    }
}
