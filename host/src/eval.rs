//! `oxtune eval`: evaluation tasks. `--task perplexity` scores each row of
//! a text dataset by the mean negative log-likelihood of its tokens.

use std::io::Write;
use std::path::PathBuf;

use anyhow::{bail, Context};
use serde_json::{json, Value};

use super::model_args::ModelArgs;
use super::GlobalArgs;
use oxtune_data::read_records;
use oxtune_engine::eval::mean_nll;

/// The evaluation tasks.
#[derive(Copy, Clone, Debug, clap::ValueEnum)]
pub enum Task {
    /// Mean negative log-likelihood and perplexity per row of `{"text"}` or `{"input_ids"}` rows.
    Perplexity,
}

/// Arguments of `oxtune eval`.
#[derive(Debug, clap::Args)]
pub struct EvalArgs {
    /// What to evaluate.
    #[arg(long, value_enum)]
    pub task: Task,
    #[command(flatten)]
    pub model: ModelArgs,
    /// A JSONL or JSON-array dataset.
    #[arg(long, value_name = "FILE")]
    pub dataset: PathBuf,
    /// Where the per-row results go (JSONL); stdout when absent.
    #[arg(long, value_name = "FILE")]
    pub output: Option<PathBuf>,
}

/// Runs `oxtune eval`.
pub fn run(global: &GlobalArgs, args: &EvalArgs) -> anyhow::Result<()> {
    match args.task {
        Task::Perplexity => perplexity(global, args),
    }
}

fn perplexity(global: &GlobalArgs, args: &EvalArgs) -> anyhow::Result<()> {
    let registry = global.registry()?;
    let text = args.model.load(&registry)?;
    let records = read_records(&args.dataset)?;
    let mut out: Box<dyn Write> = match &args.output {
        Some(path) => Box::new(std::io::BufWriter::new(
            std::fs::File::create(path).with_context(|| format!("creating {}", path.display()))?,
        )),
        None => Box::new(std::io::stdout().lock()),
    };
    let (mut total_nll, mut total_predicted) = (0.0f64, 0usize);
    for (row, record) in records.iter().enumerate() {
        let at = || format!("{}:{}", args.dataset.display(), record.line);
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
