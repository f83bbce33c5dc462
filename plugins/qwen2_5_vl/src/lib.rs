//! The Qwen2.5-VL architecture (`Qwen2_5_VLForConditionalGeneration`) as a
//! plugin the host loads at run time.
//!
//! Vision tower: patches embedded by a stride-equals-kernel `Conv3d`, 2-D
//! rotary positions, blocks of RMSNorm + attention + SwiGLU where most
//! blocks attend inside windows of `window_size` pixels (patches reordered
//! window by window) and `fullatt_block_indexes` attend over the whole
//! image, then the patch merger (2×2 patches → one language-model token).
//! Language model: Qwen2 (q/k/v biases) with M-RoPE in consecutive
//! sections; the vision rows replace the `<|image_pad|>` / `<|video_pad|>`
//! tokens.

use oxtune_helpers_decoder::{ConfigReader, Decoder, DecoderConfig, Rotary};
use oxtune_helpers_vision::layers::{
    index_tensor, patch_coordinates, patch_embed, rotary_tables, scatter_rows, token_positions, vision_attention,
    vision_rotary_angles,
};
use oxtune_helpers_vision::qwen::{
    frame_segments, language_model, mrope_tables, read_grids, vision_inv_freq, QwenMedia, VisionShape,
};
use oxtune_plugin_api::media::{MediaRequest, PreparedMedia};
use oxtune_plugin_api::nn::{Linear, RmsNorm};
use oxtune_plugin_api::serde_json::Value;
use oxtune_plugin_api::{
    declare_plugin, has_weight, scope, Descriptor, Error, Inputs, Modality, Model, ModelArchitecture, Plugin, Result,
    Tensor,
};

/// The vision tower's settings (`vision_config`).
#[derive(Clone, Debug)]
struct VisionConfig {
    shape: VisionShape,
    patch: usize,
    window_size: usize,
    full_attention_blocks: Vec<usize>,
    silu: bool,
}

impl VisionConfig {
    fn from_config(v: &Value) -> Result<VisionConfig> {
        let r = ConfigReader::new(v);
        let full_attention_blocks = r
            .get("fullatt_block_indexes")
            .and_then(Value::as_array)
            .map(|a| a.iter().filter_map(Value::as_u64).map(|i| i as usize).collect())
            .unwrap_or_else(|| vec![7, 15, 23, 31]);
        let silu = match r.get("hidden_act").and_then(Value::as_str).unwrap_or("silu") {
            "silu" => true,
            "gelu_pytorch_tanh" => false,
            other => return Err(Error::new(format!("config.json: vision `hidden_act` `{other}` is not supported"))),
        };
        Ok(VisionConfig {
            shape: VisionShape::from_config(v, 32, 1280)?,
            patch: r.usize_or("patch_size", 14)?,
            window_size: r.usize_or("window_size", 112)?,
            full_attention_blocks,
            silu,
        })
    }
}

/// The order of merge units window by window, and each window's length in
/// patches (transformers' `get_window_index`; empty windows dropped).
fn window_order(grids: &[[usize; 3]], merge: usize, window: usize) -> (Vec<usize>, Vec<usize>) {
    let (mut order, mut lengths, mut offset) = (Vec::new(), Vec::new(), 0);
    for &[t, h, w] in grids {
        let (lh, lw) = (h / merge, w / merge);
        let (nh, nw) = ((lh + window - lh % window) / window, (lw + window - lw % window) / window);
        for ti in 0..t {
            for wy in 0..nh {
                for wx in 0..nw {
                    let before = order.len();
                    for y in wy * window..(wy + 1) * window {
                        for x in wx * window..(wx + 1) * window {
                            if y < lh && x < lw {
                                order.push(offset + ti * lh * lw + y * lw + x);
                            }
                        }
                    }
                    if order.len() > before {
                        lengths.push((order.len() - before) * merge * merge);
                    }
                }
            }
        }
        offset += t * lh * lw;
    }
    (order, lengths)
}

/// The vision tower and patch merger of one checkpoint layout.
struct VisionTower {
    cfg: VisionConfig,
    prefix: String,
}

impl VisionTower {
    fn block(&self, i: usize, x: &Tensor, rotary: (&Tensor, &Tensor), segments: &[usize]) -> Result<Tensor> {
        let p = format!("{}.blocks.{i}", self.prefix);
        let h = RmsNorm::new(format!("{p}.norm1"), 1e-6).forward(x)?;
        let x = x.add(&vision_attention(&format!("{p}.attn"), &h, self.cfg.shape.heads, rotary, segments)?)?;
        let h = RmsNorm::new(format!("{p}.norm2"), 1e-6).forward(&x)?;
        let gate = Linear::new(format!("{p}.mlp.gate_proj")).forward(&h)?;
        let gate = if self.cfg.silu { gate.silu()? } else { gate.gelu()? };
        let up = Linear::new(format!("{p}.mlp.up_proj")).forward(&h)?;
        x.add(&Linear::new(format!("{p}.mlp.down_proj")).forward(&gate.mul(&up)?)?)
    }

    /// Language-model rows `[patches / merge², out_hidden]` for pixel rows.
    fn forward(&self, pixels: &Tensor, grids: &[[usize; 3]]) -> Result<Tensor> {
        let c = &self.cfg;
        let unit = c.shape.merge * c.shape.merge;
        let x = patch_embed(&format!("{}.patch_embed.proj", self.prefix), pixels)?;
        let n = x.dim(0)?;
        let (order, window_lengths) = window_order(grids, c.shape.merge, c.window_size / c.shape.merge / c.patch);
        if order.len() * unit != n {
            return Err(Error::new(format!(
                "image_grid_thw describes {} patches but pixel_values has {n} rows",
                order.len() * unit
            )));
        }
        // Reorder patches window by window (merge units stay together).
        let x =
            x.reshape(&[(n / unit) as i64, (unit * c.shape.hidden) as i64])?.index_select(&index_tensor(&order)?, 0)?;
        let mut x = x.reshape(&[n as i64, c.shape.hidden as i64])?;
        let angles = vision_rotary_angles(
            &patch_coordinates(grids, c.shape.merge),
            &vision_inv_freq(c.shape.head_dim(), 10000.0),
        );
        let half = c.shape.head_dim() / 2;
        let mut reordered = Vec::with_capacity(angles.len());
        for &u in &order {
            reordered.extend_from_slice(&angles[u * unit * half..(u + 1) * unit * half]);
        }
        let (cos, sin) = rotary_tables(&reordered, n, half)?;
        let full = frame_segments(grids);
        for i in 0..c.shape.depth {
            let segments = if c.full_attention_blocks.contains(&i) { &full } else { &window_lengths };
            // Each block's intermediates are released as it ends.
            x = scope(|| self.block(i, &x, (&cos, &sin), segments))?;
        }
        let m = format!("{}.merger", self.prefix);
        let x = RmsNorm::new(format!("{m}.ln_q"), 1e-6)
            .forward(&x)?
            .reshape(&[(n / unit) as i64, (unit * c.shape.hidden) as i64])?;
        let x = Linear::new(format!("{m}.mlp.0")).forward(&x)?.gelu_erf()?;
        let x = Linear::new(format!("{m}.mlp.2")).forward(&x)?;
        // Back to the processor's order.
        let mut inverse = vec![0; order.len()];
        for (i, &u) in order.iter().enumerate() {
            inverse[u] = i;
        }
        x.index_select(&index_tensor(&inverse)?, 0)
    }
}

/// A loaded Qwen2.5-VL.
struct Qwen25Vl {
    text: DecoderConfig,
    inv_freq: Vec<f32>,
    axes: Vec<usize>,
    vision: VisionConfig,
    media: QwenMedia,
}

impl Qwen25Vl {
    /// The checkpoint's layout: transformers 4 (`model.layers`, `visual`)
    /// or 5 (`model.language_model`, `model.visual`).
    fn parts(&self) -> Result<(Decoder, VisionTower)> {
        let new_layout = has_weight("model.language_model.embed_tokens.weight")?;
        let mut text = self.text.clone();
        text.prefix = if new_layout { "model.language_model" } else { "model" }.to_owned();
        let prefix = if has_weight("model.visual.patch_embed.proj.weight")? { "model.visual" } else { "visual" };
        Ok((Decoder::new(text), VisionTower { cfg: self.vision.clone(), prefix: prefix.to_owned() }))
    }
}

impl Model for Qwen25Vl {
    fn forward(&self, inputs: &Inputs) -> Result<Tensor> {
        let (decoder, tower) = self.parts()?;
        let ids = inputs.get("input_ids")?;
        let mut x = decoder.embed(&ids)?;
        for (pixels, grid, token) in [
            ("pixel_values", "image_grid_thw", self.media.image_token),
            ("pixel_values_videos", "video_grid_thw", self.media.video_token),
        ] {
            if let Some(pixels) = inputs.try_get(pixels) {
                let rows = tower.forward(&pixels, &read_grids(&inputs.get(grid)?)?)?;
                x = scatter_rows(&x, &token_positions(&ids, token)?, &rows)?;
            }
        }
        let (cos, sin) = mrope_tables(&inputs.get("position_ids")?, &self.inv_freq, &self.axes)?;
        decoder.forward_embeddings(x, &Rotary::Tables(cos, sin), |_, x| Ok(x))
    }

    fn media_spec(&self) -> Option<Value> {
        Some(self.media.spec())
    }

    fn prepare_media(&self, items: &[MediaRequest], options: &Value) -> Result<Vec<PreparedMedia>> {
        self.media.prepare(items, options)
    }
}

/// `Qwen2_5_VLForConditionalGeneration`.
pub struct Qwen25VlArchitecture;

impl ModelArchitecture for Qwen25VlArchitecture {
    fn descriptor(&self) -> Descriptor {
        Descriptor::model("qwen2_5_vl", env!("CARGO_PKG_VERSION"))
            .description("Qwen2.5-VL: windowed ViT with 2-D rotary, patch merger, M-RoPE Qwen2 decoder")
            .architectures(&["Qwen2_5_VLForConditionalGeneration"])
            .model_types(&["qwen2_5_vl"])
            .modality(Modality::VISION_LANGUAGE)
    }

    fn load(&self, config: &Value) -> Result<Box<dyn Model>> {
        let vision_json = config.get("vision_config").cloned().unwrap_or(Value::Null);
        let (mut text, inv_freq, axes) = language_model(config, "model")?;
        // Qwen2 always has q/k/v biases; its configs do not say so.
        text.attention_bias = true;
        let text_json = config.get("text_config").cloned().unwrap_or_else(|| config.clone());
        text.read_qwen_sliding_window(&text_json)?;
        if config.get("tie_word_embeddings").and_then(Value::as_bool).is_some() {
            text.tie_word_embeddings = config["tie_word_embeddings"].as_bool().unwrap_or(false);
        }
        Ok(Box::new(Qwen25Vl {
            text,
            inv_freq,
            axes,
            vision: VisionConfig::from_config(&vision_json)?,
            media: QwenMedia { parts: parts(), ..QwenMedia::from_config(config, &vision_json)? },
        }))
    }
}

/// The parts of both checkpoint layouts (transformers 4 and 5 names).
fn parts() -> Value {
    oxtune_plugin_api::serde_json::json!({
        "vit": ["visual.patch_embed", "visual.blocks", "model.visual.patch_embed", "model.visual.blocks"],
        "aligner": ["visual.merger", "model.visual.merger"],
        "llm": ["model.embed_tokens", "model.layers", "model.norm", "model.language_model", "lm_head"],
    })
}

fn plugin() -> Plugin {
    Plugin::new("oxtune-plugin-qwen2-5-vl", env!("CARGO_PKG_VERSION")).model(Qwen25VlArchitecture)
}

declare_plugin!(plugin);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn windows_follow_transformers_get_window_index() {
        // A 4x8-patch image, merge 2 -> 2x4 units, windows of 2x2 units:
        // two windows side by side (a third, empty one is dropped).
        let (order, lengths) = window_order(&[[1, 4, 8]], 2, 2);
        assert_eq!(order, vec![0, 1, 4, 5, 2, 3, 6, 7]);
        assert_eq!(lengths, vec![16, 16]);
        // 3x3 units with windows of 2: a ragged right column and bottom row.
        let (order, lengths) = window_order(&[[1, 6, 6]], 2, 2);
        assert_eq!(order, vec![0, 1, 3, 4, 2, 5, 6, 7, 8]);
        assert_eq!(lengths, vec![16, 8, 8, 4]);
    }
}
