//! The memory-efficient attention kernel against the naive attention
//! (the full score matrix and an additive mask, built by candle ops whose
//! gradients candle derives), values and gradients of q, k and v, at sizes
//! that span several tiles with a partial last one: causal, bidirectional,
//! left padding, packed segments, sliding window, softcap, GQA and cached
//! keys, in f32 and f64.

use candle_core::{DType, Device, Tensor, Var};
use oxtune_engine::backend::batch::{build_mask, key_mask, MaskShape, MaskSpec};
use oxtune_engine::backend::{ops, BatchInfo};

/// One comparison.
struct Setup {
    name: &'static str,
    batch: usize,
    q_heads: usize,
    kv_heads: usize,
    queries: usize,
    keys: usize,
    spec: MaskSpec,
    softcap: Option<f64>,
    info: BatchInfo,
}

fn setup(name: &'static str) -> Setup {
    Setup {
        name,
        batch: 2,
        q_heads: 4,
        kv_heads: 2,
        queries: 150,
        keys: 150,
        spec: MaskSpec { causal: true, sliding_window: 0 },
        softcap: None,
        info: BatchInfo::default(),
    }
}

/// The largest absolute difference between two tensors, over the larger
/// of 1 and `b`'s largest magnitude.
fn relative_diff(a: &Tensor, b: &Tensor) -> f64 {
    let to64 = |t: &Tensor| t.to_dtype(DType::F64).unwrap();
    let diff = (to64(a) - to64(b)).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f64>().unwrap();
    let scale = to64(b).abs().unwrap().max_all().unwrap().to_scalar::<f64>().unwrap().max(1.0);
    diff / scale
}

impl Setup {
    fn check(&self, dtype: DType, tolerance: f64) {
        let device = Device::Cpu;
        let d = 16;
        let randn = |shape: (usize, usize, usize, usize)| {
            Var::from_tensor(&Tensor::randn(0f64, 1.0, shape, &device).unwrap().to_dtype(dtype).unwrap()).unwrap()
        };
        let q = randn((self.batch, self.q_heads, self.queries, d));
        let k = randn((self.batch, self.kv_heads, self.keys, d));
        let v = randn((self.batch, self.kv_heads, self.keys, d));
        let weights = Tensor::randn(0f64, 1.0, (self.batch, self.q_heads, self.queries, d), &device)
            .unwrap()
            .to_dtype(dtype)
            .unwrap();
        let shape =
            MaskShape { batch: self.batch, queries: self.queries, keys: self.keys, offset: self.keys - self.queries };
        let scale = 1.0 / (d as f64).sqrt();

        let additive = build_mask(self.spec, shape, &self.info, dtype, &device).unwrap();
        let naive = ops::attention(&q, &k, &v, additive.as_ref(), scale, self.softcap).unwrap();
        let rules = key_mask(self.spec, shape, &self.info).unwrap();
        let flash = oxtune_kernels::flash_attention(&q, &k, &v, &rules, scale, self.softcap).unwrap();
        let diff = relative_diff(&flash, &naive);
        assert!(diff < tolerance, "{} ({dtype:?}): outputs differ by {diff:e}", self.name);

        let grads = |out: &Tensor| (out * &weights).unwrap().sum_all().unwrap().backward().unwrap();
        let (g_naive, g_flash) = (grads(&naive), grads(&flash));
        for (what, var) in [("q", &q), ("k", &k), ("v", &v)] {
            let (a, b) = (g_flash.get(var).unwrap(), g_naive.get(var).unwrap());
            let diff = relative_diff(a, b);
            assert!(diff < tolerance, "{} ({dtype:?}): gradients of {what} differ by {diff:e}", self.name);
        }
    }
}

fn setups() -> Vec<Setup> {
    let device = Device::Cpu;
    // Row 0 is left-padded by 37 positions (a whole tile and a part).
    let padding: Vec<u32> = (0..150).map(|j| (j >= 37) as u32).chain(std::iter::repeat_n(1, 150)).collect();
    let padding = Tensor::from_vec(padding, (2, 150), &device).unwrap();
    // Three packed segments per row, with boundaries inside tiles.
    let segments: Vec<u32> =
        (0..150).map(|j| (j >= 40) as u32 + (j >= 100) as u32).chain((0..150).map(|j| (j >= 70) as u32)).collect();
    let segments = Tensor::from_vec(segments, (2, 150), &device).unwrap();
    vec![
        setup("causal, GQA"),
        Setup { spec: MaskSpec { causal: false, sliding_window: 0 }, ..setup("bidirectional") },
        Setup {
            info: BatchInfo { attention_mask: Some(padding.clone()), ..Default::default() },
            ..setup("left padding")
        },
        Setup { info: BatchInfo { segment_ids: Some(segments), ..Default::default() }, ..setup("packed segments") },
        Setup { spec: MaskSpec { causal: true, sliding_window: 50 }, ..setup("sliding window 50") },
        Setup { softcap: Some(2.0), ..setup("softcap 2") },
        Setup { q_heads: 6, kv_heads: 1, ..setup("six query heads on one KV head") },
        // 70 new queries after 130 cached keys, with padding over both.
        Setup {
            queries: 70,
            keys: 200,
            info: BatchInfo {
                attention_mask: Some(
                    Tensor::cat(&[padding.clone(), Tensor::ones((2, 50), DType::U32, &device).unwrap()], 1).unwrap(),
                ),
                ..Default::default()
            },
            ..setup("cached keys with padding")
        },
        Setup { queries: 1, keys: 133, ..setup("one decoding step") },
    ]
}

#[test]
fn flash_attention_matches_the_naive_attention_in_f64() {
    for s in setups() {
        s.check(DType::F64, 1e-10);
    }
}

#[test]
fn flash_attention_matches_the_naive_attention_in_f32() {
    for s in setups() {
        s.check(DType::F32, 2e-5);
    }
}
