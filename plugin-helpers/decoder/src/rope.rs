//! RoPE frequencies from a Hugging Face `config.json`, for every scaling
//! scheme transformers implements for decoder LMs: `default`, `linear`,
//! `dynamic` (NTK), `yarn` and `llama3`.
//!
//! The host's `rope` op only rotates by `position · inv_freq`; every scheme
//! is a different `inv_freq` (and, for YaRN, a factor on cos and sin), so
//! the schemes are plugin code, here, shared by the architectures.

use serde_json::Value;

use oxtune_plugin_api::graph::Tensor;
use oxtune_plugin_api::{Error, Result};

/// How the frequencies depend on the sequence.
#[derive(Clone, Debug, PartialEq)]
enum Scheme {
    /// Fixed frequencies.
    Fixed,
    /// Dynamic NTK: the base grows once positions pass `max_positions`.
    DynamicNtk { factor: f64, max_positions: f64 },
}

/// The rotary embedding of one model.
#[derive(Clone, Debug, PartialEq)]
pub struct Rope {
    base: f64,
    /// Rotated features per head (`head_dim · partial_rotary_factor`).
    pub rotary_dim: usize,
    inv_freq: Vec<f32>,
    /// Multiplies cos and sin (YaRN's attention factor; 1 otherwise).
    pub attention_scaling: f32,
    scheme: Scheme,
}

fn base_inv_freq(base: f64, dim: usize) -> Vec<f64> {
    (0..dim / 2).map(|i| 1.0 / base.powf((2 * i) as f64 / dim as f64)).collect()
}

fn number(params: &Value, key: &str) -> Option<f64> {
    params.get(key).and_then(Value::as_f64)
}

fn required(params: &Value, key: &str, scheme: &str) -> Result<f64> {
    number(params, key).ok_or_else(|| Error::new(format!("config.json: rope scaling `{scheme}` needs `{key}`")))
}

impl Rope {
    /// Reads `rope_parameters` (transformers 5), or `rope_theta` with
    /// `rope_scaling` (earlier versions), for heads of `head_dim` features.
    pub fn from_config(config: &Value, head_dim: usize) -> Result<Rope> {
        let mut params = config
            .get("rope_parameters")
            .or_else(|| config.get("rope_scaling"))
            .filter(|v| v.is_object())
            .cloned()
            .unwrap_or_else(|| Value::Object(Default::default()));
        let object = params.as_object_mut().expect("checked to be an object");
        if !object.contains_key("rope_theta") {
            let theta = config.get("rope_theta").cloned().unwrap_or(Value::from(10_000.0));
            object.insert("rope_theta".into(), theta);
        }
        let scheme = object
            .get("rope_type")
            .or_else(|| object.get("type"))
            .and_then(Value::as_str)
            .unwrap_or("default")
            .to_owned();
        let base = required(&params, "rope_theta", &scheme)?;
        let partial = number(config, "partial_rotary_factor").or_else(|| number(&params, "partial_rotary_factor"));
        let rotary_dim = (head_dim as f64 * partial.unwrap_or(1.0)) as usize;
        let max_positions = number(config, "max_position_embeddings").unwrap_or(2048.0);
        let inv = base_inv_freq(base, rotary_dim);
        let (inv, attention_scaling, kind) = match scheme.as_str() {
            "default" => (inv, 1.0, Scheme::Fixed),
            "linear" => {
                let factor = required(&params, "factor", &scheme)?;
                (inv.iter().map(|f| f / factor).collect(), 1.0, Scheme::Fixed)
            }
            "dynamic" => {
                let factor = required(&params, "factor", &scheme)?;
                (inv, 1.0, Scheme::DynamicNtk { factor, max_positions })
            }
            "yarn" => {
                let (inv, scaling) = yarn(&params, base, rotary_dim, max_positions)?;
                (inv, scaling, Scheme::Fixed)
            }
            "llama3" => (llama3(&params, &inv)?, 1.0, Scheme::Fixed),
            other => {
                return Err(Error::new(format!(
                    "config.json: rope scaling `{other}` is not supported (default, linear, dynamic, yarn, llama3 are)"
                )))
            }
        };
        Ok(Rope {
            base,
            rotary_dim,
            inv_freq: inv.iter().map(|&f| f as f32).collect(),
            attention_scaling: attention_scaling as f32,
            scheme: kind,
        })
    }

    /// The inverse frequencies for a batch whose largest position is
    /// `max_position` (only dynamic NTK depends on it).
    pub fn inv_freq(&self, max_position: usize) -> Vec<f32> {
        match self.scheme {
            Scheme::Fixed => self.inv_freq.clone(),
            Scheme::DynamicNtk { factor, max_positions } => {
                let seq = ((max_position + 1) as f64).max(max_positions);
                let dim = self.rotary_dim as f64;
                let base = self.base * ((factor * seq / max_positions) - (factor - 1.0)).powf(dim / (dim - 2.0));
                base_inv_freq(base, self.rotary_dim).iter().map(|&f| f as f32).collect()
            }
        }
    }

    /// Whether [`Rope::inv_freq`] depends on the positions.
    pub fn depends_on_length(&self) -> bool {
        !matches!(self.scheme, Scheme::Fixed)
    }
}

fn yarn_mscale(scale: f64, mscale: f64) -> f64 {
    if scale <= 1.0 {
        1.0
    } else {
        0.1 * mscale * scale.ln() + 1.0
    }
}

/// YaRN (transformers' `_compute_yarn_parameters`).
fn yarn(params: &Value, base: f64, dim: usize, max_positions: f64) -> Result<(Vec<f64>, f64)> {
    let factor = required(params, "factor", "yarn")?;
    let original = number(params, "original_max_position_embeddings").unwrap_or(max_positions);
    let attention_factor = match number(params, "attention_factor") {
        Some(f) => f,
        None => match (number(params, "mscale"), number(params, "mscale_all_dim")) {
            (Some(m), Some(all)) if m != 0.0 && all != 0.0 => yarn_mscale(factor, m) / yarn_mscale(factor, all),
            _ => yarn_mscale(factor, 1.0),
        },
    };
    let beta_fast = number(params, "beta_fast").unwrap_or(32.0);
    let beta_slow = number(params, "beta_slow").unwrap_or(1.0);
    let truncate = params.get("truncate").and_then(Value::as_bool).unwrap_or(true);
    let correction_dim =
        |rotations: f64| dim as f64 * (original / (rotations * 2.0 * std::f64::consts::PI)).ln() / (2.0 * base.ln());
    let (mut low, mut high) = (correction_dim(beta_fast), correction_dim(beta_slow));
    if truncate {
        low = low.floor();
        high = high.ceil();
    }
    let low = low.max(0.0);
    let high = high.min(dim as f64 - 1.0);
    let high = if low == high { high + 0.001 } else { high };
    let extrapolation = base_inv_freq(base, dim);
    let inv = extrapolation
        .iter()
        .enumerate()
        .map(|(i, &extra)| {
            let ramp = ((i as f64 - low) / (high - low)).clamp(0.0, 1.0);
            let extrapolation_factor = 1.0 - ramp;
            let inter = extra / factor;
            inter * (1.0 - extrapolation_factor) + extra * extrapolation_factor
        })
        .collect();
    Ok((inv, attention_factor))
}

/// Llama 3's frequency-dependent scaling (transformers' `_compute_llama3_parameters`).
fn llama3(params: &Value, inv: &[f64]) -> Result<Vec<f64>> {
    let factor = required(params, "factor", "llama3")?;
    let low = required(params, "low_freq_factor", "llama3")?;
    let high = required(params, "high_freq_factor", "llama3")?;
    let old_context = required(params, "original_max_position_embeddings", "llama3")?;
    let (low_wavelen, high_wavelen) = (old_context / low, old_context / high);
    Ok(inv
        .iter()
        .map(|&f| {
            let wavelen = 2.0 * std::f64::consts::PI / f;
            if wavelen < high_wavelen {
                f
            } else if wavelen > low_wavelen {
                f / factor
            } else {
                let smooth = (old_context / wavelen - low) / (high - low);
                (1.0 - smooth) * f / factor + smooth * f
            }
        })
        .collect())
}

/// Rotates `x` (last dim `2·half`, the two halves paired, NeoX style) by
/// tables broadcastable to `[..., rows, half]`: `x·cos + rotate_half(x)·sin`
/// with each table repeated over both halves, as transformers writes it.
pub fn apply_rotary(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let dtype = x.dtype()?;
    let (cos, sin) = (cos.to_dtype(dtype)?, sin.to_dtype(dtype)?);
    let half = cos.dim(-1)?;
    let x1 = x.narrow(-1, 0, half)?;
    let x2 = x.narrow(-1, half, half)?;
    let out1 = x1.mul(&cos)?.sub(&x2.mul(&sin)?)?;
    let out2 = x2.mul(&cos)?.add(&x1.mul(&sin)?)?;
    Tensor::cat(&[out1, out2], -1)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn default_frequencies_follow_theta() {
        let rope =
            Rope::from_config(&json!({"rope_parameters": {"rope_type": "default", "rope_theta": 10000.0}}), 8).unwrap();
        let expected = [1.0, 0.1, 0.01, 0.001];
        for (got, want) in rope.inv_freq(0).iter().zip(expected) {
            assert!((*got as f64 - want).abs() < 1e-7, "{got} vs {want}");
        }
        // Older configs: top-level rope_theta.
        let old = Rope::from_config(&json!({"rope_theta": 10000.0}), 8).unwrap();
        assert_eq!(old, rope);
    }

    #[test]
    fn linear_and_partial_rotary() {
        let rope = Rope::from_config(
            &json!({"rope_theta": 100.0, "rope_scaling": {"type": "linear", "factor": 4.0}, "partial_rotary_factor": 0.5}),
            8,
        )
        .unwrap();
        assert_eq!(rope.rotary_dim, 4);
        let inv = rope.inv_freq(0);
        assert!((inv[0] - 0.25).abs() < 1e-7 && (inv[1] - 0.1 / 4.0).abs() < 1e-7, "{inv:?}");
    }

    #[test]
    fn dynamic_ntk_grows_the_base_past_max_positions() {
        let cfg = json!({"rope_theta": 10000.0, "max_position_embeddings": 100,
                         "rope_scaling": {"rope_type": "dynamic", "factor": 2.0}});
        let rope = Rope::from_config(&cfg, 8).unwrap();
        assert_eq!(rope.inv_freq(50), rope.inv_freq(99));
        // seq 200 = 2 × max: base · (2·2 - 1)^(8/6).
        let base = 10000.0 * 3f64.powf(8.0 / 6.0);
        let got = rope.inv_freq(199)[1] as f64;
        let want = 1.0 / base.powf(2.0 / 8.0);
        assert!((got - want).abs() < 1e-6 * want, "{got} vs {want}");
    }

    #[test]
    fn llama3_keeps_high_and_divides_low_frequencies() {
        let cfg = json!({"rope_theta": 500000.0, "rope_scaling": {"rope_type": "llama3", "factor": 8.0,
            "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}});
        let rope = Rope::from_config(&cfg, 128).unwrap();
        let plain = base_inv_freq(500000.0, 128);
        let inv = rope.inv_freq(0);
        assert_eq!(inv[0], plain[0] as f32);
        assert!((inv[63] as f64 - plain[63] / 8.0).abs() < 1e-12);
    }

    #[test]
    fn yarn_attention_factor_and_ramp() {
        let cfg = json!({"rope_theta": 10000.0, "max_position_embeddings": 4096,
            "rope_scaling": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 1024}});
        let rope = Rope::from_config(&cfg, 64).unwrap();
        assert!((rope.attention_scaling as f64 - (0.1 * 4f64.ln() + 1.0)).abs() < 1e-6);
        let plain = base_inv_freq(10000.0, 64);
        let inv = rope.inv_freq(0);
        // Fastest frequencies extrapolate (unchanged), slowest interpolate (÷ factor).
        assert_eq!(inv[0], plain[0] as f32);
        assert!((inv[31] as f64 - plain[31] / 4.0).abs() < 1e-9);
    }

    #[test]
    fn unknown_schemes_and_missing_fields_are_named() {
        let err = Rope::from_config(&json!({"rope_scaling": {"rope_type": "longrope"}}), 8).unwrap_err();
        assert!(err.to_string().contains("longrope"));
        let err = Rope::from_config(&json!({"rope_scaling": {"rope_type": "linear"}}), 8).unwrap_err();
        assert!(err.to_string().contains("`factor`"));
    }
}
