//! `oxtune eval`: evaluation tasks. `--task perplexity` scores each row of
//! a text dataset by the mean negative log-likelihood of its tokens; the
//! benchmark tasks (`gsm8k`, `mmlu`, `arc`, `hellaswag`) read local files
//! in the datasets' own columns and score them as lm-evaluation-harness
//! does, on the local model or an OpenAI-compatible server (`--api-url`).

use std::io::Write;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context};
use oxtune_eval::{evaluate, load_docs, ApiModel, EvalOptions, LanguageModel, LocalModel, TaskKind, TaskResult};
use serde_json::{json, Value};

use super::model_args::ModelArgs;
use super::GlobalArgs;
use oxtune_data::read_records;
use oxtune_engine::eval::mean_nll;

/// The evaluation tasks.
#[derive(Copy, Clone, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Task {
    /// Mean negative log-likelihood and perplexity per row of `{"text"}` or `{"input_ids"}` rows.
    Perplexity,
    /// GSM8K (`question`, `answer` with `#### N`): greedy generation, strict and flexible answer extraction.
    Gsm8k,
    /// MMLU (`question`, `choices`, `answer`, optional `subject`): lettered choices by log-likelihood.
    Mmlu,
    /// ARC (`question`, `choices.text`, `choices.label`, `answerKey`): `acc` and `acc_norm`.
    Arc,
    /// HellaSwag (`ctx` or `ctx_a`/`ctx_b`, `endings`, `label`): `acc` and `acc_norm`.
    Hellaswag,
}

impl Task {
    fn benchmark(self) -> Option<TaskKind> {
        match self {
            Task::Perplexity => None,
            Task::Gsm8k => Some(TaskKind::Gsm8k),
            Task::Mmlu => Some(TaskKind::Mmlu),
            Task::Arc => Some(TaskKind::Arc),
            Task::Hellaswag => Some(TaskKind::Hellaswag),
        }
    }
}

/// Arguments of `oxtune eval`.
#[derive(Debug, clap::Args)]
pub struct EvalArgs {
    /// What to evaluate; benchmarks may be listed (`arc,hellaswag`), each with its `--dataset`.
    #[arg(long, value_enum, value_delimiter = ',', required = true)]
    pub task: Vec<Task>,
    #[command(flatten)]
    pub model: ModelArgs,
    /// The data: a JSONL or JSON-array file per task, in the task's order.
    #[arg(long, value_name = "FILE", value_delimiter = ',', required = true)]
    pub dataset: Vec<PathBuf>,
    /// Where results go: per-row JSONL for perplexity, a JSON document for
    /// benchmarks; stdout (perplexity) or nowhere but the table when absent.
    #[arg(long, value_name = "FILE")]
    pub output: Option<PathBuf>,
    /// Benchmarks: worked examples before each question, drawn from
    /// `--fewshot-dataset` (or the task's own file, never the question itself).
    #[arg(long, value_name = "N", default_value_t = 0)]
    pub num_fewshot: usize,
    /// Benchmarks: where few-shot examples come from (a train or dev split), per task.
    #[arg(long, value_name = "FILE", value_delimiter = ',')]
    pub fewshot_dataset: Vec<PathBuf>,
    /// Benchmarks: only the first N questions of each task.
    #[arg(long, value_name = "N")]
    pub limit: Option<usize>,
    /// Benchmarks: requests per forward pass (or per server request).
    #[arg(long, value_name = "N", default_value_t = 8)]
    pub batch_size: usize,
    /// Benchmarks: the seed of the few-shot draw (lm-evaluation-harness uses 1234).
    #[arg(long, value_name = "N", default_value_t = 1234)]
    pub seed: u64,
    /// Benchmarks: most tokens a generation task produces.
    #[arg(long, value_name = "N", default_value_t = 256)]
    pub max_gen_tokens: usize,
    /// Benchmarks: score on an OpenAI-compatible server (`http://127.0.0.1:8000/v1`)
    /// instead of loading `--model`, which then names the server's model.
    #[arg(long, value_name = "URL")]
    pub api_url: Option<String>,
    /// The server's API key (`Authorization: Bearer`).
    #[arg(long, value_name = "KEY", env = "OXTUNE_API_KEY")]
    pub api_key: Option<String>,
    /// Benchmarks: each question's answer and scores, as JSONL.
    #[arg(long, value_name = "FILE")]
    pub log_samples: Option<PathBuf>,
}

/// Runs `oxtune eval`.
pub fn run(global: &GlobalArgs, args: &EvalArgs) -> anyhow::Result<()> {
    if args.task.len() != args.dataset.len() {
        bail!(
            "--task lists {} task(s) and --dataset {} file(s): give one file per task",
            args.task.len(),
            args.dataset.len()
        );
    }
    if args.task.contains(&Task::Perplexity) {
        if args.task.len() > 1 || args.api_url.is_some() {
            bail!("--task perplexity runs alone, on a local model");
        }
        return perplexity(global, args);
    }
    benchmarks(global, args)
}

fn benchmarks(global: &GlobalArgs, args: &EvalArgs) -> anyhow::Result<()> {
    if !args.fewshot_dataset.is_empty() && args.fewshot_dataset.len() != args.task.len() {
        bail!("--fewshot-dataset: give one file per task ({} tasks)", args.task.len());
    }
    let mut model: Box<dyn LanguageModel> = match &args.api_url {
        Some(url) => {
            if args.model.adapter.is_some() {
                bail!("--adapter with --api-url: the server applies adapters; name one with --model");
            }
            let name = args.model.model.to_string_lossy();
            let mut api = ApiModel::new(url, &name, args.api_key.clone(), Duration::from_secs(600));
            api.batch_size = args.batch_size;
            Box::new(api)
        }
        None => {
            let registry = global.registry()?;
            let text = args.model.load(&registry)?;
            Box::new(LocalModel { model: text.model, assets: text.assets, batch_size: args.batch_size })
        }
    };
    let options = EvalOptions {
        num_fewshot: args.num_fewshot,
        limit: args.limit,
        seed: args.seed,
        max_gen_tokens: args.max_gen_tokens,
    };
    let mut results: Vec<(TaskResult, &PathBuf)> = Vec::new();
    for (i, (task, dataset)) in args.task.iter().zip(&args.dataset).enumerate() {
        let kind = task.benchmark().expect("perplexity is handled apart");
        let docs = load_docs(kind, dataset)?;
        let pool = match args.fewshot_dataset.get(i) {
            Some(path) => load_docs(kind, path)?,
            None => docs.clone(),
        };
        let result = evaluate(kind, &docs, &pool, model.as_mut(), &options)
            .with_context(|| format!("task {kind} on {}", dataset.display()))?;
        results.push((result, dataset));
    }
    print_table(&results);
    let (mut weighted, mut samples) = (0.0, 0);
    let mut tasks = serde_json::Map::new();
    for (r, dataset) in &results {
        weighted += r.metrics.get(r.main_metric).copied().unwrap_or(0.0) * r.samples as f64;
        samples += r.samples;
        let groups: serde_json::Map<String, Value> =
            r.groups.iter().map(|(g, (n, acc))| (g.clone(), json!({"samples": n, "acc": acc}))).collect();
        tasks.insert(
            r.task.name().into(),
            json!({
                "dataset": dataset, "samples": r.samples, "metrics": r.metrics, "main_metric": r.main_metric,
                "groups": groups, "seconds": r.seconds, "samples_per_second": r.samples as f64 / r.seconds.max(1e-9),
            }),
        );
    }
    let document = json!({
        "model": model.describe(), "adapter": args.model.adapter, "seed": args.seed, "num_fewshot": args.num_fewshot,
        "limit": args.limit, "tasks": tasks,
        "overall": {"samples": samples, "score": if samples > 0 { weighted / samples as f64 } else { 0.0 },
                    "note": "the sample-weighted mean of each task's main metric"},
    });
    if let Some(path) = &args.output {
        std::fs::write(path, serde_json::to_string_pretty(&document)?)
            .with_context(|| format!("writing {}", path.display()))?;
        println!("results: {}", path.display());
    }
    if let Some(path) = &args.log_samples {
        let mut out = std::io::BufWriter::new(
            std::fs::File::create(path).with_context(|| format!("creating {}", path.display()))?,
        );
        for (r, _) in &results {
            for sample in &r.per_sample {
                writeln!(out, "{}", json!({"task": r.task.name(), "sample": sample}))?;
            }
        }
    }
    Ok(())
}

/// The results as a Markdown table: each task's metrics, its groups, the overall score.
fn print_table(results: &[(TaskResult, &PathBuf)]) {
    println!("| task | metric | value | samples |");
    println!("|---|---|---|---|");
    let (mut weighted, mut samples) = (0.0, 0);
    for (r, _) in results {
        for (metric, value) in &r.metrics {
            println!("| {} | {metric} | {value:.4} | {} |", r.task, r.samples);
        }
        for (group, (n, acc)) in &r.groups {
            println!("| {} / {group} | acc | {acc:.4} | {n} |", r.task);
        }
        weighted += r.metrics.get(r.main_metric).copied().unwrap_or(0.0) * r.samples as f64;
        samples += r.samples;
    }
    if results.len() > 1 && samples > 0 {
        println!("| overall | main metrics, sample-weighted | {:.4} | {samples} |", weighted / samples as f64);
    }
}

fn perplexity(global: &GlobalArgs, args: &EvalArgs) -> anyhow::Result<()> {
    let registry = global.registry()?;
    let text = args.model.load(&registry)?;
    let dataset = &args.dataset[0];
    let records = read_records(dataset)?;
    let mut out: Box<dyn Write> = match &args.output {
        Some(path) => Box::new(std::io::BufWriter::new(
            std::fs::File::create(path).with_context(|| format!("creating {}", path.display()))?,
        )),
        None => Box::new(std::io::stdout().lock()),
    };
    let (mut total_nll, mut total_predicted) = (0.0f64, 0usize);
    for (row, record) in records.iter().enumerate() {
        let at = || format!("{}:{}", dataset.display(), record.line);
        let ids: Vec<u32> = match (record.value.get("input_ids"), record.value.get("text")) {
            (Some(Value::Array(ids)), _) => ids
                .iter()
                .map(|v| v.as_u64().map(|v| v as u32))
                .collect::<Option<Vec<_>>>()
                .with_context(|| format!("{}: `input_ids` must be a list of token ids", at()))?,
            (_, Some(Value::String(s))) => text.assets.tokenizer.encode(s, false)?,
            _ => bail!("{}: a perplexity row needs a `text` string or an `input_ids` list", at()),
        };
        if ids.len() < 2 {
            bail!("{}: the row has {} token(s); perplexity needs at least 2", at(), ids.len());
        }
        let nll = mean_nll(&text.model, &ids).with_context(at)?;
        total_nll += nll * (ids.len() - 1) as f64;
        total_predicted += ids.len() - 1;
        writeln!(out, "{}", json!({"row": row, "tokens": ids.len(), "nll": nll, "ppl": nll.exp()}))?;
    }
    if total_predicted > 0 {
        let nll = total_nll / total_predicted as f64;
        let overall = json!({"overall": true, "rows": records.len(), "predicted_tokens": total_predicted, "nll": nll, "ppl": nll.exp()});
        writeln!(out, "{overall}")?;
    }
    Ok(())
}
