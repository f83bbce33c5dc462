//! `oxtune export`: merged folders give PEFT's `merge_and_unload` logits
//! and load back; GGUF exports read back in oxtune with the source's
//! logits, and llama.cpp itself (node-llama-cpp, installed by
//! `.ci/fetch-llamacpp`) loads them and continues a prompt as oxtune does,
//! with and without a GGUF LoRA adapter.

use std::path::{Path, PathBuf};
use std::process::Command;

use candle_core::quantized::GgmlDType;
use candle_core::{DType, Device, Tensor};
use oxtune_data::text::TextAssets;
use oxtune_engine::backend::BatchInfo;
use oxtune_engine::error_chain;
use oxtune_engine::generate::{generate, SamplingParams};
use oxtune_engine::model::checkpoint::Trainable;
use oxtune_engine::model::{LoadOptions, LoadedModel};
use oxtune_export::gguf_adapter::write_adapter_gguf;
use oxtune_export::gguf_model::{write_model_gguf, write_model_gguf_streaming};
use oxtune_export::merged::write_merged;
use oxtune_export::QuantType;
use oxtune_registry::Registry;
use oxtune_tests::{fixtures, smollm2, workspace_root};

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("oxtune-export-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(name);
    let _ = std::fs::remove_dir_all(&path);
    let _ = std::fs::remove_file(&path);
    path
}

fn load(path: &Path) -> LoadedModel {
    LoadedModel::load(&Registry::with_builtins().unwrap(), path, &LoadOptions::default()).unwrap()
}

fn with_adapter(model: &Path, adapter: &Path) -> LoadedModel {
    let mut loaded = load(model);
    loaded.attach_adapter(&Registry::with_builtins().unwrap(), adapter, Trainable::None).unwrap();
    loaded
}

fn max_abs(t: &Tensor) -> f32 {
    t.abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap()
}

fn logits(model: &LoadedModel, ids: &Tensor) -> Tensor {
    model.forward(ids, &BatchInfo::default(), None, None).unwrap()
}

fn reference_ids(model: &str) -> Tensor {
    let r = candle_core::safetensors::load(fixtures().join(model).join("reference.safetensors"), &Device::Cpu).unwrap();
    r["input_ids"].to_dtype(DType::U32).unwrap()
}

#[test]
fn merged_folders_give_peft_merged_logits_and_load_back() {
    for kind in ["lora", "dora"] {
        let adapter = fixtures().join(format!("peft/tiny-qwen3-{kind}"));
        let r = candle_core::safetensors::load(adapter.join("reference.safetensors"), &Device::Cpu).unwrap();
        let ids = r["input_ids"].to_dtype(DType::U32).unwrap();
        let mut model = with_adapter(&fixtures().join("models/tiny-qwen3"), &adapter);
        // A small shard size: the folder comes out sharded with an index.
        let dir = scratch(&format!("merged-{kind}"));
        let written = write_merged(&mut model, &dir, 40_000).unwrap();
        assert!(dir.join("model.safetensors.index.json").is_file() && dir.join("tokenizer.json").is_file());
        assert!(written.bytes > 100_000, "{} bytes", written.bytes);
        let merged = load(&dir);
        let diff = max_abs(&(logits(&merged, &ids) - &r["merged_logits"]).unwrap());
        assert!(diff < 1e-5, "{kind}: merged folder's logits differ from PEFT's merge_and_unload by {diff}");
        let diff = max_abs(&(logits(&merged, &ids) - logits(&model, &ids)).unwrap());
        assert_eq!(diff, 0.0, "{kind}: the folder loads back with the merged model's exact logits");
    }
}

/// Every tensor type of an exported file, by name.
fn tensor_types(path: &Path) -> Vec<(String, GgmlDType)> {
    let mut file = std::fs::File::open(path).unwrap();
    let content = candle_core::quantized::gguf_file::Content::read(&mut file).unwrap();
    let mut types: Vec<(String, GgmlDType)> =
        content.tensor_infos.iter().map(|(name, info)| (name.clone(), info.ggml_dtype)).collect();
    types.sort_by(|a, b| a.0.cmp(&b.0));
    types
}

#[test]
fn gguf_exports_read_back_with_the_source_logits() {
    // tiny-llama: q/k rows permuted for llama.cpp, untied head; tiny-qwen2:
    // q/k/v biases, tied; tiny-qwen3: q/k norms, head_dim ≠ hidden / heads.
    for name in ["tiny-llama", "tiny-qwen2", "tiny-qwen3"] {
        let source = fixtures().join("models").join(name);
        let ids = reference_ids(&format!("models/{name}"));
        let want = logits(&load(&source), &ids);
        let scale = max_abs(&want);
        for (quant, tolerance) in [(QuantType::F32, 1e-5), (QuantType::F16, 5e-3), (QuantType::Q8_0, 3e-2)] {
            let path = scratch(&format!("{name}-{quant}.gguf"));
            write_model_gguf(&mut load(&source), quant, &path).unwrap();
            assert!(!oxtune_export::writer::partial_path(&path).exists());
            let back = load(&path);
            let diff = max_abs(&(logits(&back, &ids) - &want).unwrap()) / scale;
            assert!(diff < tolerance, "{name} {quant}: logits differ by {diff} of their scale");
            let types = tensor_types(&path);
            let norm = types.iter().find(|(n, _)| n == "blk.0.attn_norm.weight").unwrap();
            assert_eq!(norm.1, GgmlDType::F32, "{name} {quant}: norms stay F32");
            let q = types.iter().find(|(n, _)| n == "blk.0.attn_q.weight").unwrap();
            let expected = match quant {
                QuantType::F32 => GgmlDType::F32,
                QuantType::F16 => GgmlDType::F16,
                _ => GgmlDType::Q8_0,
            };
            assert_eq!(q.1, expected, "{name} {quant}");
        }
        // Streamed from the files, the export is the same file byte for byte.
        let streamed = scratch(&format!("{name}-streamed.gguf"));
        let registry = Registry::with_builtins().unwrap();
        write_model_gguf_streaming(&registry, &source, None, QuantType::Q8_0, &streamed).unwrap();
        let loaded = streamed.with_file_name(format!("{name}-q8_0.gguf"));
        assert!(std::fs::read(&streamed).unwrap() == std::fs::read(&loaded).unwrap(), "{name}: streamed ≠ loaded");
        // The folder a GGUF base saves is an ordinary checkpoint again: the
        // rows back in transformers' order, no GGUF-only config key.
        let gguf = scratch(&format!("{name}-roundtrip.gguf"));
        write_model_gguf(&mut load(&source), QuantType::F32, &gguf).unwrap();
        let folder = scratch(&format!("{name}-from-gguf"));
        load(&gguf).save_pretrained_with(&folder, usize::MAX, |_| Ok(())).unwrap();
        let config = std::fs::read_to_string(folder.join("config.json")).unwrap();
        assert!(!config.contains("gguf_architecture"), "{config}");
        let original = load(&source);
        let resaved = load(&folder);
        let w = "model.layers.0.self_attn.q_proj.weight";
        let diff = max_abs(&(original.weights().get(w).unwrap() - resaved.weights().get(w).unwrap()).unwrap());
        assert!(diff < 1e-6, "{name}: {w} differs by {diff} after GGUF and back");
    }
}

#[test]
fn adapters_and_models_the_target_cannot_hold_are_named_errors() {
    let qwen3 = fixtures().join("models/tiny-qwen3");
    let base = load(&qwen3);
    let err = write_adapter_gguf(&base, &fixtures().join("peft/tiny-qwen3-dora"), &scratch("dora.gguf")).unwrap_err();
    let message = error_chain(&err);
    assert!(message.contains("adapter_config.json") && message.contains("DoRA"), "{message}");
    // An adapter whose matrices do not fit the base's shapes.
    let wrong = scratch("wrong-shape-adapter");
    std::fs::create_dir_all(&wrong).unwrap();
    std::fs::copy(fixtures().join("peft/tiny-qwen3-lora/adapter_config.json"), wrong.join("adapter_config.json"))
        .unwrap();
    let a = Tensor::zeros((4, 48), DType::F32, &Device::Cpu).unwrap();
    let name = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight".to_owned();
    candle_core::safetensors::save(
        &std::collections::HashMap::from([(name, a)]),
        wrong.join("adapter_model.safetensors"),
    )
    .unwrap();
    let path = scratch("mismatch.gguf");
    let err = write_adapter_gguf(&base, &wrong, &path).unwrap_err();
    let message = error_chain(&err);
    assert!(message.contains("q_proj.lora_A") && message.contains("does not fit"), "{message}");
    assert!(!path.exists() && !oxtune_export::writer::partial_path(&path).exists(), "nothing half-written");
}

/// llama.cpp's driver, if `.ci/fetch-llamacpp` installed it.
fn llama_cpp() -> Option<PathBuf> {
    let script = workspace_root().join("target/llamacpp/complete.mjs");
    if script.is_file() && workspace_root().join("target/llamacpp/node_modules/node-llama-cpp").is_dir() {
        return Some(script);
    }
    assert!(std::env::var_os("CI").is_none(), "llama.cpp is missing: .ci/run installs it with .ci/fetch-llamacpp");
    eprintln!("skipping: llama.cpp is missing (run .ci/fetch-llamacpp)");
    None
}

/// What llama.cpp made of a prompt: its tokens, and its greedy continuation.
struct LlamaCppRun {
    prompt: Vec<u32>,
    generated: Vec<u32>,
}

fn ids(v: &serde_json::Value) -> Vec<u32> {
    v.as_array().unwrap().iter().map(|t| t.as_u64().unwrap() as u32).collect()
}

/// llama.cpp's greedy continuation of `prompt` by `n` tokens (or to an end-of-generation token).
fn llama_cpp_complete(script: &Path, model: &Path, prompt: &str, n: usize, adapter: Option<&Path>) -> LlamaCppRun {
    let mut command = Command::new("node");
    command.arg(script).arg(model).arg(prompt).arg(n.to_string());
    if let Some(adapter) = adapter {
        command.arg(adapter);
    }
    let out = command.output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "llama.cpp failed on {}: {stderr}{stdout}", model.display());
    let line = stdout.lines().rev().find(|l| l.starts_with('{')).unwrap_or_else(|| panic!("no JSON in {stdout}"));
    let v: serde_json::Value = serde_json::from_str(line).unwrap();
    LlamaCppRun { prompt: ids(&v["prompt"]), generated: ids(&v["generated"]) }
}

/// A copy (named `copy`) of a fixture folder with its `config.json` edited.
fn with_config(name: &str, copy: &str, edit: impl Fn(&mut serde_json::Value)) -> PathBuf {
    let source = fixtures().join("models").join(name);
    let dir = scratch(copy);
    std::fs::create_dir_all(&dir).unwrap();
    for entry in std::fs::read_dir(&source).unwrap() {
        let path = entry.unwrap().path();
        std::fs::copy(&path, dir.join(path.file_name().unwrap())).unwrap();
    }
    let mut config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(source.join("config.json")).unwrap()).unwrap();
    edit(&mut config);
    std::fs::write(dir.join("config.json"), config.to_string()).unwrap();
    dir
}

#[test]
fn gguf_forms_of_gemma3_phi3_and_qwen3_moe_load_through_their_plugins() {
    // Gemma-3 with its sliding and global layers (llama.cpp's
    // `sliding_window_pattern` 2) and Gemma's `1 + w` norms; Phi-3's fused
    // projections and partial rotary; Qwen3-MoE's experts stacked per
    // layer. Each file's config comes from its plugin's reading of
    // llama.cpp's keys.
    let gemma = fixtures().join("models/tiny-gemma3");
    let models = [
        ("tiny-gemma3", gemma, "gemma3", "post_ffw_norm"),
        ("tiny-phi3", fixtures().join("models/tiny-phi3"), "phi3", "attn_qkv"),
        ("tiny-qwen3-moe", fixtures().join("models/tiny-qwen3-moe"), "qwen3moe", "ffn_gate_exps"),
    ];
    for (name, source, arch, tensor) in models {
        let ids = reference_ids(&format!("models/{name}"));
        let want = logits(&load(&source), &ids);
        let path = scratch(&format!("{name}-family.gguf"));
        write_model_gguf(&mut load(&source), QuantType::F32, &path).unwrap_or_else(|e| panic!("{name}: {e}"));
        let file = candle_core::quantized::gguf_file::Content::read(&mut std::fs::File::open(&path).unwrap()).unwrap();
        assert_eq!(file.metadata["general.architecture"].to_string().unwrap(), arch);
        assert!(file.tensor_infos.keys().any(|k| k.contains(tensor)), "{name}: no `{tensor}` in the file");
        let back = load(&path);
        let diff = max_abs(&(logits(&back, &ids) - &want).unwrap());
        assert!(diff < 1e-5, "{name}: the GGUF's logits differ by {diff}");
        if arch == "gemma3" {
            // Gemma's norms are stored as llama.cpp reads them: 1 + w.
            let gguf = oxtune_engine::model::gguf::GgufFile::open(&path).unwrap();
            let stored = gguf.read_tensor("output_norm.weight").unwrap();
            let checkpoint = back.weights().get("model.norm.weight").unwrap();
            assert!(max_abs(&((checkpoint + 1.0).unwrap() - stored).unwrap()) < 1e-6);
        }
        // Saved as a folder, it is the source checkpoint again.
        let folder = scratch(&format!("{name}-family-folder"));
        back.save_pretrained_with(&folder, usize::MAX, |_| Ok(())).unwrap();
        let diff = max_abs(&(logits(&load(&folder), &ids) - &want).unwrap());
        assert!(diff < 1e-5, "{name}: the folder saved from the GGUF differs by {diff}");
    }
    // Layer types with no period are a layout llama.cpp cannot state.
    let irregular = with_config("tiny-gemma3", "tiny-gemma3-irregular", |c| {
        c["layer_types"] = serde_json::json!(["full_attention", "sliding_attention"])
    });
    let err = write_model_gguf(&mut load(&irregular), QuantType::F32, &scratch("g.gguf")).unwrap_err().to_string();
    assert!(err.contains("repeat with no period") && err.contains("no GGUF form"), "{err}");
}

/// oxtune's greedy continuation of `ids` (without the end-of-sequence token).
fn oxtune_complete(model: &LoadedModel, assets: &TextAssets, ids: &[u32], n: usize) -> Vec<u32> {
    let params = SamplingParams {
        max_new_tokens: n,
        temperature: 0.0,
        eos_token_ids: assets.eos_token_ids.clone(),
        ..Default::default()
    };
    let mut tokens =
        generate(model, Some(&assets.tokenizer), &[ids.to_vec()], &params, |_, _| {}).unwrap().remove(0).tokens;
    tokens.retain(|t| !assets.eos_token_ids.contains(t));
    tokens
}

#[test]
fn llama_cpp_continues_exported_models_and_adapters_as_oxtune_does() {
    let Some(script) = llama_cpp() else { return };
    // tiny-llama (permuted q/k), f32: llama.cpp's greedy tokens are oxtune's.
    let source = fixtures().join("models/tiny-llama");
    let path = scratch("tiny-llama-f32-for-llama-cpp.gguf");
    write_model_gguf(&mut load(&source), QuantType::F32, &path).unwrap();
    let assets = TextAssets::load(&source).unwrap();
    let prompt = "hello world, this is";
    let run = llama_cpp_complete(&script, &path, prompt, 12, None);
    assert_eq!(run.prompt, assets.tokenizer.encode(prompt, false).unwrap(), "llama.cpp tokenises as the source");
    assert_eq!(run.generated, oxtune_complete(&load(&source), &assets, &run.prompt, 12), "tiny-llama");

    // A GGUF LoRA adapter on tiny-qwen3's GGUF: llama.cpp with the adapter
    // continues as oxtune with the PEFT adapter, and differently without it.
    let source = fixtures().join("models/tiny-qwen3");
    let adapter = fixtures().join("peft/tiny-qwen3-lora");
    let base = scratch("tiny-qwen3-f32-for-llama-cpp.gguf");
    write_model_gguf(&mut load(&source), QuantType::F32, &base).unwrap();
    let lora = scratch("tiny-qwen3-lora.gguf");
    write_adapter_gguf(&load(&source), &adapter, &lora).unwrap();
    let assets = TextAssets::load(&source).unwrap();
    // (A prompt whose greedy continuation the adapter changes.)
    let prompt = "the cat sat on";
    let plain = llama_cpp_complete(&script, &base, prompt, 12, None);
    let adapted = llama_cpp_complete(&script, &base, prompt, 12, Some(&lora));
    assert_eq!(plain.generated, oxtune_complete(&load(&source), &assets, &plain.prompt, 12), "tiny-qwen3");
    let with = oxtune_complete(&with_adapter(&source, &adapter), &assets, &plain.prompt, 12);
    assert_eq!(adapted.generated, with, "tiny-qwen3 with the LoRA adapter");
    assert_ne!(plain.generated, adapted.generated, "the adapter changes llama.cpp's output");
}

#[test]
fn llama_cpp_continues_gemma3_phi3_and_qwen3_moe_exports_as_oxtune_does() {
    let Some(script) = llama_cpp() else { return };
    // tiny-gemma3's window of 4 is crossed: llama.cpp's sliding layers see what transformers' do.
    let gemma = fixtures().join("models/tiny-gemma3");
    // llama.cpp sets Phi-3 token attributes by `general.name` (a name
    // holding "phi3" needs Phi-3's own special tokens, which the fixture's
    // small tokenizer lacks): the copy is named otherwise.
    let phi3 = with_config("tiny-phi3", "tiny-p-3", |_| {});
    let models =
        [("tiny-gemma3", gemma), ("tiny-phi3", phi3), ("tiny-qwen3-moe", fixtures().join("models/tiny-qwen3-moe"))];
    for (name, source) in models {
        let path = scratch(&format!("{name}-for-llama-cpp.gguf"));
        write_model_gguf(&mut load(&source), QuantType::F32, &path).unwrap();
        let assets = TextAssets::load(&source).unwrap();
        let run = llama_cpp_complete(&script, &path, "the cat sat on", 12, None);
        assert_eq!(run.generated, oxtune_complete(&load(&source), &assets, &run.prompt, 12), "{name}");
    }
}

#[test]
fn smollm2_exports_load_in_llama_cpp_and_quantized_ones_stay_close() {
    let (Some(script), Some(source)) = (llama_cpp(), smollm2()) else { return };
    let assets = TextAssets::load(&source).unwrap();
    let f16 = scratch("smollm2-f16.gguf");
    write_model_gguf(&mut load(&source), QuantType::F16, &f16).unwrap();
    // From a GGUF source, streamed: rows already in llama.cpp's order, the same file.
    let streamed = scratch("smollm2-f16-streamed.gguf");
    write_model_gguf_streaming(&Registry::with_builtins().unwrap(), &source, None, QuantType::F16, &streamed).unwrap();
    assert!(std::fs::read(&streamed).unwrap() == std::fs::read(&f16).unwrap(), "SmolLM2: streamed ≠ loaded");
    let prompt = "The three primary colors are";
    let run = llama_cpp_complete(&script, &f16, prompt, 16, None);
    let ours = oxtune_complete(&load(&source), &assets, &run.prompt, 16);
    assert_eq!(run.generated, ours, "SmolLM2 f16: llama.cpp's continuation vs oxtune's on the source");

    // q8_0 and q4_k_m: llama.cpp loads them; their perplexity on a short
    // text (read back by oxtune) stays near f16's.
    let text = "The city council met on Tuesday evening to discuss the new park. Most residents who spoke were in \
        favour of the plan, although several raised concerns about parking and noise.";
    let text_ids = assets.tokenizer.encode(text, false).unwrap();
    let ppl = |path: &Path| oxtune_engine::eval::mean_nll(&load(path), &text_ids).unwrap().exp();
    let reference = ppl(&f16);
    for (quant, max_ratio) in [(QuantType::Q8_0, 1.02), (QuantType::Q4KM, 1.25)] {
        let path = scratch(&format!("smollm2-{quant}.gguf"));
        write_model_gguf(&mut load(&source), quant, &path).unwrap();
        let run = llama_cpp_complete(&script, &path, prompt, 8, None);
        assert_eq!(run.generated.len(), 8, "{quant}: llama.cpp generated {:?}", run.generated);
        let ratio = ppl(&path) / reference;
        assert!(ratio < max_ratio, "{quant}: perplexity {ratio}× f16's");
        assert!(std::fs::metadata(&path).unwrap().len() < std::fs::metadata(&f16).unwrap().len());
    }
}

#[test]
fn the_export_command_writes_each_target_and_says_how_to_use_it() {
    use oxtune_tests::cli::oxtune;
    let model = fixtures().join("models/tiny-qwen3");
    let adapter = fixtures().join("peft/tiny-qwen3-lora");
    let (m, a) = (model.to_str().unwrap(), adapter.to_str().unwrap());
    let text = |out: &std::process::Output| {
        format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
    };

    let merged = scratch("cli-merged");
    let out =
        oxtune(&["export", "--model", m, "--adapter", a, "--merge-lora", "--output", merged.to_str().unwrap()], &[]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        text(&out).contains("oxtune infer --model") && merged.join("model.safetensors").is_file(),
        "{}",
        text(&out)
    );

    let gguf = scratch("cli-model.gguf");
    let args = ["export", "--model", m, "--to-gguf", "--quant-type", "q8_0", "--output", gguf.to_str().unwrap()];
    let out = oxtune(&args, &[]);
    assert!(out.status.success() && text(&out).contains("llama-cli -m"), "{}", text(&out));
    assert_eq!(tensor_types(&gguf).iter().find(|(n, _)| n == "blk.1.ffn_up.weight").unwrap().1, GgmlDType::Q8_0);

    let ollama = scratch("cli-ollama");
    let args = ["export", "--model", m, "--adapter", a, "--to-ollama", "--output", ollama.to_str().unwrap()];
    let out = oxtune(&args, &[]);
    assert!(out.status.success() && text(&out).contains("ollama create"), "{}", text(&out));
    let modelfile = std::fs::read_to_string(ollama.join("Modelfile")).unwrap();
    assert!(modelfile.starts_with("FROM ./model-f16.gguf\nADAPTER ./adapter.gguf\n"), "{modelfile}");
    assert!(modelfile.contains("<|im_start|>{{ .Role }}") && modelfile.contains("PARAMETER stop \"<|im_end|>\""));
    assert!(ollama.join("model-f16.gguf").is_file() && ollama.join("adapter.gguf").is_file());

    // Bad input: an unknown quant type, nothing asked for.
    let out = oxtune(&["export", "--model", m, "--to-gguf", "--quant-type", "q3_k"], &[]);
    assert!(!out.status.success() && text(&out).contains("unknown quant type `q3_k`"), "{}", text(&out));
    let out = oxtune(&["export", "--model", m], &[]);
    assert!(!out.status.success() && text(&out).contains("--merge-lora, --to-gguf or --to-ollama"), "{}", text(&out));
}

#[test]
fn a_merged_tuner_that_scales_outputs_scales_their_biases() {
    // IA³ (the example plugin's tuner, linked in) on tiny-qwen2's biased k/v
    // projections (outputs scaled) and down_proj (input scaled).
    use oxtune_example_plugin as _;
    let registry = Registry::with_builtins().unwrap();
    // tiny-qwen2's biases are zeros (transformers' init): give them values.
    let fixture = fixtures().join("models/tiny-qwen2");
    let source = scratch("tiny-qwen2-biased");
    std::fs::create_dir_all(&source).unwrap();
    for file in ["config.json", "tokenizer.json", "tokenizer_config.json", "generation_config.json"] {
        std::fs::copy(fixture.join(file), source.join(file)).unwrap();
    }
    let mut weights = candle_core::safetensors::load(fixture.join("model.safetensors"), &Device::Cpu).unwrap();
    for (name, tensor) in weights.iter_mut() {
        if name.ends_with(".bias") {
            *tensor = Tensor::randn(0f32, 0.5, tensor.shape(), &Device::Cpu).unwrap();
        }
    }
    candle_core::safetensors::save(&weights, source.join("model.safetensors")).unwrap();
    let mut model = load(&source);
    let config =
        serde_json::json!({"target_modules": ["k_proj", "v_proj", "down_proj"], "feedforward_modules": ["down_proj"]});
    model.add_adapter(&registry, "ia3", config, 0).unwrap();
    let mut scaled = 0;
    for name in model.weights().names() {
        if let (true, Some(var)) = (name.ends_with("ia3_l"), model.weights().var(name)) {
            let noise = Tensor::randn(0f32, 0.3, var.shape(), &Device::Cpu).unwrap();
            var.set(&(noise + 1.0).unwrap()).unwrap();
            scaled += 1;
        }
    }
    assert!(scaled >= 6, "{scaled} scaled layers");
    let ids = reference_ids("models/tiny-qwen2");
    let adapted = logits(&model, &ids);
    let dir = scratch("merged-ia3");
    write_merged(&mut model, &dir, usize::MAX).unwrap();
    let merged = logits(&load(&dir), &ids);
    let diff = max_abs(&(&merged - &adapted).unwrap()) / max_abs(&adapted);
    assert!(diff < 1e-5, "the merged folder's logits differ from the adapter's by {diff} of their scale");
}

#[test]
fn a_model_whose_plugin_has_no_gguf_form_is_refused_by_name() {
    // Qwen2.5-VL's plugin (a cdylib) gives its model no GGUF layout.
    let mut registry = Registry::with_builtins().unwrap();
    let plugin = oxtune_tests::build_cdylib("oxtune-plugin-qwen2-5-vl", &["cdylib"]);
    registry.load_path(&plugin, &oxtune_registry::SandboxConfig::default()).unwrap();
    let source = fixtures().join("vlm/tiny-qwen2.5-vl");
    let path = scratch("vl.gguf");
    let err = write_model_gguf_streaming(&registry, &source, None, QuantType::F16, &path).unwrap_err();
    let message = error_chain(&err);
    assert!(message.contains("tiny-qwen2.5-vl") && message.contains("no GGUF form"), "{message}");
    assert!(!path.exists() && !oxtune_export::writer::partial_path(&path).exists());
}
