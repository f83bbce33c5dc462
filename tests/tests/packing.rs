//! Packing and padding-free training: per-sample log-likelihoods of a
//! packed row equal each sample's own, attention never crosses a sample
//! (ignoring the segments would change them), and packed, padding-free,
//! padded and accumulated runs train the same thing (token-weighted
//! accumulation), step for step.

use candle_core::{Device, Tensor};
use oxtune_data::text::{encode_chat, EncodedRow, TextAssets};
use oxtune_data::{pack_rows, PackedRow};
use oxtune_engine::backend::BatchInfo;
use oxtune_engine::model::{LoadOptions, LoadedModel};
use oxtune_registry::Registry;
use oxtune_tests::fixtures;
use oxtune_train::{
    collate_packed, train, train_with, PackedSftObjective, PaddingFreeSftObjective, SftObjective, TrainConfig,
};
use serde_json::json;

fn rows(assets: &TextAssets) -> Vec<EncodedRow> {
    let pairs = [
        ("What colour is the sky on a clear day?", "blue"),
        ("Name a fruit.", "apple"),
        ("Say hello.", "hello there, friend"),
        ("2+2?", "4"),
        ("Which animal barks?", "a dog barks"),
        ("Opposite of hot?", "cold"),
    ];
    pairs
        .iter()
        .map(|(q, a)| {
            let messages = [json!({"role": "user", "content": q}), json!({"role": "assistant", "content": a})];
            encode_chat(assets, &messages, None).unwrap()
        })
        .collect()
}

fn model(seed: u64) -> LoadedModel {
    let registry = Registry::with_builtins().unwrap();
    let mut model =
        LoadedModel::load(&registry, &fixtures().join("models/tiny-qwen3"), &LoadOptions::default()).unwrap();
    let config = json!({"r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "v_proj", "down_proj"]});
    model.add_adapter(&registry, "lora", config, seed).unwrap();
    model
}

/// Per sample of each packed row, the summed log-probability of its labels.
fn per_sample_logps(model: &LoadedModel, packs: &[&PackedRow], segments: bool) -> Vec<f64> {
    let (ids, labels, mut info) = collate_packed(packs, None, &Device::Cpu).unwrap();
    if !segments {
        info.segment_ids = None;
    }
    let logps = model.label_logps(&ids, &info, &labels).unwrap().logps;
    let logps = logps.to_vec2::<f32>().unwrap();
    let mut out = Vec::new();
    for (p, row) in packs.iter().zip(&logps) {
        let mut sums = vec![0f64; p.samples()];
        // Position t predicts token t + 1, which belongs to segment_ids[t + 1].
        for (t, lp) in row.iter().enumerate().take(p.input_ids.len() - 1) {
            sums[p.segment_ids[t + 1] as usize] += f64::from(*lp);
        }
        out.extend(sums);
    }
    out
}

fn alone(model: &LoadedModel, row: &EncodedRow) -> f64 {
    let ids = Tensor::new(row.input_ids.as_slice(), &Device::Cpu).unwrap().unsqueeze(0).unwrap();
    let labels = Tensor::new(row.labels.as_slice(), &Device::Cpu).unwrap().unsqueeze(0).unwrap();
    let logps = model.label_logps(&ids, &BatchInfo::default(), &labels).unwrap().logps;
    logps.to_vec2::<f32>().unwrap()[0].iter().map(|&v| f64::from(v)).sum()
}

#[test]
fn packed_samples_score_as_they_do_alone_and_never_see_each_other() {
    let assets = TextAssets::load(&fixtures().join("models/tiny-qwen3")).unwrap();
    let rows = rows(&assets);
    let model = model(3);
    // Two packed rows of different lengths in one batch (the shorter padded).
    let a = PackedRow::from_rows(&[&rows[0], &rows[1], &rows[2]]).unwrap();
    let b = PackedRow::from_rows(&[&rows[3], &rows[4]]).unwrap();
    let packed = per_sample_logps(&model, &[&a, &b], true);
    let expected: Vec<f64> = rows[..5].iter().map(|r| alone(&model, r)).collect();
    for (i, (got, want)) in packed.iter().zip(&expected).enumerate() {
        assert!((got - want).abs() < 1e-5 * want.abs().max(1.0), "sample {i}: packed {got} vs alone {want}");
    }
    // Without the segments, later samples attend to earlier ones: different.
    let leaky = per_sample_logps(&model, &[&a, &b], false);
    assert!((leaky[1] - expected[1]).abs() > 1e-3, "the segments are what keep samples apart");
    assert!((leaky[0] - expected[0]).abs() < 1e-5, "the first sample has nothing before it either way");
}

#[test]
fn packed_padding_free_padded_and_accumulated_runs_train_the_same() {
    let assets = TextAssets::load(&fixtures().join("models/tiny-qwen3")).unwrap();
    let rows = rows(&assets);
    let config = |batch_size, accum| TrainConfig {
        learning_rate: 1e-2,
        max_steps: Some(4),
        batch_size,
        gradient_accumulation_steps: accum,
        ..Default::default()
    };
    // Every step sees all six samples: one padded batch of six.
    let losses = |metrics: Vec<oxtune_train::StepMetrics>| -> Vec<f64> { metrics.iter().map(|m| m.loss).collect() };
    let padded = losses(train(&model(5), &rows, &[], &config(6, 1)).unwrap());
    // Three micro-batches of two, weighted by their tokens.
    let accumulated = losses(train(&model(5), &rows, &[], &config(2, 3)).unwrap());
    let free = losses(train_with(&model(5), &PaddingFreeSftObjective, &rows, &[], &config(6, 1)).unwrap());
    // Packed into rows of at most twice the longest sample, all of them in each step.
    let longest = rows.iter().map(|r| r.input_ids.len()).max().unwrap();
    let packs = pack_rows(&rows, 2 * longest).unwrap();
    assert!(packs.len() > 1 && packs.len() < rows.len(), "{} packs", packs.len());
    let packed = losses(train_with(&model(5), &PackedSftObjective, &packs, &[], &config(packs.len(), 1)).unwrap());
    for step in 0..4 {
        for (name, run) in [("accumulated", &accumulated), ("padding-free", &free), ("packed", &packed)] {
            let (got, want) = (run[step], padded[step]);
            assert!((got - want).abs() < 2e-5 * want.abs(), "step {}: {name} loss {got} vs padded {want}", step + 1);
        }
    }
    assert!(padded[3] < padded[0], "the runs learn: {padded:?}");
    // The plain SFT objective and the packed one weigh by the same tokens.
    use oxtune_train::Objective;
    let tokens: f64 = rows.iter().map(|r| SftObjective.weight(r)).sum();
    assert_eq!(tokens, packs.iter().map(|p| PackedSftObjective.weight(p)).sum::<f64>());
}

#[test]
fn the_packing_flags_train_sft_and_are_refused_where_they_do_not_apply() {
    use oxtune_tests::cli::{fresh_dir, metrics, oxtune, scratch, tiny};
    let data = scratch(
        "packing-chats.jsonl",
        &(0..6)
            .map(|i| format!("{{\"messages\": [{{\"role\": \"user\", \"content\": \"q{i}\"}}, {{\"role\": \"assistant\", \"content\": \"{}\"}}]}}\n", "a".repeat(i + 1)))
            .collect::<String>(),
    );
    for flag in ["--packing", "--padding-free"] {
        let out = fresh_dir(&format!("packing{flag}"));
        let args = [
            "sft",
            "--model",
            &tiny("tiny-qwen3"),
            "--dataset",
            data.to_str().unwrap(),
            "--output-dir",
            out.to_str().unwrap(),
            "--max-steps",
            "2",
            "--max-length",
            "128",
            flag,
            "true",
        ];
        let run = oxtune(&args, &[]);
        let stderr = String::from_utf8_lossy(&run.stderr);
        assert!(run.status.success(), "{flag}: {stderr}");
        assert_eq!(metrics(&out).len(), 2, "{flag}");
        if flag == "--packing" {
            assert!(stderr.contains("packed 6 row(s) into"), "{stderr}");
        }
    }
    let args = [
        "sft",
        "--model",
        &tiny("tiny-qwen3"),
        "--dataset",
        data.to_str().unwrap(),
        "--output-dir",
        "x",
        "--packing",
        "true",
        "--padding-free",
        "true",
    ];
    let both = oxtune(&args, &[]);
    assert!(!both.status.success() && String::from_utf8_lossy(&both.stderr).contains("cannot be used with"));
    let args = [
        "rlhf",
        "--algo",
        "dpo",
        "--model",
        &tiny("tiny-qwen3"),
        "--dataset",
        data.to_str().unwrap(),
        "--output-dir",
        "x",
        "--packing",
        "true",
    ];
    // KTO and GRPO compare across their batch or score whole rollouts: refused by name.
    for (algo, says) in [("kto", "kto compares completions"), ("grpo", "grpo scores whole rollouts")] {
        let mut args = args.to_vec();
        args[2] = algo;
        let flag = args.len() - 2;
        args[flag] = "--padding-free";
        let out = oxtune(&args, &[]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success() && stderr.contains(says), "{algo}: {stderr}");
    }
}
