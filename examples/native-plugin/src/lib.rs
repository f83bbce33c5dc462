//! An example third-party plugin, built against `oxtune-plugin-api` only.
//!
//! Build it and list it:
//!
//! ```text
//! cargo build -p oxtune-example-plugin --features cdylib
//! oxtune plugins --plugin target/debug/liboxtune_example_plugin.so
//! ```
//!
//! It provides one component of each kind:
//!
//! - reward `keyword`: 1.0 when the completion contains the row's
//!   `keyword` column (case-insensitive), else 0.0;
//! - dataset adapter `qa-pairs`: `{"q": ..., "a": ...}` records become a
//!   user/assistant conversation;
//! - tuner `scale`: an IA3-style learned per-output-feature scale on the
//!   targeted linear layers (`{layer}.scale_vector`, initialised to ones);
//! - model `example-block`: a stack of pre-norm transformer blocks (GQA
//!   attention with RoPE, SwiGLU MLP) over `hidden_states` input; the ABI
//!   dispatch benchmark runs it.

use oxtune_plugin_api::nn::{rope_inv_freq, Linear, RmsNorm};
use oxtune_plugin_api::serde_json::{json, Map, Value};
use oxtune_plugin_api::{
    attention, declare_plugin, weight, AttentionSpec, DatasetAdapter, Descriptor, Error, Inputs, Model,
    ModelArchitecture, ParamInit, Plugin, Result, RewardFunction, RewardSample, Tensor, Tuner, TunerLayers, TunerParam,
};

/// Rewards completions that mention the row's keyword.
pub struct KeywordReward;

impl RewardFunction for KeywordReward {
    fn descriptor(&self) -> Descriptor {
        Descriptor::reward("keyword", env!("CARGO_PKG_VERSION"))
            .description("1.0 if the completion contains the row's `keyword` column")
    }

    fn score(&self, samples: &[RewardSample]) -> Result<Vec<f64>> {
        samples
            .iter()
            .enumerate()
            .map(|(i, s)| {
                let keyword = s
                    .columns
                    .get("keyword")
                    .and_then(Value::as_str)
                    .ok_or_else(|| Error::new(format!("sample {i} has no string column `keyword`")))?;
                let hit = s.completion.to_lowercase().contains(&keyword.to_lowercase());
                Ok(if hit { 1.0 } else { 0.0 })
            })
            .collect()
    }
}

/// Turns `{"q", "a"}` records into conversations.
pub struct QaPairs;

impl DatasetAdapter for QaPairs {
    fn descriptor(&self) -> Descriptor {
        Descriptor::dataset_adapter("qa-pairs", env!("CARGO_PKG_VERSION"))
            .description("{\"q\", \"a\"} records as a user/assistant conversation")
            .columns(&["q", "a"])
    }

    fn adapt(&self, record: &Map<String, Value>) -> Result<Value> {
        let field = |name: &str| {
            record
                .get(name)
                .and_then(Value::as_str)
                .ok_or_else(|| Error::new(format!("record has no string field `{name}`")))
        };
        Ok(json!({
            "messages": [
                {"role": "user", "content": field("q")?},
                {"role": "assistant", "content": field("a")?},
            ]
        }))
    }
}

/// An IA3-style tuner: `base ⊙ s` with a learned vector `s` per layer.
pub struct ScaleTuner;

struct ScaleLayers;

impl Tuner for ScaleTuner {
    fn descriptor(&self) -> Descriptor {
        Descriptor::tuner("scale", env!("CARGO_PKG_VERSION"))
            .description("learned per-feature scaling of targeted linear outputs (IA3-style)")
    }

    fn load(&self, _config: &Value) -> Result<Box<dyn TunerLayers>> {
        Ok(Box::new(ScaleLayers))
    }
}

impl TunerLayers for ScaleLayers {
    fn params(&self, layer: &str, _in_features: usize, out_features: usize) -> Result<Vec<TunerParam>> {
        Ok(vec![TunerParam { name: format!("{layer}.scale_vector"), shape: vec![out_features], init: ParamInit::Ones }])
    }

    fn forward(&self, layer: &str, _x: &Tensor, base: &Tensor) -> Result<Tensor> {
        base.mul(&weight(&format!("{layer}.scale_vector"))?)
    }

    fn merge(&self, layer: &str) -> Result<Tensor> {
        // Scaling output feature o scales row o of the weight.
        let scale = weight(&format!("{layer}.scale_vector"))?;
        weight(&format!("{layer}.weight"))?.mul(&scale.reshape(&[-1, 1])?)
    }
}

/// The `example-block` architecture.
pub struct ExampleBlockArch;

/// Its configuration (`config.json`).
#[derive(Clone, Debug)]
pub struct ExampleBlock {
    layers: usize,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
    eps: f64,
    inv_freq: Vec<f32>,
}

impl ModelArchitecture for ExampleBlockArch {
    fn descriptor(&self) -> Descriptor {
        Descriptor::model("example-block", env!("CARGO_PKG_VERSION"))
            .description("pre-norm transformer blocks over hidden states (an API example)")
            .architectures(&["ExampleBlockModel"])
            .model_types(&["example-block"])
    }

    fn load(&self, config: &Value) -> Result<Box<dyn Model>> {
        let get = |key: &str| {
            config
                .get(key)
                .and_then(Value::as_u64)
                .ok_or_else(|| Error::new(format!("config.json: `{key}` is missing")))
        };
        let hidden = get("hidden_size")? as usize;
        let heads = get("num_attention_heads")? as usize;
        let kv_heads = config.get("num_key_value_heads").and_then(Value::as_u64).map_or(heads, |v| v as usize);
        let head_dim = hidden / heads;
        let theta = config.get("rope_theta").and_then(Value::as_f64).unwrap_or(10_000.0);
        Ok(Box::new(ExampleBlock {
            layers: get("num_hidden_layers")? as usize,
            heads,
            kv_heads,
            head_dim,
            eps: config.get("rms_norm_eps").and_then(Value::as_f64).unwrap_or(1e-6),
            inv_freq: rope_inv_freq(head_dim, theta),
        }))
    }
}

impl ExampleBlock {
    fn heads(&self, x: &Tensor, n: usize) -> Result<Tensor> {
        let (b, s) = (x.dim(0)? as i64, x.dim(1)? as i64);
        x.reshape(&[b, s, n as i64, self.head_dim as i64])?.transpose(1, 2)
    }

    fn block(&self, l: usize, x: &Tensor) -> Result<Tensor> {
        let p = format!("layers.{l}");
        let h = RmsNorm::new(format!("{p}.attn_norm"), self.eps).forward(x)?;
        let q = self.heads(&Linear::new(format!("{p}.q_proj")).forward(&h)?, self.heads)?;
        let k = self.heads(&Linear::new(format!("{p}.k_proj")).forward(&h)?, self.kv_heads)?;
        let v = self.heads(&Linear::new(format!("{p}.v_proj")).forward(&h)?, self.kv_heads)?;
        let q = q.rope(&self.inv_freq, false, 1.0)?;
        let k = k.rope(&self.inv_freq, false, 1.0)?;
        let a = attention(l as u32, &q, &k, &v, AttentionSpec::default())?;
        let (b, s) = (x.dim(0)? as i64, x.dim(1)? as i64);
        let a = a.transpose(1, 2)?.reshape(&[b, s, -1])?;
        let x = x.add(&Linear::new(format!("{p}.o_proj")).forward(&a)?)?;
        let h = RmsNorm::new(format!("{p}.mlp_norm"), self.eps).forward(&x)?;
        let gate = Linear::new(format!("{p}.gate_proj")).forward(&h)?.silu()?;
        let up = Linear::new(format!("{p}.up_proj")).forward(&h)?;
        x.add(&Linear::new(format!("{p}.down_proj")).forward(&gate.mul(&up)?)?)
    }
}

impl Model for ExampleBlock {
    fn forward(&self, inputs: &Inputs) -> Result<Tensor> {
        let mut x = inputs.get("hidden_states")?;
        for l in 0..self.layers {
            x = self.block(l, &x)?;
        }
        Ok(x)
    }
}

fn plugin() -> Plugin {
    Plugin::new("oxtune-example-plugin", env!("CARGO_PKG_VERSION"))
        .reward(KeywordReward)
        .dataset_adapter(QaPairs)
        .tuner(ScaleTuner)
        .model(ExampleBlockArch)
}

declare_plugin!(plugin);
