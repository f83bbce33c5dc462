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
//! - tuner `ia3`: PEFT's IA³ — a learned vector rescales each targeted
//!   layer's output (`{layer}.ia3_l`, shape `[out, 1]`), or for the
//!   `feedforward_modules` its input (`[1, in]`); initialised to ones and
//!   saved as PEFT saves it (`peft_type: IA3`), so the adapters move
//!   between PEFT and oxtune;
//! - tuner `ln-tuning`: PEFT's LayerNorm tuning — the model's norm weights
//!   (every parameter named `...norm.weight`) are trained in place and
//!   nothing is added at the linear hook: the form of a tuner that trains
//!   base parameters, as `full` and `freeze` do;
//! - model `example-block`: a stack of pre-norm transformer blocks (GQA
//!   attention with RoPE, SwiGLU MLP) over `hidden_states` input; the ABI
//!   dispatch benchmark runs it.

use oxtune_plugin_api::nn::{rope_inv_freq, Linear, RmsNorm};
use oxtune_plugin_api::serde_json::{json, Map, Value};
use oxtune_plugin_api::{
    attention, declare_plugin, weight, AttentionSpec, DatasetAdapter, Descriptor, Error, InPlace, Inputs, Model,
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

/// PEFT's IA³ tuner.
pub struct Ia3Tuner;

/// A configured IA³: which modules scale their input, and the config to save.
struct Ia3Layers {
    /// Module names (`down_proj`) whose input, not output, is scaled.
    feedforward: Vec<String>,
    /// The run's configuration (PEFT keys).
    config: Value,
}

impl Tuner for Ia3Tuner {
    fn descriptor(&self) -> Descriptor {
        Descriptor::tuner("ia3", env!("CARGO_PKG_VERSION"))
            .description("IA³ (PEFT-compatible): learned rescaling of targeted layers' outputs, or feed-forward inputs")
    }

    fn load(&self, config: &Value) -> Result<Box<dyn TunerLayers>> {
        let feedforward = match config.get("feedforward_modules") {
            None | Some(Value::Null) => vec!["down_proj".to_owned()],
            Some(Value::Array(names)) => names
                .iter()
                .map(|n| {
                    n.as_str().map(str::to_owned).ok_or_else(|| Error::new("`feedforward_modules` must hold names"))
                })
                .collect::<Result<_>>()?,
            Some(other) => {
                return Err(Error::new(format!("`feedforward_modules` must be a list of names, not {other}")))
            }
        };
        Ok(Box::new(Ia3Layers { feedforward, config: config.clone() }))
    }
}

impl Ia3Layers {
    /// Whether `layer` (a full name) is one of the feed-forward modules.
    fn is_feedforward(&self, layer: &str) -> bool {
        let module = layer.rsplit('.').next().unwrap_or(layer);
        self.feedforward.iter().any(|f| f == module)
    }
}

impl TunerLayers for Ia3Layers {
    fn params(&self, layer: &str, in_features: usize, out_features: usize) -> Result<Vec<TunerParam>> {
        let shape = if self.is_feedforward(layer) { vec![1, in_features] } else { vec![out_features, 1] };
        Ok(vec![TunerParam { name: format!("{layer}.ia3_l"), shape, init: ParamInit::Ones }])
    }

    fn forward(&self, layer: &str, x: &Tensor, base: &Tensor) -> Result<Tensor> {
        let scale = weight(&format!("{layer}.ia3_l"))?.reshape(&[-1])?;
        if !self.is_feedforward(layer) {
            return base.mul(&scale);
        }
        // base(x ⊙ l) = (x ⊙ l) Wᵀ + b: the layer again, on the scaled input.
        let mut out = x.mul(&scale)?.matmul(&weight(&format!("{layer}.weight"))?.transpose(0, 1)?)?;
        let bias = format!("{layer}.bias");
        if oxtune_plugin_api::has_weight(&bias)? {
            out = out.add(&weight(&bias)?)?;
        }
        Ok(out)
    }

    fn merge(&self, layer: &str) -> Result<Tensor> {
        // diag(l) W for outputs, W diag(l) for inputs: `[out, 1]` or `[1, in]` broadcasts either way.
        weight(&format!("{layer}.weight"))?.mul(&weight(&format!("{layer}.ia3_l"))?)
    }

    fn merge_bias(&self, layer: &str) -> Result<Option<Tensor>> {
        // Scaling a layer's output scales its bias; scaling its input does not.
        let bias = format!("{layer}.bias");
        if self.is_feedforward(layer) || !oxtune_plugin_api::has_weight(&bias)? {
            return Ok(None);
        }
        Ok(Some(weight(&bias)?.mul(&weight(&format!("{layer}.ia3_l"))?.reshape(&[-1])?)?))
    }

    fn saved_config(&self) -> Option<Value> {
        let mut saved = json!({
            "auto_mapping": null, "base_model_name_or_path": null, "exclude_modules": null, "fan_in_fan_out": false,
            "feedforward_modules": self.feedforward, "inference_mode": true, "init_ia3_weights": true,
            "modules_to_save": null, "peft_type": "IA3", "peft_version": "0.21.2", "revision": null,
            "target_modules": [], "task_type": "CAUSAL_LM"
        });
        for key in ["target_modules", "base_model_name_or_path"] {
            if let Some(v) = self.config.get(key) {
                saved[key] = v.clone();
            }
        }
        Some(saved)
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

/// PEFT's LayerNorm tuning, in place: only the norm weights train.
pub struct LnTuning;

impl Tuner for LnTuning {
    fn descriptor(&self) -> Descriptor {
        Descriptor::tuner("ln-tuning", env!("CARGO_PKG_VERSION"))
            .description("LayerNorm tuning: the norm weights are trained in place, nothing else")
    }

    fn load(&self, _config: &Value) -> Result<Box<dyn TunerLayers>> {
        Ok(Box::new(InPlace::new(|name| name.ends_with("norm.weight"))))
    }
}

fn plugin() -> Plugin {
    Plugin::new("oxtune-example-plugin", env!("CARGO_PKG_VERSION"))
        .reward(KeywordReward)
        .dataset_adapter(QaPairs)
        .tuner(Ia3Tuner)
        .tuner(LnTuning)
        .model(ExampleBlockArch)
}

declare_plugin!(plugin);
