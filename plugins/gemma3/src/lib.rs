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
use oxtune_helpers_decoder::ConfigReader;
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
    Rope::from_config(&view, head_dim)
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
}

/// `Gemma3ForCausalLM`.
pub struct Gemma3Text;

impl ModelArchitecture for Gemma3Text {
    fn descriptor(&self) -> Descriptor {
        Descriptor::model("gemma3", env!("CARGO_PKG_VERSION"))
            .description("Gemma-3 text decoder (sandwich norms, (1 + w) RMSNorm, local/global attention)")
            .architectures(&["Gemma3ForCausalLM"])
            .model_types(&["gemma3_text"])
    }

    fn load(&self, config: &Value) -> Result<Box<dyn Model>> {
        Ok(Box::new(Gemma3::from_config(config)?))
    }
}

fn plugin() -> Plugin {
    Plugin::new("oxtune-plugin-gemma3", env!("CARGO_PKG_VERSION")).model(Gemma3Text)
}

declare_plugin!(plugin);
