//! The output head and the log-probability of each label, without the
//! logits.
//!
//! Training needs `log softmax(x · Wᵀ)[label]` per position, not the
//! `[tokens, vocab]` logits: built whole, they and their gradient are
//! several vocabulary-sized tensors (at 4096 tokens and a 49k vocabulary,
//! 800 MB each). This kernel walks the labelled rows in chunks, holds one
//! chunk's logits at a time, and skips the rows without a label (prompt
//! tokens, padding) entirely.
//!
//! The gradient of a row's log-probability with respect to its input is
//! `(onehot(label) − softmax) · W` (times the soft-cap's derivative), a
//! vector of the hidden size that does not depend on what the caller does
//! with the log-probability. So the forward pass computes it while the
//! chunk's logits are at hand and keeps it (`[rows, hidden]`, the size of
//! the input); the backward pass only scales it by each row's incoming
//! gradient. A trainable `W` (full fine-tuning, tied embeddings) needs the
//! logits again: its backward pass recomputes them chunk by chunk.

use std::sync::Mutex;

use candle_core::backend::BackendStorage;
use candle_core::{bail, CpuStorage, CustomOp2, DType, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use crate::float::{cpu, data, matmul, Real, Threads};

/// The op's name in errors.
const OP: &str = "label-log-probs";

/// Logits one chunk holds at most (`rows × vocab`): 32 MB in f32.
const CHUNK_ELEMS: usize = 1 << 23;

/// The log-probability `[rows]` of each row's label under
/// `log_softmax(x · Wᵀ)`, for `x` `[rows, hidden]` and `W`
/// `[vocab, hidden]` (both f32 or both f64; CPU). Rows whose label is
/// `None` get 0 and cost nothing. With `softcap`, logits are capped at
/// `softcap · tanh(z / softcap)` first (Gemma 2's final soft-capping).
///
/// Differentiable in `x`, and in `W` when `W` is a variable; peak memory
/// is one chunk of logits whatever the number of rows.
///
/// ```
/// use candle_core::{Device, Tensor};
/// let x = Tensor::new(&[[1f32, 0.0], [0.0, 1.0]], &Device::Cpu)?;
/// let w = Tensor::new(&[[2f32, 0.0], [0.0, 0.0], [0.0, 1.0]], &Device::Cpu)?;
/// // Row 0's logits are (2, 0, 0); its label is token 0. Row 1 has no label.
/// let logps = oxtune_kernels::label_log_probs(&x, &w, &[Some(0), None], None)?.to_vec1::<f32>()?;
/// let want = 2.0 - (2f32.exp() + 2.0).ln();
/// assert!((logps[0] - want).abs() < 1e-6);
/// assert_eq!(logps[1], 0.0);
/// # Ok::<(), candle_core::Error>(())
/// ```
pub fn label_log_probs(x: &Tensor, w: &Tensor, labels: &[Option<u32>], softcap: Option<f64>) -> Result<Tensor> {
    chunked(x, w, labels, softcap, CHUNK_ELEMS)
}

/// [`label_log_probs`] with chunks of at most `chunk_elems` logits.
fn chunked(x: &Tensor, w: &Tensor, labels: &[Option<u32>], softcap: Option<f64>, chunk_elems: usize) -> Result<Tensor> {
    let (rows, hidden) = x.dims2()?;
    let (vocab, w_hidden) = w.dims2()?;
    if hidden != w_hidden {
        bail!("{OP}: the input has {hidden} features, the head's weight {w_hidden}");
    }
    if labels.len() != rows {
        bail!("{OP}: {} labels for {rows} rows", labels.len());
    }
    if let Some(&bad) = labels.iter().flatten().find(|&&l| l as usize >= vocab) {
        bail!("{OP}: label {bad} is outside the vocabulary of {vocab} tokens");
    }
    let op = LabelLogProbs {
        labels: labels.to_vec(),
        softcap,
        chunk_elems,
        input_grad: x.track_op(),
        weight_grad: w.track_op(),
        saved_input_grad: Mutex::new(None),
    };
    x.contiguous()?.apply_op2(&w.contiguous()?, op)
}

/// The op: labels and what the forward pass keeps for the backward one.
struct LabelLogProbs {
    labels: Vec<Option<u32>>,
    softcap: Option<f64>,
    /// Logits one chunk holds at most.
    chunk_elems: usize,
    /// Whether `x` needs a gradient (the forward pass then computes it).
    input_grad: bool,
    /// Whether `W` needs a gradient (the backward pass recomputes logits).
    weight_grad: bool,
    /// `∂ logp / ∂ x` per row `[rows, hidden]`, when `x` needs it and `W`
    /// does not.
    saved_input_grad: Mutex<Option<Tensor>>,
}

/// One chunk's rows: indices into the input and their labels.
struct Chunk {
    rows: Vec<usize>,
    labels: Vec<usize>,
}

impl LabelLogProbs {
    /// The labelled rows in chunks of at most `chunk_elems` logits.
    fn chunks(&self, vocab: usize) -> Vec<Chunk> {
        let per_chunk = (self.chunk_elems / vocab.max(1)).max(1);
        let labelled: Vec<(usize, usize)> =
            self.labels.iter().enumerate().filter_map(|(r, l)| l.map(|l| (r, l as usize))).collect();
        labelled
            .chunks(per_chunk)
            .map(|c| Chunk { rows: c.iter().map(|p| p.0).collect(), labels: c.iter().map(|p| p.1).collect() })
            .collect()
    }

    /// The chunk's logits `[n, vocab]` into `z` (capped when the op caps),
    /// from its input rows gathered into `xc` `[n, hidden]`.
    fn logits<T: Real>(&self, chunk: &Chunk, x: &[T], w: &[T], vocab: usize, xc: &mut Vec<T>, z: &mut [T]) {
        let hidden = w.len() / vocab;
        xc.clear();
        for &r in &chunk.rows {
            xc.extend_from_slice(&x[r * hidden..(r + 1) * hidden]);
        }
        let n = chunk.rows.len();
        // SAFETY: xc is n × hidden, w is vocab × hidden (read transposed), z is n × vocab.
        unsafe {
            matmul(
                Threads::All,
                (n, vocab, hidden),
                z.as_mut_ptr(),
                vocab,
                false,
                xc.as_ptr(),
                (hidden, 1),
                w.as_ptr(),
                (1, hidden),
            );
        }
        if let Some(cap) = self.softcap {
            let cap = T::of(cap);
            z.par_chunks_mut(vocab).for_each(|row| row.iter_mut().for_each(|v| *v = cap * (*v / cap).tanh()));
        }
    }

    /// Turns each row of logits `z` into `scale_r · ∂ logp_r / ∂ z` in place
    /// and returns the rows' log-probabilities.
    fn softmax_grad<T: Real>(&self, chunk: &Chunk, z: &mut [T], vocab: usize, scales: Option<&[T]>) -> Vec<T> {
        let cap = self.softcap.map(T::of);
        let mut logps = vec![T::of(0.0); chunk.rows.len()];
        z.par_chunks_mut(vocab).zip(logps.par_iter_mut()).enumerate().for_each(|(i, (row, logp))| {
            let max = T::max_of(row);
            let label = chunk.labels[i];
            let scale = scales.map_or(T::of(1.0), |s| s[i]);
            let Some(c) = cap else {
                // One exponential per logit: the row becomes exp(z - max),
                // the probabilities are that over its sum.
                let label_logit = row[label];
                let sum = T::exp_shifted_sum(row, max);
                *logp = label_logit - (max + sum.ln());
                let inverse = T::of(1.0) / sum;
                for v in row.iter_mut() {
                    *v = T::of(0.0) - scale * *v * inverse;
                }
                row[label] += scale;
                return;
            };
            // Softcapped: the derivative of the cap reads the logits.
            let sum = row.iter().fold(T::of(0.0), |s, &v| s + (v - max).exp());
            let lse = max + sum.ln();
            *logp = row[label] - lse;
            for (j, v) in row.iter_mut().enumerate() {
                let p = (*v - lse).exp();
                let onehot = if j == label { T::of(1.0) } else { T::of(0.0) };
                let dcap = T::of(1.0) - (*v / c) * (*v / c);
                *v = scale * (onehot - p) * dcap;
            }
        });
        logps
    }

    fn forward<T: Real>(&self, x: &[T], w: &[T], rows: usize, vocab: usize) -> (Vec<T>, Option<Vec<T>>) {
        let hidden = w.len() / vocab;
        let keep_grad = self.input_grad && !self.weight_grad;
        let mut out = vec![T::of(0.0); rows];
        let mut dx = keep_grad.then(|| vec![T::of(0.0); rows * hidden]);
        let mut xc = Vec::new();
        let mut z = Vec::new();
        let mut dxc = Vec::new();
        for chunk in self.chunks(vocab) {
            let n = chunk.rows.len();
            z.resize(n * vocab, T::of(0.0));
            self.logits(&chunk, x, w, vocab, &mut xc, &mut z);
            let logps = self.softmax_grad(&chunk, &mut z, vocab, None);
            for (&r, &lp) in chunk.rows.iter().zip(&logps) {
                out[r] = lp;
            }
            if let Some(dx) = dx.as_mut() {
                input_grad_rows(&chunk, &z, w, &mut dxc, dx);
            }
        }
        (out, dx)
    }

    /// Gradients of `x` (when it needs one) and `W` for the incoming
    /// gradient `g` `[rows]`, recomputing each chunk's logits.
    fn backward<T: Real>(&self, x: &[T], w: &[T], g: &[T], rows: usize, vocab: usize) -> (Option<Vec<T>>, Vec<T>) {
        let hidden = w.len() / vocab;
        let mut dx = self.input_grad.then(|| vec![T::of(0.0); rows * hidden]);
        let mut dw = vec![T::of(0.0); vocab * hidden];
        let (mut xc, mut z, mut dxc) = (Vec::new(), Vec::new(), Vec::new());
        for chunk in self.chunks(vocab) {
            let n = chunk.rows.len();
            z.resize(n * vocab, T::of(0.0));
            self.logits(&chunk, x, w, vocab, &mut xc, &mut z);
            let scales: Vec<T> = chunk.rows.iter().map(|&r| g[r]).collect();
            self.softmax_grad(&chunk, &mut z, vocab, Some(&scales));
            // SAFETY: z is n × vocab (read transposed), xc n × hidden, dw vocab × hidden.
            unsafe {
                matmul(
                    Threads::All,
                    (vocab, hidden, n),
                    dw.as_mut_ptr(),
                    hidden,
                    true,
                    z.as_ptr(),
                    (1, vocab),
                    xc.as_ptr(),
                    (hidden, 1),
                );
            }
            if let Some(dx) = dx.as_mut() {
                input_grad_rows(&chunk, &z, w, &mut dxc, dx);
            }
        }
        (dx, dw)
    }
}

/// `dx[r] = G[i] · W` for each row `r` of the chunk, from the chunk's
/// logit gradients `z` `[n, vocab]`, through the scratch buffer `dxc`.
fn input_grad_rows<T: Real>(chunk: &Chunk, z: &[T], w: &[T], dxc: &mut Vec<T>, dx: &mut [T]) {
    let n = chunk.rows.len();
    let vocab = z.len() / n;
    let hidden = w.len() / vocab;
    dxc.resize(n * hidden, T::of(0.0));
    // SAFETY: z is n × vocab, w vocab × hidden, dxc n × hidden.
    unsafe {
        matmul(
            Threads::All,
            (n, hidden, vocab),
            dxc.as_mut_ptr(),
            hidden,
            false,
            z.as_ptr(),
            (vocab, 1),
            w.as_ptr(),
            (hidden, 1),
        );
    }
    for (i, &r) in chunk.rows.iter().enumerate() {
        dx[r * hidden..(r + 1) * hidden].copy_from_slice(&dxc[i * hidden..(i + 1) * hidden]);
    }
}

impl CustomOp2 for LabelLogProbs {
    fn name(&self) -> &'static str {
        OP
    }

    fn cpu_fwd(&self, xs: &CpuStorage, xl: &Layout, ws: &CpuStorage, wl: &Layout) -> Result<(CpuStorage, Shape)> {
        let (rows, hidden) = xl.shape().dims2()?;
        let (vocab, _) = wl.shape().dims2()?;
        if xs.dtype() != ws.dtype() {
            bail!("{OP}: the input is {:?}, the head's weight {:?}", xs.dtype(), ws.dtype());
        }
        macro_rules! run {
            ($t:ty, $variant:ident) => {{
                let (out, dx) = self.forward::<$t>(data(OP, xs, xl)?, data(OP, ws, wl)?, rows, vocab);
                if let Some(dx) = dx {
                    let saved = Tensor::from_vec(dx, (rows, hidden), &candle_core::Device::Cpu)?;
                    *self.saved_input_grad.lock().expect("not poisoned") = Some(saved);
                }
                CpuStorage::$variant(out)
            }};
        }
        let out = match xs.dtype() {
            DType::F32 => run!(f32, F32),
            DType::F64 => run!(f64, F64),
            other => bail!("{OP}: f32 or f64 inputs, got {other:?}"),
        };
        Ok((out, Shape::from(rows)))
    }

    fn bwd(&self, x: &Tensor, w: &Tensor, _out: &Tensor, grad: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
        if !self.weight_grad {
            let saved = self.saved_input_grad.lock().expect("not poisoned").clone();
            let Some(dx) = saved else { return Ok((None, None)) };
            return Ok((Some(dx.broadcast_mul(&grad.unsqueeze(1)?)?), None));
        }
        let grad = grad.contiguous()?;
        let (xs, xl) = x.storage_and_layout();
        let (ws, wl) = w.storage_and_layout();
        let (gs, gl) = grad.storage_and_layout();
        let (xs, ws, gs) = (cpu(OP, &xs)?, cpu(OP, &ws)?, cpu(OP, &gs)?);
        let (rows, vocab) = (x.dim(0)?, w.dim(0)?);
        macro_rules! run {
            ($t:ty) => {{
                let (dx, dw) =
                    self.backward::<$t>(data(OP, xs, xl)?, data(OP, ws, wl)?, data(OP, gs, gl)?, rows, vocab);
                let dx = dx.map(|dx| Tensor::from_vec(dx, x.shape(), x.device())).transpose()?;
                (dx, Tensor::from_vec(dw, w.shape(), w.device())?)
            }};
        }
        let (dx, dw) = match x.dtype() {
            DType::F32 => run!(f32),
            DType::F64 => run!(f64),
            other => bail!("{OP}: f32 or f64 inputs, got {other:?}"),
        };
        Ok((dx, Some(dw)))
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{DType, Device, Tensor, Var, D};

    use super::*;

    /// The reference: full logits, log-softmax, pick.
    fn naive(x: &Tensor, w: &Tensor, labels: &[Option<u32>], softcap: Option<f64>) -> Result<Tensor> {
        let mut z = x.matmul(&w.t()?)?;
        if let Some(c) = softcap {
            z = ((z / c)?.tanh()? * c)?;
        }
        let max = z.max_keepdim(D::Minus1)?;
        let shifted = z.broadcast_sub(&max)?;
        let logp = shifted.broadcast_sub(&shifted.exp()?.sum_keepdim(D::Minus1)?.log()?)?;
        let ids: Vec<u32> = labels.iter().map(|l| l.unwrap_or(0)).collect();
        let keep: Vec<f64> = labels.iter().map(|l| if l.is_some() { 1.0 } else { 0.0 }).collect();
        let ids = Tensor::new(ids, x.device())?.unsqueeze(1)?;
        let keep = Tensor::new(keep, x.device())?.to_dtype(x.dtype())?;
        logp.gather(&ids, 1)?.squeeze(1)? * keep
    }

    fn max_diff(a: &Tensor, b: &Tensor) -> f64 {
        (a - b).unwrap().abs().unwrap().max_all().unwrap().to_dtype(DType::F64).unwrap().to_scalar::<f64>().unwrap()
    }

    /// Values and both gradients against the naive form, with a weighted
    /// sum downstream (rows get different incoming gradients).
    fn check(dtype: DType, chunk_elems: usize, softcap: Option<f64>, train_weight: bool, tol: f64) {
        let vocab = 50;
        let dev = Device::Cpu;
        let rows = 37;
        let x =
            Var::from_tensor(&Tensor::randn(0f64, 1.0, (rows, 24), &dev).unwrap().to_dtype(dtype).unwrap()).unwrap();
        let w0 = (Tensor::randn(0f64, 1.0, (vocab, 24), &dev).unwrap() * 0.5).unwrap().to_dtype(dtype).unwrap();
        let w = Var::from_tensor(&w0).unwrap();
        let labels: Vec<Option<u32>> = (0..rows).map(|r| (r % 5 != 2).then_some(((r * 7919) % vocab) as u32)).collect();
        let weights = Tensor::arange(1.0, rows as f64 + 1.0, &dev).unwrap().to_dtype(dtype).unwrap();
        let wt: &Tensor = if train_weight { w.as_tensor() } else { &w0 };
        let fast = chunked(x.as_tensor(), wt, &labels, softcap, chunk_elems).unwrap();
        let slow = naive(x.as_tensor(), wt, &labels, softcap).unwrap();
        assert!(max_diff(&fast, &slow) < tol, "values differ by {}", max_diff(&fast, &slow));
        let gf = (&fast * &weights).unwrap().sum_all().unwrap().backward().unwrap();
        let gs = (&slow * &weights).unwrap().sum_all().unwrap().backward().unwrap();
        let (dxf, dxs) = (gf.get(x.as_tensor()).unwrap(), gs.get(x.as_tensor()).unwrap());
        assert!(max_diff(dxf, dxs) < tol * 10.0, "input gradients differ by {}", max_diff(dxf, dxs));
        if train_weight {
            let (dwf, dws) = (gf.get(w.as_tensor()).unwrap(), gs.get(w.as_tensor()).unwrap());
            assert!(max_diff(dwf, dws) < tol * 10.0, "weight gradients differ by {}", max_diff(dwf, dws));
        } else {
            assert!(gf.get(w.as_tensor()).is_none());
        }
    }

    #[test]
    fn equals_the_full_logits_in_values_and_gradients() {
        // One chunk of every row, chunks of 7 rows, and of 1 row.
        for chunk_elems in [CHUNK_ELEMS, 7 * 50 + 3, 1] {
            for softcap in [None, Some(3.0)] {
                for train_weight in [false, true] {
                    check(DType::F64, chunk_elems, softcap, train_weight, 1e-10);
                    check(DType::F32, chunk_elems, softcap, train_weight, 2e-5);
                }
            }
        }
    }

    #[test]
    fn rejects_a_label_outside_the_vocabulary() {
        let x = Tensor::zeros((2, 4), DType::F32, &Device::Cpu).unwrap();
        let w = Tensor::zeros((10, 4), DType::F32, &Device::Cpu).unwrap();
        let err = label_log_probs(&x, &w, &[Some(3), Some(10)], None).unwrap_err().to_string();
        assert!(err.contains("label 10 is outside the vocabulary of 10"), "{err}");
    }
}
