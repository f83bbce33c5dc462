//! `oxtune logits`: a model's logits (or each token's log-probability) for
//! given token ids or text, written to a safetensors or JSON file — the
//! one step between a model plugin and a parity check against
//! transformers (`model(input_ids).logits`).

use std::path::PathBuf;

use anyhow::{bail, Context};
use candle_core::{DType, Device, Tensor, D};
use oxtune_engine::backend::BatchInfo;
use serde_json::json;

use super::model_args::ModelArgs;
use super::GlobalArgs;

/// Arguments of `oxtune logits`.
#[derive(Debug, clap::Args)]
pub struct LogitsArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// The input as token ids (`1,2,3`).
    #[arg(long, value_name = "IDS", value_delimiter = ',', required_unless_present = "text", conflicts_with = "text")]
    pub prompt_ids: Vec<u32>,
    /// The input as text, tokenized as it is (special tokens as the tokenizer adds them, no template).
    #[arg(long)]
    pub text: Option<String>,
    /// Write each token's log-probability given the ones before it
    /// (`[seq - 1]`) instead of the logits (`[seq, vocab]`).
    #[arg(long)]
    pub logprobs: bool,
    /// The file: `.safetensors` (tensors `input_ids` and `logits` or
    /// `logprobs`, f32) or `.json`.
    #[arg(long, value_name = "FILE")]
    pub output: PathBuf,
}

/// Runs `oxtune logits`.
pub fn run(global: &GlobalArgs, args: &LogitsArgs) -> anyhow::Result<()> {
    let registry = global.registry()?;
    let text = args.model.load(&registry)?;
    let ids = match &args.text {
        Some(t) => text.assets.tokenizer.encode(t, true)?,
        None => args.prompt_ids.clone(),
    };
    let vocab = text.model.vocab_size().unwrap_or(usize::MAX);
    if ids.is_empty() {
        bail!("no tokens to score");
    }
    if let Some(bad) = ids.iter().find(|&&t| t as usize >= vocab) {
        bail!("--prompt-ids: token id {bad} is outside the model's vocabulary of {vocab}");
    }
    let input = Tensor::new(ids.as_slice(), text.model.device())?.unsqueeze(0)?;
    let logits = text.model.forward(&input, &BatchInfo::default(), None, None)?.squeeze(0)?.to_dtype(DType::F32)?;
    let logits = logits.to_device(&Device::Cpu)?;
    let (name, values) = if args.logprobs {
        if ids.len() < 2 {
            bail!("--logprobs needs at least two tokens (one to predict from)");
        }
        let max = logits.max_keepdim(D::Minus1)?;
        let shifted = logits.broadcast_sub(&max)?;
        let log_probs = shifted.broadcast_sub(&shifted.exp()?.sum_keepdim(D::Minus1)?.log()?)?;
        let next = Tensor::new(&ids[1..], &Device::Cpu)?.unsqueeze(1)?;
        ("logprobs", log_probs.narrow(0, 0, ids.len() - 1)?.gather(&next, 1)?.squeeze(1)?)
    } else {
        ("logits", logits)
    };
    let is_json = args.output.extension().is_some_and(|e| e.eq_ignore_ascii_case("json"));
    let partial = args.output.with_extension("partial");
    if is_json {
        let data = match values.rank() {
            1 => json!(values.to_vec1::<f32>()?),
            _ => json!(values.to_vec2::<f32>()?),
        };
        std::fs::write(&partial, json!({"input_ids": ids, name: data}).to_string())
            .with_context(|| format!("writing {}", args.output.display()))?;
    } else {
        let id_tensor = Tensor::new(ids.iter().map(|&i| i64::from(i)).collect::<Vec<_>>(), &Device::Cpu)?;
        let tensors =
            std::collections::HashMap::from([("input_ids".to_owned(), id_tensor), (name.to_owned(), values.clone())]);
        candle_core::safetensors::save(&tensors, &partial)
            .with_context(|| format!("writing {}", args.output.display()))?;
    }
    std::fs::rename(&partial, &args.output)?;
    println!("wrote {} {:?} for {} tokens to {}", name, values.dims(), ids.len(), args.output.display());
    Ok(())
}
