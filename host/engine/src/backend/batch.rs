//! What the host knows about a batch that a model plugin does not: positions,
//! padding, packing segments, and the KV cache during generation.

use candle_core::{DType, Device, Result, Tensor};

/// Per-batch facts the host's `rope` and `attention` ops read.
#[derive(Clone, Debug, Default)]
pub struct BatchInfo {
    /// `[batch, seq]` positions of the new tokens. When absent they run
    /// from the KV cache's length on.
    pub position_ids: Option<Tensor>,
    /// `[batch, kv_len]`, non-zero where a key may be attended to (left
    /// padding in batched generation). `kv_len` counts cached tokens too.
    pub attention_mask: Option<Tensor>,
    /// `[batch, seq]` packing segment of each token: a token attends only
    /// within its segment. Not used together with a KV cache.
    pub segment_ids: Option<Tensor>,
    /// Set while training: dropout is active, its masks drawn from this
    /// seed (the trainer derives one per micro-batch, so runs reproduce).
    /// `None` (inference, evaluation): dropout is the identity.
    pub dropout_seed: Option<u64>,
    /// Media inputs of the batch by forward-input name (`pixel_values`,
    /// `image_grid_thw`, ...), passed to the model beside `input_ids`;
    /// empty for text. Only the first step of a generation carries them.
    pub media: Vec<(String, Tensor)>,
}

/// Keys and values of past tokens, per layer, for incremental decoding.
///
/// Each layer's keys and values live in a buffer with room for more
/// positions (`[b, h, capacity, d]`): a step writes its positions in place
/// and reads the cached ones as a view, so decoding copies nothing that is
/// already cached; a full buffer (the prompt's keys are kept as they are)
/// is replaced by one with room for [`SPARE_POSITIONS`] more: a copy every
/// 128 positions instead of every step, and never more than 128 unused
/// positions held.
///
/// Keys and values are stored in the cache's dtype ([`KvCache::with_dtype`]:
/// f16 halves an f32 model's cache, as llama.cpp stores it; the CPU
/// attention kernel reads f16 tiles directly), or as the model computes
/// them ([`KvCache::new`]).
#[derive(Clone, Debug, Default)]
pub struct KvCache {
    layers: Vec<Option<CachedLayer>>,
    /// The dtype keys and values are stored in (`None`: as computed).
    dtype: Option<DType>,
}

/// One layer's buffers and how many positions they hold.
#[derive(Clone, Debug)]
struct CachedLayer {
    keys: Tensor,
    values: Tensor,
    len: usize,
}

/// Positions a new buffer has room for beyond what it is made to hold.
const SPARE_POSITIONS: usize = 128;

impl CachedLayer {
    /// Buffers holding `k`, `v` (`[b, h, s, d]`) with room to grow.
    fn new(k: &Tensor, v: &Tensor, capacity: usize) -> Result<CachedLayer> {
        let (b, h, s, d) = k.dims4()?;
        let buffer = |t: &Tensor| -> Result<Tensor> {
            let buffer = Tensor::zeros((b, h, capacity, d), t.dtype(), t.device())?;
            buffer.slice_set(&t.contiguous()?.detach(), 2, 0)?;
            Ok(buffer)
        };
        Ok(CachedLayer { keys: buffer(k)?, values: buffer(v)?, len: s })
    }

    /// The cached keys and values (views of the buffers).
    fn views(&self) -> Result<(Tensor, Tensor)> {
        Ok((self.keys.narrow(2, 0, self.len)?, self.values.narrow(2, 0, self.len)?))
    }

    /// Appends `k`, `v` in place, growing the buffers when full.
    fn append(&mut self, k: &Tensor, v: &Tensor) -> Result<()> {
        let s = k.dim(2)?;
        if self.len + s > self.keys.dim(2)? {
            let (keys, values) = self.views()?;
            *self = CachedLayer::new(&keys, &values, self.len + s + SPARE_POSITIONS)?;
        }
        self.keys.slice_set(&k.contiguous()?.detach(), 2, self.len)?;
        self.values.slice_set(&v.contiguous()?.detach(), 2, self.len)?;
        self.len += s;
        Ok(())
    }

    /// The layer holding `keys`, `values` (`[b, h, s, d]`) as they are,
    /// without spare room: a prompt's keys are kept without a copy, and
    /// the first step after it moves them into a buffer.
    fn of(keys: &Tensor, values: &Tensor) -> Result<CachedLayer> {
        Ok(CachedLayer { keys: keys.contiguous()?.detach(), values: values.contiguous()?.detach(), len: keys.dim(2)? })
    }
}

impl KvCache {
    /// An empty cache.
    pub fn new() -> KvCache {
        KvCache::default()
    }

    /// An empty cache storing keys and values as `dtype`.
    pub fn with_dtype(dtype: DType) -> KvCache {
        KvCache { layers: Vec::new(), dtype: Some(dtype) }
    }

    /// `t` in the cache's dtype.
    fn stored(&self, t: &Tensor) -> Result<Tensor> {
        match self.dtype {
            Some(DType::F16) if t.dtype() != DType::F16 => oxtune_kernels::to_f16(t),
            Some(dtype) if dtype != t.dtype() => t.to_dtype(dtype),
            _ => Ok(t.clone()),
        }
    }

    /// How many tokens are cached (those of layer 0).
    pub fn seq_len(&self) -> usize {
        match self.layers.first() {
            Some(Some(layer)) => layer.len,
            _ => 0,
        }
    }

    /// Appends this step's `k`, `v` (`[b, h, s, d]`) to `layer` and returns
    /// the full keys and values.
    pub fn append(&mut self, layer: usize, k: &Tensor, v: &Tensor) -> Result<(Tensor, Tensor)> {
        if self.layers.len() <= layer {
            self.layers.resize(layer + 1, None);
        }
        let (k, v) = (&self.stored(k)?, &self.stored(v)?);
        match &mut self.layers[layer] {
            Some(cached) => cached.append(k, v)?,
            slot => *slot = Some(CachedLayer::of(k, v)?),
        }
        self.layers[layer].as_ref().expect("filled above").views()
    }

    /// Rows in the cache (those of layer 0; 0 when empty).
    pub fn rows(&self) -> usize {
        match self.layers.first() {
            Some(Some(layer)) => layer.keys.dim(0).unwrap_or(0),
            _ => 0,
        }
    }

    /// Keeps only the rows `keep` (in that order): the rows of a
    /// continuous batch that are still decoding.
    pub fn select_rows(&mut self, keep: &[usize]) -> Result<()> {
        for layer in self.layers.iter_mut().flatten() {
            let index = Tensor::from_iter(keep.iter().map(|&r| r as u32), layer.keys.device())?;
            let (k, v) = layer.views()?;
            *layer =
                CachedLayer::of(&k.contiguous()?.index_select(&index, 0)?, &v.contiguous()?.index_select(&index, 0)?)?;
        }
        Ok(())
    }

    /// Drops the first `n` cached positions of every row (columns that
    /// are padding in all of them).
    pub fn drop_leading(&mut self, n: usize) -> Result<()> {
        for layer in self.layers.iter_mut().flatten() {
            let (k, v) = layer.views()?;
            let len = layer.len;
            *layer = CachedLayer::of(&k.narrow(2, n, len - n)?, &v.narrow(2, n, len - n)?)?;
        }
        Ok(())
    }

    /// Appends the rows of `other` after this cache's, both left-padded
    /// with zeros to the longer of the two lengths (the padding is what
    /// the callers' attention masks leave out).
    pub fn append_rows(&mut self, other: KvCache) -> Result<()> {
        if self.layers.is_empty() {
            *self = other;
            return Ok(());
        }
        let width = self.seq_len().max(other.seq_len());
        if self.layers.len() != other.layers.len() {
            candle_core::bail!("KV caches of {} and {} layers cannot be joined", self.layers.len(), other.layers.len());
        }
        for (mine, theirs) in self.layers.iter_mut().zip(other.layers) {
            *mine = match (mine.take(), theirs) {
                (Some(a), Some(b)) => {
                    let ((k, v), (k2, v2)) = (a.views()?, b.views()?);
                    Some(CachedLayer::of(
                        &Tensor::cat(&[&left_pad(&k, width)?, &left_pad(&k2, width)?], 0)?,
                        &Tensor::cat(&[&left_pad(&v, width)?, &left_pad(&v2, width)?], 0)?,
                    )?)
                }
                (None, None) => None,
                _ => candle_core::bail!("KV caches with different cached layers cannot be joined"),
            };
        }
        Ok(())
    }
}

/// `t` (`[b, h, s, d]`) with zeros before its `s` positions to make `width`.
fn left_pad(t: &Tensor, width: usize) -> Result<Tensor> {
    let (b, h, s, d) = t.dims4()?;
    if s == width {
        return Ok(t.clone());
    }
    let zeros = Tensor::zeros((b, h, width - s, d), t.dtype(), t.device())?;
    Tensor::cat(&[&zeros, t], 2)
}

/// Which keys query `i` (absolute position `offset + i`) may see.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash)]
pub struct MaskSpec {
    /// Only keys at or before the query.
    pub causal: bool,
    /// Only the last `n` keys (0: no window).
    pub sliding_window: u32,
}

fn rows_u32(t: &Tensor) -> Result<Vec<Vec<u32>>> {
    t.to_dtype(DType::U32)?.to_vec2::<u32>()
}

/// The geometry of one attention call.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash)]
pub struct MaskShape {
    /// Rows in the batch.
    pub batch: usize,
    /// New query positions.
    pub queries: usize,
    /// Key positions, cached ones included.
    pub keys: usize,
    /// Cached positions before the first query.
    pub offset: usize,
}

/// The same rules as [`build_mask`], for the memory-efficient attention
/// kernel, which applies them tile by tile instead of reading a
/// `[queries, keys]` matrix.
pub fn key_mask(spec: MaskSpec, shape: MaskShape, info: &BatchInfo) -> Result<oxtune_kernels::KeyMask> {
    let visible = |rows: Vec<Vec<u32>>| rows.into_iter().map(|r| r.into_iter().map(|x| x != 0).collect()).collect();
    Ok(oxtune_kernels::KeyMask {
        causal: spec.causal,
        sliding_window: spec.sliding_window as usize,
        offset: shape.offset,
        padding: info.attention_mask.as_ref().map(rows_u32).transpose()?.map(visible),
        segments: info.segment_ids.as_ref().map(rows_u32).transpose()?,
    })
}

/// Builds the additive mask `[batch or 1, 1, queries, keys]` (0 or -inf).
/// A query that would see no key at all (a padding row) is allowed to see
/// itself, so its softmax stays finite. `None` when nothing is masked.
pub fn build_mask(
    spec: MaskSpec,
    shape: MaskShape,
    info: &BatchInfo,
    dtype: DType,
    device: &Device,
) -> Result<Option<Tensor>> {
    let MaskShape { batch, queries: seq, keys: kv_len, offset } = shape;
    let padding = info.attention_mask.as_ref().map(rows_u32).transpose()?;
    let segments = info.segment_ids.as_ref().map(rows_u32).transpose()?;
    if !spec.causal && spec.sliding_window == 0 && padding.is_none() && segments.is_none() {
        return Ok(None);
    }
    let rows = if padding.is_some() || segments.is_some() { batch } else { 1 };
    let mut data = vec![0f32; rows * seq * kv_len];
    for r in 0..rows {
        for i in 0..seq {
            let qpos = offset + i;
            let row = &mut data[(r * seq + i) * kv_len..(r * seq + i + 1) * kv_len];
            let mut any = false;
            for (j, cell) in row.iter_mut().enumerate() {
                let mut ok = !spec.causal || j <= qpos;
                if spec.sliding_window > 0 && qpos >= j + spec.sliding_window as usize {
                    ok = false;
                }
                if let Some(p) = &padding {
                    ok &= p[r].get(j).copied().unwrap_or(1) != 0;
                }
                if let Some(sg) = &segments {
                    ok &= sg[r].get(i) == sg[r].get(j);
                }
                if ok {
                    any = true;
                } else {
                    *cell = f32::NEG_INFINITY;
                }
            }
            if !any {
                row[qpos.min(kv_len - 1)] = 0.0;
            }
        }
    }
    Ok(Some(Tensor::from_vec(data, (rows, 1, seq, kv_len), device)?.to_dtype(dtype)?))
}
