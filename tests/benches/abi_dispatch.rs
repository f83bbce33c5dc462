//! What the plugin ABI costs: the example plugin's `example-block` model (two
//! pre-norm transformer blocks: GQA attention with RoPE, SwiGLU MLP) on a
//! 256×512 input, run through the tensor-op API from the dynamically loaded
//! cdylib, against the same computation written directly in candle (with the
//! host's differentiable op implementations). Prints both medians and the
//! ratio; the target is an ABI cost under 3% at this size.
//!
//! `cargo bench -p oxtune-tests --bench abi_dispatch`

use std::time::{Duration, Instant};

use candle_core::{DType, Device, Result, Tensor};
use oxtune_engine::backend::batch::{build_mask, MaskShape, MaskSpec};
use oxtune_engine::backend::{ops, BatchInfo, ForwardContext, GraphSession, WeightStore};
use oxtune_registry::{Registry, SandboxConfig};

const HIDDEN: usize = 512;
const HEADS: usize = 8;
const KV_HEADS: usize = 4;
const HEAD_DIM: usize = HIDDEN / HEADS;
const INTERMEDIATE: usize = 1024;
const LAYERS: usize = 2;
const SEQ: usize = 256;
const EPS: f64 = 1e-6;

fn weights() -> Result<WeightStore> {
    let mut store = WeightStore::new();
    let shapes: [(&str, &[usize]); 9] = [
        ("attn_norm", &[HIDDEN]),
        ("q_proj", &[HEADS * HEAD_DIM, HIDDEN]),
        ("k_proj", &[KV_HEADS * HEAD_DIM, HIDDEN]),
        ("v_proj", &[KV_HEADS * HEAD_DIM, HIDDEN]),
        ("o_proj", &[HIDDEN, HEADS * HEAD_DIM]),
        ("mlp_norm", &[HIDDEN]),
        ("gate_proj", &[INTERMEDIATE, HIDDEN]),
        ("up_proj", &[INTERMEDIATE, HIDDEN]),
        ("down_proj", &[HIDDEN, INTERMEDIATE]),
    ];
    for l in 0..LAYERS {
        for (name, shape) in shapes {
            let scale = 1.0 / (shape[shape.len() - 1] as f32).sqrt();
            store.insert(format!("layers.{l}.{name}.weight"), Tensor::rand(-scale, scale, shape, &Device::Cpu)?);
        }
    }
    Ok(store)
}

fn linear(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    let (b, s, i) = x.dims3()?;
    x.reshape((b * s, i))?.matmul(&w.t()?)?.reshape((b, s, w.dim(0)?))
}

/// The example block, written directly against candle.
fn direct_forward(store: &WeightStore, x: &Tensor) -> Result<Tensor> {
    let w = |l: usize, name: &str| store.get(&format!("layers.{l}.{name}.weight")).expect("weight").clone();
    let (b, s, _) = x.dims3()?;
    let inv_freq: Vec<f32> = (0..HEAD_DIM / 2).map(|i| 10_000f32.powf(-2.0 * i as f32 / HEAD_DIM as f32)).collect();
    let positions = Tensor::arange(0u32, s as u32, x.device())?.unsqueeze(0)?.broadcast_as((b, s))?.contiguous()?;
    let (cos, sin) = ops::rope_tables(&positions, &inv_freq, 1.0, x.dtype())?;
    let spec = MaskSpec { causal: true, sliding_window: 0 };
    let shape = MaskShape { batch: b, queries: s, keys: s, offset: 0 };
    let mask = build_mask(spec, shape, &BatchInfo::default(), x.dtype(), x.device())?;
    let heads = |t: Tensor, n: usize| t.reshape((b, s, n, HEAD_DIM))?.transpose(1, 2);
    let mut x = x.clone();
    for l in 0..LAYERS {
        let h = ops::rms_norm(&x, &w(l, "attn_norm"), EPS)?;
        let q = ops::rope(&heads(linear(&h, &w(l, "q_proj"))?, HEADS)?, &cos, &sin, false)?;
        let k = ops::rope(&heads(linear(&h, &w(l, "k_proj"))?, KV_HEADS)?, &cos, &sin, false)?;
        let v = heads(linear(&h, &w(l, "v_proj"))?, KV_HEADS)?;
        let scale = 1.0 / (HEAD_DIM as f64).sqrt();
        let a = ops::attention(&q.contiguous()?, &k.contiguous()?, &v.contiguous()?, mask.as_ref(), scale, None)?;
        let a = a.transpose(1, 2)?.reshape((b, s, HEADS * HEAD_DIM))?;
        x = (x + linear(&a, &w(l, "o_proj"))?)?;
        let h = ops::rms_norm(&x, &w(l, "mlp_norm"), EPS)?;
        let gated = (linear(&h, &w(l, "gate_proj"))?.silu()? * linear(&h, &w(l, "up_proj"))?)?;
        x = (x + linear(&gated, &w(l, "down_proj"))?)?;
    }
    Ok(x)
}

fn median(mut times: Vec<Duration>) -> Duration {
    times.sort();
    times[times.len() / 2]
}

fn main() -> std::result::Result<(), String> {
    let plugin = oxtune_tests::build_cdylib("oxtune-example-plugin", &["cdylib"]);
    let mut registry = Registry::empty();
    registry.load_path(&plugin, &SandboxConfig::default()).map_err(|e| e.to_string())?;
    let config = format!(
        r#"{{"hidden_size": {HIDDEN}, "num_attention_heads": {HEADS}, "num_key_value_heads": {KV_HEADS}, "num_hidden_layers": {LAYERS}, "rms_norm_eps": {EPS}}}"#
    );
    let model = registry.load_model("example-block", &config).map_err(|e| e.to_string())?;
    let store = weights().map_err(|e| e.to_string())?;
    let batch = BatchInfo::default();
    let x = Tensor::rand(-1f32, 1.0, (1, SEQ, HIDDEN), &Device::Cpu).map_err(|e| e.to_string())?;

    let via_plugin = || -> std::result::Result<Tensor, String> {
        let mut session =
            GraphSession::new(ForwardContext { weights: &store, batch: &batch, cache: None, tuner: None });
        session.run_model(&model, &[("hidden_states", x.clone())]).map_err(|e| e.to_string())
    };
    let direct = || direct_forward(&store, &x).map_err(|e| e.to_string());

    let a = via_plugin()?;
    let b = direct()?;
    let diff = (&a - &b).and_then(|d| d.abs()?.max_all()?.to_dtype(DType::F32)?.to_scalar::<f32>());
    let diff = diff.map_err(|e| e.to_string())?;
    assert!(diff < 1e-4, "the plugin and the direct forward disagree by {diff}");

    for _ in 0..3 {
        via_plugin()?;
        direct()?;
    }
    let (mut plugin_times, mut direct_times) = (Vec::new(), Vec::new());
    for _ in 0..21 {
        let t = Instant::now();
        via_plugin()?;
        plugin_times.push(t.elapsed());
        let t = Instant::now();
        direct()?;
        direct_times.push(t.elapsed());
    }
    let (p, d) = (median(plugin_times), median(direct_times));
    println!("example-block forward, 2 layers, 1x{SEQ}x{HIDDEN} f32, median of 21 (max |diff| {diff:.1e})");
    println!("  direct candle          {:>8.2} ms", d.as_secs_f64() * 1e3);
    println!("  plugin through the ABI {:>8.2} ms", p.as_secs_f64() * 1e3);
    println!(
        "  ratio plugin/direct    {:>8.3}  (ABI cost {:+.1}%)",
        p.as_secs_f64() / d.as_secs_f64(),
        (p.as_secs_f64() / d.as_secs_f64() - 1.0) * 100.0
    );
    Ok(())
}
