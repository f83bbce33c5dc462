//! The one-pass CPU kernels for RoPE and RMSNorm against the host's
//! composed candle ops (whose gradients candle derives), values and
//! gradients, in f32 and f64: RoPE with different positions per row, the
//! NeoX and interleaved layouts, partial rotary and a scale; RMSNorm over
//! activations and over per-head features (Qwen3's q/k norms).

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
