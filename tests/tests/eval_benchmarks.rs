//! `oxtune eval` on benchmarks: every task format read from the shipped
//! samples, each choice's log-likelihood equal to a direct computation
//! from the model's logits, the same numbers through `oxtune serve`'s
//! `/v1/completions` as in process, and bad input named.

use std::path::PathBuf;
use std::time::Duration;

use candle_core::{DType, Device, Tensor, D};
use oxtune_data::TextAssets;
use oxtune_engine::backend::BatchInfo;
use oxtune_engine::model::{LoadOptions, LoadedModel};
use oxtune_eval::{
    evaluate, load_docs, ApiModel, Doc, EvalOptions, LanguageModel, LocalModel, LoglikelihoodRequest, TaskKind,
};
use oxtune_registry::Registry;
use oxtune_tests::cli::oxtune;
use oxtune_tests::{fixtures, Server};
use serde_json::{json, Value};

fn benchmark(name: &str) -> PathBuf {
    fixtures().join("benchmarks").join(format!("{name}.jsonl"))
}

fn local(batch_size: usize) -> LocalModel {
    let dir = fixtures().join("models/tiny-qwen3");
    let model = LoadedModel::load(&Registry::with_builtins().unwrap(), &dir, &LoadOptions::default()).unwrap();
    LocalModel { model, assets: TextAssets::load(&dir).unwrap(), batch_size }
}

/// Each row's log-softmax, in f64.
fn log_softmax_rows(logits: &Tensor) -> Vec<Vec<f64>> {
    let logits = logits.to_dtype(DType::F64).unwrap();
    let max = logits.max_keepdim(D::Minus1).unwrap();
    let shifted = logits.broadcast_sub(&max).unwrap();
    let log_sum = shifted.exp().unwrap().sum_keepdim(D::Minus1).unwrap().log().unwrap();
    shifted.broadcast_sub(&log_sum).unwrap().to_vec2::<f64>().unwrap()
}

/// The log-likelihood of the continuation straight from the full logits
/// of one unbatched forward pass.
fn direct_loglikelihood(m: &LocalModel, request: &LoglikelihoodRequest) -> f64 {
    let (context, continuation) = m.request_tokens(request).unwrap();
    let ids: Vec<u32> = context.iter().chain(&continuation).copied().collect();
    let input = Tensor::new(ids.as_slice(), &Device::Cpu).unwrap().unsqueeze(0).unwrap();
    let logits = m.model.forward(&input, &BatchInfo::default(), None, None).unwrap().squeeze(0).unwrap();
    let rows = log_softmax_rows(&logits);
    (0..continuation.len()).map(|i| rows[context.len() + i - 1][continuation[i] as usize]).sum()
}

#[test]
fn every_format_loads_and_choice_loglikelihoods_equal_the_logits() {
    let mut m = local(3);
    for kind in [TaskKind::Mmlu, TaskKind::Arc, TaskKind::Hellaswag] {
        let docs = load_docs(kind, &benchmark(kind.name())).unwrap();
        assert!(docs.len() >= 4, "{kind}");
        let mut requests = Vec::new();
        for d in &docs {
            let Doc::Choice { query, choices, .. } = &d.doc else { panic!("{kind}: a choice task") };
            requests.extend(
                choices.iter().map(|c| LoglikelihoodRequest { context: query.clone(), continuation: c.clone() }),
            );
        }
        // Batched (3 per pass, padded, longest first) equals one at a time from the logits.
        let batched = m.loglikelihoods(&requests).unwrap();
        for (request, got) in requests.iter().zip(&batched) {
            let want = direct_loglikelihood(&m, request);
            assert!((got - want).abs() < 1e-4 * want.abs().max(1.0), "{kind}: {got} vs {want} for {request:?}");
        }
    }
    let docs = load_docs(TaskKind::Gsm8k, &benchmark("gsm8k")).unwrap();
    let Doc::Generation { query, answer } = &docs[3].doc else { panic!("GSM8K generates") };
    assert!(query.starts_with("Question: A garden") && query.ends_with("\nAnswer:") && answer.ends_with("#### 95"));
}

#[test]
fn few_shot_contexts_follow_lm_eval_and_never_show_the_question() {
    let docs = load_docs(TaskKind::Mmlu, &benchmark("mmlu")).unwrap();
    let mut m = local(8);
    let options = EvalOptions { num_fewshot: 2, ..Default::default() };
    let result = evaluate(TaskKind::Mmlu, &docs, &docs, &mut m, &options).unwrap();
    assert_eq!(result.samples, 6);
    assert_eq!(result.groups.len(), 2, "per subject: {:?}", result.groups);
    assert_eq!(result.groups.values().map(|(n, _)| n).sum::<usize>(), 6);
    let shots: Vec<&Doc> = vec![&docs[1].doc, &docs[2].doc];
    let context = oxtune_eval::run::context(TaskKind::Mmlu, &docs[0].doc, &shots);
    assert!(context.starts_with("The following are multiple choice questions (with answers) about elementary mathematics.\n\nWhich number is prime?\nA. 21"));
    assert!(context.contains("D. 33\nAnswer: C\n\nWhat is 15% of 200?"), "{context}");
    assert!(context.ends_with("What is the value of 7 * 8?\nA. 54\nB. 56\nC. 58\nD. 64\nAnswer:"));
    // The same seed draws the same examples; acc is a mean of 0/1 scores.
    let again = evaluate(TaskKind::Mmlu, &docs, &docs, &mut m, &options).unwrap();
    assert_eq!(result.metrics, again.metrics);
    assert!((result.metrics["acc"] * 6.0).fract().abs() < 1e-9);
}

#[test]
fn oxtune_serve_gives_the_in_process_numbers() {
    let arc = load_docs(TaskKind::Arc, &benchmark("arc")).unwrap();
    let gsm8k = load_docs(TaskKind::Gsm8k, &benchmark("gsm8k")).unwrap();
    let options = EvalOptions { num_fewshot: 1, max_gen_tokens: 12, ..Default::default() };
    let mut m = local(4);
    let here = evaluate(TaskKind::Arc, &arc, &arc, &mut m, &options).unwrap();
    let here_gen = evaluate(TaskKind::Gsm8k, &gsm8k, &gsm8k, &mut m, &options).unwrap();
    let server = Server::start(&["--model", fixtures().join("models/tiny-qwen3").to_str().unwrap()]);
    let mut api = ApiModel::new(&server.url, "tiny-qwen3", None, Duration::from_secs(60));
    api.batch_size = 4;
    let there = evaluate(TaskKind::Arc, &arc, &arc, &mut api, &options).unwrap();
    let there_gen = evaluate(TaskKind::Gsm8k, &gsm8k, &gsm8k, &mut api, &options).unwrap();
    assert_eq!(here.metrics, there.metrics);
    for (a, b) in here.per_sample.iter().zip(&there.per_sample) {
        let (a, b) = (a["loglikelihoods"].as_array().unwrap(), b["loglikelihoods"].as_array().unwrap());
        for (x, y) in a.iter().zip(b) {
            let (x, y) = (x.as_f64().unwrap(), y.as_f64().unwrap());
            assert!((x - y).abs() < 1e-4 * x.abs().max(1.0), "{x} vs {y}");
        }
    }
    let generations =
        |r: &oxtune_eval::TaskResult| r.per_sample.iter().map(|s| s["generation"].clone()).collect::<Vec<_>>();
    assert_eq!(generations(&here_gen), generations(&there_gen));
    assert_eq!(here_gen.metrics, there_gen.metrics);
}

fn text(out: &std::process::Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
}

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("oxtune-eval-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir.join(name)
}

#[test]
fn the_eval_command_writes_results_and_names_bad_input() {
    let model = fixtures().join("models/tiny-qwen3");
    let m = model.to_str().unwrap();
    let datasets = format!("{},{}", benchmark("arc").display(), benchmark("hellaswag").display());
    let results = scratch("results.json");
    let args = [
        "eval",
        "--task",
        "arc,hellaswag",
        "--dataset",
        &datasets,
        "--model",
        m,
        "--num-fewshot",
        "1",
        "--output",
        results.to_str().unwrap(),
    ];
    let out = oxtune(&args, &[]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("| arc | acc_norm |") && text(&out).contains("| overall |"), "{}", text(&out));
    let doc: Value = serde_json::from_str(&std::fs::read_to_string(&results).unwrap()).unwrap();
    assert_eq!(doc["tasks"]["arc"]["samples"], 5);
    assert_eq!(doc["tasks"]["hellaswag"]["samples"], 4);
    assert_eq!((doc["seed"].clone(), doc["num_fewshot"].clone()), (json!(1234), json!(1)));
    assert_eq!(doc["overall"]["samples"], 9);

    // A file with the wrong columns names the row and the field.
    let wrong = scratch("wrong.jsonl");
    std::fs::write(
        &wrong,
        "{\"question\": \"Q\", \"choices\": [\"a\", \"b\"], \"answer\": 0}\n{\"question\": \"Q\", \"answer\": 1}\n",
    )
    .unwrap();
    let out = oxtune(&["eval", "--task", "mmlu", "--dataset", wrong.to_str().unwrap(), "--model", m], &[]);
    assert!(
        !out.status.success() && text(&out).contains("wrong.jsonl:2") && text(&out).contains("`choices` is missing"),
        "{}",
        text(&out)
    );
    // An unreachable server is named.
    let args = [
        "eval",
        "--task",
        "arc",
        "--dataset",
        &benchmark("arc").display().to_string(),
        "--model",
        "m",
        "--api-url",
        "http://127.0.0.1:9/v1",
    ];
    let out = oxtune(&args, &[]);
    assert!(!out.status.success() && text(&out).contains("http://127.0.0.1:9/v1/completions"), "{}", text(&out));
}
