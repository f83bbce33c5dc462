//! LoRA and DoRA as PEFT defines them, applied at the host's `linear` hook,
//! so every architecture plugin gets them with no code of its own.
//!
//! Both read PEFT's `adapter_config.json` keys (`r`, `lora_alpha`,
//! `use_rslora`, `init_lora_weights`) and use PEFT's parameter names
//! (`{layer}.lora_A.weight`, `{layer}.lora_B.weight`,
//! `{layer}.lora_magnitude_vector`), so adapters move between PEFT and
//! oxtune unchanged.
//!
//! - LoRA: `y = base + s · x Aᵀ Bᵀ`, with `s = alpha / r` (`alpha / √r`
//!   with rsLoRA).
//! - DoRA: with `V = W + s·BA` and `n = ‖V‖` per output row (both treated
//!   as constants in the backward pass, as PEFT does),
//!   `y = base + (m/n − 1)·(base − b) + (m/n)·s·x Aᵀ Bᵀ`.

use oxtune_plugin_api::serde_json::Value;
use oxtune_plugin_api::{
    declare_plugin, weight, Descriptor, Error, ParamInit, Plugin, Result, Tensor, Tuner, TunerLayers, TunerParam,
};

/// The LoRA settings shared by LoRA and DoRA.
#[derive(Clone, Debug)]
struct LoraConfig {
    rank: usize,
    scale: f64,
    gaussian_init: bool,
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
        Ok(LoraConfig { rank, scale, gaussian_init })
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

    /// `s · x Aᵀ Bᵀ`
    fn delta(&self, layer: &str, x: &Tensor) -> Result<Tensor> {
        let a = weight(&format!("{layer}.lora_A.weight"))?;
        let b = weight(&format!("{layer}.lora_B.weight"))?;
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
        base.add(&self.0.delta(layer, x)?)
    }

    fn merge(&self, layer: &str) -> Result<Tensor> {
        self.0.merged(layer)
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
}

fn plugin() -> Plugin {
    Plugin::new("oxtune-plugin-tuners", env!("CARGO_PKG_VERSION")).tuner(Lora).tuner(Dora)
}

declare_plugin!(plugin);
