//! Running a task: few-shot contexts drawn with a seed, the model's
//! answers, the metrics per task and per group (MMLU's subjects).

use std::collections::BTreeMap;
use std::time::Instant;

use oxtune_engine::rng::SplitMix64;
use serde_json::{json, Value};

use crate::backend::{LanguageModel, LoglikelihoodRequest};
use crate::scoring::{boxed, choice_scores, exact_match, flexible_extract, strict_match};
use crate::tasks::{Doc, LoadedDoc, TaskKind};
use crate::EvalError;

/// How a task is run.
#[derive(Clone, Debug)]
pub struct EvalOptions {
    /// Worked examples before each question.
    pub num_fewshot: usize,
    /// Only the first N questions.
    pub limit: Option<usize>,
    /// Seeds the choice of few-shot examples (lm-eval's default: 1234).
    pub seed: u64,
    /// Most tokens a generation task may produce.
    pub max_gen_tokens: usize,
}

impl Default for EvalOptions {
    fn default() -> Self {
        EvalOptions { num_fewshot: 0, limit: None, seed: 1234, max_gen_tokens: 256 }
    }
}

/// One task's outcome.
#[derive(Clone, Debug)]
pub struct TaskResult {
    /// The task.
    pub task: TaskKind,
    /// Questions scored.
    pub samples: usize,
    /// Each metric's mean over the questions (`acc`, `acc_norm`,
    /// `exact_match,strict-match`, ...).
    pub metrics: BTreeMap<String, f64>,
    /// Per group (MMLU subject): questions and `acc`.
    pub groups: BTreeMap<String, (usize, f64)>,
    /// The main metric's name (`acc`, `exact_match,strict-match`).
    pub main_metric: &'static str,
    /// Per question: its line, what the model answered, and its scores.
    pub per_sample: Vec<Value>,
    /// Wall time of the model's work, in seconds.
    pub seconds: f64,
}

/// GSM8K's stop sequences (lm-eval's `until`).
fn gsm8k_until() -> Vec<String> {
    ["Question:", "</s>", "<|im_end|>"].map(str::to_owned).to_vec()
}

/// The few-shot examples for question `index`: `n` docs of `pool` drawn
/// with `seed`, never the question itself.
fn fewshot<'a>(pool: &'a [LoadedDoc], question: &LoadedDoc, index: usize, n: usize, seed: u64) -> Vec<&'a Doc> {
    let mut candidates: Vec<&LoadedDoc> = pool.iter().filter(|d| d.doc != question.doc).collect();
    let mut rng = SplitMix64::new(seed ^ (index as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15));
    let take = n.min(candidates.len());
    for i in 0..take {
        let j = i + (rng.next_u64() % (candidates.len() - i) as u64) as usize;
        candidates.swap(i, j);
    }
    candidates[..take].iter().map(|d| &d.doc).collect()
}

/// The full prompt of a question: the description, the worked examples,
/// then the question.
pub fn context(kind: TaskKind, doc: &Doc, shots: &[&Doc]) -> String {
    let mut text = String::new();
    if let (TaskKind::Mmlu, Doc::Choice { group: Some(subject), .. }) = (kind, doc) {
        text.push_str(&format!("The following are multiple choice questions (with answers) about {subject}.\n\n"));
    }
    for shot in shots {
        text.push_str(shot.query());
        text.push_str(shot.fewshot_target());
        text.push_str("\n\n");
    }
    text.push_str(doc.query());
    text
}

/// Runs `kind` over `docs` (few-shot examples from `pool`) on `model`.
pub fn evaluate(
    kind: TaskKind,
    docs: &[LoadedDoc],
    pool: &[LoadedDoc],
    model: &mut dyn LanguageModel,
    options: &EvalOptions,
) -> Result<TaskResult, EvalError> {
    let docs = &docs[..options.limit.unwrap_or(docs.len()).min(docs.len())];
    let contexts: Vec<String> = docs
        .iter()
        .enumerate()
        .map(|(i, d)| context(kind, &d.doc, &fewshot(pool, d, i, options.num_fewshot, options.seed)))
        .collect();
    let started = Instant::now();
    let mut per_sample = Vec::with_capacity(docs.len());
    let mut sums: BTreeMap<String, f64> = BTreeMap::new();
    let mut groups: BTreeMap<String, (usize, f64)> = BTreeMap::new();
    let main_metric;
    if kind == TaskKind::Gsm8k {
        main_metric = "exact_match,strict-match";
        let answers = model.generate(&contexts, &gsm8k_until(), options.max_gen_tokens)?;
        for (d, answer) in docs.iter().zip(&answers) {
            let Doc::Generation { answer: reference, .. } = &d.doc else { unreachable!("GSM8K docs generate") };
            let extracted = [
                ("strict-match", strict_match(answer)),
                ("flexible-extract", flexible_extract(answer)),
                ("boxed", boxed(answer)),
            ];
            let mut scores = serde_json::Map::new();
            for (filter, value) in &extracted {
                let hit = exact_match(value, reference);
                *sums.entry(format!("exact_match,{filter}")).or_default() += f64::from(u8::from(hit));
                scores.insert(format!("exact_match,{filter}"), json!(hit));
            }
            per_sample.push(json!({"line": d.line, "generation": answer, "extracted": {
                "strict-match": extracted[0].1, "flexible-extract": extracted[1].1, "boxed": extracted[2].1},
                "scores": scores}));
        }
    } else {
        main_metric = "acc";
        let mut requests = Vec::new();
        for (d, context) in docs.iter().zip(&contexts) {
            let Doc::Choice { choices, .. } = &d.doc else { unreachable!("choice docs") };
            requests.extend(
                choices.iter().map(|c| LoglikelihoodRequest { context: context.clone(), continuation: c.clone() }),
            );
        }
        let lls = model.loglikelihoods(&requests)?;
        let mut offset = 0;
        for d in docs {
            let Doc::Choice { choices, gold, group, .. } = &d.doc else { unreachable!("choice docs") };
            let ll = &lls[offset..offset + choices.len()];
            offset += choices.len();
            let (acc, acc_norm) = choice_scores(ll, choices, *gold);
            *sums.entry("acc".into()).or_default() += f64::from(u8::from(acc));
            *sums.entry("acc_norm".into()).or_default() += f64::from(u8::from(acc_norm));
            if let Some(group) = group {
                let entry = groups.entry(group.clone()).or_default();
                entry.0 += 1;
                entry.1 += f64::from(u8::from(acc));
            }
            per_sample
                .push(json!({"line": d.line, "loglikelihoods": ll, "gold": gold, "acc": acc, "acc_norm": acc_norm}));
        }
    }
    let n = docs.len().max(1) as f64;
    Ok(TaskResult {
        task: kind,
        samples: docs.len(),
        metrics: sums.into_iter().map(|(k, v)| (k, v / n)).collect(),
        groups: groups.into_iter().map(|(k, (count, hits))| (k, (count, hits / count as f64))).collect(),
        main_metric,
        per_sample,
        seconds: started.elapsed().as_secs_f64(),
    })
}
