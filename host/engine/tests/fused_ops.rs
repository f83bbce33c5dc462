//! The one-pass CPU kernels for RoPE and RMSNorm against the host's
//! composed candle ops (whose gradients candle derives), values and
//! gradients, in f32 and f64: RoPE with different positions per row, the
//! NeoX and interleaved layouts, partial rotary and a scale; RMSNorm over
//! activations and over per-head features (Qwen3's q/k norms). And the
//! fused adapter ops (dropout, LoRA's low-rank update) against the same
//! maths in single candle ops.

use candle_core::{DType, Device, Tensor, Var};
use oxtune_engine::backend::ops;
use oxtune_kernels::rope::RopeTables;

fn max_diff(a: &Tensor, b: &Tensor) -> f64 {
    (a - b).unwrap().abs().unwrap().max_all().unwrap().to_dtype(DType::F64).unwrap().to_scalar::<f64>().unwrap()
}

fn tolerance(dtype: DType) -> f64 {
    if dtype == DType::F64 {
        1e-12
    } else {
        2e-5
    }
}

#[test]
fn rope_kernel_equals_the_composed_rotation() {
    let dev = Device::Cpu;
    for dtype in [DType::F64, DType::F32] {
        for (interleaved, rotated, scale) in [(false, 8, 1.0f32), (true, 8, 1.0), (false, 4, 1.3)] {
            let (b, h, s, d) = (2, 3, 7, 8);
            let x = Var::from_tensor(&Tensor::randn(0f64, 1.0, (b, h, s, d), &dev).unwrap().to_dtype(dtype).unwrap())
                .unwrap();
            let inv_freq: Vec<f32> = (0..rotated / 2).map(|i| 1.0 / 10000f32.powf(2.0 * i as f32 / d as f32)).collect();
            // Row 1 starts at position 5 (a packed or cached row).
            let positions: Vec<Vec<f64>> = (0..b).map(|r| (0..s).map(|t| (t + 5 * r) as f64).collect()).collect();
            let pos = Tensor::new(positions.iter().flatten().map(|&p| p as u32).collect::<Vec<_>>(), &dev)
                .unwrap()
                .reshape((b, s))
                .unwrap();
            let (cos, sin) = ops::rope_tables(&pos, &inv_freq, scale, dtype).unwrap();
            let slow = ops::rope(x.as_tensor(), &cos, &sin, interleaved).unwrap();
            let tables = RopeTables::new(&positions, &inv_freq, scale);
            let fast = oxtune_kernels::rope(x.as_tensor(), &tables, interleaved).unwrap();
            let what = format!("{dtype:?} interleaved={interleaved} rotated={rotated} scale={scale}");
            assert!(max_diff(&fast, &slow) < tolerance(dtype), "{what}: values differ by {}", max_diff(&fast, &slow));
            let mix = Tensor::randn(0f64, 1.0, (b, h, s, d), &dev).unwrap().to_dtype(dtype).unwrap();
            let gf = (&fast * &mix).unwrap().sum_all().unwrap().backward().unwrap();
            let gs = (&slow * &mix).unwrap().sum_all().unwrap().backward().unwrap();
            let (a, c) = (gf.get(x.as_tensor()).unwrap(), gs.get(x.as_tensor()).unwrap());
            assert!(max_diff(a, c) < tolerance(dtype), "{what}: gradients differ by {}", max_diff(a, c));
        }
    }
}

#[test]
fn rms_norm_kernel_equals_the_composed_norm() {
    let dev = Device::Cpu;
    for dtype in [DType::F64, DType::F32] {
        // Activations [b, s, hidden], and per-head features [b, s, heads, head_dim].
        for shape in [vec![2, 9, 48], vec![2, 9, 3, 16]] {
            let last = *shape.last().unwrap();
            let x =
                Var::from_tensor(&Tensor::randn(0f64, 2.0, shape.as_slice(), &dev).unwrap().to_dtype(dtype).unwrap())
                    .unwrap();
            let w = Var::from_tensor(&Tensor::randn(1f64, 0.3, last, &dev).unwrap().to_dtype(dtype).unwrap()).unwrap();
            let slow = ops::rms_norm(x.as_tensor(), w.as_tensor(), 1e-6).unwrap();
            let fast = oxtune_kernels::rms_norm(x.as_tensor(), w.as_tensor(), 1e-6).unwrap();
            assert!(max_diff(&fast, &slow) < tolerance(dtype), "{dtype:?} {shape:?}: values");
            let mix = Tensor::randn(0f64, 1.0, shape.as_slice(), &dev).unwrap().to_dtype(dtype).unwrap();
            let gf = (&fast * &mix).unwrap().sum_all().unwrap().backward().unwrap();
            let gs = (&slow * &mix).unwrap().sum_all().unwrap().backward().unwrap();
            for (name, v) in [("input", &x), ("weight", &w)] {
                let (a, c) = (gf.get(v.as_tensor()).unwrap(), gs.get(v.as_tensor()).unwrap());
                let scale =
                    c.abs().unwrap().max_all().unwrap().to_dtype(DType::F64).unwrap().to_scalar::<f64>().unwrap();
                assert!(max_diff(a, c) < tolerance(dtype) * scale.max(1.0), "{dtype:?} {shape:?}: {name} gradient");
            }
        }
    }
}

/// `x` times the mask `mask` draws, in single ops (the reference).
fn masked(x: &Tensor, mask: &oxtune_engine::backend::fused::DropoutMask) -> Tensor {
    x.mul(&mask.tensor(x.shape(), x.dtype(), x.device()).unwrap()).unwrap()
}

#[test]
fn the_fused_low_rank_update_equals_single_ops_in_values_and_all_four_gradients() {
    use oxtune_engine::backend::fused::{low_rank_update, DropoutMask};
    let dev = Device::Cpu;
    for dtype in [DType::F64, DType::F32] {
        for mask in [None, Some(DropoutMask { seed: 7, p: 0.3 })] {
            let (rows, inp, out, r) = (2 * 11, 40, 24, 4);
            let var = |shape: &[usize]| {
                Var::from_tensor(&Tensor::randn(0f64, 1.0, shape, &dev).unwrap().to_dtype(dtype).unwrap()).unwrap()
            };
            // x and base as [batch, seq, features], as a layer sees them.
            let (x, base, a, b) = (var(&[2, 11, inp]), var(&[2, 11, out]), var(&[r, inp]), var(&[out, r]));
            let fused =
                low_rank_update(base.as_tensor(), x.as_tensor(), a.as_tensor(), b.as_tensor(), 1.7, mask).unwrap();
            let dropped = match &mask {
                Some(m) => masked(&x.as_tensor().reshape((rows, inp)).unwrap(), m).reshape((2, 11, inp)).unwrap(),
                None => x.as_tensor().clone(),
            };
            let update = dropped.broadcast_matmul(&a.as_tensor().t().unwrap()).unwrap();
            let update = update.broadcast_matmul(&b.as_tensor().t().unwrap()).unwrap();
            let single = (base.as_tensor() + (update * 1.7).unwrap()).unwrap();
            let what = format!("{dtype:?} dropout {mask:?}");
            assert_eq!(fused.dims(), single.dims());
            assert!(
                max_diff(&fused, &single) < tolerance(dtype),
                "{what}: values differ by {}",
                max_diff(&fused, &single)
            );
            if mask.is_some() {
                // The mask dropped something (else the test shows nothing).
                let plain =
                    low_rank_update(base.as_tensor(), x.as_tensor(), a.as_tensor(), b.as_tensor(), 1.7, None).unwrap();
                assert!(max_diff(&plain, &fused) > 0.1, "{what}: dropout changed nothing");
            }
            let mix = Tensor::randn(0f64, 1.0, (2, 11, out), &dev).unwrap().to_dtype(dtype).unwrap();
            let gf = (&fused * &mix).unwrap().sum_all().unwrap().backward().unwrap();
            let gs = (&single * &mix).unwrap().sum_all().unwrap().backward().unwrap();
            for (name, t) in [("x", &x), ("base", &base), ("a", &a), ("b", &b)] {
                let (g, want) = (gf.get(t.as_tensor()).unwrap(), gs.get(t.as_tensor()).unwrap());
                let scale =
                    want.abs().unwrap().max_all().unwrap().to_dtype(DType::F64).unwrap().to_scalar::<f64>().unwrap();
                assert!(
                    max_diff(g, want) < tolerance(dtype) * scale.max(1.0),
                    "{what}: d{name} differs by {}",
                    max_diff(g, want)
                );
            }
        }
    }
}

#[test]
fn fused_dropout_equals_the_mask_product_and_its_gradient() {
    use oxtune_engine::backend::fused::{dropout, DropoutMask};
    let dev = Device::Cpu;
    let x = Var::from_tensor(&Tensor::randn(0f32, 1.0, (3, 50_000), &dev).unwrap()).unwrap();
    let mask = DropoutMask { seed: 99, p: 0.25 };
    let fused = dropout(x.as_tensor(), mask).unwrap();
    let single = masked(x.as_tensor(), &mask);
    assert_eq!(max_diff(&fused, &single), 0.0);
    // About a quarter dropped, the rest scaled by 4/3.
    let zeros = fused.eq(0f32).unwrap().to_dtype(DType::F32).unwrap().mean_all().unwrap().to_scalar::<f32>().unwrap();
    assert!((zeros - 0.25).abs() < 0.01, "{zeros} of the elements dropped");
    let mix = Tensor::randn(0f32, 1.0, (3, 50_000), &dev).unwrap();
    let gf = (&fused * &mix).unwrap().sum_all().unwrap().backward().unwrap();
    let gs = (&single * &mix).unwrap().sum_all().unwrap().backward().unwrap();
    assert_eq!(max_diff(gf.get(x.as_tensor()).unwrap(), gs.get(x.as_tensor()).unwrap()), 0.0);
    // Another seed, another mask.
    let other = dropout(x.as_tensor(), DropoutMask { seed: 100, p: 0.25 }).unwrap();
    assert!(max_diff(&other, &fused) > 0.1);
}

#[test]
fn the_rms_norm_weight_gradient_is_the_same_bits_every_time() {
    // Thousands of rows: many tasks, summed across threads. The sum must
    // not depend on which thread ran which rows (training is reproducible
    // run to run, not only within one run).
    let dev = Device::Cpu;
    let x = Tensor::randn(0f32, 1.0, (4096, 96), &dev).unwrap();
    let w = Var::from_tensor(&Tensor::randn(1f32, 0.1, 96, &dev).unwrap()).unwrap();
    let mix = Tensor::randn(0f32, 1.0, (4096, 96), &dev).unwrap();
    let grad = || {
        let y = oxtune_kernels::rms_norm(&x, w.as_tensor(), 1e-6).unwrap();
        let g = (y * &mix).unwrap().sum_all().unwrap().backward().unwrap();
        g.get(w.as_tensor()).unwrap().to_vec1::<f32>().unwrap()
    };
    let first = grad();
    for run in 0..30 {
        assert_eq!(grad(), first, "run {run} summed the weight's gradient in another order");
    }
}
