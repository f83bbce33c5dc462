//! AdamW with decoupled weight decay, and the learning-rate schedules of
//! transformers' `get_scheduler` (warm-up, then cosine, linear or constant).

use candle_core::{DType, Result, Tensor, Var};

/// The shape of the learning rate over training.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum Schedule {
    /// Warm-up, then a half cosine down to 0.
    Cosine,
    /// Warm-up, then linearly down to 0.
    Linear,
    /// Warm-up, then constant.
    Constant,
}

impl Schedule {
    /// The learning rate at `step` (0-based) of `total`, after `warmup` steps
    /// rising linearly from 0, as transformers computes it.
    pub fn lr(self, peak: f64, step: usize, warmup: usize, total: usize) -> f64 {
        if step < warmup {
            return peak * step as f64 / warmup.max(1) as f64;
        }
        let progress = (step - warmup) as f64 / (total.saturating_sub(warmup)).max(1) as f64;
        match self {
            Schedule::Cosine => peak * 0.5 * (1.0 + (std::f64::consts::PI * progress.min(1.0)).cos()),
            Schedule::Linear => peak * (1.0 - progress).max(0.0),
            Schedule::Constant => peak,
        }
    }
}

/// AdamW's hyper-parameters.
#[derive(Clone, Debug)]
pub struct AdamWConfig {
    /// First-moment decay.
    pub beta1: f64,
    /// Second-moment decay.
    pub beta2: f64,
    /// Denominator epsilon.
    pub eps: f64,
    /// Decoupled weight decay, applied to matrices only (not to norms,
    /// biases or other vectors).
    pub weight_decay: f64,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        AdamWConfig { beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.0 }
    }
}

/// One parameter's optimizer state.
struct Slot {
    name: String,
    var: Var,
    m: Tensor,
    v: Tensor,
    decay: bool,
}

/// AdamW over a fixed set of parameters (state in f32).
pub struct AdamW {
    config: AdamWConfig,
    slots: Vec<Slot>,
    step: usize,
}

impl AdamW {
    /// An optimizer for the named parameters `vars` (gradients are passed
    /// in this order).
    pub fn new(vars: Vec<(String, Var)>, config: AdamWConfig) -> Result<AdamW> {
        let slots = vars
            .into_iter()
            .map(|(name, var)| {
                let zeros = Tensor::zeros(var.shape(), DType::F32, var.device())?;
                let decay = var.rank() >= 2;
                Ok(Slot { name, m: zeros.clone(), v: zeros, decay, var })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(AdamW { config, slots, step: 0 })
    }

    /// Steps taken so far.
    pub fn steps(&self) -> usize {
        self.step
    }

    /// The moments, named `m.<parameter>` / `v.<parameter>`, for a checkpoint.
    pub fn state(&self) -> Vec<(String, Tensor)> {
        self.slots
            .iter()
            .flat_map(|s| [(format!("m.{}", s.name), s.m.clone()), (format!("v.{}", s.name), s.v.clone())])
            .collect()
    }

    /// Restores what [`AdamW::state`] saved after `step` steps.
    pub fn restore(&mut self, step: usize, state: &std::collections::HashMap<String, Tensor>) -> Result<()> {
        for slot in self.slots.iter_mut() {
            let take = |key: String| {
                state
                    .get(&key)
                    .cloned()
                    .ok_or_else(|| candle_core::Error::Msg(format!("optimizer state lacks `{key}`")))
            };
            let (m, v) = (take(format!("m.{}", slot.name))?, take(format!("v.{}", slot.name))?);
            if m.dims() != slot.m.dims() || v.dims() != slot.v.dims() {
                candle_core::bail!(
                    "optimizer state of `{}` has shape {:?}, the parameter {:?}",
                    slot.name,
                    m.dims(),
                    slot.m.dims()
                );
            }
            slot.m = m.to_dtype(DType::F32)?;
            slot.v = v.to_dtype(DType::F32)?;
        }
        self.step = step;
        Ok(())
    }

    /// Applies one update with learning rate `lr` from `grads` (one per
    /// parameter, in order; `None` leaves a parameter unchanged).
    pub fn step(&mut self, grads: &[Option<Tensor>], lr: f64) -> Result<()> {
        self.step += 1;
        let c = &self.config;
        let (bias1, bias2) = (1.0 - c.beta1.powi(self.step as i32), 1.0 - c.beta2.powi(self.step as i32));
        for (slot, grad) in self.slots.iter_mut().zip(grads) {
            let Some(grad) = grad else { continue };
            let g = grad.to_dtype(DType::F32)?;
            slot.m = ((&slot.m * c.beta1)? + (&g * (1.0 - c.beta1))?)?;
            slot.v = ((&slot.v * c.beta2)? + (g.sqr()? * (1.0 - c.beta2))?)?;
            let update = ((&slot.m / bias1)? / ((&slot.v / bias2)?.sqrt()? + c.eps)?)?;
            let param = slot.var.as_tensor().to_dtype(DType::F32)?;
            let decayed =
                if slot.decay && c.weight_decay > 0.0 { (&param * (1.0 - lr * c.weight_decay))? } else { param };
            let next = (decayed - (update * lr)?)?;
            slot.var.set(&next.to_dtype(slot.var.dtype())?)?;
        }
        Ok(())
    }
}

/// The global L2 norm of `grads`.
pub fn global_norm(grads: &[Option<Tensor>]) -> Result<f64> {
    let mut total = 0.0;
    for g in grads.iter().flatten() {
        total += g.to_dtype(DType::F64)?.sqr()?.sum_all()?.to_scalar::<f64>()?;
    }
    Ok(total.sqrt())
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn schedules_warm_up_then_decay() {
        assert_eq!(Schedule::Cosine.lr(1.0, 0, 10, 110), 0.0);
        assert!((Schedule::Cosine.lr(1.0, 5, 10, 110) - 0.5).abs() < 1e-12);
        assert!((Schedule::Cosine.lr(1.0, 10, 10, 110) - 1.0).abs() < 1e-12);
        assert!((Schedule::Cosine.lr(1.0, 60, 10, 110) - 0.5).abs() < 1e-12);
        assert!((Schedule::Linear.lr(1.0, 60, 10, 110) - 0.5).abs() < 1e-12);
        assert_eq!(Schedule::Constant.lr(1.0, 100, 10, 110), 1.0);
    }

    #[test]
    fn adamw_first_step_moves_each_weight_by_lr_against_its_gradient_sign() {
        // With bias correction, step 1's update is g / (|g| + eps) ≈ sign(g).
        let var = Var::from_tensor(&Tensor::new(&[[1.0f32, -2.0], [0.5, 3.0]], &Device::Cpu).unwrap()).unwrap();
        let named = vec![("w".to_owned(), var.clone())];
        let mut opt = AdamW::new(named, AdamWConfig { weight_decay: 0.1, ..Default::default() }).unwrap();
        let grad = Tensor::new(&[[0.3f32, -0.2], [0.0, 4.0]], &Device::Cpu).unwrap();
        opt.step(&[Some(grad)], 0.01).unwrap();
        let got = var.as_tensor().to_vec2::<f32>().unwrap();
        let expect = |w: f32, g: f32| w * (1.0 - 0.01 * 0.1) - 0.01 * if g == 0.0 { 0.0 } else { g.signum() };
        let want = [[expect(1.0, 0.3), expect(-2.0, -0.2)], [expect(0.5, 0.0), expect(3.0, 4.0)]];
        for (row, want_row) in got.iter().zip(want) {
            for (g, w) in row.iter().zip(want_row) {
                assert!((g - w).abs() < 1e-6, "{got:?} vs {want:?}");
            }
        }
    }
}
