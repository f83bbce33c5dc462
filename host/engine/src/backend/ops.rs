//! Differentiable implementations of the ops candle has no backward for.
//!
//! candle's fused `rms_norm`, `rope`, `softmax_last_dim` and `sdpa` record no
//! gradient, so each op here is a composition of candle primitives that all
//! have one (matmul, broadcasting arithmetic, exp, reductions, narrow, cat).
//! The op tests check every gradient against finite differences in f64.

use candle_core::{DType, Result, Tensor, D};

/// Softmax over `dim`, stabilised by subtracting the (detached) maximum;
/// a bf16/f16 input is computed in f32 and the result rounded back.
pub fn softmax(x: &Tensor, dim: usize) -> Result<Tensor> {
    let dtype = x.dtype();
    let x = x.to_dtype(norm_dtype(dtype))?;
    let max = x.max_keepdim(dim)?.detach();
    let e = x.broadcast_sub(&max)?.exp()?;
    e.broadcast_div(&e.sum_keepdim(dim)?)?.to_dtype(dtype)
}

/// Log-softmax over `dim` (in f32 for a bf16/f16 input, as [`softmax`]).
pub fn log_softmax(x: &Tensor, dim: usize) -> Result<Tensor> {
    let dtype = x.dtype();
    let x = x.to_dtype(norm_dtype(dtype))?;
    let max = x.max_keepdim(dim)?.detach();
    let shifted = x.broadcast_sub(&max)?;
    let log_sum = shifted.exp()?.sum_keepdim(dim)?.log()?;
    shifted.broadcast_sub(&log_sum)?.to_dtype(dtype)
}

/// `1 / (1 + e^-x)`.
pub fn sigmoid(x: &Tensor) -> Result<Tensor> {
    (x.neg()?.exp()? + 1.0)?.recip()
}

/// The dtype norms compute in: f32, or f64 when the input already is.
fn norm_dtype(dtype: DType) -> DType {
    if dtype == DType::F64 {
        DType::F64
    } else {
        DType::F32
    }
}

/// RMSNorm over the last dim, as Llama computes it: normalise in f32, cast
/// back to the input dtype, then scale by `weight`.
pub fn rms_norm(x: &Tensor, weight: &Tensor, eps: f64) -> Result<Tensor> {
    let dtype = x.dtype();
    let xf = x.to_dtype(norm_dtype(dtype))?;
    let mean_sq = xf.sqr()?.mean_keepdim(D::Minus1)?;
    let normed = xf.broadcast_mul(&(mean_sq + eps)?.sqrt()?.recip()?)?.to_dtype(dtype)?;
    normed.broadcast_mul(weight)
}

/// LayerNorm over the last dim with optional bias.
pub fn layer_norm(x: &Tensor, weight: &Tensor, bias: Option<&Tensor>, eps: f64) -> Result<Tensor> {
    let dtype = x.dtype();
    let xf = x.to_dtype(norm_dtype(dtype))?;
    let centered = xf.broadcast_sub(&xf.mean_keepdim(D::Minus1)?)?;
    let var = centered.sqr()?.mean_keepdim(D::Minus1)?;
    let normed = centered.broadcast_div(&(var + eps)?.sqrt()?)?.to_dtype(dtype)?;
    let scaled = normed.broadcast_mul(weight)?;
    match bias {
        Some(b) => scaled.broadcast_add(b),
        None => Ok(scaled),
    }
}

/// The cos and sin tables of RoPE for `positions` (`[batch, seq]`, any
/// numeric dtype), shaped `[batch, 1, seq, inv_freq.len()]` for
/// broadcasting over heads, in `dtype`, multiplied by `scale`.
pub fn rope_tables(positions: &Tensor, inv_freq: &[f32], scale: f32, dtype: DType) -> Result<(Tensor, Tensor)> {
    let (batch, seq) = positions.dims2()?;
    let half = inv_freq.len();
    let pos = positions.to_dtype(DType::F32)?.reshape((batch, 1, seq, 1))?;
    let inv = Tensor::from_slice(inv_freq, (1, 1, 1, half), positions.device())?;
    let freqs = pos.broadcast_mul(&inv)?;
    let cos = (freqs.cos()? * scale as f64)?.to_dtype(dtype)?;
    let sin = (freqs.sin()? * scale as f64)?.to_dtype(dtype)?;
    Ok((cos, sin))
}

/// Rotary embedding of `x` (`[batch, heads, seq, head_dim]`) with tables from
/// [`rope_tables`]. The first `2 * half` features rotate, the rest pass
/// through. NeoX style rotates the two halves; interleaved style rotates
/// the pairs `(2i, 2i+1)`.
pub fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor, interleaved: bool) -> Result<Tensor> {
    let head_dim = x.dim(D::Minus1)?;
    let half = cos.dim(D::Minus1)?;
    let rot = 2 * half;
    if rot > head_dim {
        candle_core::bail!("rope: {half} frequencies need {rot} features but head_dim is {head_dim}");
    }
    let x_rot = x.narrow(D::Minus1, 0, rot)?;
    let rotated = if interleaved {
        let (b, h, s, _) = x_rot.dims4()?;
        let pairs = x_rot.reshape((b, h, s, half, 2))?;
        let even = pairs.narrow(4, 0, 1)?.squeeze(4)?;
        let odd = pairs.narrow(4, 1, 1)?.squeeze(4)?;
        let new_even = (even.broadcast_mul(cos)? - odd.broadcast_mul(sin)?)?;
        let new_odd = (odd.broadcast_mul(cos)? + even.broadcast_mul(sin)?)?;
        Tensor::stack(&[new_even, new_odd], 4)?.reshape((b, h, s, rot))?
    } else {
        let x1 = x_rot.narrow(D::Minus1, 0, half)?;
        let x2 = x_rot.narrow(D::Minus1, half, half)?;
        let out1 = (x1.broadcast_mul(cos)? - x2.broadcast_mul(sin)?)?;
        let out2 = (x2.broadcast_mul(cos)? + x1.broadcast_mul(sin)?)?;
        Tensor::cat(&[out1, out2], D::Minus1)?
    };
    if rot == head_dim {
        Ok(rotated)
    } else {
        let pass = x.narrow(D::Minus1, rot, head_dim - rot)?;
        Tensor::cat(&[rotated, pass], D::Minus1)
    }
}

/// Scaled dot-product attention with grouped-query heads.
///
/// `q`: `[b, hq, s, d]`; `k`, `v`: `[b, hkv, t, d]` with `hq = hkv · rep`;
/// `mask`: additive, broadcastable to `[b, 1, s, t]` (0 or -inf). Query head
/// `h` reads KV head `h / rep`, as transformers' `repeat_kv` arranges; the
/// query heads of a group are folded into rows instead of copying K and V.
pub fn attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: Option<&Tensor>,
    scale: f64,
    softcap: Option<f64>,
) -> Result<Tensor> {
    let (b, hq, s, d) = q.dims4()?;
    let (_, hkv, t, _) = k.dims4()?;
    if hkv == 0 || hq % hkv != 0 {
        candle_core::bail!("attention: {hq} query heads cannot share {hkv} key/value heads");
    }
    let rep = hq / hkv;
    let q = q.reshape((b, hkv, rep * s, d))?;
    let mut scores = (q.matmul(&k.transpose(2, 3)?)? * scale)?;
    if let Some(cap) = softcap {
        scores = ((scores / cap)?.tanh()? * cap)?;
    }
    let scores = scores.reshape((b, hkv, rep, s, t))?;
    let scores = match mask {
        Some(m) => scores.broadcast_add(&m.unsqueeze(1)?)?,
        None => scores,
    };
    let probs = softmax(&scores, 4)?.reshape((b, hkv, rep * s, t))?;
    probs.matmul(v)?.reshape((b, hq, s, d))
}
