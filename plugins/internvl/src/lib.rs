//! InternVL (`InternVLForConditionalGeneration`: InternVL3 and 3.5 in
//! transformers' layout) as a plugin the host loads at run time.
//!
//! Each image is cut into square tiles by aspect ratio, plus a thumbnail
//! (`oxtune_helpers_vision::tiles`). Vision tower (InternViT), per tile: a
//! stride-equals-kernel `Conv2d` patch embedding, a CLS token, absolute
//! position embeddings, then pre-norm blocks (LayerNorm or RMSNorm,
//! optional q/k norm over the whole width, q/k/v biases) whose attention
//! and MLP outputs are scaled per channel (`lambda_1`, `lambda_2`). The
//! CLS row is dropped, the patch grid is pixel-shuffled (`downsample_ratio`
//! 0.5: 2×2 patches → one row of 4× the width) and the MLP projector
//! (LayerNorm, Linear, GELU, Linear) maps each row to one language-model
//! token. The prompt holds `<img>` `<IMG_CONTEXT>`×N `</img>` per image;
//! the language model (Qwen3 or Qwen2) reads the projected rows in place of
//! the `<IMG_CONTEXT>` tokens, with plain 1-D positions.

use oxtune_helpers_decoder::{ConfigReader, Decoder, DecoderConfig};
use oxtune_helpers_vision::layers::{patch_embed, scatter_rows, token_positions};
use oxtune_helpers_vision::tiles::TileConfig;
use oxtune_plugin_api::abi::{DType, WANT_AUX_OUTPUTS};
use oxtune_plugin_api::graph::{aux_output, weight};
use oxtune_plugin_api::media::{MediaKind, MediaRequest, PreparedMedia};
use oxtune_plugin_api::nn::{LayerNorm, Linear, RmsNorm};
use oxtune_plugin_api::serde_json::{json, Value};
use oxtune_plugin_api::{
    declare_plugin, has_weight, scope, Descriptor, Error, Inputs, Modality, Model, ModelArchitecture, Plugin, Result,
    Tensor,
};

/// The forward input holding the tile grid of every image
/// (`[images, 3]`: tiles, patch rows, patch columns).
const TILE_GRID_INPUT: &str = "image_tile_grid";

/// The name of the auxiliary output holding the projected image features
/// (`[tiles, tokens per tile, text hidden]`), reported when the host asks
/// for auxiliary outputs: the rows the language model reads, for parity
/// checks against transformers' `get_image_features`.
pub const IMAGE_FEATURES: &str = "image_features";

/// A side given as one number or as `[height, width]`.
fn sides(r: &ConfigReader, key: &str, default: usize) -> Result<(usize, usize)> {
    match r.get(key) {
        None => Ok((default, default)),
        Some(Value::Array(a)) if a.len() == 2 && a.iter().all(|v| v.as_u64().is_some_and(|n| n > 0)) => {
            Ok((a[0].as_u64().unwrap() as usize, a[1].as_u64().unwrap() as usize))
        }
        Some(_) => r.usize(key).map(|n| (n, n)),
    }
}

/// GELU as transformers' `ACT2FN` names it.
fn activation(x: &Tensor, name: &str) -> Result<Tensor> {
    match name {
        "gelu" => x.gelu_erf(),
        "gelu_pytorch_tanh" | "gelu_new" => x.gelu(),
        other => Err(Error::new(format!("config.json: activation `{other}` is not supported (gelu is)"))),
    }
}

/// The vision tower's settings (`vision_config`).
#[derive(Clone, Debug)]
struct VisionConfig {
    hidden: usize,
    heads: usize,
    layers: usize,
    patch: usize,
    /// Patches per tile side.
    grid: usize,
    rms_norm: bool,
    eps: f64,
    qk_norm: bool,
    position_embeddings: bool,
    /// No final LayerNorm (`use_mean_pooling`).
    mean_pooling: bool,
    act: String,
}

impl VisionConfig {
    fn from_config(v: &Value) -> Result<VisionConfig> {
        let r = ConfigReader::new(v);
        let (image_h, image_w) = sides(&r, "image_size", 448)?;
        let (patch_h, patch_w) = sides(&r, "patch_size", 14)?;
        if image_h != image_w || patch_h != patch_w || image_h % patch_h != 0 {
            return Err(Error::new(format!(
                "config.json: vision `image_size` {image_h}x{image_w} must be square and a multiple of the \
                 square `patch_size` {patch_h}x{patch_w}"
            )));
        }
        let rms_norm = match r.get("norm_type").and_then(Value::as_str).unwrap_or("layer_norm") {
            "layer_norm" => false,
            "rms_norm" => true,
            other => return Err(Error::new(format!("config.json: vision `norm_type` `{other}` is not supported"))),
        };
        let cfg = VisionConfig {
            hidden: r.usize_or("hidden_size", 1024)?,
            heads: r.usize_or("num_attention_heads", 16)?,
            layers: r.usize_or("num_hidden_layers", 24)?,
            patch: patch_h,
            grid: image_h / patch_h,
            rms_norm,
            eps: r.f64_or("layer_norm_eps", 1e-6)?,
            qk_norm: r.bool_or("use_qk_norm", false)?,
            position_embeddings: r.bool_or("use_absolute_position_embeddings", true)?,
            mean_pooling: r.bool_or("use_mean_pooling", true)?,
            act: r.get("hidden_act").and_then(Value::as_str).unwrap_or("gelu").to_owned(),
        };
        if cfg.heads == 0 || !cfg.hidden.is_multiple_of(cfg.heads) {
            return Err(Error::new("config.json: vision `hidden_size` must be a multiple of `num_attention_heads`"));
        }
        Ok(cfg)
    }
}

/// Where a checkpoint keeps each part: transformers 5 saves the llava
/// layout (`language_model.model`, `vision_tower`), in memory it is
/// `model.language_model`, `model.vision_tower`.
struct Layout {
    vision: String,
    projector: String,
}

/// A loaded InternVL.
struct InternVl {
    text: DecoderConfig,
    vision: VisionConfig,
    /// Pixel-shuffle factor per side (`1 / downsample_ratio`).
    shuffle: usize,
    projector_act: String,
    image_token: u32,
}

impl InternVl {
    fn parts(&self) -> Result<(Decoder, Layout)> {
        let in_memory = has_weight("model.language_model.embed_tokens.weight")?;
        let mut text = self.text.clone();
        let layout = if in_memory {
            text.prefix = "model.language_model".into();
            text.lm_head = "lm_head".into();
            Layout { vision: "model.vision_tower".into(), projector: "model.multi_modal_projector".into() }
        } else {
            text.prefix = "language_model.model".into();
            text.lm_head = "language_model.lm_head".into();
            Layout { vision: "vision_tower".into(), projector: "multi_modal_projector".into() }
        };
        Ok((Decoder::new(text), layout))
    }

    fn norm(&self, prefix: String, x: &Tensor) -> Result<Tensor> {
        if self.vision.rms_norm {
            RmsNorm::new(prefix, self.vision.eps).forward(x)
        } else {
            LayerNorm::new(prefix, self.vision.eps).forward(x)
        }
    }

    /// Full (non-causal) attention within each tile, `x`: `[tiles, rows, hidden]`.
    fn attention(&self, p: &str, x: &Tensor) -> Result<Tensor> {
        let c = &self.vision;
        let (t, n) = (x.dim(0)? as i64, x.dim(1)? as i64);
        let (heads, hd) = (c.heads as i64, (c.hidden / c.heads) as i64);
        let project = |name: &str, norm: Option<&str>| -> Result<Tensor> {
            let mut y = Linear::new(format!("{p}.{name}")).forward(x)?;
            if let Some(norm) = norm.filter(|_| c.qk_norm) {
                // InternViT normalises q and k over the whole width, before the head split.
                y = RmsNorm::new(format!("{p}.{norm}"), 1e-6).forward(&y)?;
            }
            y.reshape(&[t, n, heads, hd])?.transpose(1, 2)
        };
        let (q, k, v) =
            (project("q_proj", Some("q_norm"))?, project("k_proj", Some("k_norm"))?, project("v_proj", None)?);
        let scores = q.matmul(&k.transpose(2, 3)?)?.scale(1.0 / (hd as f64).sqrt())?;
        let a = scores.to_dtype(DType::F32)?.softmax(-1)?.to_dtype(v.dtype()?)?.matmul(&v)?;
        let a = a.transpose(1, 2)?.reshape(&[t, n, heads * hd])?;
        Linear::new(format!("{p}.projection_layer")).forward(&a)
    }

    fn vision_layer(&self, prefix: &str, i: usize, x: &Tensor) -> Result<Tensor> {
        let p = format!("{prefix}.encoder.layer.{i}");
        let h = self.norm(format!("{p}.layernorm_before"), x)?;
        let a = self.attention(&format!("{p}.attention"), &h)?;
        let x = x.add(&a.mul(&weight(&format!("{p}.lambda_1"))?)?)?;
        let h = self.norm(format!("{p}.layernorm_after"), &x)?;
        let h = activation(&Linear::new(format!("{p}.mlp.fc1")).forward(&h)?, &self.vision.act)?;
        let h = Linear::new(format!("{p}.mlp.fc2")).forward(&h)?;
        x.add(&h.mul(&weight(&format!("{p}.lambda_2"))?)?)
    }

    /// The vision tower's last hidden state `[tiles, 1 + patches, hidden]`
    /// (CLS first) of pixel rows `[tiles, 3·side·side]`.
    fn vision_tower(&self, prefix: &str, pixels: &Tensor) -> Result<Tensor> {
        let c = &self.vision;
        let (t, g, p) = (pixels.dim(0)?, c.grid as i64, c.patch as i64);
        let side = c.grid * c.patch;
        if pixels.dim(1)? != 3 * side * side {
            return Err(Error::new(format!(
                "pixel_values rows hold {} values, but the vision tower reads 3x{side}x{side} tiles",
                pixels.dim(1)?
            )));
        }
        // [tiles, c, gy, py, gx, px] -> one row of c·p·p values per patch, row-major.
        let patches = pixels.reshape(&[t as i64, 3, g, p, g, p])?.permute(&[0, 2, 4, 1, 3, 5])?;
        let patches = patches.reshape(&[t as i64 * g * g, 3 * p * p])?;
        let x = patch_embed(&format!("{prefix}.embeddings.patch_embeddings.projection"), &patches)?;
        let x = x.reshape(&[t as i64, g * g, c.hidden as i64])?;
        let cls = weight(&format!("{prefix}.embeddings.cls_token"))?.broadcast_as(&[t, 1, c.hidden])?;
        let mut x = Tensor::cat(&[cls, x], 1)?;
        if c.position_embeddings {
            let positions = weight(&format!("{prefix}.embeddings.position_embeddings"))?;
            if positions.dim(1)? != c.grid * c.grid + 1 {
                return Err(Error::new(format!(
                    "`{prefix}.embeddings.position_embeddings` has {} rows but {side}x{side} tiles give {} patches \
                     and a CLS token (position interpolation is not supported)",
                    positions.dim(1)?,
                    c.grid * c.grid
                )));
            }
            x = x.add(&positions)?;
        }
        for i in 0..c.layers {
            // Each layer's intermediates are released as it ends.
            x = scope(|| self.vision_layer(prefix, i, &x))?;
        }
        if c.mean_pooling {
            Ok(x)
        } else {
            LayerNorm::new(format!("{prefix}.layernorm"), c.eps).forward(&x)
        }
    }

    /// Language-model rows `[tiles, tokens per tile, text hidden]` of pixel
    /// rows: the tower's patch rows (CLS dropped), pixel-shuffled and projected.
    fn image_features(&self, layout: &Layout, pixels: &Tensor) -> Result<Tensor> {
        let x = self.vision_tower(&layout.vision, pixels)?;
        let (t, g, hidden, r) =
            (x.dim(0)? as i64, self.vision.grid as i64, self.vision.hidden as i64, self.shuffle as i64);
        let x = x.narrow(1, 1, (g * g) as usize)?.reshape(&[t, g, g, hidden])?;
        // transformers' pixel_shuffle: fold r columns into the width, swap the
        // axes, fold r rows, swap back.
        let x = x.reshape(&[t, g, g / r, hidden * r])?.permute(&[0, 2, 1, 3])?;
        let x = x.reshape(&[t, g / r, g / r, hidden * r * r])?.permute(&[0, 2, 1, 3])?;
        let x = x.reshape(&[t, (g / r) * (g / r), hidden * r * r])?;
        let m = &layout.projector;
        let x = LayerNorm::new(format!("{m}.layer_norm"), 1e-5).forward(&x)?;
        let x = activation(&Linear::new(format!("{m}.linear_1")).forward(&x)?, &self.projector_act)?;
        Linear::new(format!("{m}.linear_2")).forward(&x)
    }

    /// Language-model tokens per tile.
    fn tokens_per_tile(&self) -> usize {
        (self.vision.grid / self.shuffle).pow(2)
    }
}

impl Model for InternVl {
    fn forward(&self, inputs: &Inputs) -> Result<Tensor> {
        let (decoder, layout) = self.parts()?;
        let ids = inputs.get("input_ids")?;
        let mut x = decoder.embed(&ids)?;
        if let Some(pixels) = inputs.try_get("pixel_values") {
            let features = self.image_features(&layout, &pixels)?;
            if inputs.try_get(WANT_AUX_OUTPUTS).is_some() {
                aux_output(IMAGE_FEATURES, &features)?;
            }
            let rows = features.reshape(&[-1, decoder.config().hidden_size as i64])?;
            x = scatter_rows(&x, &token_positions(&ids, self.image_token)?, &rows)?;
        }
        decoder.forward_embeddings(x, &decoder.rotary(inputs, &ids)?, |_, x| Ok(x))
    }

    fn media_spec(&self) -> Option<Value> {
        Some(json!({
            "position_axes": 1,
            "image_placeholder": "<img><IMG_CONTEXT></img>",
            "parts": {
                "vit": ["vision_tower", "model.vision_tower"],
                "aligner": ["multi_modal_projector", "model.multi_modal_projector"],
                "llm": ["language_model", "model.language_model", "lm_head"],
            },
        }))
    }

    fn prepare_media(&self, items: &[MediaRequest], options: &Value) -> Result<Vec<PreparedMedia>> {
        let cfg = TileConfig::from_json(options, self.vision.grid * self.vision.patch)?;
        let side = self.vision.grid * self.vision.patch;
        if cfg.tile != (side, side) {
            return Err(Error::new(format!(
                "preprocessor config: tiles of {}x{} but the vision tower reads {side}x{side}",
                cfg.tile.0, cfg.tile.1
            )));
        }
        let mut out = Vec::with_capacity(items.len());
        for (request, item) in items.iter().enumerate() {
            let path = match (item.kind, item.sources.as_slice()) {
                (MediaKind::Image, [path]) => path,
                (MediaKind::Image, sources) => {
                    return Err(Error::new(format!("an image is one file, not {}", sources.len())))
                }
                (MediaKind::Video, _) => return Err(Error::new("the InternVL plugin reads images, not videos")),
            };
            let (pixels, tiles) = cfg.image(std::path::Path::new(path))?;
            let tokens = tiles * self.tokens_per_tile();
            out.push(PreparedMedia {
                pixels_input: "pixel_values".into(),
                pixels,
                features: cfg.features(),
                grid_input: TILE_GRID_INPUT.into(),
                grid: vec![tiles, self.vision.grid, self.vision.grid],
                placeholder_token: self.image_token,
                positions: vec![(0..tokens as u32).collect()],
                request,
                prompt_text: None,
            });
        }
        Ok(out)
    }
}

/// `InternVLForConditionalGeneration`.
pub struct InternVlArchitecture;

impl ModelArchitecture for InternVlArchitecture {
    fn descriptor(&self) -> Descriptor {
        Descriptor::model("internvl", env!("CARGO_PKG_VERSION"))
            .description("InternVL: InternViT on dynamic tiles, pixel shuffle, MLP projector, Qwen2/Qwen3 decoder")
            .architectures(&["InternVLForConditionalGeneration"])
            .model_types(&["internvl"])
            .modality(Modality::VISION_LANGUAGE)
    }

    fn load(&self, config: &Value) -> Result<Box<dyn Model>> {
        let text_json = config
            .get("text_config")
            .ok_or_else(|| Error::new("config.json: InternVL needs `text_config` (the language model's settings)"))?;
        let vision_json = config
            .get("vision_config")
            .ok_or_else(|| Error::new("config.json: InternVL needs `vision_config` (the vision tower's settings)"))?;
        let mut text = DecoderConfig::from_hf_config(text_json)?;
        match text_json.get("model_type").and_then(Value::as_str).unwrap_or("qwen2") {
            "qwen3" => text.qk_norm = true,
            "qwen2" => text.attention_bias = true,
            other => {
                return Err(Error::new(format!(
                    "config.json: text_config.model_type `{other}` is not supported by the InternVL plugin \
                     (qwen2 and qwen3 are)"
                )))
            }
        }
        text.read_qwen_sliding_window(text_json)?;
        if let Some(tie) = config.get("tie_word_embeddings").and_then(Value::as_bool) {
            text.tie_word_embeddings = tie;
        }
        let r = ConfigReader::new(config);
        let ratio = r.f64_or("downsample_ratio", 0.5)?;
        let shuffle = (1.0 / ratio).round() as usize;
        let vision = VisionConfig::from_config(vision_json)?;
        if shuffle == 0 || (1.0 / ratio - shuffle as f64).abs() > 1e-9 || !vision.grid.is_multiple_of(shuffle) {
            return Err(Error::new(format!(
                "config.json: `downsample_ratio` {ratio} must be 1/n for an n dividing the {} patches per side",
                vision.grid
            )));
        }
        if let Some(layer) = r.get("vision_feature_layer").filter(|l| l.as_i64() != Some(-1)) {
            return Err(Error::new(format!("config.json: `vision_feature_layer` {layer} is not supported (-1 is)")));
        }
        if let Some(s) = r.get("vision_feature_select_strategy").and_then(Value::as_str).filter(|s| *s != "default") {
            return Err(Error::new(format!(
                "config.json: `vision_feature_select_strategy` `{s}` is not supported (default is)"
            )));
        }
        let model = InternVl {
            text,
            vision,
            shuffle,
            projector_act: r.get("projector_hidden_act").and_then(Value::as_str).unwrap_or("gelu").to_owned(),
            image_token: r.usize_or("image_token_id", 151667)? as u32,
        };
        if let Some(n) = r.get("image_seq_length").and_then(Value::as_u64) {
            if n as usize != model.tokens_per_tile() {
                return Err(Error::new(format!(
                    "config.json: `image_seq_length` {n} disagrees with the vision config, which gives {} tokens \
                     per tile",
                    model.tokens_per_tile()
                )));
            }
        }
        Ok(Box::new(model))
    }
}

fn plugin() -> Plugin {
    Plugin::new("oxtune-plugin-internvl", env!("CARGO_PKG_VERSION")).model(InternVlArchitecture)
}

declare_plugin!(plugin);

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> Value {
        let text = std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../tests/fixtures/vlm/tiny-internvl/config.json"
        ))
        .unwrap();
        oxtune_plugin_api::serde_json::from_str(&text).unwrap()
    }

    fn load_error(config: Value) -> String {
        match InternVlArchitecture.load(&config) {
            Ok(_) => panic!("the config was accepted"),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn the_fixture_config_loads_as_a_one_axis_vl_model() {
        let model = InternVlArchitecture.load(&config()).unwrap();
        let spec = model.media_spec().unwrap();
        assert_eq!(spec["position_axes"], 1);
        assert_eq!(spec["image_placeholder"], "<img><IMG_CONTEXT></img>");
    }

    #[test]
    fn configs_the_plugin_cannot_serve_are_named() {
        let mut c = config();
        c.as_object_mut().unwrap().remove("vision_config");
        assert!(load_error(c).contains("InternVL needs `vision_config`"));
        let mut c = config();
        c["text_config"]["model_type"] = "gpt_oss".into();
        assert!(load_error(c).contains("text_config.model_type `gpt_oss` is not supported"));
        let mut c = config();
        c["image_seq_length"] = 16.into();
        assert!(load_error(c).contains("`image_seq_length` 16 disagrees with the vision config, which gives 4"));
        let mut c = config();
        c["downsample_ratio"] = 0.3.into();
        assert!(load_error(c).contains("`downsample_ratio` 0.3"));
        let mut c = config();
        c["vision_config"]["norm_type"] = "batch_norm".into();
        assert!(load_error(c).contains("vision `norm_type` `batch_norm`"));
    }
}
