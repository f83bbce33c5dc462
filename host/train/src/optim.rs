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
    /// The parameter's f32 master copy, when the parameter itself is held
    /// in a narrower dtype (bf16, f16): updates accumulate here and the
    /// parameter is this rounded, so an update smaller than the narrow
    /// dtype's resolution is not lost (mixed precision, as transformers'
    /// and PEFT's f32 adapters and optimizer states do).
    master: Option<Tensor>,
    m: Tensor,
    v: Tensor,
    decay: bool,
}

/// Whether a parameter of `dtype` trains through an f32 master copy.
fn needs_master(dtype: DType) -> bool {
    matches!(dtype, DType::BF16 | DType::F16)
}

/// AdamW over a fixed set of parameters (state in f32, and f32 master
/// copies of parameters held in bf16 or f16).
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
                // Two buffers: the moments are updated in place.
                let zeros = || Tensor::zeros(var.shape(), DType::F32, var.device());
                let decay = var.rank() >= 2;
                let master = match needs_master(var.dtype()) {
                    true => Some(var.as_tensor().to_dtype(DType::F32)?.contiguous()?),
                    false => None,
                };
                Ok(Slot { name, master, m: zeros()?, v: zeros()?, decay, var })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(AdamW { config, slots, step: 0 })
    }

    /// Steps taken so far.
    pub fn steps(&self) -> usize {
        self.step
    }

    /// The moments, named `m.<parameter>` / `v.<parameter>`, and the f32
    /// master copies of narrow parameters, `master.<parameter>`, for a
    /// checkpoint: the live tensors (the next step updates them in place),
    /// to be saved before it.
    pub fn state(&self) -> Vec<(String, Tensor)> {
        let mut out = Vec::with_capacity(self.slots.len() * 3);
        for s in &self.slots {
            out.push((format!("m.{}", s.name), s.m.clone()));
            out.push((format!("v.{}", s.name), s.v.clone()));
            if let Some(master) = &s.master {
                out.push((format!("master.{}", s.name), master.clone()));
            }
        }
        out
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
            // Copies: the moments are updated in place.
            slot.m = m.to_dtype(DType::F32)?.copy()?;
            slot.v = v.to_dtype(DType::F32)?.copy()?;
            if slot.master.is_some() {
                // A checkpoint of a narrow parameter keeps its master copy;
                // the parameter is its rounding, as after a step. (One
                // written before master copies existed has only the
                // parameter, which then is the master.)
                let master = match state.get(&format!("master.{}", slot.name)) {
                    Some(master) => master.to_dtype(DType::F32)?.copy()?,
                    None => slot.var.as_tensor().to_dtype(DType::F32)?.copy()?,
                };
                slot.var.set(&master.to_dtype(slot.var.dtype())?)?;
                slot.master = Some(master);
            }
        }
        self.step = step;
        Ok(())
    }

    /// Applies one update with learning rate `lr` from `grads` (one per
    /// parameter, in order; `None` leaves a parameter unchanged). On the
    /// CPU the update runs in place, three passes over each parameter and
    /// no temporaries ([`in_place`]); elsewhere as tensor ops.
    pub fn step(&mut self, grads: &[Option<Tensor>], lr: f64) -> Result<()> {
        self.step += 1;
        let c = &self.config;
        let (bias1, bias2) = (1.0 - c.beta1.powi(self.step as i32), 1.0 - c.beta2.powi(self.step as i32));
        for (slot, grad) in self.slots.iter_mut().zip(grads) {
            let Some(grad) = grad else { continue };
            let g = grad.to_dtype(DType::F32)?;
            let decay = if slot.decay { c.weight_decay } else { 0.0 };
            let update = in_place::Update { lr, decay, bias1, bias2, eps: c.eps };
            match slot.in_place_target() {
                Some(target) if g.device().is_cpu() => slot.update_in_place(&target, &g.contiguous()?, c, &update)?,
                _ => slot.update_with_tensor_ops(&g, c, &update)?,
            }
        }
        Ok(())
    }
}

impl Slot {
    /// The f32 tensor an in-place update writes: the master copy, or the
    /// parameter itself when it is contiguous f32.
    fn in_place_target(&self) -> Option<Tensor> {
        match &self.master {
            Some(master) => Some(master.clone()),
            None => (self.var.dtype() == DType::F32 && self.var.is_contiguous()).then(|| self.var.as_tensor().clone()),
        }
    }

    /// One update on the CPU, in place on `target` (see
    /// [`in_place_target`](Self::in_place_target)): three passes and no
    /// temporaries.
    fn update_in_place(
        &mut self,
        target: &Tensor,
        g: &Tensor,
        c: &AdamWConfig,
        update: &in_place::Update,
    ) -> Result<()> {
        self.m.inplace_op2(g, &in_place::Moment { beta: c.beta1, squared: false })?;
        self.v.inplace_op2(g, &in_place::Moment { beta: c.beta2, squared: true })?;
        target.inplace_op3(&self.m, &self.v, update)?;
        if self.master.is_some() {
            self.var.set(&target.to_dtype(self.var.dtype())?)?;
        }
        Ok(())
    }

    /// One update as tensor ops, on any device (the same arithmetic).
    fn update_with_tensor_ops(&mut self, g: &Tensor, c: &AdamWConfig, u: &in_place::Update) -> Result<()> {
        self.m = ((&self.m * c.beta1)? + (g * (1.0 - c.beta1))?)?;
        self.v = ((&self.v * c.beta2)? + (g.sqr()? * (1.0 - c.beta2))?)?;
        let step = ((&self.m / u.bias1)? / ((&self.v / u.bias2)?.sqrt()? + u.eps)?)?;
        let param = match &self.master {
            Some(master) => master.clone(),
            None => self.var.as_tensor().to_dtype(DType::F32)?,
        };
        let decayed = if u.decay > 0.0 { (&param * (1.0 - u.lr * u.decay))? } else { param };
        let next = (decayed - (step * u.lr)?)?;
        self.var.set(&next.to_dtype(self.var.dtype())?)?;
        if self.master.is_some() {
            self.master = Some(next);
        }
        Ok(())
    }
}

/// AdamW's passes on CPU f32 tensors, in place: the moments, then the
/// parameter (the same arithmetic, in f64 scalars and f32 values, as the
/// tensor-op path).
mod in_place {
    use candle_core::{bail, CpuStorage, InplaceOp2, InplaceOp3, Layout, Result};
    use rayon::prelude::*;

    /// Values one task updates.
    const CHUNK: usize = 1 << 14;

    /// The contiguous f32 values of a storage.
    fn values<'a>(op: &str, s: &'a CpuStorage, l: &Layout) -> Result<&'a [f32]> {
        let (CpuStorage::F32(v), Some((a, b))) = (s, l.contiguous_offsets()) else {
            bail!("{op}: contiguous f32 tensors only")
        };
        Ok(&v[a..b])
    }

    /// The contiguous f32 values of a storage, to update.
    fn values_mut<'a>(op: &str, s: &'a mut CpuStorage, l: &Layout) -> Result<&'a mut [f32]> {
        let (CpuStorage::F32(v), Some((a, b))) = (s, l.contiguous_offsets()) else {
            bail!("{op}: contiguous f32 tensors only")
        };
        Ok(&mut v[a..b])
    }

    /// `m ← β·m + (1 − β)·g`, or with `g²` for the second moment.
    pub(super) struct Moment {
        pub beta: f64,
        pub squared: bool,
    }

    impl InplaceOp2 for Moment {
        fn name(&self) -> &'static str {
            "adamw-moment"
        }

        fn cpu_fwd(&self, m: &mut CpuStorage, ml: &Layout, g: &CpuStorage, gl: &Layout) -> Result<()> {
            let (m, g) = (values_mut(self.name(), m, ml)?, values(self.name(), g, gl)?);
            if m.len() != g.len() {
                bail!("adamw-moment: {} moments for {} gradients", m.len(), g.len());
            }
            let (keep, take) = (self.beta as f32, (1.0 - self.beta) as f32);
            m.par_chunks_mut(CHUNK).zip(g.par_chunks(CHUNK)).for_each(|(m, g)| {
                for (m, &g) in m.iter_mut().zip(g) {
                    let g = if self.squared { g * g } else { g };
                    *m = *m * keep + g * take;
                }
            });
            Ok(())
        }
    }

    /// `p ← p·(1 − lr·decay) − lr · (m / bias1) / (√(v / bias2) + eps)`
    /// (its settings are the tensor-op path's too).
    pub(super) struct Update {
        pub lr: f64,
        pub decay: f64,
        pub bias1: f64,
        pub bias2: f64,
        pub eps: f64,
    }

    impl InplaceOp3 for Update {
        fn name(&self) -> &'static str {
            "adamw-update"
        }

        fn cpu_fwd(
            &self,
            p: &mut CpuStorage,
            pl: &Layout,
            m: &CpuStorage,
            ml: &Layout,
            v: &CpuStorage,
            vl: &Layout,
        ) -> Result<()> {
            let p = values_mut(self.name(), p, pl)?;
            let (m, v) = (values(self.name(), m, ml)?, values(self.name(), v, vl)?);
            if p.len() != m.len() || p.len() != v.len() {
                bail!("adamw-update: {} values, {} and {} moments", p.len(), m.len(), v.len());
            }
            let kept = (1.0 - self.lr * self.decay) as f32;
            let (lr, bias1, bias2, eps) = (self.lr as f32, self.bias1 as f32, self.bias2 as f32, self.eps as f32);
            p.par_chunks_mut(CHUNK).zip(m.par_chunks(CHUNK).zip(v.par_chunks(CHUNK))).for_each(|(p, (m, v))| {
                for ((p, &m), &v) in p.iter_mut().zip(m).zip(v) {
                    let update = (m / bias1) / ((v / bias2).sqrt() + eps);
                    *p = *p * kept - update * lr;
                }
            });
            Ok(())
        }
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

    #[test]
    fn a_bf16_parameter_accumulates_updates_below_its_resolution_in_its_f32_master() {
        // bf16 has 8 significant bits: around 1.0 its step is 2^-7, so an
        // update of 1e-3 rounds away on its own. Ten of them must add up.
        let start = Tensor::new(&[1.0f32, -1.0], &Device::Cpu).unwrap().to_dtype(DType::BF16).unwrap();
        let var = Var::from_tensor(&start).unwrap();
        let mut opt = AdamW::new(vec![("w".to_owned(), var.clone())], AdamWConfig::default()).unwrap();
        let grad = Tensor::new(&[1.0f32, -1.0], &Device::Cpu).unwrap().to_dtype(DType::BF16).unwrap();
        for _ in 0..10 {
            opt.step(&[Some(grad.clone())], 1e-3).unwrap();
        }
        let got = var.as_tensor().to_dtype(DType::F32).unwrap().to_vec1::<f32>().unwrap();
        // 1 - 10·1e-3 = 0.99 → bf16 0.98828125 (the nearest); without the
        // master every step would round back to 1.0.
        assert_eq!(got, vec![0.98828125, -0.98828125]);
        let state: std::collections::HashMap<String, Tensor> = opt.state().into_iter().collect();
        let master = state["master.w"].to_vec1::<f32>().unwrap();
        assert!((master[0] - 0.99).abs() < 1e-6 && (master[1] + 0.99).abs() < 1e-6, "{master:?}");

        // Restoring the checkpoint restores the master (not the rounded
        // parameter): the next step continues from 0.99.
        let again = Var::from_tensor(&start).unwrap();
        let mut resumed = AdamW::new(vec![("w".to_owned(), again.clone())], AdamWConfig::default()).unwrap();
        resumed.restore(10, &state).unwrap();
        assert_eq!(again.as_tensor().to_dtype(DType::F32).unwrap().to_vec1::<f32>().unwrap(), got);
        opt.step(&[Some(grad.clone())], 1e-3).unwrap();
        resumed.step(&[Some(grad)], 1e-3).unwrap();
        let a: std::collections::HashMap<String, Tensor> = opt.state().into_iter().collect();
        let b: std::collections::HashMap<String, Tensor> = resumed.state().into_iter().collect();
        assert_eq!(a["master.w"].to_vec1::<f32>().unwrap(), b["master.w"].to_vec1::<f32>().unwrap());
    }

    #[test]
    fn f32_parameters_have_no_master_copy() {
        let var = Var::from_tensor(&Tensor::new(&[1.0f32], &Device::Cpu).unwrap()).unwrap();
        let opt = AdamW::new(vec![("w".to_owned(), var)], AdamWConfig::default()).unwrap();
        let names: Vec<String> = opt.state().into_iter().map(|(n, _)| n).collect();
        assert_eq!(names, vec!["m.w".to_owned(), "v.w".to_owned()]);
    }

    #[test]
    fn three_steps_with_weight_decay_follow_adamw_computed_in_f64() {
        let (w0, b0) = ([[0.5f32, -1.5, 2.0], [0.25, 1.0, -0.75]], [0.1f32, -0.2]);
        let w = Var::from_tensor(&Tensor::new(&w0, &Device::Cpu).unwrap()).unwrap();
        let b = Var::from_tensor(&Tensor::new(&b0, &Device::Cpu).unwrap()).unwrap();
        let config = AdamWConfig { weight_decay: 0.05, ..Default::default() };
        let mut opt = AdamW::new(vec![("w".into(), w.clone()), ("b".into(), b.clone())], config.clone()).unwrap();
        let grads: Vec<(Vec<f32>, Vec<f32>)> = vec![
            (vec![0.3, -0.2, 0.0, 4.0, -1.0, 0.5], vec![1.0, -0.5]),
            (vec![-0.1, 0.4, 2.0, -3.0, 0.2, 0.0], vec![0.25, 0.75]),
            (vec![0.05, -0.05, 1.0, 1.0, -2.0, 0.3], vec![-1.0, 0.1]),
        ];
        let lrs = [0.1, 0.05, 0.02];
        // The reference: AdamW (decoupled decay on the matrix only) in f64.
        let reference = |start: Vec<f64>, gs: Vec<Vec<f64>>, decay: f64| {
            let (mut p, mut m, mut v) = (start, vec![0.0; gs[0].len()], vec![0.0; gs[0].len()]);
            for (t, (g, lr)) in gs.iter().zip(lrs).enumerate() {
                let (b1, b2) = (1.0 - 0.9f64.powi(t as i32 + 1), 1.0 - 0.999f64.powi(t as i32 + 1));
                for i in 0..p.len() {
                    m[i] = 0.9 * m[i] + 0.1 * g[i];
                    v[i] = 0.999 * v[i] + 0.001 * g[i] * g[i];
                    p[i] = p[i] * (1.0 - lr * decay) - lr * (m[i] / b1) / ((v[i] / b2).sqrt() + 1e-8);
                }
            }
            p
        };
        for ((gw, gb), lr) in grads.iter().zip(lrs) {
            let gw = Tensor::from_vec(gw.clone(), (2, 3), &Device::Cpu).unwrap();
            let gb = Tensor::from_vec(gb.clone(), 2, &Device::Cpu).unwrap();
            opt.step(&[Some(gw), Some(gb)], lr).unwrap();
        }
        let f64s = |v: &[f32]| v.iter().map(|&x| x as f64).collect::<Vec<f64>>();
        let want_w = reference(f64s(w0.as_flattened()), grads.iter().map(|g| f64s(&g.0)).collect(), 0.05);
        let want_b = reference(f64s(&b0), grads.iter().map(|g| f64s(&g.1)).collect(), 0.0);
        let got_w = w.as_tensor().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let got_b = b.as_tensor().to_vec1::<f32>().unwrap();
        for (got, want) in got_w.iter().zip(&want_w).chain(got_b.iter().zip(&want_b)) {
            assert!((*got as f64 - want).abs() < 1e-6, "{got_w:?} {got_b:?} vs {want_w:?} {want_b:?}");
        }
    }

    #[test]
    fn the_in_place_update_equals_the_tensor_op_update_other_devices_run() {
        let var = || Var::from_tensor(&Tensor::new(&[[0.5f32, -1.5], [2.0, 0.25]], &Device::Cpu).unwrap()).unwrap();
        let config = AdamWConfig { weight_decay: 0.1, ..Default::default() };
        let (fast, slow) = (var(), var());
        let mut a = AdamW::new(vec![("w".into(), fast.clone())], config.clone()).unwrap();
        let mut b = AdamW::new(vec![("w".into(), slow.clone())], config.clone()).unwrap();
        for (t, lr) in [0.1, 0.05, 0.02].into_iter().enumerate() {
            let g = Tensor::new(&[[0.3f32, -0.2 * t as f32], [1.0, -4.0]], &Device::Cpu).unwrap();
            a.step(&[Some(g.clone())], lr).unwrap();
            // The same step through the tensor-op path.
            b.step += 1;
            let (bias1, bias2) = (1.0 - 0.9f64.powi(b.step as i32), 1.0 - 0.999f64.powi(b.step as i32));
            let update = in_place::Update { lr, decay: 0.1, bias1, bias2, eps: config.eps };
            b.slots[0].update_with_tensor_ops(&g, &config, &update).unwrap();
        }
        let (x, y) = (fast.as_tensor().flatten_all().unwrap(), slow.as_tensor().flatten_all().unwrap());
        let diff = (x - y).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        assert!(diff < 1e-6, "the two paths differ by {diff}");
        assert_ne!(fast.as_tensor().flatten_all().unwrap().to_vec1::<f32>().unwrap()[0], 0.5, "the parameter moved");
    }
}
