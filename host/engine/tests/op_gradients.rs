//! Every op of the tensor-op API, run through the host's `GraphSession` in
//! f64: its gradient with respect to every input and every named weight
//! must match a central finite-difference estimate.
//!
//! Loss: `sum(op(inputs) * R)` for a fixed random `R`, so every output
//! element's gradient is weighted differently. Tolerance: 1e-6 relative to
//! the gradient's largest magnitude (f64 differences with h = 1e-5 are
//! accurate to about 1e-9).

use abi_stable::std_types::RVec;
use candle_core::{DType, Device, Tensor, Var};
use oxtune_engine::backend::{BatchInfo, ForwardContext, GraphSession, KvCache, WeightStore};
use oxtune_plugin_api::abi::{self, Op, TensorId};

/// Deterministic values in [-1, 1) from a seed (xorshift).
fn values(n: usize, seed: u64) -> Vec<f64> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            (s >> 11) as f64 / (1u64 << 53) as f64 * 2.0 - 1.0
        })
        .collect()
}

fn rand(shape: &[usize], seed: u64) -> Tensor {
    let n = shape.iter().product();
    Tensor::from_vec(values(n, seed), shape, &Device::Cpu).unwrap()
}

/// Values in [lo, hi) — for ops defined on a sub-domain (log, sqrt, ...).
fn rand_in(shape: &[usize], seed: u64, lo: f64, hi: f64) -> Tensor {
    ((rand(shape, seed) + 1.0).unwrap() * ((hi - lo) / 2.0)).unwrap().affine(1.0, lo).unwrap()
}

/// Builds an op (or a few) from the input handles.
type BuildFn = Box<dyn Fn(&mut GraphSession, &[TensorId]) -> TensorId>;

/// One gradient check.
struct Case {
    name: &'static str,
    /// Differentiable inputs, in handle order.
    inputs: Vec<Tensor>,
    /// Non-differentiable inputs (integer ids), handles after `inputs`.
    constants: Vec<Tensor>,
    /// Named weights (differentiated too).
    weights: Vec<(&'static str, Tensor)>,
    batch: BatchInfo,
    build: BuildFn,
}

impl Case {
    fn new(
        name: &'static str,
        inputs: Vec<Tensor>,
        build: impl Fn(&mut GraphSession, &[TensorId]) -> TensorId + 'static,
    ) -> Case {
        Case { name, inputs, constants: vec![], weights: vec![], batch: BatchInfo::default(), build: Box::new(build) }
    }

    fn weights(mut self, weights: Vec<(&'static str, Tensor)>) -> Case {
        self.weights = weights;
        self
    }

    fn constants(mut self, constants: Vec<Tensor>) -> Case {
        self.constants = constants;
        self
    }

    fn batch(mut self, batch: BatchInfo) -> Case {
        self.batch = batch;
        self
    }

    /// Runs the op on `inputs` / `weights` and returns the output.
    fn forward(&self, inputs: &[Tensor], weights: &[(&'static str, Tensor)], store_vars: Option<&[Var]>) -> Tensor {
        let mut store = WeightStore::new();
        for (i, (name, w)) in weights.iter().enumerate() {
            match store_vars {
                Some(vars) => store.insert_var(*name, vars[i].clone()),
                None => store.insert(*name, w.clone()),
            }
        }
        let mut session =
            GraphSession::new(ForwardContext { weights: &store, batch: &self.batch, cache: None, tuner: None });
        let ids: Vec<TensorId> = inputs.iter().chain(&self.constants).map(|t| session.insert(t.clone())).collect();
        let out = (self.build)(&mut session, &ids);
        session.get(out).unwrap().clone()
    }

    fn check(&self, tolerance: f64, h: f64) {
        let input_vars: Vec<Var> = self.inputs.iter().map(|t| Var::from_tensor(t).unwrap()).collect();
        let weight_vars: Vec<Var> = self.weights.iter().map(|(_, t)| Var::from_tensor(t).unwrap()).collect();
        let inputs: Vec<Tensor> = input_vars.iter().map(|v| v.as_tensor().clone()).collect();
        let y = self.forward(&inputs, &self.weights, Some(&weight_vars));
        let r = rand(y.dims(), 977).to_dtype(y.dtype()).unwrap();
        let loss = (y * &r).unwrap().sum_all().unwrap();
        let grads = loss.backward().unwrap();

        let loss_at = |inputs: &[Tensor], weights: &[(&'static str, Tensor)]| -> f64 {
            let y = self.forward(inputs, weights, None);
            (y * &r).unwrap().sum_all().unwrap().to_dtype(DType::F64).unwrap().to_scalar::<f64>().unwrap()
        };
        let perturbed = |t: &Tensor, i: usize, delta: f64| -> Tensor {
            let mut v = t.flatten_all().unwrap().to_dtype(DType::F64).unwrap().to_vec1::<f64>().unwrap();
            v[i] += delta;
            Tensor::from_vec(v, t.dims(), &Device::Cpu).unwrap().to_dtype(t.dtype()).unwrap()
        };
        let compare = |what: String, analytic: Option<&Tensor>, numeric: Vec<f64>| {
            let analytic = analytic
                .unwrap_or_else(|| panic!("{}: no gradient reached {what}", self.name))
                .flatten_all()
                .unwrap()
                .to_dtype(DType::F64)
                .unwrap()
                .to_vec1::<f64>()
                .unwrap();
            let scale = numeric.iter().fold(1e-3f64, |m, v| m.max(v.abs()));
            let worst = analytic.iter().zip(&numeric).map(|(a, n)| (a - n).abs()).fold(0.0, f64::max);
            assert!(
                worst <= tolerance * scale,
                "{}: gradient of {what} differs from finite differences by {worst:e} (scale {scale:e})\n analytic {analytic:?}\n numeric  {numeric:?}",
                self.name
            );
        };
        for (k, var) in input_vars.iter().enumerate() {
            let t = var.as_tensor();
            let numeric = (0..t.elem_count())
                .map(|i| {
                    let mut plus = self.inputs.clone();
                    plus[k] = perturbed(t, i, h);
                    let mut minus = self.inputs.clone();
                    minus[k] = perturbed(t, i, -h);
                    (loss_at(&plus, &self.weights) - loss_at(&minus, &self.weights)) / (2.0 * h)
                })
                .collect();
            compare(format!("input {k}"), grads.get(t), numeric);
        }
        for (k, var) in weight_vars.iter().enumerate() {
            let t = var.as_tensor();
            let numeric = (0..t.elem_count())
                .map(|i| {
                    let mut plus = self.weights.clone();
                    plus[k].1 = perturbed(t, i, h);
                    let mut minus = self.weights.clone();
                    minus[k].1 = perturbed(t, i, -h);
                    (loss_at(&self.inputs, &plus) - loss_at(&self.inputs, &minus)) / (2.0 * h)
                })
                .collect();
            compare(format!("weight `{}`", self.weights[k].0), grads.get(t), numeric);
        }
    }
}

fn op(s: &mut GraphSession, op: Op) -> TensorId {
    s.apply(&op).unwrap_or_else(|e| panic!("{op:?}: {e}"))
}

fn unary(name: &'static str, x: Tensor, make: fn(TensorId) -> Op) -> Case {
    Case::new(name, vec![x], move |s, ids| op(s, make(ids[0])))
}

fn binary(name: &'static str, make: fn(TensorId, TensorId) -> Op) -> Case {
    // [2,3,4] with [3,1]: exercises broadcasting on both sides.
    Case::new(name, vec![rand(&[2, 3, 4], 1), rand_in(&[3, 1], 2, 0.5, 1.5)], move |s, ids| op(s, make(ids[0], ids[1])))
}

const TOL: f64 = 1e-6;
const H: f64 = 1e-5;

#[test]
fn elementwise_unary_ops() {
    let x = || rand(&[3, 4], 11);
    let away_from_zero = || (rand_in(&[3, 4], 12, 0.2, 1.0) * rand(&[3, 4], 13).sign().unwrap()).unwrap();
    let positive = || rand_in(&[3, 4], 14, 0.3, 2.0);
    let cases = vec![
        unary("neg", x(), |x| Op::Neg { x }),
        unary("exp", x(), |x| Op::Exp { x }),
        unary("log", positive(), |x| Op::Log { x }),
        unary("sqrt", positive(), |x| Op::Sqrt { x }),
        unary("recip", away_from_zero(), |x| Op::Recip { x }),
        unary("abs", away_from_zero(), |x| Op::Abs { x }),
        unary("sqr", x(), |x| Op::Sqr { x }),
        unary("tanh", x(), |x| Op::Tanh { x }),
        unary("sigmoid", x(), |x| Op::Sigmoid { x }),
        unary("silu", x(), |x| Op::Silu { x }),
        unary("gelu", x(), |x| Op::Gelu { x }),
        unary("gelu_erf", x(), |x| Op::GeluErf { x }),
        unary("relu", away_from_zero(), |x| Op::Relu { x }),
        unary("sin", x(), |x| Op::Sin { x }),
        unary("cos", x(), |x| Op::Cos { x }),
        unary("affine", x(), |x| Op::Affine { x, mul: -1.5, add: 0.25 }),
        unary("pow", positive(), |x| Op::PowScalar { x, exponent: 2.5 }),
        // Some values are inside [-0.5, 0.5], some clamped; none sits on a kink.
        unary("clamp", away_from_zero(), |x| Op::Clamp { x, min: -0.5, max: 0.5 }),
    ];
    for case in cases {
        case.check(TOL, H);
    }
}

#[test]
fn broadcasting_binary_ops() {
    binary("add", |a, b| Op::Add { a, b }).check(TOL, H);
    binary("sub", |a, b| Op::Sub { a, b }).check(TOL, H);
    binary("mul", |a, b| Op::Mul { a, b }).check(TOL, H);
    binary("div", |a, b| Op::Div { a, b }).check(TOL, H);
    // Distinct magnitudes so no element ties.
    binary("maximum", |a, b| Op::Maximum { a, b }).check(TOL, H);
    binary("minimum", |a, b| Op::Minimum { a, b }).check(TOL, H);
}

#[test]
fn reductions_and_softmax() {
    let x = || rand(&[2, 3, 4], 21);
    for (keepdim, dim) in [(false, -1i64), (true, 1)] {
        Case::new("sum", vec![x()], move |s, i| op(s, Op::Sum { x: i[0], dim, keepdim })).check(TOL, H);
        Case::new("mean", vec![x()], move |s, i| op(s, Op::Mean { x: i[0], dim, keepdim })).check(TOL, H);
        Case::new("max", vec![x()], move |s, i| op(s, Op::Max { x: i[0], dim, keepdim })).check(TOL, H);
        Case::new("min", vec![x()], move |s, i| op(s, Op::Min { x: i[0], dim, keepdim })).check(TOL, H);
    }
    for dim in [-1i64, 0, 1] {
        Case::new("softmax", vec![x()], move |s, i| op(s, Op::Softmax { x: i[0], dim })).check(TOL, H);
        Case::new("log_softmax", vec![x()], move |s, i| op(s, Op::LogSoftmax { x: i[0], dim })).check(TOL, H);
    }
}

#[test]
fn argmax_picks_the_largest() {
    let x = Tensor::new(&[[0.1f64, 0.7, -0.2], [2.0, 1.0, 3.0]], &Device::Cpu).unwrap();
    let case = Case::new("argmax", vec![x], |s, i| op(s, Op::ArgMax { x: i[0], dim: -1, keepdim: false }));
    let out = case.forward(&case.inputs, &[], None);
    assert_eq!(out.to_vec1::<u32>().unwrap(), vec![1, 2]);
}

#[test]
fn matmul_and_shape_ops() {
    // Batched matmul with a broadcast right operand.
    Case::new("matmul", vec![rand(&[2, 3, 4], 31), rand(&[4, 5], 32)], |s, i| op(s, Op::Matmul { a: i[0], b: i[1] }))
        .check(TOL, H);
    Case::new("matmul(transposed)", vec![rand(&[2, 3, 4], 33), rand(&[2, 5, 4], 34)], |s, i| {
        let bt = op(s, Op::Transpose { x: i[1], dim0: -1, dim1: -2 });
        op(s, Op::Matmul { a: i[0], b: bt })
    })
    .check(TOL, H);
    let x = || rand(&[2, 3, 4], 35);
    Case::new("reshape", vec![x()], |s, i| op(s, Op::Reshape { x: i[0], shape: RVec::from(vec![4, -1]) }))
        .check(TOL, H);
    Case::new("transpose", vec![x()], |s, i| op(s, Op::Transpose { x: i[0], dim0: 0, dim1: 2 })).check(TOL, H);
    Case::new("permute", vec![x()], |s, i| op(s, Op::Permute { x: i[0], dims: RVec::from(vec![2, 0, 1]) }))
        .check(TOL, H);
    Case::new("narrow", vec![x()], |s, i| op(s, Op::Narrow { x: i[0], dim: -1, start: 1, len: 2 })).check(TOL, H);
    Case::new("cat", vec![x(), rand(&[2, 1, 4], 36)], |s, i| {
        op(s, Op::Cat { xs: RVec::from(vec![i[0], i[1]]), dim: 1 })
    })
    .check(TOL, H);
    Case::new("broadcast_as", vec![rand(&[3, 1], 37)], |s, i| {
        op(s, Op::BroadcastAs { x: i[0], shape: RVec::from(vec![2, 3, 4]) })
    })
    .check(TOL, H);
    let ids = Tensor::new(&[2u32, 0, 2, 1], &Device::Cpu).unwrap();
    Case::new("index_select", vec![x()], |s, i| op(s, Op::IndexSelect { x: i[0], ids: i[1], dim: 2 }))
        .constants(vec![ids])
        .check(TOL, H);
    // f64 -> f32 -> f64: the gradient passes through the cast (f32 precision).
    Case::new("to_dtype", vec![x()], |s, i| {
        let f = op(s, Op::ToDType { x: i[0], dtype: abi::DType::F32 });
        let g = op(s, Op::Sqr { x: f });
        op(s, Op::ToDType { x: g, dtype: abi::DType::F64 })
    })
    .check(1e-3, 1e-3);
}

#[test]
fn named_weight_ops() {
    Case::new("weight", vec![], |s, _| op(s, Op::Weight { name: "w".into() }))
        .weights(vec![("w", rand(&[3, 2], 40))])
        .check(TOL, H);
    let ids = Tensor::new(&[[1u32, 3, 1], [0, 2, 4]], &Device::Cpu).unwrap();
    Case::new("embedding", vec![], |s, i| op(s, Op::Embedding { name: "emb".into(), ids: i[0] }))
        .constants(vec![ids])
        .weights(vec![("emb.weight", rand(&[5, 3], 41))])
        .check(TOL, H);
    Case::new("linear", vec![rand(&[2, 3, 4], 42)], |s, i| op(s, Op::Linear { name: "proj".into(), x: i[0] }))
        .weights(vec![("proj.weight", rand(&[5, 4], 43)), ("proj.bias", rand(&[5], 44))])
        .check(TOL, H);
    Case::new("linear(no bias)", vec![rand(&[3, 4], 45)], |s, i| op(s, Op::Linear { name: "proj".into(), x: i[0] }))
        .weights(vec![("proj.weight", rand(&[2, 4], 46))])
        .check(TOL, H);
    Case::new("rms_norm", vec![rand(&[2, 3, 6], 47)], |s, i| {
        op(s, Op::RmsNorm { name: "norm".into(), x: i[0], eps: 1e-6 })
    })
    .weights(vec![("norm.weight", rand(&[6], 48))])
    .check(TOL, H);
    Case::new("rms_norm_offset", vec![rand(&[2, 3, 6], 47)], |s, i| {
        op(s, Op::RmsNormOffset { name: "norm".into(), x: i[0], eps: 1e-6, offset: 1.0 })
    })
    .weights(vec![("norm.weight", rand(&[6], 48))])
    .check(TOL, H);
    Case::new("layer_norm", vec![rand(&[2, 3, 6], 49)], |s, i| {
        op(s, Op::LayerNorm { name: "ln".into(), x: i[0], eps: 1e-5 })
    })
    .weights(vec![("ln.weight", rand(&[6], 50)), ("ln.bias", rand(&[6], 51))])
    .check(TOL, H);
}

fn rope_case(name: &'static str, head_dim: usize, inv_freq: Vec<f32>, interleaved: bool, scale: f32) -> Case {
    Case::new(name, vec![rand(&[2, 2, 5, head_dim], 60)], move |s, i| {
        op(s, Op::Rope { x: i[0], inv_freq: RVec::from(inv_freq.clone()), interleaved, scale })
    })
}

#[test]
fn rope_variants() {
    let inv =
        |n: usize, dim: usize| -> Vec<f32> { (0..n).map(|i| 10000f32.powf(-2.0 * i as f32 / dim as f32)).collect() };
    rope_case("rope(neox)", 8, inv(4, 8), false, 1.0).check(TOL, H);
    rope_case("rope(interleaved)", 8, inv(4, 8), true, 1.0).check(TOL, H);
    rope_case("rope(partial)", 8, inv(2, 4), false, 1.0).check(TOL, H);
    rope_case("rope(scaled)", 8, inv(4, 8), false, 1.3).check(TOL, H);
    // Explicit positions from the batch (packing restarts them).
    let positions = Tensor::new(&[[0u32, 1, 2, 0, 1], [3, 4, 5, 6, 7]], &Device::Cpu).unwrap();
    rope_case("rope(positions)", 8, inv(4, 8), false, 1.0)
        .batch(BatchInfo { position_ids: Some(positions), ..Default::default() })
        .check(TOL, H);
}

#[test]
fn rope_rotates_pairs_by_position_times_frequency() {
    // One head, head_dim 2, frequency 1: position p rotates (x0, x1) by p radians.
    let x = Tensor::new(&[[[[1.0f64, 0.0], [1.0, 0.0], [0.0, 1.0]]]], &Device::Cpu).unwrap();
    let case = Case::new("rope", vec![x], |s, i| {
        op(s, Op::Rope { x: i[0], inv_freq: RVec::from(vec![1.0f32]), interleaved: false, scale: 1.0 })
    });
    let out = case.forward(&case.inputs, &[], None).flatten_all().unwrap().to_vec1::<f64>().unwrap();
    let expected = [1.0, 0.0, 1f64.cos(), 1f64.sin(), -2f64.sin(), 2f64.cos()];
    for (o, e) in out.iter().zip(expected) {
        assert!((o - e).abs() < 1e-6, "{out:?} vs {expected:?}");
    }
}

fn attention_case(name: &'static str, causal: bool, window: u32, softcap: f32) -> Case {
    // 4 query heads share 2 KV heads (GQA), 5 positions, head_dim 3.
    Case::new(name, vec![rand(&[1, 4, 5, 3], 70), rand(&[1, 2, 5, 3], 71), rand(&[1, 2, 5, 3], 72)], move |s, i| {
        op(
            s,
            Op::Attention { layer: 0, q: i[0], k: i[1], v: i[2], causal, scale: 0.0, sliding_window: window, softcap },
        )
    })
}

#[test]
fn attention_variants() {
    attention_case("attention(causal, gqa)", true, 0, 0.0).check(TOL, H);
    attention_case("attention(bidirectional)", false, 0, 0.0).check(TOL, H);
    attention_case("attention(sliding window 2)", true, 2, 0.0).check(TOL, H);
    attention_case("attention(softcap)", true, 0, 1.5).check(TOL, H);
    let padding = Tensor::new(&[[0u32, 1, 1, 1, 1]], &Device::Cpu).unwrap();
    attention_case("attention(left padding)", true, 0, 0.0)
        .batch(BatchInfo { attention_mask: Some(padding), ..Default::default() })
        .check(TOL, H);
    let segments = Tensor::new(&[[0u32, 0, 1, 1, 1]], &Device::Cpu).unwrap();
    attention_case("attention(packed segments)", true, 0, 0.0)
        .batch(BatchInfo { segment_ids: Some(segments), ..Default::default() })
        .check(TOL, H);
}

/// Reference attention for one head, written out with loops.
fn naive_attention(
    q: &[f64],
    k: &[f64],
    v: &[f64],
    s: usize,
    d: usize,
    allowed: impl Fn(usize, usize) -> bool,
) -> Vec<f64> {
    let mut out = vec![0.0; s * d];
    for i in 0..s {
        let scores: Vec<f64> = (0..s)
            .map(|j| {
                if allowed(i, j) {
                    (0..d).map(|c| q[i * d + c] * k[j * d + c]).sum::<f64>() / (d as f64).sqrt()
                } else {
                    f64::NEG_INFINITY
                }
            })
            .collect();
        let max = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let exps: Vec<f64> = scores.iter().map(|x| (x - max).exp()).collect();
        let total: f64 = exps.iter().sum();
        for j in 0..s {
            for c in 0..d {
                out[i * d + c] += exps[j] / total * v[j * d + c];
            }
        }
    }
    out
}

#[test]
fn attention_matches_loops_with_gqa_head_mapping_and_window() {
    let case = attention_case("attention", true, 2, 0.0);
    let out = case.forward(&case.inputs, &[], None);
    let head = |t: &Tensor, h: usize| t.narrow(1, h, 1).unwrap().flatten_all().unwrap().to_vec1::<f64>().unwrap();
    for h in 0..4 {
        // Query head h reads KV head h / 2, as transformers' repeat_kv arranges.
        let expected = naive_attention(
            &head(&case.inputs[0], h),
            &head(&case.inputs[1], h / 2),
            &head(&case.inputs[2], h / 2),
            5,
            3,
            |i, j| j <= i && i - j < 2,
        );
        let got = head(&out, h);
        for (g, e) in got.iter().zip(&expected) {
            assert!((g - e).abs() < 1e-12, "head {h}: {got:?} vs {expected:?}");
        }
    }
}

#[test]
fn kv_cache_decoding_matches_the_full_sequence() {
    let (q, k, v) = (rand(&[1, 4, 5, 3], 80), rand(&[1, 2, 5, 3], 81), rand(&[1, 2, 5, 3], 82));
    let store = WeightStore::new();
    let batch = BatchInfo::default();
    let attend = |cache: Option<&mut KvCache>, q: &Tensor, k: &Tensor, v: &Tensor| {
        let mut s = GraphSession::new(ForwardContext { weights: &store, batch: &batch, cache, tuner: None });
        let (q, k, v) = (s.insert(q.clone()), s.insert(k.clone()), s.insert(v.clone()));
        let out =
            op(&mut s, Op::Attention { layer: 0, q, k, v, causal: true, scale: 0.0, sliding_window: 0, softcap: 0.0 });
        s.get(out).unwrap().clone()
    };
    let full = attend(None, &q, &k, &v);
    let mut cache = KvCache::new();
    let prefix =
        attend(Some(&mut cache), &q.narrow(2, 0, 3).unwrap(), &k.narrow(2, 0, 3).unwrap(), &v.narrow(2, 0, 3).unwrap());
    let mut steps = vec![prefix];
    for t in 3..5 {
        let narrow = |x: &Tensor| x.narrow(2, t, 1).unwrap();
        steps.push(attend(Some(&mut cache), &narrow(&q), &narrow(&k), &narrow(&v)));
    }
    assert_eq!(cache.seq_len(), 5);
    let incremental = Tensor::cat(&steps, 2).unwrap();
    let diff = (full - incremental).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f64>().unwrap();
    assert!(diff < 1e-12, "cached decoding differs by {diff}");
}

#[test]
fn handles_from_another_call_are_rejected() {
    let store = WeightStore::new();
    let batch = BatchInfo::default();
    let mut first = GraphSession::new(ForwardContext { weights: &store, batch: &batch, cache: None, tuner: None });
    let id = first.insert(rand(&[2], 1));
    let mut second = GraphSession::new(ForwardContext { weights: &store, batch: &batch, cache: None, tuner: None });
    let err = second.apply(&Op::Exp { x: id }).unwrap_err().to_string();
    assert!(err.contains("does not belong to this call"), "{err}");
    let missing = second.apply(&Op::Weight { name: "nope".into() }).unwrap_err().to_string();
    assert!(missing.contains("no weight `nope`"), "{missing}");
}

#[test]
fn released_handles_are_errors_and_the_kept_one_lives_on() {
    let store = WeightStore::new();
    let batch = BatchInfo::default();
    let mut s = GraphSession::new(ForwardContext { weights: &store, batch: &batch, cache: None, tuner: None });
    let x = s.insert(rand(&[3], 5));
    let e = s.apply(&Op::Exp { x }).unwrap();
    let y = s.apply(&Op::Sqr { x: e }).unwrap();
    let kept = s.apply(&Op::Release { xs: vec![e, y].into(), keep: y }).unwrap();
    let err = s.apply(&Op::Neg { x: e }).unwrap_err().to_string();
    assert!(err.contains("was released"), "{err}");
    let expected = rand(&[3], 5).exp().unwrap().sqr().unwrap();
    assert_eq!(s.get(kept).unwrap().to_vec1::<f64>().unwrap(), expected.to_vec1::<f64>().unwrap());
    // The input was not in the list: still usable.
    assert!(s.apply(&Op::Neg { x }).is_ok());
}

/// The composite ops compute what their names say (the gradient checks above
/// only prove each backward matches its own forward).
#[test]
fn composite_ops_compute_their_formulas() {
    let x = rand(&[2, 5], 90);
    let w = rand(&[5], 91);
    let b = rand(&[5], 92);
    let rows = x.to_vec2::<f64>().unwrap();
    let (wv, bv) = (w.to_vec1::<f64>().unwrap(), b.to_vec1::<f64>().unwrap());
    let run = |build: fn(&mut GraphSession, &[TensorId]) -> TensorId, weights: Vec<(&'static str, Tensor)>| {
        let case = Case::new("formula", vec![x.clone()], build).weights(weights);
        case.forward(&case.inputs, &case.weights, None).to_vec2::<f64>().unwrap()
    };
    let close = |got: &[Vec<f64>], want: &dyn Fn(&[f64], usize) -> f64, what: &str| {
        for (r, (row, got_row)) in rows.iter().zip(got).enumerate() {
            for (c, &g) in got_row.iter().enumerate() {
                let e = want(row, c);
                assert!((g - e).abs() < 1e-12, "{what}[{r}][{c}]: {g} vs {e}");
            }
        }
    };
    let rms = run(|s, i| op(s, Op::RmsNorm { name: "n".into(), x: i[0], eps: 1e-6 }), vec![("n.weight", w.clone())]);
    close(
        &rms,
        &|row, c| row[c] / (row.iter().map(|v| v * v).sum::<f64>() / row.len() as f64 + 1e-6).sqrt() * wv[c],
        "rms_norm",
    );
    let ln = run(
        |s, i| op(s, Op::LayerNorm { name: "n".into(), x: i[0], eps: 1e-5 }),
        vec![("n.weight", w.clone()), ("n.bias", b.clone())],
    );
    close(
        &ln,
        &|row, c| {
            let mean = row.iter().sum::<f64>() / row.len() as f64;
            let var = row.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / row.len() as f64;
            (row[c] - mean) / (var + 1e-5).sqrt() * wv[c] + bv[c]
        },
        "layer_norm",
    );
    let softmax = |row: &[f64], c: usize| row[c].exp() / row.iter().map(|v| v.exp()).sum::<f64>();
    close(&run(|s, i| op(s, Op::Softmax { x: i[0], dim: -1 }), vec![]), &softmax, "softmax");
    close(
        &run(|s, i| op(s, Op::LogSoftmax { x: i[0], dim: -1 }), vec![]),
        &|row, c| softmax(row, c).ln(),
        "log_softmax",
    );
    close(&run(|s, i| op(s, Op::Sigmoid { x: i[0] }), vec![]), &|row, c| 1.0 / (1.0 + (-row[c]).exp()), "sigmoid");
}

#[test]
fn routing_ops_gather_scatter_and_select() {
    let x = || rand(&[3, 5], 61);
    let ids = Tensor::new(&[[4u32, 0], [1, 1], [3, 2]], &Device::Cpu).unwrap();
    Case::new("gather", vec![x()], |s, i| op(s, Op::Gather { x: i[0], ids: i[1], dim: -1 }))
        .constants(vec![ids])
        .check(TOL, H);
    // Row 0 receives twice: repeated ids add up.
    let rows = Tensor::new(&[0u32, 2, 0, 1], &Device::Cpu).unwrap();
    Case::new("index_add", vec![x(), rand(&[4, 5], 62)], |s, i| {
        op(s, Op::IndexAdd { x: i[0], ids: i[2], src: i[1], dim: 0 })
    })
    .constants(vec![rows])
    .check(TOL, H);
    let cond = Tensor::new(&[[1u8, 0, 1, 0, 0]], &Device::Cpu).unwrap();
    Case::new("where", vec![x(), rand(&[3, 1], 63)], |s, i| op(s, Op::Where { cond: i[2], a: i[0], b: i[1] }))
        .constants(vec![cond])
        .check(TOL, H);
}

#[test]
fn topk_and_compare_pick_and_test_exactly() {
    let x = Tensor::new(&[[0.1f64, 0.7, -0.2, 0.5], [2.0, 1.0, 3.0, -1.0]], &Device::Cpu).unwrap();
    let case = Case::new("topk", vec![x], |s, i| op(s, Op::TopK { x: i[0], k: 3 }));
    let out = case.forward(&case.inputs, &[], None);
    assert_eq!(out.to_vec2::<u32>().unwrap(), vec![vec![1, 3, 0], vec![2, 0, 1]]);
    let a = Tensor::new(&[[0u32], [1], [2]], &Device::Cpu).unwrap();
    let b = Tensor::new(&[1u32, 2], &Device::Cpu).unwrap();
    for (cmp, expected) in [
        (abi::Compare::EQ, vec![vec![0u8, 0], vec![1, 0], vec![0, 1]]),
        (abi::Compare::NE, vec![vec![1, 1], vec![0, 1], vec![1, 0]]),
        (abi::Compare::LT, vec![vec![1, 1], vec![0, 1], vec![0, 0]]),
        (abi::Compare::LE, vec![vec![1, 1], vec![1, 1], vec![0, 1]]),
        (abi::Compare::GT, vec![vec![0, 0], vec![0, 0], vec![1, 0]]),
        (abi::Compare::GE, vec![vec![0, 0], vec![1, 0], vec![1, 1]]),
    ] {
        let case =
            Case::new("compare", vec![a.clone(), b.clone()], move |s, i| op(s, Op::Compare { a: i[0], b: i[1], cmp }));
        let out = case.forward(&case.inputs, &[], None);
        assert_eq!(out.to_vec2::<u8>().unwrap(), expected, "{cmp:?}");
    }
    let too_many = Case::new("topk", vec![rand(&[2, 3], 64)], |s, i| {
        let err = s.apply(&Op::TopK { x: i[0], k: 4 }).unwrap_err().to_string();
        assert!(err.contains("k = 4 of a last dim of 3"), "{err}");
        i[0]
    });
    too_many.forward(&too_many.inputs, &[], None);
}

#[test]
fn grouped_linear_routes_each_row_to_its_layer() {
    // Rows 0 and 3 to layer a, 1 to c, 2 and 4 to b: values and gradients
    // of the inputs and all three weights.
    let groups = Tensor::new(&[0u32, 2, 1, 0, 1], &Device::Cpu).unwrap();
    let case = Case::new("grouped_linear", vec![rand(&[5, 4], 71)], |s, i| {
        let names = RVec::from(vec!["a".into(), "b".into(), "c".into()]);
        op(s, Op::GroupedLinear { names, x: i[0], groups: i[1] })
    })
    .constants(vec![groups.clone()])
    .weights(vec![
        ("a.weight", rand(&[3, 4], 72)),
        ("b.weight", rand(&[3, 4], 73)),
        ("b.bias", rand(&[3], 74)),
        ("c.weight", rand(&[3, 4], 75)),
    ]);
    case.check(TOL, H);
    // Each row equals its own layer applied to it.
    let out = case.forward(&case.inputs, &case.weights, None);
    let w = |k: usize| case.weights[k].1.clone();
    for (row, layer) in groups.to_vec1::<u32>().unwrap().into_iter().enumerate() {
        let x = case.inputs[0].narrow(0, row, 1).unwrap();
        let expected = match layer {
            0 => x.matmul(&w(0).t().unwrap()).unwrap(),
            1 => x.matmul(&w(1).t().unwrap()).unwrap().broadcast_add(&w(2)).unwrap(),
            _ => x.matmul(&w(3).t().unwrap()).unwrap(),
        };
        let got = out.narrow(0, row, 1).unwrap();
        let diff = (got - expected).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f64>().unwrap();
        assert!(diff < 1e-12, "row {row}: {diff}");
    }
    // A group id past the layers is named.
    let bad = Tensor::new(&[0u32, 3, 1, 0, 1], &Device::Cpu).unwrap();
    let case = Case::new("grouped_linear", vec![rand(&[5, 4], 71)], |s, i| {
        let names = RVec::from(vec!["a".into(), "b".into(), "c".into()]);
        let err = s.apply(&Op::GroupedLinear { names, x: i[0], groups: i[1] }).unwrap_err().to_string();
        assert!(err.contains("row 1 names group 3 of 3 layers"), "{err}");
        i[0]
    })
    .constants(vec![bad]);
    case.forward(&case.inputs, &[], None);
}

#[test]
fn collected_tensors_outlive_their_handles_and_aux_outputs_are_named() {
    let case = Case::new("collect", vec![rand(&[2, 3], 81), rand(&[1, 3], 82)], |s, i| {
        op(s, Op::Collect { key: "k".into(), x: i[0] });
        op(s, Op::Collect { key: "k".into(), x: i[1] });
        op(s, Op::Release { xs: RVec::from(vec![i[0], i[1]]), keep: i[2] });
        let all = op(s, Op::Collected { key: "k".into() });
        let total = op(s, Op::Sum { x: all, dim: 0, keepdim: false });
        let total = op(s, Op::Sum { x: total, dim: 0, keepdim: false });
        op(s, Op::AuxOutput { name: "aux_loss".into(), x: total });
        assert!(s
            .apply(&Op::Collected { key: "other".into() })
            .unwrap_err()
            .to_string()
            .contains("nothing was collected under `other`"));
        // Any shape may be reported (a VL model's image features).
        op(s, Op::AuxOutput { name: "features".into(), x: all });
        assert_eq!(s.aux_outputs().get("features").unwrap().dims(), &[3, 3]);
        assert_eq!(s.aux_outputs().get("aux_loss").unwrap().elem_count(), 1);
        assert_eq!(s.aux_outputs().iter().count(), 2);
        all
    })
    .constants(vec![Tensor::zeros(1, DType::F64, &Device::Cpu).unwrap()]);
    let out = case.forward(&case.inputs, &[], None);
    assert_eq!(out.dims(), &[3, 3]);
    // Without aux gradients (the default) the kept tensors are detached.
    let input_vars: Vec<Var> = case.inputs.iter().map(|t| Var::from_tensor(t).unwrap()).collect();
    let tracked: Vec<Tensor> = input_vars.iter().map(|v| v.as_tensor().clone()).collect();
    assert!(!case.forward(&tracked, &[], None).track_op());
}

#[test]
fn token_mask_marks_the_new_tokens_that_are_not_padding() {
    let ids = Tensor::zeros((2, 3), DType::U32, &Device::Cpu).unwrap();
    let mask = Tensor::new(&[[1u32, 1, 1, 1], [0, 0, 1, 1]], &Device::Cpu).unwrap();
    let batch = BatchInfo { attention_mask: Some(mask), ..Default::default() };
    let store = WeightStore::new();
    let mut session = GraphSession::new(ForwardContext { weights: &store, batch: &batch, cache: None, tuner: None });
    // Without a forward pass's `input_ids` the shape is unknown.
    assert!(session.apply(&Op::TokenMask {}).unwrap_err().to_string().contains("input_ids"));
    session.set_tokens_shape(ids.dims2().unwrap());
    let out = session.apply(&Op::TokenMask {}).unwrap();
    let got = session.get(out).unwrap().to_vec2::<f32>().unwrap();
    assert_eq!(got, vec![vec![1.0, 1.0, 1.0], vec![0.0, 1.0, 1.0]]);
}
