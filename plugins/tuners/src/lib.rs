//! oxtune's built-in tuners: LoRA and DoRA as PEFT defines them, applied
//! at the host's `linear` hook so every architecture plugin gets them with
//! no code of its own, and full fine-tuning and freeze, which train base
//! parameters in place.
//!
//! Both read PEFT's `adapter_config.json` keys (`r`, `lora_alpha`,
//! `use_rslora`, `init_lora_weights`) and use PEFT's parameter names
//! (`{layer}.lora_A.weight`, `{layer}.lora_B.weight`,
//! `{layer}.lora_magnitude_vector`), so adapters move between PEFT and
//! oxtune unchanged.
//!
//! - LoRA: `y = base + s · dropout(x) Aᵀ Bᵀ`, with `s = alpha / r` (`alpha / √r`
//!   with rsLoRA).
//! - full: every base parameter is trained; saved as a whole model.
//! - freeze: only the parameters matched by `trainable_parameters`
//!   (regexes), or all but those matched by `freeze_parameters`, are trained.
//! - DoRA: with `V = W + s·BA` and `n = ‖V‖` per output row (both treated
//!   as constants in the backward pass, as PEFT does),
//!   `y = base + (m/n − 1)·(base − b) + (m/n)·s·x Aᵀ Bᵀ`.

use oxtune_plugin_api::serde_json::Value;
use oxtune_plugin_api::{
    declare_plugin, weight, Descriptor, Error, InPlace, ParamInit, Plugin, Result, Tensor, Tuner, TunerLayers,
    TunerParam,
};

/// The LoRA settings shared by LoRA and DoRA.
#[derive(Clone, Debug)]
struct LoraConfig {
    rank: usize,
    scale: f64,
    gaussian_init: bool,
    /// PEFT's `lora_dropout`, applied to the adapter's input while training.
    dropout: f64,
    /// The run's configuration, saved in PEFT's format.
    peft: Value,
}

impl LoraConfig {
    fn from_peft(config: &Value) -> Result<LoraConfig> {
        let rank = config.get("r").and_then(Value::as_u64).unwrap_or(8) as usize;
        if rank == 0 {
            return Err(Error::new("adapter config: `r` must be positive"));
        }
        let alpha = config.get("lora_alpha").and_then(Value::as_f64).unwrap_or(8.0);
        let rs = config.get("use_rslora").and_then(Value::as_bool).unwrap_or(false);
        let scale = if rs { alpha / (rank as f64).sqrt() } else { alpha / rank as f64 };
        let gaussian_init = config.get("init_lora_weights").and_then(Value::as_str) == Some("gaussian");
        let dropout = config.get("lora_dropout").and_then(Value::as_f64).unwrap_or(0.0);
        if !(0.0..1.0).contains(&dropout) {
            return Err(Error::new(format!("adapter config: `lora_dropout` {dropout} is not in [0, 1)")));
        }
        Ok(LoraConfig { rank, scale, gaussian_init, dropout, peft: config.clone() })
    }

    /// The `adapter_config.json` PEFT 0.21 writes, with its defaults and
    /// the run's values.
    fn saved_config(&self, dora: bool) -> Value {
        let mut saved = oxtune_plugin_api::serde_json::json!({
            "alora_invocation_tokens": null, "alpha_pattern": {}, "arrow_config": null, "auto_mapping": null,
            "base_model_name_or_path": null, "bias": "none", "corda_config": null, "ensure_weight_tying": false,
            "eva_config": null, "exclude_modules": null, "fan_in_fan_out": false, "inference_mode": true,
            "init_lora_weights": true, "kasa_config": null, "layer_replication": null, "layers_pattern": null,
            "layers_to_transform": null, "loftq_config": {}, "lora_alpha": 8, "lora_bias": false,
            "lora_dropout": 0.0, "lora_ga_config": null, "megatron_config": null, "megatron_core": "megatron.core",
            "modules_to_save": null, "monteclora_config": null, "peft_type": "LORA", "peft_version": "0.21.2",
            "qalora_group_size": 16, "r": 8, "rank_pattern": {}, "revision": null, "target_modules": [],
            "target_parameters": null, "task_type": "CAUSAL_LM", "trainable_token_indices": null,
            "use_bdlora": null, "use_dora": false, "use_qalora": false, "use_rslora": false, "velora_config": null
        });
        for key in [
            "r",
            "lora_alpha",
            "lora_dropout",
            "use_rslora",
            "target_modules",
            "init_lora_weights",
            "base_model_name_or_path",
        ] {
            if let Some(v) = self.peft.get(key) {
                saved[key] = v.clone();
            }
        }
        saved["use_dora"] = Value::Bool(dora);
        saved
    }

    fn params(&self, layer: &str, in_features: usize, out_features: usize) -> Vec<TunerParam> {
        // PEFT: A is Kaiming-uniform with a = √5 (bound 1/√in), or N(0, 1/r); B is zero.
        let a_init = if self.gaussian_init {
            ParamInit::Normal { std: 1.0 / self.rank as f64 }
        } else {
            ParamInit::Uniform { bound: 1.0 / (in_features as f64).sqrt() }
        };
        vec![
            TunerParam { name: format!("{layer}.lora_A.weight"), shape: vec![self.rank, in_features], init: a_init },
            TunerParam {
                name: format!("{layer}.lora_B.weight"),
                shape: vec![out_features, self.rank],
                init: ParamInit::Zeros,
            },
        ]
    }

    /// `s · dropout(x) Aᵀ Bᵀ`
    fn delta(&self, layer: &str, x: &Tensor) -> Result<Tensor> {
        let a = weight(&format!("{layer}.lora_A.weight"))?;
        let b = weight(&format!("{layer}.lora_B.weight"))?;
        let x = if self.dropout > 0.0 { x.dropout(self.dropout)? } else { *x };
        x.matmul(&a.transpose(0, 1)?)?.matmul(&b.transpose(0, 1)?)?.scale(self.scale)
    }

    /// `W + s·BA`
    fn merged(&self, layer: &str) -> Result<Tensor> {
        let a = weight(&format!("{layer}.lora_A.weight"))?;
        let b = weight(&format!("{layer}.lora_B.weight"))?;
        weight(&format!("{layer}.weight"))?.add(&b.matmul(&a)?.scale(self.scale)?)
    }
}

/// The `lora` tuner.
pub struct Lora;

impl Tuner for Lora {
    fn descriptor(&self) -> Descriptor {
        Descriptor::tuner("lora", env!("CARGO_PKG_VERSION")).description("LoRA (and rsLoRA), PEFT-compatible")
    }

    fn load(&self, config: &Value) -> Result<Box<dyn TunerLayers>> {
        Ok(Box::new(LoraLayers(LoraConfig::from_peft(config)?)))
    }
}

struct LoraLayers(LoraConfig);

impl TunerLayers for LoraLayers {
    fn params(&self, layer: &str, in_features: usize, out_features: usize) -> Result<Vec<TunerParam>> {
        Ok(self.0.params(layer, in_features, out_features))
    }

    fn forward(&self, layer: &str, x: &Tensor, base: &Tensor) -> Result<Tensor> {
        let a = weight(&format!("{layer}.lora_A.weight"))?;
        let b = weight(&format!("{layer}.lora_B.weight"))?;
        oxtune_plugin_api::graph::low_rank_update(base, x, &a, &b, self.0.scale, self.0.dropout)
    }

    fn merge(&self, layer: &str) -> Result<Tensor> {
        self.0.merged(layer)
    }

    fn saved_config(&self) -> Option<Value> {
        Some(self.0.saved_config(false))
    }
}

/// The `dora` tuner.
pub struct Dora;

impl Tuner for Dora {
    fn descriptor(&self) -> Descriptor {
        Descriptor::tuner("dora", env!("CARGO_PKG_VERSION"))
            .description("DoRA (weight-decomposed LoRA), PEFT-compatible")
    }

    fn load(&self, config: &Value) -> Result<Box<dyn TunerLayers>> {
        Ok(Box::new(DoraLayers(LoraConfig::from_peft(config)?)))
    }
}

struct DoraLayers(LoraConfig);

impl DoraLayers {
    /// `m / ‖W + s·BA‖` per output feature, the norm held constant.
    fn magnitude_scale(&self, layer: &str) -> Result<Tensor> {
        let norm = self.0.merged(layer)?.detach()?.sqr()?.sum(1)?.sqrt()?;
        weight(&format!("{layer}.lora_magnitude_vector"))?.div(&norm)
    }
}

impl TunerLayers for DoraLayers {
    fn params(&self, layer: &str, in_features: usize, out_features: usize) -> Result<Vec<TunerParam>> {
        let mut params = self.0.params(layer, in_features, out_features);
        params.push(TunerParam {
            name: format!("{layer}.lora_magnitude_vector"),
            shape: vec![out_features],
            init: ParamInit::WeightRowNorm,
        });
        Ok(params)
    }

    fn forward(&self, layer: &str, x: &Tensor, base: &Tensor) -> Result<Tensor> {
        let scale = self.magnitude_scale(layer)?;
        let bias_name = format!("{layer}.bias");
        let unbiased = if oxtune_plugin_api::has_weight(&bias_name)? { base.sub(&weight(&bias_name)?)? } else { *base };
        let rescaled_base = unbiased.mul(&scale.affine(1.0, -1.0)?)?;
        base.add(&rescaled_base)?.add(&self.0.delta(layer, x)?.mul(&scale)?)
    }

    fn merge(&self, layer: &str) -> Result<Tensor> {
        let merged = self.0.merged(layer)?;
        let norm = merged.sqr()?.sum_keepdim(1)?.sqrt()?;
        let magnitude = weight(&format!("{layer}.lora_magnitude_vector"))?.reshape(&[-1, 1])?;
        merged.mul(&magnitude.div(&norm)?)
    }

    fn saved_config(&self) -> Option<Value> {
        Some(self.0.saved_config(true))
    }
}

/// The `full` tuner: every base parameter is trained in place.
pub struct Full;

impl Tuner for Full {
    fn descriptor(&self) -> Descriptor {
        Descriptor::tuner("full", env!("CARGO_PKG_VERSION")).description("full fine-tuning: every parameter trained")
    }

    fn load(&self, _config: &Value) -> Result<Box<dyn TunerLayers>> {
        Ok(Box::new(InPlace::new(|_| true)))
    }
}

/// The `freeze` tuner: base parameters trained in place, chosen by pattern.
pub struct Freeze;

/// Reads a list of regexes (or one) from `config[key]`.
fn patterns(config: &Value, key: &str) -> Result<Vec<regex::Regex>> {
    let texts: Vec<&str> = match config.get(key) {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::String(s)) => vec![s.as_str()],
        Some(Value::Array(items)) => items
            .iter()
            .map(|v| v.as_str().ok_or_else(|| Error::new(format!("freeze: `{key}` must hold strings, found {v}"))))
            .collect::<Result<_>>()?,
        Some(other) => return Err(Error::new(format!("freeze: `{key}` must be a regex or a list, found {other}"))),
    };
    texts
        .into_iter()
        .map(|t| regex::Regex::new(t).map_err(|e| Error::new(format!("freeze: `{key}` pattern `{t}`: {e}"))))
        .collect()
}

impl Tuner for Freeze {
    fn descriptor(&self) -> Descriptor {
        Descriptor::tuner("freeze", env!("CARGO_PKG_VERSION"))
            .description("train only the parameters `trainable_parameters` matches (or all but `freeze_parameters`)")
    }

    fn load(&self, config: &Value) -> Result<Box<dyn TunerLayers>> {
        let trainable = patterns(config, "trainable_parameters")?;
        let frozen = patterns(config, "freeze_parameters")?;
        if trainable.is_empty() && frozen.is_empty() {
            return Err(Error::new("freeze: give `trainable_parameters` or `freeze_parameters` (regexes)"));
        }
        Ok(Box::new(InPlace::new(move |name: &str| {
            trainable.iter().any(|r| r.is_match(name))
                || (!frozen.is_empty() && !frozen.iter().any(|r| r.is_match(name)))
        })))
    }
}

fn plugin() -> Plugin {
    Plugin::new("oxtune-plugin-tuners", env!("CARGO_PKG_VERSION")).tuner(Lora).tuner(Dora).tuner(Full).tuner(Freeze)
}

declare_plugin!(plugin);
