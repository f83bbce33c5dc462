//! The commands a model-plugin author checks parity with: `oxtune logits`
//! writes transformers' logits for given ids, and `oxtune infer` takes
//! token ids (`--prompt-ids`, or pre-tokenized `input_ids` rows) and
//! continues them as transformers' greedy `generate` does.

use std::path::PathBuf;

use candle_core::{DType, Device, Tensor, D};
use oxtune_data::TextAssets;
use oxtune_tests::cli::{oxtune, succeeded};
use oxtune_tests::fixtures;

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("oxtune-author-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir.join(name)
}

fn reference() -> std::collections::HashMap<String, Tensor> {
    candle_core::safetensors::load(fixtures().join("models/tiny-llama/reference.safetensors"), &Device::Cpu).unwrap()
}

fn ids_of(t: &Tensor) -> Vec<u32> {
    t.to_dtype(DType::I64).unwrap().flatten_all().unwrap().to_vec1::<i64>().unwrap().iter().map(|&v| v as u32).collect()
}

#[test]
fn logits_for_token_ids_match_transformers() {
    let r = reference();
    let ids = ids_of(&r["input_ids"].get(0).unwrap());
    let list = ids.iter().map(u32::to_string).collect::<Vec<_>>().join(",");
    let model = fixtures().join("models/tiny-llama");
    let out = scratch("logits.safetensors");
    let args = ["logits", "--model", model.to_str().unwrap(), "--prompt-ids", &list, "--output", out.to_str().unwrap()];
    succeeded(&oxtune(&args, &[]));
    let written = candle_core::safetensors::load(&out, &Device::Cpu).unwrap();
    let want = r["logits"].get(0).unwrap();
    let diff = (&written["logits"] - &want).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
    assert!(diff < 1e-4, "logits differ from transformers by {diff}");
    assert_eq!(ids_of(&written["input_ids"]), ids);

    // Per-token log-probabilities as JSON: log-softmax of the same logits at the next ids.
    let json_out = scratch("logprobs.json");
    let args = [
        "logits",
        "--model",
        model.to_str().unwrap(),
        "--prompt-ids",
        &list,
        "--logprobs",
        "--output",
        json_out.to_str().unwrap(),
    ];
    succeeded(&oxtune(&args, &[]));
    let doc: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&json_out).unwrap()).unwrap();
    let got: Vec<f64> = doc["logprobs"].as_array().unwrap().iter().map(|v| v.as_f64().unwrap()).collect();
    let max = want.max_keepdim(D::Minus1).unwrap();
    let shifted = want.broadcast_sub(&max).unwrap();
    let lp = shifted.broadcast_sub(&shifted.exp().unwrap().sum_keepdim(D::Minus1).unwrap().log().unwrap()).unwrap();
    let lp = lp.to_vec2::<f32>().unwrap();
    assert_eq!(got.len(), ids.len() - 1);
    for (t, g) in got.iter().enumerate() {
        let w = f64::from(lp[t][ids[t + 1] as usize]);
        assert!((g - w).abs() < 1e-4, "token {t}: {g} vs {w}");
    }

    // An id outside the vocabulary is named.
    let args =
        ["logits", "--model", model.to_str().unwrap(), "--prompt-ids", "1,99999", "--output", out.to_str().unwrap()];
    let bad = oxtune(&args, &[]);
    assert!(!bad.status.success() && String::from_utf8_lossy(&bad.stderr).contains("token id 99999"));
}

#[test]
fn infer_continues_token_ids_as_transformers_generate() {
    let r = reference();
    let prompt = ids_of(&r["greedy_prompt"]);
    let model = fixtures().join("models/tiny-llama");
    let assets = TextAssets::load(&model).unwrap();
    // transformers' greedy output (it did not stop at the end token), up to one.
    let mut expected = ids_of(&r["greedy_output"]);
    if let Some(end) = expected.iter().position(|t| assets.eos_token_ids.contains(t)) {
        expected.truncate(end);
    }
    let want = assets.tokenizer.decode(&expected, true).unwrap();
    let list = prompt.iter().map(u32::to_string).collect::<Vec<_>>().join(",");
    let args = [
        "infer",
        "--model",
        model.to_str().unwrap(),
        "--prompt-ids",
        &list,
        "--max-new-tokens",
        "10",
        "--temperature",
        "0",
    ];
    let out = oxtune(&args, &[]);
    succeeded(&out);
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim_end_matches('\n'), want);
    // The same prompt as a pre-tokenized dataset row.
    let data = scratch("ids.jsonl");
    std::fs::write(&data, format!("{{\"input_ids\": {prompt:?}}}\n")).unwrap();
    let args = [
        "infer",
        "--model",
        model.to_str().unwrap(),
        "--dataset",
        data.to_str().unwrap(),
        "--max-new-tokens",
        "10",
        "--temperature",
        "0",
    ];
    let out = oxtune(&args, &[]);
    succeeded(&out);
    let line: serde_json::Value = serde_json::from_str(String::from_utf8_lossy(&out.stdout).trim()).unwrap();
    assert_eq!(line["response"], want);
}
