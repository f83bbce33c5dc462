//! Tensor pieces vision-language models share, built from the op API:
//! patch embedding, rotary tables computed from plugin-side positions,
//! attention restricted to segments (images, windows), placing vision rows
//! at placeholder tokens, and multi-axis rotary (M-RoPE).

pub use oxtune_helpers_decoder::rope::apply_rotary;
use oxtune_plugin_api::abi::DType;
use oxtune_plugin_api::graph::{constant, has_weight, weight, Tensor};
use oxtune_plugin_api::nn::Linear;
use oxtune_plugin_api::{Error, Result};

/// A `Conv3d` whose kernel equals its stride over pre-cut patches
/// (`{prefix}.weight` `[out, c, t, p, p]`, optional bias): one matrix
/// product of the `[rows, c·t·p·p]` pixel rows with the flattened kernel.
pub fn patch_embed(prefix: &str, pixels: &Tensor) -> Result<Tensor> {
    let w = weight(&format!("{prefix}.weight"))?;
    let out = w.dim(0)? as i64;
    let w = w.reshape(&[out, -1])?;
    let features = pixels.dim(-1)?;
    if w.dim(1)? != features {
        return Err(Error::new(format!(
            "`{prefix}.weight` takes {} features per patch but the pixel rows have {features}",
            w.dim(1)?
        )));
    }
    let y = pixels.matmul(&w.transpose(0, 1)?)?;
    if has_weight(&format!("{prefix}.bias"))? {
        y.add(&weight(&format!("{prefix}.bias"))?)
    } else {
        Ok(y)
    }
}

/// cos and sin tables `[rows, half]` of rotation angles computed by the
/// plugin (`angles` row-major).
pub fn rotary_tables(angles: &[f32], rows: usize, half: usize) -> Result<(Tensor, Tensor)> {
    let cos = constant(angles.iter().map(|a| a.cos()).collect(), &[rows, half], DType::F32)?;
    let sin = constant(angles.iter().map(|a| a.sin()).collect(), &[rows, half], DType::F32)?;
    Ok((cos, sin))
}

/// Each patch's `(row, column)` in the image grid, for grids `[t, h, w]`,
/// in the order the processor lays patches out (merge blocks of `merge²`).
pub fn patch_coordinates(grids: &[[usize; 3]], merge: usize) -> Vec<(usize, usize)> {
    let mut out = Vec::new();
    for &[t, h, w] in grids {
        for _ in 0..t {
            for bh in 0..h / merge {
                for bw in 0..w / merge {
                    for mh in 0..merge {
                        for mw in 0..merge {
                            out.push((bh * merge + mh, bw * merge + mw));
                        }
                    }
                }
            }
        }
    }
    out
}

/// The 2-D rotary angles of vision patches: per patch, `row · inv_freq`
/// then `column · inv_freq` (`[patches, 2·inv_freq.len()]`).
pub fn vision_rotary_angles(coords: &[(usize, usize)], inv_freq: &[f32]) -> Vec<f32> {
    let mut out = Vec::with_capacity(coords.len() * 2 * inv_freq.len());
    for &(r, c) in coords {
        out.extend(inv_freq.iter().map(|f| r as f32 * f));
        out.extend(inv_freq.iter().map(|f| c as f32 * f));
    }
    out
}

/// Non-causal attention of `q`, `k`, `v` (`[heads, rows, head_dim]`) in
/// which a row sees only the rows of its own segment; `segments` are the
/// consecutive segment lengths (frames, or attention windows) summing to
/// `rows`. Each segment is its own small attention (block-diagonal, never
/// a `rows × rows` score matrix: a 448×448 image in 64-patch windows needs
/// 1/16 of the dense scores); softmax in f32.
pub fn segment_attention(q: &Tensor, k: &Tensor, v: &Tensor, segments: &[usize]) -> Result<Tensor> {
    let rows = q.dim(1)?;
    let total: usize = segments.iter().sum();
    if total != rows {
        return Err(Error::new(format!("segments cover {total} rows but attention has {rows}")));
    }
    let scale = 1.0 / (q.dim(2)? as f64).sqrt();
    let attend = |q: &Tensor, k: &Tensor, v: &Tensor| -> Result<Tensor> {
        let scores = q.matmul(&k.transpose(1, 2)?)?.scale(scale)?.to_dtype(DType::F32)?;
        scores.softmax(-1)?.to_dtype(v.dtype()?)?.matmul(v)
    };
    if segments.len() <= 1 {
        return attend(q, k, v);
    }
    let mut outputs = Vec::with_capacity(segments.len());
    let mut start = 0;
    for &len in segments.iter().filter(|&&len| len > 0) {
        let part = |t: &Tensor| t.narrow(1, start, len);
        outputs.push(attend(&part(q)?, &part(k)?, &part(v)?)?);
        start += len;
    }
    Tensor::cat(&outputs, 1)
}

/// The attention of a ViT block (`{prefix}.qkv` and `{prefix}.proj`
/// linear layers, `heads` heads) over rows `x` (`[rows, hidden]`), with
/// 2-D rotary tables `cos`/`sin` (`[rows, head_dim / 2]`) and attention
/// kept within `segments` (see [`segment_attention`]).
pub fn vision_attention(
    prefix: &str,
    x: &Tensor,
    heads: usize,
    rotary: (&Tensor, &Tensor),
    segments: &[usize],
) -> Result<Tensor> {
    let (n, hidden) = (x.dim(0)? as i64, x.dim(1)? as i64);
    let (heads, hd) = (heads as i64, hidden / heads as i64);
    let qkv = Linear::new(format!("{prefix}.qkv")).forward(x)?.reshape(&[n, 3, heads, hd])?.permute(&[1, 2, 0, 3])?;
    let part = |j: usize| qkv.narrow(0, j, 1)?.reshape(&[heads, n, hd]);
    let (cos, sin) = rotary;
    let q = apply_rotary(&part(0)?, cos, sin)?;
    let k = apply_rotary(&part(1)?, cos, sin)?;
    let a = segment_attention(&q, &k, &part(2)?, segments)?.transpose(0, 1)?.reshape(&[n, heads * hd])?;
    Linear::new(format!("{prefix}.proj")).forward(&a)
}

/// A 1-D `u32` index tensor holding `values` (for `index_select`).
pub fn index_tensor(values: &[usize]) -> Result<Tensor> {
    constant(values.iter().map(|&v| v as f32).collect(), &[values.len()], DType::U32)
}

/// Positions in `ids` (the flattened `input_ids`) holding `token`.
pub fn token_positions(ids: &Tensor, token: u32) -> Result<Vec<usize>> {
    Ok(ids.to_vec_f32()?.iter().enumerate().filter(|(_, &t)| t as u32 == token).map(|(i, _)| i).collect())
}

/// `hidden` (`[batch, seq, dim]`) with the rows at flattened `positions`
/// replaced by `rows` (`[positions.len(), dim]`) in order — vision
/// features put where the placeholder tokens were. Gradients reach both.
pub fn scatter_rows(hidden: &Tensor, positions: &[usize], rows: &Tensor) -> Result<Tensor> {
    let dims = hidden.dims()?;
    let (n, dim) = (dims[0] * dims[1], dims[2]);
    if rows.dim(0)? != positions.len() {
        return Err(Error::new(format!(
            "the prompt has {} placeholder tokens but the vision tower produced {} rows",
            positions.len(),
            rows.dim(0)?
        )));
    }
    let flat = hidden.reshape(&[n as i64, dim as i64])?;
    let table = Tensor::cat(&[flat, rows.to_dtype(hidden.dtype()?)?], 0)?;
    let mut index: Vec<f32> = (0..n).map(|i| i as f32).collect();
    for (k, &p) in positions.iter().enumerate() {
        index[p] = (n + k) as f32;
    }
    let index = constant(index, &[n], DType::U32)?;
    table.index_select(&index, 0)?.reshape(&[dims[0] as i64, dims[1] as i64, dim as i64])
}

/// `hidden` with `rows` added at flattened `positions` (DeepStack).
pub fn add_rows(hidden: &Tensor, positions: &[usize], rows: &Tensor) -> Result<Tensor> {
    let dims = hidden.dims()?;
    let (n, dim) = (dims[0] * dims[1], dims[2]);
    let zero = constant(vec![0.0; dim], &[1, dim], DType::F32)?.to_dtype(hidden.dtype()?)?;
    let table = Tensor::cat(&[zero, rows.to_dtype(hidden.dtype()?)?], 0)?;
    let mut index = vec![0f32; n];
    for (k, &p) in positions.iter().enumerate() {
        index[p] = (k + 1) as f32;
    }
    let index = constant(index, &[n], DType::U32)?;
    let addend = table.index_select(&index, 0)?.reshape(&[dims[0] as i64, dims[1] as i64, dim as i64])?;
    hidden.add(&addend)
}

/// cos and sin `[batch, 1, seq, half]` of multi-axis rotary (M-RoPE):
/// `positions` is `[axes, batch, seq]`, and frequency `i` turns with the
/// position on axis `axis_of[i]`.
pub fn multi_axis_rotary(positions: &Tensor, inv_freq: &[f32], axis_of: &[usize]) -> Result<(Tensor, Tensor)> {
    let dims = positions.dims()?;
    let (axes, batch, seq) = match dims.as_slice() {
        [a, b, s] => (*a, *b, *s),
        [b, s] => (1, *b, *s),
        _ => return Err(Error::new(format!("position_ids must be [axes, batch, seq], not {dims:?}"))),
    };
    if let Some(&bad) = axis_of.iter().find(|&&a| a >= axes) {
        return Err(Error::new(format!("rotary axis {bad} but position_ids has {axes} axes")));
    }
    let pos = positions.to_vec_f32()?;
    let half = inv_freq.len();
    let mut angles = Vec::with_capacity(batch * seq * half);
    for b in 0..batch {
        for s in 0..seq {
            for (i, f) in inv_freq.iter().enumerate() {
                angles.push(pos[(axis_of[i] * batch + b) * seq + s] * f);
            }
        }
    }
    let (cos, sin) = rotary_tables(&angles, batch * seq, half)?;
    let shape = [batch as i64, 1, seq as i64, half as i64];
    Ok((cos.reshape(&shape)?, sin.reshape(&shape)?))
}
