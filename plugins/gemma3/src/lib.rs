//! Gemma-3's text model (`Gemma3ForCausalLM`, `model_type` `gemma3_text`),
//! written on the plugin API's ops as a third-party author would, to
//! transformers' `modeling_gemma3.py`:
//!
//! - RMSNorm scales by `(1 + w)` (in f32), and each block has four of them:
//!   before and after attention, before and after the MLP ("sandwich");
//! - queries and keys get their own per-head RMSNorm before RoPE;
//! - token embeddings are multiplied by `√hidden_size`;
//! - layers alternate sliding-window (`sliding_attention`, RoPE base 10 000)
//!   and global attention (`full_attention`, RoPE base 1 000 000), each with
//!   its own `rope_parameters`;
//! - attention scores are scaled by `query_pre_attn_scalar^-½`;
//! - the MLP is GeGLU with tanh-approximated GELU; the head is tied.

use oxtune_helpers_decoder::rope::Rope;
use std::collections::BTreeMap;

use oxtune_helpers_decoder::{rope_scaling_metadata, ConfigReader};
use oxtune_plugin_api::gguf::{GgufLayout, GgufMetadata, GgufTensor, GgufValue};
use oxtune_plugin_api::graph::{attention, block, output_head, AttentionSpec, Tensor};
use oxtune_plugin_api::nn::{Embedding, Linear, RmsNorm};
use oxtune_plugin_api::serde_json::{json, Value};
use oxtune_plugin_api::{declare_plugin, Descriptor, Error, Inputs, Model, ModelArchitecture, Plugin, Result};

/// One layer's attention kind.
#[derive(Clone, Debug)]
struct LayerKind {
    /// The sliding window, for a `sliding_attention` layer.
    window: Option<u32>,
    /// Its RoPE inverse frequencies.
    inv_freq: Vec<f32>,
}

/// A configured Gemma-3 text model.
struct Gemma3 {
    /// Its `config.json`, for the GGUF form's hyperparameters.
    config: Value,
    hidden: usize,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
    eps: f64,
    query_pre_attn_scalar: f64,
    layers: Vec<LayerKind>,
    final_softcap: Option<f32>,
    attn_softcap: Option<f32>,
}

/// The RoPE of one layer type: `rope_parameters[type]` (transformers 5),
/// or the older `rope_theta` / `rope_local_base_freq` keys.
fn rope_for(config: &Value, layer_type: &str, head_dim: usize) -> Result<Rope> {
    Rope::from_config(&rope_view(config, layer_type), head_dim)
}

impl Gemma3 {
    fn from_config(config: &Value) -> Result<Gemma3> {
        let r = ConfigReader::new(config);
        let hidden = r.usize("hidden_size")?;
        let heads = r.usize("num_attention_heads")?;
        let head_dim = r.usize_or("head_dim", 256)?;
        let layers = r.usize("num_hidden_layers")?;
        let activation = r.get("hidden_activation").and_then(Value::as_str).unwrap_or("gelu_pytorch_tanh");
        if activation != "gelu_pytorch_tanh" {
            return Err(Error::new(format!(
                "config.json: `hidden_activation` `{activation}` is not Gemma-3's gelu_pytorch_tanh"
            )));
        }
        let window = r.usize_or("sliding_window", 4096)? as u32;
        let types: Vec<String> = match r.get("layer_types").and_then(Value::as_array) {
            Some(list) => list.iter().map(|t| t.as_str().unwrap_or_default().to_owned()).collect(),
            None => {
                // Older configs: every `sliding_window_pattern`-th layer is global.
                let pattern = r.usize_or("sliding_window_pattern", r.usize_or("_sliding_window_pattern", 6)?)?.max(1);
                (0..layers)
                    .map(|i| if (i + 1) % pattern == 0 { "full_attention" } else { "sliding_attention" }.to_owned())
                    .collect()
            }
        };
        if types.len() != layers {
            return Err(Error::new(format!(
                "config.json: `layer_types` has {} entries for {layers} layers",
                types.len()
            )));
        }
        // One RoPE per layer type, shared by the layers of that type.
        let sliding =
            LayerKind { window: Some(window), inv_freq: rope_for(config, "sliding_attention", head_dim)?.inv_freq(0) };
        let full = LayerKind { window: None, inv_freq: rope_for(config, "full_attention", head_dim)?.inv_freq(0) };
        let kinds = types
            .iter()
            .map(|t| match t.as_str() {
                "sliding_attention" => Ok(sliding.clone()),
                "full_attention" => Ok(full.clone()),
                other => Err(Error::new(format!("config.json: unknown layer type `{other}` in `layer_types`"))),
            })
            .collect::<Result<Vec<_>>>()?;
        let softcap = |key: &str| r.get(key).and_then(Value::as_f64).map(|v| v as f32);
        Ok(Gemma3 {
            config: config.clone(),
            hidden,
            heads,
            kv_heads: r.usize_or("num_key_value_heads", heads)?,
            head_dim,
            eps: r.f64_or("rms_norm_eps", 1e-6)?,
            query_pre_attn_scalar: r.f64_or("query_pre_attn_scalar", head_dim as f64)?,
            layers: kinds,
            final_softcap: softcap("final_logit_softcapping"),
            attn_softcap: softcap("attn_logit_softcapping"),
        })
    }

    /// llama.cpp's `gemma3`: norms stored as `1 + w`, the embedding scale
    /// and GeGLU implied, the global layers every `sliding_window_pattern`-th,
    /// the query scale fixed by the layer count (see
    /// [`llama_cpp_query_scalar`]). A model llama.cpp would read differently
    /// has no GGUF form.
    fn layout(&self) -> Result<GgufLayout> {
        let arch = "gemma3";
        let refuse =
            |what: String| Err(Error::new(format!("{what}: llama.cpp's `gemma3` cannot hold it (no GGUF form)")));
        let sliding: Vec<bool> = self.layers.iter().map(|k| k.window.is_some()).collect();
        let Some(period) = swa_period(&sliding) else {
            return refuse(format!("the layer types {sliding:?} (sliding or not) repeat with no period"));
        };
        let query_scalar = llama_cpp_query_scalar(self.layers.len(), self.hidden, self.heads, self.head_dim);
        if self.query_pre_attn_scalar != query_scalar {
            return refuse(format!(
                "`query_pre_attn_scalar` {} is not the {query_scalar} llama.cpp uses for {} layers",
                self.query_pre_attn_scalar,
                self.layers.len()
            ));
        }
        if self.attn_softcap.is_some() {
            return refuse("attention logit soft-capping".into());
        }
        let r = ConfigReader::new(&self.config);
        let mut metadata = BTreeMap::new();
        let full = rope_view(&self.config, "full_attention");
        let theta = rope_scaling_metadata(&full, arch, &mut metadata)?;
        let local = rope_scaling_metadata(&rope_view(&self.config, "sliding_attention"), arch, &mut BTreeMap::new())?;
        let u32_of = |n: usize| GgufValue::U32(n as u32);
        for (key, value) in [
            ("context_length", u32_of(r.usize_or("max_position_embeddings", 131_072)?)),
            ("embedding_length", u32_of(self.hidden)),
            ("block_count", u32_of(self.layers.len())),
            ("feed_forward_length", u32_of(r.usize("intermediate_size")?)),
            ("attention.head_count", u32_of(self.heads)),
            ("attention.head_count_kv", u32_of(self.kv_heads)),
            ("attention.layer_norm_rms_epsilon", GgufValue::F32(self.eps as f32)),
            ("attention.key_length", u32_of(self.head_dim)),
            ("attention.value_length", u32_of(self.head_dim)),
            ("rope.freq_base", GgufValue::F32(theta)),
        ] {
            metadata.insert(format!("{arch}.{key}"), value);
        }
        if let Some(window) = self.layers.iter().find_map(|k| k.window) {
            metadata.insert(format!("{arch}.attention.sliding_window"), GgufValue::U32(window));
            metadata.insert(format!("{arch}.attention.sliding_window_pattern"), u32_of(period));
            metadata.insert(format!("{arch}.rope.freq_base_swa"), GgufValue::F32(local));
        }
        if let Some(cap) = self.final_softcap {
            metadata.insert(format!("{arch}.final_logit_softcapping"), GgufValue::F32(cap));
        }
        let norm = |hf: String, gguf: String| GgufTensor { offset: Some(1.0), ..GgufTensor::renamed(hf, gguf) };
        let mut tensors = vec![
            GgufTensor::renamed("model.embed_tokens.weight", "token_embd.weight"),
            norm("model.norm.weight".into(), "output_norm.weight".into()),
        ];
        for i in 0..self.layers.len() {
            let l = format!("model.layers.{i}");
            for (hf, gguf) in [
                ("input_layernorm", "attn_norm"),
                ("self_attn.q_norm", "attn_q_norm"),
                ("self_attn.k_norm", "attn_k_norm"),
                ("post_attention_layernorm", "post_attention_norm"),
                ("pre_feedforward_layernorm", "ffn_norm"),
                ("post_feedforward_layernorm", "post_ffw_norm"),
            ] {
                tensors.push(norm(format!("{l}.{hf}.weight"), format!("blk.{i}.{gguf}.weight")));
            }
            for (hf, gguf) in [
                ("self_attn.q_proj", "attn_q"),
                ("self_attn.k_proj", "attn_k"),
                ("self_attn.v_proj", "attn_v"),
                ("self_attn.o_proj", "attn_output"),
                ("mlp.gate_proj", "ffn_gate"),
                ("mlp.up_proj", "ffn_up"),
                ("mlp.down_proj", "ffn_down"),
            ] {
                tensors.push(GgufTensor::renamed(format!("{l}.{hf}.weight"), format!("blk.{i}.{gguf}.weight")));
            }
        }
        Ok(GgufLayout { architecture: arch.into(), metadata, tensors })
    }

    /// Gemma's RMSNorm: `x / rms(x) · (1 + w)`, over the last dim.
    fn norm(&self, name: &str, x: &Tensor) -> Result<Tensor> {
        RmsNorm::new(name, self.eps).with_weight_offset(1.0).forward(x)
    }

    fn attention(&self, layer: usize, x: &Tensor) -> Result<Tensor> {
        let p = format!("model.layers.{layer}.self_attn");
        let kind = &self.layers[layer];
        let (b, s) = (x.dim(0)? as i64, x.dim(1)? as i64);
        let heads = |t: Tensor, n: usize| t.reshape(&[b, s, n as i64, self.head_dim as i64]);
        let q = heads(Linear::new(format!("{p}.q_proj")).forward(x)?, self.heads)?;
        let k = heads(Linear::new(format!("{p}.k_proj")).forward(x)?, self.kv_heads)?;
        let v = heads(Linear::new(format!("{p}.v_proj")).forward(x)?, self.kv_heads)?;
        let q = self.norm(&format!("{p}.q_norm"), &q)?.transpose(1, 2)?.rope(&kind.inv_freq, false, 1.0)?;
        let k = self.norm(&format!("{p}.k_norm"), &k)?.transpose(1, 2)?.rope(&kind.inv_freq, false, 1.0)?;
        let spec = AttentionSpec {
            scale: Some(self.query_pre_attn_scalar.powf(-0.5)),
            sliding_window: kind.window,
            softcap: self.attn_softcap,
            ..AttentionSpec::default()
        };
        let a = attention(layer as u32, &q, &k, &v.transpose(1, 2)?, spec)?;
        let a = a.transpose(1, 2)?.reshape(&[b, s, (self.heads * self.head_dim) as i64])?;
        Linear::new(format!("{p}.o_proj")).forward(&a)
    }

    fn mlp(&self, layer: usize, x: &Tensor) -> Result<Tensor> {
        let p = format!("model.layers.{layer}.mlp");
        let gate = Linear::new(format!("{p}.gate_proj")).forward(x)?.gelu()?;
        let up = Linear::new(format!("{p}.up_proj")).forward(x)?;
        Linear::new(format!("{p}.down_proj")).forward(&gate.mul(&up)?)
    }
}

impl Model for Gemma3 {
    fn forward(&self, inputs: &Inputs) -> Result<Tensor> {
        let ids = inputs.get("input_ids")?;
        let mut x = Embedding::new("model.embed_tokens").forward(&ids)?.scale((self.hidden as f64).sqrt())?;
        for layer in 0..self.layers.len() {
            x = block(&x, |x| {
                let l = format!("model.layers.{layer}");
                let h = self.norm(&format!("{l}.input_layernorm"), x)?;
                let h = self.norm(&format!("{l}.post_attention_layernorm"), &self.attention(layer, &h)?)?;
                let x = x.add(&h)?;
                let h = self.norm(&format!("{l}.pre_feedforward_layernorm"), &x)?;
                let h = self.norm(&format!("{l}.post_feedforward_layernorm"), &self.mlp(layer, &h)?)?;
                x.add(&h)
            })?;
        }
        let x = self.norm("model.norm", &x)?;
        output_head("model.embed_tokens", &x, self.final_softcap)
    }

    fn gguf_layout(&self) -> Option<Result<GgufLayout>> {
        Some(self.layout())
    }
}

/// `Gemma3ForCausalLM`.
pub struct Gemma3Text;

impl ModelArchitecture for Gemma3Text {
    fn descriptor(&self) -> Descriptor {
        Descriptor::model("gemma3", env!("CARGO_PKG_VERSION"))
            .description("Gemma-3 text decoder (sandwich norms, (1 + w) RMSNorm, local/global attention)")
            .architectures(&["Gemma3ForCausalLM"])
            // `gemma3`: llama.cpp's name, which GGUF files carry.
            .model_types(&["gemma3_text", "gemma3"])
    }

    fn load(&self, config: &Value) -> Result<Box<dyn Model>> {
        Ok(Box::new(Gemma3::from_config(config)?))
    }

    /// llama.cpp's `gemma3` keys: the layer pattern (no sliding window:
    /// every layer global), the two RoPE bases, the query scale the layer
    /// count implies, the final soft-cap.
    fn config_from_gguf(&self, metadata: &GgufMetadata) -> Option<Result<Value>> {
        let translate = || -> Result<Value> {
            let mut config = metadata.generic_config().clone();
            let layers = metadata.require("block_count")? as usize;
            let head_dim = metadata.require("attention.key_length")? as usize;
            let (hidden, heads) =
                (metadata.require("embedding_length")? as usize, metadata.require("attention.head_count")? as usize);
            let global = metadata.require("rope.freq_base")?;
            let local = metadata.number("rope.freq_base_swa").unwrap_or(LLAMA_CPP_LOCAL_ROPE_BASE);
            let period = match metadata.number("attention.sliding_window").filter(|&w| w > 0.0) {
                Some(_) => metadata.number("attention.sliding_window_pattern").unwrap_or(6.0) as usize,
                None => 1,
            };
            let types: Vec<&str> = (0..layers)
                .map(|i| if (i + 1) % period.max(1) == 0 { "full_attention" } else { "sliding_attention" })
                .collect();
            let mut full = json!({"rope_type": "default", "rope_theta": global});
            if let Some(scaling) = config.get("rope_scaling").and_then(Value::as_object) {
                for (key, value) in scaling {
                    full[key] = value.clone();
                }
                full["rope_theta"] = global.into();
            }
            let object = config.as_object_mut().expect("a config is an object");
            for key in ["rope_scaling", "rope_theta", "gguf_architecture"] {
                object.remove(key);
            }
            config["model_type"] = "gemma3_text".into();
            config["architectures"] = json!(["Gemma3ForCausalLM"]);
            config["hidden_activation"] = "gelu_pytorch_tanh".into();
            config["query_pre_attn_scalar"] = json!(llama_cpp_query_scalar(layers, hidden, heads, head_dim));
            if let Some(cap) = metadata.number("final_logit_softcapping").filter(|&c| c > 0.0) {
                config["final_logit_softcapping"] = json!(cap);
            }
            config["layer_types"] = json!(types);
            config["rope_parameters"] =
                json!({"full_attention": full, "sliding_attention": {"rope_type": "default", "rope_theta": local}});
            config["tie_word_embeddings"] = true.into();
            Ok(config)
        };
        Some(translate())
    }
}

/// The RoPE base llama.cpp gives sliding-window layers when the file
/// states none.
const LLAMA_CPP_LOCAL_ROPE_BASE: f64 = 10_000.0;

/// The period `p` of llama.cpp's `sliding_window_pattern` for layers
/// `sliding` (whether each has a window): layer `i` is global exactly when
/// `(i + 1) % p == 0`; `None` when no period fits.
fn swa_period(sliding: &[bool]) -> Option<usize> {
    let period = sliding.iter().position(|&s| !s).map_or(sliding.len() + 1, |first_global| first_global + 1);
    sliding.iter().enumerate().all(|(i, &s)| s == ((i + 1) % period != 0)).then_some(period)
}

/// The query scalar llama.cpp's `gemma3` uses (`scale = scalar^-½`):
/// `hidden / heads` for the 62-layer (27B) model, the head width otherwise.
fn llama_cpp_query_scalar(layers: usize, hidden: usize, heads: usize, head_dim: usize) -> f64 {
    if layers == 62 {
        (hidden / heads.max(1)) as f64
    } else {
        head_dim as f64
    }
}

/// The config with `rope_parameters` of one layer type at its top level
/// (what the shared RoPE readers take).
fn rope_view(config: &Value, layer_type: &str) -> Value {
    let mut view = config.clone();
    let params = config.get("rope_parameters").and_then(|p| p.get(layer_type)).cloned();
    let object = view.as_object_mut().expect("a config is a JSON object");
    match params {
        Some(p) => {
            object.insert("rope_parameters".into(), p);
        }
        None => {
            object.remove("rope_parameters");
            if layer_type == "sliding_attention" {
                let local = config.get("rope_local_base_freq").cloned().unwrap_or(json!(10_000.0));
                object.insert("rope_theta".into(), local);
                object.remove("rope_scaling");
            }
        }
    }
    view
}

fn plugin() -> Plugin {
    Plugin::new("oxtune-plugin-gemma3", env!("CARGO_PKG_VERSION")).model(Gemma3Text)
}

declare_plugin!(plugin);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layer_patterns_become_llama_cpp_periods_or_are_refused() {
        let (s, g) = (true, false);
        assert_eq!(swa_period(&[s, s, s, s, s, g, s, s, s, s, s, g]), Some(6));
        assert_eq!(swa_period(&[s, g]), Some(2));
        assert_eq!(swa_period(&[s, s]), Some(3));
        assert_eq!(swa_period(&[g, g]), Some(1));
        assert_eq!(swa_period(&[g, s]), None);
        assert_eq!(swa_period(&[s, g, g]), None);
    }
}
