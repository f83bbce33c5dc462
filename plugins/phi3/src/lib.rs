//! Phi-3 (`Phi3ForCausalLM`), written on the plugin API's ops to
//! transformers' `modeling_phi3.py`: fused projections — one `qkv_proj`
//! split into queries, keys and values, one `gate_up_proj` split into the
//! SwiGLU's gate and up halves — and partial rotary embeddings (RoPE on the
//! first `partial_rotary_factor` of each head's features). LoRA on the
//! fused layers adapts `qkv_proj` and `gate_up_proj` as the modules PEFT
//! names, so adapters load in PEFT as saved.

use oxtune_helpers_decoder::rope::Rope;
use std::collections::BTreeMap;

use oxtune_helpers_decoder::{rope_scaling_metadata, ConfigReader};
use oxtune_plugin_api::gguf::{GgufLayout, GgufMetadata, GgufTensor, GgufValue};
use oxtune_plugin_api::graph::{attention, block, output_head, AttentionSpec, Tensor};
use oxtune_plugin_api::nn::{Embedding, Linear, RmsNorm};
use oxtune_plugin_api::serde_json::{json, Value};
use oxtune_plugin_api::{declare_plugin, Descriptor, Error, Inputs, Model, ModelArchitecture, Plugin, Result};

/// A configured Phi-3 model.
struct Phi3 {
    /// Its `config.json`, for the GGUF form's hyperparameters.
    config: Value,
    hidden: usize,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
    intermediate: usize,
    layers: usize,
    eps: f64,
    rope: Rope,
    sliding_window: Option<u32>,
    tied: bool,
}

impl Phi3 {
    fn from_config(config: &Value) -> Result<Phi3> {
        let r = ConfigReader::new(config);
        let hidden = r.usize("hidden_size")?;
        let heads = r.usize("num_attention_heads")?;
        let head_dim = r.usize_or("head_dim", hidden / heads.max(1))?;
        let activation = r.get("hidden_act").and_then(Value::as_str).unwrap_or("silu");
        if activation != "silu" {
            return Err(Error::new(format!("config.json: `hidden_act` `{activation}` is not Phi-3's silu")));
        }
        let rope = Rope::from_config(config, head_dim)?;
        if rope.rotary_dim % 2 != 0 || rope.rotary_dim > head_dim {
            return Err(Error::new(format!(
                "config.json: a rotary width of {} does not fit heads of {head_dim}",
                rope.rotary_dim
            )));
        }
        Ok(Phi3 {
            config: config.clone(),
            hidden,
            heads,
            kv_heads: r.usize_or("num_key_value_heads", heads)?,
            head_dim,
            intermediate: r.usize("intermediate_size")?,
            layers: r.usize("num_hidden_layers")?,
            eps: r.f64_or("rms_norm_eps", 1e-5)?,
            rope,
            sliding_window: r.get("sliding_window").and_then(Value::as_u64).map(|w| w as u32),
            tied: r.bool_or("tie_word_embeddings", false)?,
        })
    }

    /// RoPE on the first `rotary_dim` features of each head, the rest passed through.
    fn partial_rope(&self, x: &Tensor, inv_freq: &[f32]) -> Result<Tensor> {
        let rotary = self.rope.rotary_dim;
        if rotary == self.head_dim {
            return x.rope(inv_freq, false, self.rope.attention_scaling);
        }
        let rotated = x.narrow(3, 0, rotary)?.rope(inv_freq, false, self.rope.attention_scaling)?;
        Tensor::cat(&[rotated, x.narrow(3, rotary, self.head_dim - rotary)?], 3)
    }

    fn attention(&self, layer: usize, x: &Tensor, inv_freq: &[f32]) -> Result<Tensor> {
        let p = format!("model.layers.{layer}.self_attn");
        let (b, s) = (x.dim(0)? as i64, x.dim(1)? as i64);
        let (q_size, kv_size) = (self.heads * self.head_dim, self.kv_heads * self.head_dim);
        let qkv = Linear::new(format!("{p}.qkv_proj")).forward(x)?;
        let heads = |t: Tensor, n: usize| t.reshape(&[b, s, n as i64, self.head_dim as i64])?.transpose(1, 2);
        let q = heads(qkv.narrow(2, 0, q_size)?, self.heads)?;
        let k = heads(qkv.narrow(2, q_size, kv_size)?, self.kv_heads)?;
        let v = heads(qkv.narrow(2, q_size + kv_size, kv_size)?, self.kv_heads)?;
        let (q, k) = (self.partial_rope(&q, inv_freq)?, self.partial_rope(&k, inv_freq)?);
        let spec = AttentionSpec { sliding_window: self.sliding_window, ..AttentionSpec::default() };
        let a = attention(layer as u32, &q, &k, &v, spec)?;
        let a = a.transpose(1, 2)?.reshape(&[b, s, q_size as i64])?;
        Linear::new(format!("{p}.o_proj")).forward(&a)
    }

    /// llama.cpp's `phi3`: the fused projections keep their fusion
    /// (`attn_qkv`, and `ffn_up` holding gate then up), RoPE rotates the
    /// first `rope.dimension_count` features of each head.
    fn layout(&self) -> Result<GgufLayout> {
        let arch = "phi3";
        let r = ConfigReader::new(&self.config);
        let mut metadata = BTreeMap::new();
        let theta = rope_scaling_metadata(&self.config, arch, &mut metadata)?;
        let u32_of = |n: usize| GgufValue::U32(n as u32);
        let context = r.usize_or("max_position_embeddings", 4096)?;
        for (key, value) in [
            ("context_length", u32_of(context)),
            ("rope.scaling.original_context_length", u32_of(r.usize_or("original_max_position_embeddings", context)?)),
            ("embedding_length", u32_of(self.hidden)),
            ("feed_forward_length", u32_of(self.intermediate)),
            ("block_count", u32_of(self.layers)),
            ("attention.head_count", u32_of(self.heads)),
            ("attention.head_count_kv", u32_of(self.kv_heads)),
            ("attention.layer_norm_rms_epsilon", GgufValue::F32(self.eps as f32)),
            ("rope.dimension_count", u32_of(self.rope.rotary_dim)),
            ("rope.freq_base", GgufValue::F32(theta)),
        ] {
            metadata.insert(format!("{arch}.{key}"), value);
        }
        if let Some(window) = self.sliding_window {
            metadata.insert(format!("{arch}.attention.sliding_window"), GgufValue::U32(window));
        }
        let mut tensors = vec![
            GgufTensor::renamed("model.embed_tokens.weight", "token_embd.weight"),
            GgufTensor::renamed("model.norm.weight", "output_norm.weight"),
        ];
        if !self.tied {
            tensors.push(GgufTensor::renamed("lm_head.weight", "output.weight"));
        }
        for i in 0..self.layers {
            let l = format!("model.layers.{i}");
            for (hf, gguf) in [
                ("input_layernorm", "attn_norm"),
                ("self_attn.qkv_proj", "attn_qkv"),
                ("self_attn.o_proj", "attn_output"),
                ("post_attention_layernorm", "ffn_norm"),
                ("mlp.gate_up_proj", "ffn_up"),
                ("mlp.down_proj", "ffn_down"),
            ] {
                tensors.push(GgufTensor::renamed(format!("{l}.{hf}.weight"), format!("blk.{i}.{gguf}.weight")));
            }
        }
        Ok(GgufLayout { architecture: arch.into(), metadata, tensors })
    }

    fn mlp(&self, layer: usize, x: &Tensor) -> Result<Tensor> {
        let p = format!("model.layers.{layer}.mlp");
        let gate_up = Linear::new(format!("{p}.gate_up_proj")).forward(x)?;
        let gate = gate_up.narrow(2, 0, self.intermediate)?;
        let up = gate_up.narrow(2, self.intermediate, self.intermediate)?;
        Linear::new(format!("{p}.down_proj")).forward(&up.mul(&gate.silu()?)?)
    }
}

impl Model for Phi3 {
    fn forward(&self, inputs: &Inputs) -> Result<Tensor> {
        let ids = inputs.get("input_ids")?;
        let max_position = match inputs.try_get("position_ids") {
            Some(p) if self.rope.depends_on_length() => p.to_vec_f32()?.into_iter().fold(0f32, f32::max) as usize,
            _ => ids.dim(1)?.saturating_sub(1),
        };
        let inv_freq = self.rope.inv_freq(max_position);
        let mut x = Embedding::new("model.embed_tokens").forward(&ids)?;
        for layer in 0..self.layers {
            x = block(&x, |x| {
                let l = format!("model.layers.{layer}");
                let h = RmsNorm::new(format!("{l}.input_layernorm"), self.eps).forward(x)?;
                let x = x.add(&self.attention(layer, &h, &inv_freq)?)?;
                let h = RmsNorm::new(format!("{l}.post_attention_layernorm"), self.eps).forward(&x)?;
                x.add(&self.mlp(layer, &h)?)
            })?;
        }
        let x = RmsNorm::new("model.norm", self.eps).forward(&x)?;
        output_head(if self.tied { "model.embed_tokens" } else { "lm_head" }, &x, None)
    }

    fn gguf_layout(&self) -> Option<Result<GgufLayout>> {
        Some(self.layout())
    }
}

/// `Phi3ForCausalLM`.
pub struct Phi3Architecture;

impl ModelArchitecture for Phi3Architecture {
    fn descriptor(&self) -> Descriptor {
        Descriptor::model("phi3", env!("CARGO_PKG_VERSION"))
            .description("Phi-3 decoder (fused qkv and gate/up projections, partial rotary)")
            .architectures(&["Phi3ForCausalLM"])
            .model_types(&["phi3"])
    }

    fn load(&self, config: &Value) -> Result<Box<dyn Model>> {
        Ok(Box::new(Phi3::from_config(config)?))
    }

    /// llama.cpp's `phi3` keys: the rotary width as a fraction of the
    /// head, the original context length, the sliding window.
    fn config_from_gguf(&self, metadata: &GgufMetadata) -> Option<Result<Value>> {
        let translate = || -> Result<Value> {
            let mut config = metadata.generic_config().clone();
            config["architectures"] = json!(["Phi3ForCausalLM"]);
            config["hidden_act"] = "silu".into();
            let head_dim = config["head_dim"].as_f64().unwrap_or(1.0);
            if let Some(rotary) = metadata.number("rope.dimension_count") {
                config["partial_rotary_factor"] = json!(rotary / head_dim);
            }
            if let Some(original) = metadata.number("rope.scaling.original_context_length") {
                config["original_max_position_embeddings"] = json!(original as u64);
            }
            if let Some(window) = metadata.number("attention.sliding_window") {
                config["sliding_window"] = json!(window as u64);
            }
            Ok(config)
        };
        Some(translate())
    }
}

fn plugin() -> Plugin {
    Plugin::new("oxtune-plugin-phi3", env!("CARGO_PKG_VERSION")).model(Phi3Architecture)
}

declare_plugin!(plugin);
