//! What a training run needs around the loop: whether its output folder
//! holds an earlier run of the same arguments to resume (and which
//! checkpoint), the `args.json` it records, whether preference training
//! needs a frozen copy of the model as its reference, and greedy answers to
//! sample prompts before and after training.

use std::path::{Path, PathBuf};

use oxtune_data::{ChatRequest, TextAssets};
use oxtune_engine::generate::{generate, Detokenizer, SamplingParams};
use oxtune_engine::model::checkpoint::{read_json, CheckpointError};
use oxtune_engine::{LoadedModel, ModelError};
use serde_json::{json, Value};

use crate::checkpoints;

/// An error settling where a run starts.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// The output folder holds a run with other arguments.
    #[error("{dir} holds another run ({what}); choose another --output-dir, or --resume-from one of its checkpoints")]
    OtherRun {
        /// The output folder.
        dir: PathBuf,
        /// How it differs.
        what: String,
    },
    /// A checkpoint to resume was saved by a run with another identity.
    #[error("{dir} was saved by another run ({saved}); this run is {this}")]
    OtherIdentity {
        /// The checkpoint.
        dir: PathBuf,
        /// The identity it records.
        saved: Value,
        /// This run's identity.
        this: Value,
    },
    /// A file of the run could not be read or written.
    #[error("{path}")]
    Io {
        /// The file or folder.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// A JSON file of the run (`args.json`, `trainer_state.json`) cannot be read or parsed.
    #[error(transparent)]
    Checkpoint(#[from] CheckpointError),
    /// Rendering or tokenizing a sample prompt failed.
    #[error(transparent)]
    Text(#[from] oxtune_data::text::TextError),
    /// Generating a sample answer failed.
    #[error(transparent)]
    Model(#[from] Box<ModelError>),
}

/// The checkpoint a run continues from: `resume_from` if given, else the
/// latest checkpoint of an earlier run in `output_dir` whose `args.json`
/// equals `recorded`. A folder holding any other run is an error naming
/// the arguments that differ; one whose run never took a step (it was
/// refused before training, or stopped while loading) holds nothing to
/// keep, and is taken over.
pub fn resume_point(
    output_dir: &Path,
    resume_from: Option<&Path>,
    recorded: &Value,
) -> Result<Option<PathBuf>, RunError> {
    if let Some(dir) = resume_from {
        return Ok(Some(dir.to_owned()));
    }
    let args_path = output_dir.join("args.json");
    if !args_path.exists() {
        if output_dir.join("metrics.jsonl").exists() {
            return Err(RunError::OtherRun { dir: output_dir.to_owned(), what: "metrics.jsonl".into() });
        }
        return Ok(None);
    }
    let earlier = read_json(&args_path)?;
    let took_a_step = output_dir.join("metrics.jsonl").exists() || checkpoints::latest(output_dir).is_some();
    if &earlier != recorded && took_a_step {
        let differing: Vec<&str> = recorded
            .as_object()
            .map(|o| o.iter().filter(|(k, v)| earlier.get(k.as_str()) != Some(*v)).map(|(k, _)| k.as_str()).collect())
            .unwrap_or_default();
        let what = format!("its args.json differs in: {}", differing.join(", "));
        return Err(RunError::OtherRun { dir: output_dir.to_owned(), what });
    }
    Ok(checkpoints::latest(output_dir))
}

/// Fails unless checkpoint `dir` was saved by a run of `identity`.
pub fn check_identity(dir: &Path, identity: &Value) -> Result<(), RunError> {
    let path = dir.join("trainer_state.json");
    if !path.is_file() {
        let source = std::io::Error::new(std::io::ErrorKind::NotFound, "not a resumable checkpoint");
        return Err(RunError::Io { path: dir.to_owned(), source });
    }
    let saved = read_json(&path)?["identity"].clone();
    if &saved != identity {
        return Err(RunError::OtherIdentity { dir: dir.to_owned(), saved, this: identity.clone() });
    }
    Ok(())
}

/// Writes the run's `args.json` into `output_dir` (created if needed),
/// through a temporary file renamed into place.
pub fn write_args(output_dir: &Path, recorded: &Value) -> Result<(), RunError> {
    let io = |path: &Path| {
        let path = path.to_owned();
        move |source| RunError::Io { path, source }
    };
    std::fs::create_dir_all(output_dir).map_err(io(output_dir))?;
    let path = output_dir.join("args.json");
    let partial = output_dir.join(".args.json.partial");
    let text = serde_json::to_string_pretty(recorded).expect("JSON values serialise");
    std::fs::write(&partial, text).map_err(io(&partial))?;
    std::fs::rename(&partial, &path).map_err(io(&path))
}

/// Whether preference training needs a frozen copy of the model as its
/// reference: when the attached tuner trains base parameters in place
/// (full, freeze, or any plugin tuner that says so), switching the adapter
/// off would give the model being trained; when an existing adapter is
/// continued, switching it off would give the base, not the starting point.
pub fn needs_frozen_reference(model: &LoadedModel, continues_an_adapter: bool) -> bool {
    model.trains_base() || continues_an_adapter
}

/// Greedy answers (48 tokens at most) to `prompts`, each a user turn
/// rendered with the chat template when `templated` (and the model has
/// one), else plain text.
pub fn sample_answers(
    model: &LoadedModel,
    assets: &TextAssets,
    prompts: &[String],
    templated: bool,
) -> Result<Vec<String>, RunError> {
    if prompts.is_empty() {
        return Ok(Vec::new());
    }
    let tokenizer = &assets.tokenizer;
    let mut encoded = Vec::new();
    for prompt in prompts {
        let ids = match &assets.template {
            Some(_) if templated => {
                let messages = [json!({"role": "user", "content": prompt})];
                let request = ChatRequest { messages: &messages, add_generation_prompt: true, ..Default::default() };
                tokenizer.encode(&assets.render_chat(&request)?, false)?
            }
            _ => tokenizer.encode(prompt, true)?,
        };
        encoded.push(ids);
    }
    let params =
        SamplingParams { max_new_tokens: 48, eos_token_ids: assets.eos_token_ids.clone(), ..Default::default() };
    let out = generate(model, Some(tokenizer as &dyn Detokenizer), &encoded, &params, |_, _| {}).map_err(Box::new)?;
    Ok(out.into_iter().map(|g| g.text.trim().to_owned()).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_output_folder_resumes_only_the_same_run() {
        let dir = std::env::temp_dir().join(format!("oxtune-run-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let recorded = json!({"model": "m", "learning_rate": 1e-4});
        assert!(resume_point(&dir, None, &recorded).unwrap().is_none());
        write_args(&dir, &recorded).unwrap();
        std::fs::create_dir_all(dir.join("checkpoint-2")).unwrap();
        std::fs::create_dir_all(dir.join("checkpoint-10")).unwrap();
        assert_eq!(resume_point(&dir, None, &recorded).unwrap(), Some(dir.join("checkpoint-10")));
        let other = json!({"model": "m", "learning_rate": 2e-4});
        let err = resume_point(&dir, None, &other).unwrap_err().to_string();
        assert!(err.contains("differs in: learning_rate"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
