//! The decoder-only transformer that Llama, Mistral, Qwen2 and Qwen3 share,
//! as a helper for architecture plugins.
//!
//! An architecture plugin reads its `config.json` into a [`DecoderConfig`]
//! (choosing the family's options: q/k norms, which layers slide) and
//! returns a [`Decoder`]. Weight names are those of transformers'
//! `*ForCausalLM` checkpoints (`model.layers.N.self_attn.q_proj`, ...).
//!
//! Inputs: `input_ids` (`[batch, seq]`, integer) and, for length-dependent
//! RoPE scaling, `position_ids`. Output: the output head's result (logits
//! `[batch, seq, vocab]` unless the host asks for less; see
//! [`oxtune_plugin_api::abi::Op::OutputHead`]).

use std::collections::BTreeMap;

use serde_json::Value;

use oxtune_plugin_api::gguf::{GgufLayout, GgufTensor, GgufValue};
use oxtune_plugin_api::graph::{attention, block, has_weight, output_head, release, scope, AttentionSpec, Tensor};
use oxtune_plugin_api::nn::{Embedding, Linear, RmsNorm};
use oxtune_plugin_api::{Error, Inputs, LinearLayer, LinearRole, Model, Result};

use crate::rope::{apply_rotary, Rope};

/// The MLP's gate activation.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum Activation {
    /// `silu` (SwiGLU).
    Silu,
    /// `gelu_pytorch_tanh` / `gelu_new`.
    GeluTanh,
    /// `gelu` (exact).
    Gelu,
}

/// Everything a [`Decoder`] needs, read from `config.json`.
#[derive(Clone, Debug)]
pub struct DecoderConfig {
    /// Vocabulary size (logit count).
    pub vocab_size: usize,
    /// Residual stream width.
    pub hidden_size: usize,
    /// Transformer blocks.
    pub num_layers: usize,
    /// Query heads.
    pub num_heads: usize,
    /// Key/value heads (GQA when fewer than `num_heads`).
    pub num_kv_heads: usize,
    /// Features per head.
    pub head_dim: usize,
    /// RMSNorm epsilon.
    pub rms_norm_eps: f64,
    /// Rotary embedding.
    pub rope: Rope,
    /// RoPE rotates adjacent feature pairs instead of the two halves (the
    /// layout llama.cpp stores Llama's q/k projections in).
    pub rope_interleaved: bool,
    /// `q_proj`/`k_proj`/`v_proj` have biases (checked against the weights).
    pub attention_bias: bool,
    /// The MLP projections have biases (checked against the weights).
    pub mlp_bias: bool,
    /// RMSNorm on each query and key head before RoPE (Qwen3).
    pub qk_norm: bool,
    /// The output projection reuses the token embedding.
    pub tie_word_embeddings: bool,
    /// Per layer: the sliding attention window, if that layer slides.
    pub sliding_windows: Vec<Option<u32>>,
    /// The MLP activation.
    pub activation: Activation,
    /// Where the decoder's weights live: `model` (`model.layers.0...`), or
    /// `model.language_model` inside a vision-language checkpoint.
    pub prefix: String,
    /// The output projection's weight prefix (`lm_head`).
    pub lm_head: String,
}

/// How a decoder rotates queries and keys.
pub enum Rotary {
    /// The host's `rope` op with these frequencies and the batch's positions.
    Host(Vec<f32>),
    /// Precomputed cos and sin tables `[batch, 1, seq, head_dim / 2]`
    /// (multi-axis RoPE, computed by the plugin from its positions).
    Tables(Tensor, Tensor),
}

/// Reads config fields, naming the missing or malformed one.
pub struct ConfigReader<'a> {
    config: &'a Value,
}

impl<'a> ConfigReader<'a> {
    /// A reader over a parsed `config.json`.
    pub fn new(config: &'a Value) -> ConfigReader<'a> {
        ConfigReader { config }
    }

    /// The raw value of `key`, if present and not null.
    pub fn get(&self, key: &str) -> Option<&'a Value> {
        self.config.get(key).filter(|v| !v.is_null())
    }

    /// A required unsigned integer.
    pub fn usize(&self, key: &str) -> Result<usize> {
        match self.get(key) {
            None => Err(Error::new(format!("config.json: `{key}` is missing"))),
            Some(v) => v
                .as_u64()
                .map(|n| n as usize)
                .ok_or_else(|| Error::new(format!("config.json: `{key}` must be a non-negative integer, not {v}"))),
        }
    }

    /// An optional unsigned integer.
    pub fn usize_or(&self, key: &str, default: usize) -> Result<usize> {
        if self.get(key).is_some() {
            self.usize(key)
        } else {
            Ok(default)
        }
    }

    /// An optional number.
    pub fn f64_or(&self, key: &str, default: f64) -> Result<f64> {
        match self.get(key) {
            None => Ok(default),
            Some(v) => v.as_f64().ok_or_else(|| Error::new(format!("config.json: `{key}` must be a number, not {v}"))),
        }
    }

    /// An optional boolean.
    pub fn bool_or(&self, key: &str, default: bool) -> Result<bool> {
        match self.get(key) {
            None => Ok(default),
            Some(v) => {
                v.as_bool().ok_or_else(|| Error::new(format!("config.json: `{key}` must be true or false, not {v}")))
            }
        }
    }
}

impl DecoderConfig {
    /// The fields every Llama-family config has; family options
    /// (`qk_norm`, sliding windows) start off and are set by the plugin.
    pub fn from_hf_config(config: &Value) -> Result<DecoderConfig> {
        let r = ConfigReader::new(config);
        let hidden_size = r.usize("hidden_size")?;
        let num_heads = r.usize("num_attention_heads")?;
        if num_heads == 0 {
            return Err(Error::new("config.json: `num_attention_heads` must be positive"));
        }
        let num_kv_heads = r.usize_or("num_key_value_heads", num_heads)?;
        if num_kv_heads == 0 || num_heads % num_kv_heads != 0 {
            return Err(Error::new(format!(
                "config.json: `num_attention_heads` ({num_heads}) must be a multiple of `num_key_value_heads` ({num_kv_heads})"
            )));
        }
        let head_dim = r.usize_or("head_dim", hidden_size / num_heads)?;
        let num_layers = r.usize("num_hidden_layers")?;
        let activation = match r.get("hidden_act").and_then(Value::as_str).unwrap_or("silu") {
            "silu" | "swish" => Activation::Silu,
            "gelu_pytorch_tanh" | "gelu_new" => Activation::GeluTanh,
            "gelu" => Activation::Gelu,
            other => return Err(Error::new(format!("config.json: `hidden_act` `{other}` is not supported"))),
        };
        Ok(DecoderConfig {
            vocab_size: r.usize("vocab_size")?,
            hidden_size,
            num_layers,
            num_heads,
            num_kv_heads,
            head_dim,
            rms_norm_eps: r.f64_or("rms_norm_eps", 1e-6)?,
            rope: Rope::from_config(config, head_dim)?,
            rope_interleaved: false,
            attention_bias: r.bool_or("attention_bias", false)?,
            mlp_bias: r.bool_or("mlp_bias", false)?,
            qk_norm: false,
            tie_word_embeddings: r.bool_or("tie_word_embeddings", false)?,
            sliding_windows: vec![None; num_layers],
            activation,
            prefix: "model".to_owned(),
            lm_head: "lm_head".to_owned(),
        })
    }

    /// Qwen2-style sliding windows: with `use_sliding_window`, layers from
    /// `max_window_layers` on slide by `sliding_window` (used when the
    /// config has no `layer_types`).
    pub fn read_qwen_sliding_window(&mut self, config: &Value) -> Result<()> {
        if self.read_layer_types(config)? {
            return Ok(());
        }
        let r = ConfigReader::new(config);
        let window = r.usize_or("sliding_window", 0)? as u32;
        if r.bool_or("use_sliding_window", false)? && window > 0 {
            let from = r.usize_or("max_window_layers", self.num_layers)?;
            for slot in self.sliding_windows.iter_mut().skip(from) {
                *slot = Some(window);
            }
        }
        Ok(())
    }

    /// Sliding windows as transformers 5 states them: `layer_types`
    /// (`sliding_attention` layers slide by `sliding_window`). Returns
    /// whether the config had `layer_types`.
    pub fn read_layer_types(&mut self, config: &Value) -> Result<bool> {
        let r = ConfigReader::new(config);
        let Some(types) = r.get("layer_types") else { return Ok(false) };
        let types = types.as_array().ok_or_else(|| Error::new("config.json: `layer_types` must be a list"))?;
        if types.len() != self.num_layers {
            return Err(Error::new(format!(
                "config.json: `layer_types` has {} entries for {} layers",
                types.len(),
                self.num_layers
            )));
        }
        let window = r.usize_or("sliding_window", 0)? as u32;
        for (slot, t) in self.sliding_windows.iter_mut().zip(types) {
            *slot = match t.as_str() {
                Some("full_attention") => None,
                Some("sliding_attention") if window > 0 => Some(window),
                Some("sliding_attention") => {
                    return Err(Error::new("config.json: a `sliding_attention` layer needs `sliding_window`"))
                }
                _ => return Err(Error::new(format!("config.json: unknown layer type {t} in `layer_types`"))),
            };
        }
        Ok(true)
    }
}

/// llama.cpp's conventions for a decoder family (see [`Decoder::with_gguf`]).
#[derive(Clone, Debug)]
pub struct GgufNaming {
    /// llama.cpp's architecture name: `llama`, `qwen2`, `qwen3`.
    pub architecture: String,
    /// llama.cpp stores the q and k projections' rows permuted so that RoPE
    /// rotates adjacent pairs (Llama).
    pub permute_qk: bool,
}

/// The feed-forward part of a decoder layer, after the post-attention
/// norm: the dense gated MLP ([`GatedMlp`]) unless a plugin gives another
/// (a mixture of experts, [`crate::moe::SparseMoe`]).
pub trait FeedForward: Send + Sync {
    /// The output for `x` (`[batch, seq, hidden]`, normed) in layer
    /// `layer`, whose weights live under `prefix` (`model.layers.3.mlp`).
    fn forward(&self, layer: usize, prefix: &str, x: &Tensor) -> Result<Tensor>;

    /// The linear layers of layer `layer` under `prefix`.
    fn linear_layers(&self, layer: usize, prefix: &str) -> Vec<LinearLayer>;

    /// Layer `layer`'s weights under `prefix` with their llama.cpp names
    /// (`blk` is the layer's GGUF prefix, `blk.3`); an error when
    /// llama.cpp's architecture cannot hold this layer's form.
    fn gguf_tensors(&self, layer: usize, prefix: &str, blk: &str) -> Result<Vec<GgufTensor>>;

    /// The hyperparameters llama.cpp reads for this part under `arch`
    /// (expert counts), added to `metadata`.
    fn gguf_metadata(&self, arch: &str, metadata: &mut BTreeMap<String, GgufValue>) -> Result<()> {
        let _ = (arch, metadata);
        Ok(())
    }
}

/// The dense gated MLP of Llama-family decoders:
/// `down_proj(act(gate_proj(x)) * up_proj(x))`.
#[derive(Copy, Clone, Debug)]
pub struct GatedMlp {
    /// The gate's activation.
    pub activation: Activation,
    /// Whether the projections have biases (checked against the weights).
    pub bias: bool,
}

impl FeedForward for GatedMlp {
    fn forward(&self, _layer: usize, p: &str, x: &Tensor) -> Result<Tensor> {
        if self.bias && !has_weight(&format!("{p}.gate_proj.bias"))? {
            return Err(Error::new(format!(
                "config.json sets `mlp_bias` but the checkpoint has no `{p}.gate_proj.bias`"
            )));
        }
        // The gate and up projections are given up once multiplied: the
        // down projection runs with one intermediate-sized tensor alive.
        let hidden = scope(|| {
            let gate = Linear::new(format!("{p}.gate_proj")).forward(x)?;
            let gate = self.activation.apply(&gate)?;
            let up = Linear::new(format!("{p}.up_proj")).forward(x)?;
            gate.mul(&up)
        })?;
        Linear::new(format!("{p}.down_proj")).forward(&hidden)
    }

    fn linear_layers(&self, _layer: usize, p: &str) -> Vec<LinearLayer> {
        vec![
            LinearLayer::new(format!("{p}.gate_proj"), LinearRole::MlpGate),
            LinearLayer::new(format!("{p}.up_proj"), LinearRole::MlpUp),
            LinearLayer::new(format!("{p}.down_proj"), LinearRole::MlpDown),
        ]
    }

    fn gguf_tensors(&self, _layer: usize, p: &str, blk: &str) -> Result<Vec<GgufTensor>> {
        let mut tensors = Vec::new();
        for (hf, gguf) in [("gate_proj", "ffn_gate"), ("up_proj", "ffn_up"), ("down_proj", "ffn_down")] {
            for kind in ["weight", "bias"] {
                tensors.push(GgufTensor::renamed(format!("{p}.{hf}.{kind}"), format!("{blk}.{gguf}.{kind}")));
            }
        }
        Ok(tensors)
    }
}

impl Activation {
    /// The activation of `x`.
    pub fn apply(self, x: &Tensor) -> Result<Tensor> {
        match self {
            Activation::Silu => x.silu(),
            Activation::GeluTanh => x.gelu(),
            Activation::Gelu => x.gelu_erf(),
        }
    }
}

/// A decoder-only transformer language model.
pub struct Decoder {
    cfg: DecoderConfig,
    gguf: Option<(GgufNaming, Value)>,
    feed_forward: Box<dyn FeedForward>,
}

impl Decoder {
    /// The model for `cfg`, with the dense gated MLP.
    pub fn new(cfg: DecoderConfig) -> Decoder {
        let mlp = GatedMlp { activation: cfg.activation, bias: cfg.mlp_bias };
        Decoder { cfg, gguf: None, feed_forward: Box::new(mlp) }
    }

    /// The same model with another feed-forward part in every layer (a
    /// mixture of experts).
    pub fn with_feed_forward(mut self, feed_forward: Box<dyn FeedForward>) -> Decoder {
        self.feed_forward = feed_forward;
        self
    }

    /// Every linear layer, with its role: the attention projections, the
    /// feed-forward part's layers and, when not tied to the embedding,
    /// the output head.
    pub fn linear_layers(&self) -> Vec<LinearLayer> {
        let c = &self.cfg;
        let mut layers = Vec::new();
        for layer in 0..c.num_layers {
            let p = format!("{}.layers.{layer}", c.prefix);
            for (name, role) in [
                ("q_proj", LinearRole::AttentionQ),
                ("k_proj", LinearRole::AttentionK),
                ("v_proj", LinearRole::AttentionV),
                ("o_proj", LinearRole::AttentionO),
            ] {
                layers.push(LinearLayer::new(format!("{p}.self_attn.{name}"), role));
            }
            layers.extend(self.feed_forward.linear_layers(layer, &format!("{p}.mlp")));
        }
        if !c.tie_word_embeddings {
            layers.push(LinearLayer::new(c.lm_head.clone(), LinearRole::Head));
        }
        layers
    }

    /// The same model, with a GGUF form under `naming`; `config` is the
    /// `config.json` it was read from (for the hyperparameters llama.cpp
    /// stores that the forward pass does not need).
    pub fn with_gguf(mut self, naming: GgufNaming, config: &Value) -> Decoder {
        self.gguf = Some((naming, config.clone()));
        self
    }

    /// Its configuration.
    pub fn config(&self) -> &DecoderConfig {
        &self.cfg
    }

    fn split_heads(&self, x: &Tensor, heads: usize) -> Result<Tensor> {
        let (b, s) = (x.dim(0)? as i64, x.dim(1)? as i64);
        x.reshape(&[b, s, heads as i64, self.cfg.head_dim as i64])
    }

    fn attention_block(&self, layer: usize, x: &Tensor, rotary: &Rotary) -> Result<Tensor> {
        let c = &self.cfg;
        let p = format!("{}.layers.{layer}.self_attn", c.prefix);
        if c.attention_bias && !has_weight(&format!("{p}.q_proj.bias"))? {
            return Err(Error::new(format!(
                "config.json sets `attention_bias` but the checkpoint has no `{p}.q_proj.bias`"
            )));
        }
        let mut q = self.split_heads(&Linear::new(format!("{p}.q_proj")).forward(x)?, c.num_heads)?;
        let mut k = self.split_heads(&Linear::new(format!("{p}.k_proj")).forward(x)?, c.num_kv_heads)?;
        let v = self.split_heads(&Linear::new(format!("{p}.v_proj")).forward(x)?, c.num_kv_heads)?;
        if c.qk_norm {
            q = RmsNorm::new(format!("{p}.q_norm"), c.rms_norm_eps).forward(&q)?;
            k = RmsNorm::new(format!("{p}.k_norm"), c.rms_norm_eps).forward(&k)?;
        }
        let (q, k) = (q.transpose(1, 2)?, k.transpose(1, 2)?);
        let (q, k) = match rotary {
            Rotary::Host(inv_freq) => (
                q.rope(inv_freq, c.rope_interleaved, c.rope.attention_scaling)?,
                k.rope(inv_freq, c.rope_interleaved, c.rope.attention_scaling)?,
            ),
            Rotary::Tables(cos, sin) => (apply_rotary(&q, cos, sin)?, apply_rotary(&k, cos, sin)?),
        };
        let v = v.transpose(1, 2)?;
        let spec = AttentionSpec { sliding_window: c.sliding_windows[layer], ..AttentionSpec::default() };
        let a = attention(layer as u32, &q, &k, &v, spec)?;
        let (b, s) = (x.dim(0)? as i64, x.dim(1)? as i64);
        let a = a.transpose(1, 2)?.reshape(&[b, s, (c.num_heads * c.head_dim) as i64])?;
        Linear::new(format!("{p}.o_proj")).forward(&a)
    }

    fn inv_freq(&self, inputs: &Inputs, ids: &Tensor) -> Result<Vec<f32>> {
        if !self.cfg.rope.depends_on_length() {
            return Ok(self.cfg.rope.inv_freq(0));
        }
        let max_position = match inputs.try_get("position_ids") {
            Some(p) => p.to_vec_f32()?.into_iter().fold(0f32, f32::max) as usize,
            None => ids.dim(1)?.saturating_sub(1),
        };
        Ok(self.cfg.rope.inv_freq(max_position))
    }

    /// The host's rotary embedding for a forward pass over `ids`: the
    /// inverse frequencies, for the length the pass reaches when the rope
    /// type depends on it. The host turns them at `position_ids`.
    pub fn rotary(&self, inputs: &Inputs, ids: &Tensor) -> Result<Rotary> {
        Ok(Rotary::Host(self.inv_freq(inputs, ids)?))
    }

    /// The token embeddings `[batch, seq, hidden]` of `ids`.
    pub fn embed(&self, ids: &Tensor) -> Result<Tensor> {
        Embedding::new(format!("{}.embed_tokens", self.cfg.prefix)).forward(ids)
    }

    /// Logits from input embeddings `x`: every layer, with `after_layer`
    /// given each layer's output to change (DeepStack adds vision features
    /// there), then the final norm and the output projection.
    pub fn forward_embeddings(
        &self,
        mut x: Tensor,
        rotary: &Rotary,
        mut after_layer: impl FnMut(usize, Tensor) -> Result<Tensor>,
    ) -> Result<Tensor> {
        let c = &self.cfg;
        for layer in 0..c.num_layers {
            let y = block(&x, |x| {
                let norm = format!("{}.layers.{layer}.input_layernorm", c.prefix);
                let h = RmsNorm::new(norm, c.rms_norm_eps).forward(x)?;
                let x = x.add(&self.attention_block(layer, &h, rotary)?)?;
                let norm = format!("{}.layers.{layer}.post_attention_layernorm", c.prefix);
                let h = RmsNorm::new(norm, c.rms_norm_eps).forward(&x)?;
                let mlp = format!("{}.layers.{layer}.mlp", c.prefix);
                x.add(&self.feed_forward.forward(layer, &mlp, &h)?)
            })?;
            let next = after_layer(layer, y)?;
            // The layer's input and output handles are given up once the
            // next layer's input exists: one layer's hidden states held.
            x = release(&[x, y, next], &next)?;
        }
        let x = RmsNorm::new(format!("{}.norm", c.prefix), c.rms_norm_eps).forward(&x)?;
        let head = if c.tie_word_embeddings { format!("{}.embed_tokens", c.prefix) } else { c.lm_head.clone() };
        output_head(&head, &x, None)
    }
}

impl Model for Decoder {
    fn forward(&self, inputs: &Inputs) -> Result<Tensor> {
        let ids = inputs.get("input_ids")?;
        self.forward_embeddings(self.embed(&ids)?, &self.rotary(inputs, &ids)?, |_, x| Ok(x))
    }

    fn gguf_layout(&self) -> Option<Result<GgufLayout>> {
        let (naming, config) = self.gguf.as_ref()?;
        Some(self.gguf_layout_as(naming, config))
    }

    fn linear_layers(&self) -> Option<Vec<LinearLayer>> {
        Some(Decoder::linear_layers(self))
    }
}

/// The GGUF metadata llama.cpp reads for RoPE scaling (under `arch`),
/// from `config.json`'s `rope_parameters` (or `rope_scaling`); returns the
/// RoPE base.
pub fn rope_scaling_metadata(config: &Value, arch: &str, out: &mut BTreeMap<String, GgufValue>) -> Result<f32> {
    let params = config.get("rope_parameters").or_else(|| config.get("rope_scaling")).filter(|v| v.is_object());
    let field = |k: &str| params.and_then(|p| p.get(k)).and_then(Value::as_f64);
    let theta = field("rope_theta").or_else(|| config.get("rope_theta").and_then(Value::as_f64)).unwrap_or(10_000.0);
    let kind =
        params.and_then(|p| p.get("rope_type").or_else(|| p.get("type"))).and_then(Value::as_str).unwrap_or("default");
    let factor = || {
        field("factor")
            .map(|f| GgufValue::F32(f as f32))
            .ok_or_else(|| Error::new(format!("config.json: rope scaling `{kind}` needs `factor`")))
    };
    match kind {
        "default" => {}
        "linear" | "yarn" => {
            out.insert(format!("{arch}.rope.scaling.type"), GgufValue::Str(kind.to_owned()));
            out.insert(format!("{arch}.rope.scaling.factor"), factor()?);
            if kind == "yarn" {
                let original = field("original_max_position_embeddings")
                    .or_else(|| config.get("max_position_embeddings").and_then(Value::as_f64))
                    .unwrap_or(2048.0);
                out.insert(format!("{arch}.rope.scaling.original_context_length"), GgufValue::U32(original as u32));
            }
        }
        other => {
            return Err(Error::new(format!(
                "rope scaling `{other}` has no GGUF form here yet (default, linear and yarn have)"
            )))
        }
    }
    Ok(theta as f32)
}

impl Decoder {
    /// The decoder's GGUF form under `naming`: llama.cpp's keys and tensor
    /// names for the Llama-shaped families (`convert_hf_to_gguf.py`'s
    /// `LlamaModel` and the classes derived from it), the feed-forward part's
    /// own (experts) included; `config` is the model's `config.json`.
    pub fn gguf_layout_as(&self, naming: &GgufNaming, config: &Value) -> Result<GgufLayout> {
        let c = &self.cfg;
        let arch = naming.architecture.as_str();
        if let Some(window) = c.sliding_windows.iter().flatten().next() {
            return Err(Error::new(format!(
                "layers with a sliding window ({window}) have no GGUF form in llama.cpp's `{arch}`"
            )));
        }
        let r = ConfigReader::new(config);
        let mut metadata = BTreeMap::new();
        let theta = rope_scaling_metadata(config, arch, &mut metadata)?;
        let u32_of = |n: usize| GgufValue::U32(n as u32);
        for (key, value) in [
            ("context_length", u32_of(r.usize_or("max_position_embeddings", 2048)?)),
            ("embedding_length", u32_of(c.hidden_size)),
            ("block_count", u32_of(c.num_layers)),
            ("feed_forward_length", u32_of(r.usize("intermediate_size")?)),
            ("attention.head_count", u32_of(c.num_heads)),
            ("attention.head_count_kv", u32_of(c.num_kv_heads)),
            ("attention.layer_norm_rms_epsilon", GgufValue::F32(c.rms_norm_eps as f32)),
            ("rope.freq_base", GgufValue::F32(theta)),
            ("rope.dimension_count", u32_of(c.rope.rotary_dim)),
            ("attention.key_length", u32_of(c.head_dim)),
            ("attention.value_length", u32_of(c.head_dim)),
            ("vocab_size", u32_of(c.vocab_size)),
        ] {
            metadata.insert(format!("{arch}.{key}"), value);
        }
        let (mut tensors, mut feed_forward) = (Vec::new(), Vec::new());
        let mut add = |hf: String, gguf: String, permute_heads: Option<usize>| {
            tensors.push(GgufTensor { permute_heads: permute_heads.map(|h| h as u32), ..GgufTensor::renamed(hf, gguf) })
        };
        let p = &c.prefix;
        add(format!("{p}.embed_tokens.weight"), "token_embd.weight".into(), None);
        add(format!("{p}.norm.weight"), "output_norm.weight".into(), None);
        if !c.tie_word_embeddings {
            add(format!("{}.weight", c.lm_head), "output.weight".into(), None);
        }
        let permute = |heads: usize| naming.permute_qk.then_some(heads);
        for i in 0..c.num_layers {
            let l = format!("{p}.layers.{i}");
            add(format!("{l}.input_layernorm.weight"), format!("blk.{i}.attn_norm.weight"), None);
            add(format!("{l}.post_attention_layernorm.weight"), format!("blk.{i}.ffn_norm.weight"), None);
            let linears = [
                ("self_attn.q_proj", "attn_q", permute(c.num_heads)),
                ("self_attn.k_proj", "attn_k", permute(c.num_kv_heads)),
                ("self_attn.v_proj", "attn_v", None),
                ("self_attn.o_proj", "attn_output", None),
            ];
            for (hf, gguf, heads) in linears {
                for kind in ["weight", "bias"] {
                    add(format!("{l}.{hf}.{kind}"), format!("blk.{i}.{gguf}.{kind}"), heads);
                }
            }
            if c.qk_norm {
                add(format!("{l}.self_attn.q_norm.weight"), format!("blk.{i}.attn_q_norm.weight"), None);
                add(format!("{l}.self_attn.k_norm.weight"), format!("blk.{i}.attn_k_norm.weight"), None);
            }
            feed_forward.extend(self.feed_forward.gguf_tensors(i, &format!("{l}.mlp"), &format!("blk.{i}"))?);
        }
        tensors.extend(feed_forward);
        self.feed_forward.gguf_metadata(arch, &mut metadata)?;
        Ok(GgufLayout { architecture: arch.to_owned(), metadata, tensors })
    }
}
