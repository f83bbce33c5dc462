//! Writes a Qwen2.5-VL checkpoint folder with random weights, for timing
//! (`oxtune bench vl`): Qwen2.5-VL-3B's vision tower and merger, and
//! language-model layers of the 3B's shape (as many as asked; the 3B has
//! 36). The tokenizer, chat template and processor settings are copied
//! from a small model folder (the tiny test fixture serves).
//!
//! ```text
//! cargo run --release -p oxtune-plugin-qwen2-5-vl --example random_checkpoint -- \
//!     tests/fixtures/vlm/tiny-qwen2.5-vl target/qwen2.5-vl-3b-random 2
//! ```
//!
//! Weights are N(0, 0.02) (norms 1), stored as bf16 to halve the file.

use std::collections::BTreeMap;
use std::path::Path;

use oxtune_plugin_api::serde_json::{self, json, Value};
use safetensors::tensor::{Dtype, TensorView};

/// SplitMix64 and Box–Muller: reproducible normals with no dependency.
struct Normal(u64);

impl Normal {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn sample(&mut self) -> f32 {
        let u1 = ((self.next_u64() >> 11) as f64 + 1.0) / (1u64 << 53) as f64;
        let u2 = (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64;
        ((-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()) as f32
    }
}

/// bf16 bytes (round to nearest even) of `values`.
fn bf16_bytes(values: impl Iterator<Item = f32>) -> Vec<u8> {
    values
        .flat_map(|v| {
            let bits = v.to_bits();
            let rounded = bits.wrapping_add(0x7FFF + ((bits >> 16) & 1)) >> 16;
            (rounded as u16).to_le_bytes()
        })
        .collect()
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let [_, from, to, layers] = args.as_slice() else {
        return Err("usage: random_checkpoint FROM_MODEL_DIR OUT_DIR LM_LAYERS".into());
    };
    let (from, to, layers) = (Path::new(from), Path::new(to), layers.parse::<usize>()?);
    std::fs::create_dir_all(to)?;
    for file in ["tokenizer.json", "tokenizer_config.json", "preprocessor_config.json", "generation_config.json"] {
        if from.join(file).is_file() {
            std::fs::copy(from.join(file), to.join(file))?;
        }
    }
    let small: Value = serde_json::from_str(&std::fs::read_to_string(from.join("config.json"))?)?;
    let (hidden, inter, heads, kv, head_dim, vocab) = (2048usize, 11008usize, 16usize, 2usize, 128usize, 151936usize);
    let (v_hidden, v_inter, v_depth) = (1280usize, 3420usize, 32usize);
    let config = json!({
        "architectures": ["Qwen2_5_VLForConditionalGeneration"],
        "model_type": "qwen2_5_vl",
        "image_token_id": small["image_token_id"], "video_token_id": small["video_token_id"],
        "vision_start_token_id": small["vision_start_token_id"], "vision_end_token_id": small["vision_end_token_id"],
        "tie_word_embeddings": true,
        "text_config": {
            "hidden_size": hidden, "intermediate_size": inter, "num_hidden_layers": layers,
            "num_attention_heads": heads, "num_key_value_heads": kv, "head_dim": head_dim,
            "vocab_size": vocab, "rms_norm_eps": 1e-6, "hidden_act": "silu", "max_position_embeddings": 128000,
            "rope_parameters": {"rope_type": "default", "rope_theta": 1_000_000.0, "mrope_section": [16, 24, 24]},
        },
        "vision_config": {
            "depth": v_depth, "hidden_size": v_hidden, "intermediate_size": v_inter, "num_heads": 16,
            "out_hidden_size": hidden, "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2,
            "window_size": 112, "fullatt_block_indexes": [7, 15, 23, 31], "hidden_act": "silu",
            "tokens_per_second": 2, "in_channels": 3,
        },
    });
    std::fs::write(to.join("config.json"), serde_json::to_string_pretty(&config)?)?;

    let mut shapes: BTreeMap<String, Vec<usize>> = BTreeMap::new();
    let mut add = |name: String, shape: &[usize]| shapes.insert(name, shape.to_vec());
    add("model.embed_tokens.weight".into(), &[vocab, hidden]);
    add("model.norm.weight".into(), &[hidden]);
    for l in 0..layers {
        let p = format!("model.layers.{l}");
        for (m, out, inp) in [
            ("self_attn.q_proj", heads * head_dim, hidden),
            ("self_attn.k_proj", kv * head_dim, hidden),
            ("self_attn.v_proj", kv * head_dim, hidden),
        ] {
            add(format!("{p}.{m}.weight"), &[out, inp]);
            add(format!("{p}.{m}.bias"), &[out]);
        }
        add(format!("{p}.self_attn.o_proj.weight"), &[hidden, heads * head_dim]);
        add(format!("{p}.mlp.gate_proj.weight"), &[inter, hidden]);
        add(format!("{p}.mlp.up_proj.weight"), &[inter, hidden]);
        add(format!("{p}.mlp.down_proj.weight"), &[hidden, inter]);
        add(format!("{p}.input_layernorm.weight"), &[hidden]);
        add(format!("{p}.post_attention_layernorm.weight"), &[hidden]);
    }
    add("visual.patch_embed.proj.weight".into(), &[v_hidden, 3, 2, 14, 14]);
    for b in 0..v_depth {
        let p = format!("visual.blocks.{b}");
        for (m, out, inp) in [
            ("attn.qkv", 3 * v_hidden, v_hidden),
            ("attn.proj", v_hidden, v_hidden),
            ("mlp.gate_proj", v_inter, v_hidden),
            ("mlp.up_proj", v_inter, v_hidden),
            ("mlp.down_proj", v_hidden, v_inter),
        ] {
            add(format!("{p}.{m}.weight"), &[out, inp]);
            add(format!("{p}.{m}.bias"), &[out]);
        }
        add(format!("{p}.norm1.weight"), &[v_hidden]);
        add(format!("{p}.norm2.weight"), &[v_hidden]);
    }
    add("visual.merger.ln_q.weight".into(), &[v_hidden]);
    add("visual.merger.mlp.0.weight".into(), &[4 * v_hidden, 4 * v_hidden]);
    add("visual.merger.mlp.0.bias".into(), &[4 * v_hidden]);
    add("visual.merger.mlp.2.weight".into(), &[hidden, 4 * v_hidden]);
    add("visual.merger.mlp.2.bias".into(), &[hidden]);

    let mut rng = Normal(42);
    let data: BTreeMap<String, (Vec<usize>, Vec<u8>)> = shapes
        .into_iter()
        .map(|(name, shape)| {
            let count: usize = shape.iter().product();
            let is_norm = name.ends_with("norm.weight") || name.contains("layernorm") || name.contains("ln_q");
            let bytes = if is_norm {
                bf16_bytes(std::iter::repeat_n(1.0, count))
            } else {
                bf16_bytes((0..count).map(|_| rng.sample() * 0.02))
            };
            (name, (shape, bytes))
        })
        .collect();
    let views: Vec<(String, TensorView<'_>)> = data
        .iter()
        .map(|(name, (shape, bytes))| Ok((name.clone(), TensorView::new(Dtype::BF16, shape.clone(), bytes)?)))
        .collect::<Result<_, safetensors::SafeTensorError>>()?;
    safetensors::serialize_to_file(views, None, &to.join("model.safetensors"))?;
    let params: usize = data.values().map(|(s, _)| s.iter().product::<usize>()).sum();
    println!("wrote {} ({params} parameters)", to.display());
    Ok(())
}
