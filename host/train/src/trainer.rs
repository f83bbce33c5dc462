//! The training loop every trainer shares: seeded data order, padded
//! batches, gradient accumulation, global-norm clipping, AdamW with a
//! warm-up schedule, a metrics stream, and checkpoints written atomically.
//!
//! It trains the model's trainable parameters (an adapter's, or base
//! parameters for full fine-tuning and freeze) on encoded rows with the
//! causal-LM loss, evaluates held-out rows every few steps, and keeps the
//! newest checkpoints.

use crate::checkpoints;
use crate::objective::{Objective, SftObjective};

use std::borrow::Cow;
use std::io::Write;
use std::path::PathBuf;
use std::time::Instant;

use candle_core::{DType, Tensor, Var};
use serde_json::json;

use crate::optim::{global_norm, AdamW, AdamWConfig, Schedule};
use oxtune_data::text::EncodedRow;
use oxtune_data::Items;
use oxtune_engine::model::{LoadedModel, ModelError};

/// How to train.
#[derive(Clone, Debug)]
pub struct TrainConfig {
    /// Peak learning rate.
    pub learning_rate: f64,
    /// Passes over the data (when `max_steps` is not set).
    pub epochs: usize,
    /// Optimizer steps to take, overriding `epochs`.
    pub max_steps: Option<usize>,
    /// Rows per micro-batch.
    pub batch_size: usize,
    /// Micro-batches per optimizer step.
    pub gradient_accumulation_steps: usize,
    /// Clip the global gradient norm to this (0: no clipping).
    pub max_grad_norm: f64,
    /// Share of the steps spent warming up.
    pub warmup_ratio: f64,
    /// The learning-rate schedule after warm-up.
    pub schedule: Schedule,
    /// AdamW's settings.
    pub adamw: AdamWConfig,
    /// Seed of the data order.
    pub seed: u64,
    /// Save a checkpoint every this many steps (and at the end).
    pub save_steps: Option<usize>,
    /// Where checkpoints and `metrics.jsonl` go.
    pub output_dir: Option<PathBuf>,
    /// A checkpoint to continue from: its optimizer state and position in
    /// the data (its adapter must already be attached, trainable).
    pub resume_from: Option<PathBuf>,
    /// Evaluate the held-out rows every this many steps (and at the end).
    pub eval_steps: Option<usize>,
    /// Keep only the newest this many checkpoints.
    pub save_total_limit: Option<usize>,
    /// What a resumed run must match (model, tuner...), saved with each
    /// checkpoint and compared on resume.
    pub identity: serde_json::Value,
    /// Largest weight shard of a whole-model checkpoint, in bytes.
    pub max_shard_bytes: usize,
    /// Show a progress bar (on a terminal).
    pub progress: bool,
    /// Weight of the model's router load-balancing loss (its auxiliary
    /// output `aux_loss`) added to the loss, as transformers and ms-swift
    /// do with `router_aux_loss_coef`; 0 leaves it out. A model that
    /// reports none is refused when this is positive.
    pub router_aux_loss_coef: f64,
}

impl Default for TrainConfig {
    fn default() -> Self {
        TrainConfig {
            learning_rate: 1e-4,
            epochs: 1,
            max_steps: None,
            batch_size: 1,
            gradient_accumulation_steps: 1,
            max_grad_norm: 1.0,
            warmup_ratio: 0.0,
            schedule: Schedule::Cosine,
            adamw: AdamWConfig::default(),
            seed: 42,
            save_steps: None,
            output_dir: None,
            resume_from: None,
            eval_steps: None,
            save_total_limit: None,
            identity: serde_json::Value::Null,
            max_shard_bytes: oxtune_engine::model::export::DEFAULT_MAX_SHARD_BYTES,
            progress: false,
            router_aux_loss_coef: 0.0,
        }
    }
}

/// An error during training.
#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    /// The model failed (forward, adapter saving).
    #[error(transparent)]
    Model(#[from] Box<ModelError>),
    /// A tensor computation failed.
    #[error("training step {step}")]
    Compute {
        /// The optimizer step.
        step: usize,
        /// candle's error.
        source: candle_core::Error,
    },
    /// The loss or the gradient stopped being finite.
    #[error("the {what} is {value} at step {step}; the run stopped; the last good checkpoint is {last_checkpoint}")]
    NonFinite {
        /// What went bad: "loss" or "gradient norm".
        what: &'static str,
        /// Its value.
        value: f64,
        /// The optimizer step.
        step: usize,
        /// The last checkpoint written, or "none".
        last_checkpoint: String,
    },
    /// A row's data could not be read for its batch (a media file changed or vanished).
    #[error("training step {step}: {message}")]
    Data {
        /// The optimizer step.
        step: usize,
        /// What went wrong.
        message: String,
    },
    /// Nothing to train on, or a checkpoint that cannot be resumed.
    #[error("{0}")]
    Setup(String),
    /// Writing metrics failed.
    #[error("writing {path}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
}

/// What one optimizer step reported.
#[derive(Clone, Debug, serde::Serialize)]
pub struct StepMetrics {
    /// The step (1-based).
    pub step: usize,
    /// The steps the run will take in all.
    pub total_steps: usize,
    /// The step's loss: its micro-batches' losses weighted by their share of
    /// the step's trained tokens (rows, for row-level objectives).
    pub loss: f64,
    /// The learning rate used.
    pub lr: f64,
    /// The global gradient norm before clipping.
    pub grad_norm: f64,
    /// Tokens (padding excluded) per second in this step.
    pub tokens_per_s: f64,
    /// Wall-clock seconds of this step (rollouts included, for GRPO;
    /// evaluation excluded).
    pub seconds: f64,
    /// Fractional epoch reached.
    pub epoch: f64,
    /// Peak resident memory of the process so far, in MiB (Linux).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub memory_mib: Option<f64>,
    /// Mean loss over the held-out rows, on evaluation steps.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub eval_loss: Option<f64>,
    /// What the objective logs besides the loss (`rewards/chosen`, ...),
    /// averaged over the step's micro-batches.
    #[serde(flatten)]
    pub extra: std::collections::BTreeMap<String, f64>,
}

/// Where a run is in its data and schedule: saved with each checkpoint
/// (`trainer_state.json`) so a resumed run continues exactly.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct TrainerState {
    /// Optimizer steps taken.
    pub step: usize,
    /// Epochs whose order has been drawn.
    pub epoch: u64,
    /// Next row of the current epoch's order.
    pub cursor: usize,
    /// The run's total steps (the schedule depends on it).
    pub total_steps: usize,
    /// Rows trained on (a resume must see the same data).
    pub rows: usize,
    /// The run's identity (model, tuner...): a resume must match it.
    #[serde(default)]
    pub identity: serde_json::Value,
}

const STATE_FILE: &str = "trainer_state.json";
const OPTIMIZER_FILE: &str = "optimizer.safetensors";

fn setup(message: String) -> TrainError {
    TrainError::Setup(message)
}

/// Reads a checkpoint's position and optimizer state.
fn read_checkpoint(
    dir: &std::path::Path,
) -> Result<(TrainerState, std::collections::HashMap<String, Tensor>), TrainError> {
    let state_path = dir.join(STATE_FILE);
    let text = std::fs::read_to_string(&state_path)
        .map_err(|e| setup(format!("{} is not a resumable checkpoint: {e}", state_path.display())))?;
    let state: TrainerState =
        serde_json::from_str(&text).map_err(|e| setup(format!("{}: {e}", state_path.display())))?;
    let optimizer = candle_core::safetensors::load(dir.join(OPTIMIZER_FILE), &candle_core::Device::Cpu)
        .map_err(|e| setup(format!("{}: {e}", dir.join(OPTIMIZER_FILE).display())))?;
    Ok((state, optimizer))
}

/// Keeps the lines of `metrics.jsonl` up to `step`: a resumed run rewrites
/// the steps after its checkpoint.
fn truncate_metrics(path: &std::path::Path, step: usize) -> std::io::Result<()> {
    let Ok(text) = std::fs::read_to_string(path) else { return Ok(()) };
    let kept: String = text
        .lines()
        .filter(|line| {
            serde_json::from_str::<serde_json::Value>(line)
                .ok()
                .and_then(|v| v["step"].as_u64())
                .is_some_and(|s| s as usize <= step)
        })
        .map(|line| format!("{line}\n"))
        .collect();
    std::fs::write(path, kept)
}

/// The auxiliary output a mixture of experts reports its router
/// load-balancing loss as.
pub const ROUTER_AUX_LOSS: &str = "aux_loss";

/// `loss + coef · aux_loss` (transformers' `loss_with_aux`); `loss` itself
/// when `coef` is 0. A positive `coef` for a model without the aux loss is
/// an error naming the flag.
fn with_router_aux_loss(
    loss: candle_core::Tensor,
    aux: &oxtune_engine::backend::AuxOutputs,
    coef: f64,
    model: &LoadedModel,
    step: usize,
) -> Result<candle_core::Tensor, TrainError> {
    if coef == 0.0 {
        return Ok(loss);
    }
    let Some(aux_loss) = router_aux_loss(aux, model)? else {
        return Err(TrainError::Setup(format!(
            "--router-aux-loss-coef {coef}: the `{}` model reports no router aux loss (it is not a mixture of experts)",
            model.architecture()
        )));
    };
    (aux_loss.reshape(()).and_then(|a| a.to_dtype(loss.dtype())).and_then(|a| a * coef).and_then(|a| loss + a))
        .map_err(|cause| TrainError::Compute { step, source: cause })
}

/// The model's router aux loss, if it reported one; an error naming the
/// architecture when it is not a scalar.
fn router_aux_loss<'a>(
    aux: &'a oxtune_engine::backend::AuxOutputs,
    model: &LoadedModel,
) -> Result<Option<&'a candle_core::Tensor>, TrainError> {
    match aux.get(ROUTER_AUX_LOSS) {
        Some(t) if t.elem_count() != 1 => Err(TrainError::Setup(format!(
            "the `{}` model reports `{ROUTER_AUX_LOSS}` of shape {:?}; a router aux loss is a scalar",
            model.architecture(),
            t.dims()
        ))),
        found => Ok(found),
    }
}

/// Mean loss of `objective` over `items`, in batches of `batch_size`,
/// weighted as the objective weighs its batches (no parameter is updated).
fn evaluate<O: Objective, I: Items<O::Item> + ?Sized>(
    model: &LoadedModel,
    objective: &O,
    items: &I,
    indices: &[usize],
    batch_size: usize,
) -> Result<f64, TrainError>
where
    O::Item: Clone,
{
    let (mut weighted, mut total) = (0.0f64, 0.0f64);
    for batch in indices.chunks(batch_size.max(1)) {
        let batch = fetch(items, batch, 0)?;
        let out = objective.loss(model, &batch.iter().map(Cow::as_ref).collect::<Vec<_>>(), None, 0)?;
        let value = out.loss.to_scalar::<f32>().map_err(|cause| TrainError::Compute { step: 0, source: cause })?;
        weighted += value as f64 * out.weight;
        total += out.weight;
    }
    Ok(if total == 0.0 { f64::NAN } else { weighted / total })
}

/// A seeded Fisher–Yates shuffle of `0..n`.
fn shuffled(n: usize, seed: u64) -> Vec<usize> {
    let mut order: Vec<usize> = (0..n).collect();
    let mut state = seed ^ 0xD1B5_4A32_D192_ED03;
    for i in (1..n).rev() {
        state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        let j = ((state >> 33) % (i as u64 + 1)) as usize;
        order.swap(i, j);
    }
    order
}

/// Writes checkpoint `step`: the adapter in its tuner's layout, or the
/// whole model when the tuner trains base parameters; with the trainer's
/// position and the optimizer's moments beside it.
fn save_checkpoint(
    model: &LoadedModel,
    dir: &std::path::Path,
    state: &TrainerState,
    optimizer: &AdamW,
    max_shard_bytes: usize,
) -> Result<(), TrainError> {
    let optimizer_state: std::collections::HashMap<String, Tensor> = optimizer.state().into_iter().collect();
    let extra = |staging: &std::path::Path| {
        let state_text = serde_json::to_string_pretty(state).expect("plain data serialises");
        std::fs::write(staging.join(STATE_FILE), state_text)?;
        candle_core::safetensors::save(&optimizer_state, staging.join(OPTIMIZER_FILE)).map_err(std::io::Error::other)
    };
    let saved = if model.trains_base() {
        model.save_pretrained_with(dir, max_shard_bytes, extra)
    } else {
        model.save_adapter_with(dir, extra)
    };
    saved.map_err(|e| TrainError::Model(Box::new(e)))
}

/// Opens `metrics.jsonl` in `dir` for appending (after dropping the lines
/// past `resumed_step`, which a resumed run writes again).
fn open_metrics(dir: &std::path::Path, resumed_step: usize) -> Result<(std::fs::File, PathBuf), TrainError> {
    let path = dir.join("metrics.jsonl");
    let io = |cause| TrainError::Io { path: path.clone(), source: cause };
    std::fs::create_dir_all(dir).map_err(io)?;
    truncate_metrics(&path, resumed_step).map_err(io)?;
    let file = std::fs::OpenOptions::new().create(true).append(true).open(&path).map_err(io)?;
    Ok((file, path))
}

/// A progress bar on stderr, when it is a terminal and one is asked for.
fn progress_bar(show: bool, total: usize, done: usize) -> Option<indicatif::ProgressBar> {
    use std::io::IsTerminal;
    if !show || !std::io::stderr().is_terminal() {
        return None;
    }
    let bar = indicatif::ProgressBar::new(total as u64);
    let style = indicatif::ProgressStyle::with_template("{bar:30} {pos}/{len} steps [{elapsed} < {eta}] {msg}")
        .expect("the template is valid");
    bar.set_style(style);
    bar.set_position(done as u64);
    Some(bar)
}

/// Trains `model`'s trainable parameters on `rows` with the causal-LM loss
/// (SFT and pretraining), evaluating on `eval_rows` every `eval_steps`;
/// returns each step's metrics.
pub fn train(
    model: &LoadedModel,
    rows: &[EncodedRow],
    eval_rows: &[EncodedRow],
    config: &TrainConfig,
) -> Result<Vec<StepMetrics>, TrainError> {
    train_with(model, &SftObjective, rows, eval_rows, config)
}

/// Trains `model`'s trainable parameters on `items` with `objective`'s
/// loss (SFT, a preference loss, ...), evaluating on `eval_items` every
/// `eval_steps`; returns each step's metrics.
pub fn train_with<O: Objective>(
    model: &LoadedModel,
    objective: &O,
    items: &[O::Item],
    eval_items: &[O::Item],
    config: &TrainConfig,
) -> Result<Vec<StepMetrics>, TrainError>
where
    O::Item: Clone + Sync,
{
    train_items(model, objective, items, eval_items, config)
}

/// Items `indices` of `items`, read for a micro-batch of `step`.
fn fetch<'a, T: Clone, I: Items<T> + ?Sized>(
    items: &'a I,
    indices: &[usize],
    step: usize,
) -> Result<Vec<Cow<'a, T>>, TrainError> {
    indices.iter().map(|&i| items.get(i).map_err(|message| TrainError::Data { step, message })).collect()
}

/// Indices of the items `objective` can train on, and the most tokens one
/// of them puts through the forward pass ([`Objective::forward_tokens`]).
fn trainable_indices<O: Objective, I: Items<O::Item> + ?Sized>(
    objective: &O,
    items: &I,
) -> Result<(Vec<usize>, usize), TrainError>
where
    O::Item: Clone,
{
    let (mut out, mut longest) = (Vec::new(), 0);
    for i in 0..items.len() {
        let item = items.get(i).map_err(|message| TrainError::Data { step: 0, message })?;
        if objective.trainable(&item) {
            out.push(i);
            longest = longest.max(objective.forward_tokens(&item));
        }
    }
    Ok((out, longest))
}

/// Refuses, before the first step, a micro-batch whose activations cannot
/// fit in the memory this process has left ([`oxtune_engine::memory::budget`]):
/// `micro` items of up to `longest` forward tokens each, at the model's
/// lower-bound cost per token. Only on the CPU, whose memory is the
/// process's; a device's is not read.
fn check_activation_memory(model: &LoadedModel, micro: usize, longest: usize) -> Result<(), TrainError> {
    if !model.device().is_cpu() || longest == 0 {
        return Ok(());
    }
    let (Some(per_token), Some(budget)) = (model.activation_bytes_per_token(), oxtune_engine::memory::budget()) else {
        return Ok(());
    };
    let need = per_token.saturating_mul((micro * longest) as u64);
    if need <= budget.bytes {
        return Ok(());
    }
    let gb = |bytes: u64| bytes as f64 / 1e9;
    let checkpointing = match model.gradient_checkpointing() {
        true => "",
        false => ", or set --gradient-checkpointing true",
    };
    Err(TrainError::Setup(format!(
        "--per-device-train-batch-size {micro} with rows of up to {longest} tokens needs at least {:.1} GB for \
         activations, and {:.1} GB is left under {}: lower --per-device-train-batch-size or --max-length{checkpointing}",
        gb(need),
        gb(budget.bytes),
        budget.limit
    )))
}

/// [`train_with`] over items read by index ([`Items`]): in memory, or a
/// streamed dataset on disk read a micro-batch at a time.
pub fn train_items<O: Objective, I: Items<O::Item> + ?Sized>(
    model: &LoadedModel,
    objective: &O,
    items: &I,
    eval_items: &I,
    config: &TrainConfig,
) -> Result<Vec<StepMetrics>, TrainError>
where
    O::Item: Clone,
{
    let names: Vec<String> =
        model.weights().names().iter().filter(|n| model.weights().var(n).is_some()).map(|n| n.to_string()).collect();
    if names.is_empty() {
        return Err(TrainError::Setup(
            "the model has no trainable parameters (attach an adapter, or load them trainable)".into(),
        ));
    }
    let (rows, longest) = trainable_indices(objective, items)?;
    if rows.is_empty() {
        return Err(TrainError::Setup("no row has a token to train on".into()));
    }
    let (eval_rows, _) = trainable_indices(objective, eval_items)?;
    let vars: Vec<Var> = names.iter().map(|n| model.weights().var(n).expect("filtered above").clone()).collect();
    let micro = config.batch_size.max(1);
    check_activation_memory(model, micro, longest)?;
    let accum = config.gradient_accumulation_steps.max(1);
    let steps_per_epoch = rows.len().div_ceil(micro * accum);
    let total = config.max_steps.unwrap_or(steps_per_epoch * config.epochs.max(1));
    let warmup = (config.warmup_ratio * total as f64).ceil() as usize;
    let named: Vec<(String, Var)> = names.iter().cloned().zip(vars.iter().cloned()).collect();
    let mut optimizer =
        AdamW::new(named, config.adamw.clone()).map_err(|cause| TrainError::Compute { step: 0, source: cause })?;
    let mut last_checkpoint = "none".to_owned();
    let mut out = Vec::with_capacity(total);
    let mut order: Vec<usize> = Vec::new();
    let mut cursor = 0;
    let mut epoch = 0u64;
    let mut first_step = 1;
    if let Some(dir) = &config.resume_from {
        let (state, optimizer_state) = read_checkpoint(dir)?;
        if state.identity != config.identity {
            return Err(setup(format!(
                "{} belongs to another run ({}); this run is {}",
                dir.display(),
                state.identity,
                config.identity
            )));
        }
        if state.total_steps != total || state.rows != rows.len() {
            return Err(setup(format!(
                "{} was a run of {} steps over {} rows; this one is {total} steps over {} rows",
                dir.display(),
                state.total_steps,
                state.rows,
                rows.len()
            )));
        }
        optimizer.restore(state.step, &optimizer_state).map_err(|e| setup(format!("{}: {e}", dir.display())))?;
        if state.epoch > 0 {
            order = shuffled(rows.len(), config.seed.wrapping_add(state.epoch - 1));
        }
        (epoch, cursor, first_step) = (state.epoch, state.cursor, state.step + 1);
        last_checkpoint = dir.display().to_string();
    }
    let mut metrics_file = match &config.output_dir {
        Some(dir) => Some(open_metrics(dir, first_step - 1)?),
        None => None,
    };
    let bar = progress_bar(config.progress, total, first_step - 1);
    for step in first_step..=total {
        let compute = |cause| TrainError::Compute { step, source: cause };
        let started = Instant::now();
        let mut summed: Vec<Option<Tensor>> = vec![None; vars.len()];
        let (mut loss_sum, mut tokens) = (0.0f64, 0usize);
        let mut extra = std::collections::BTreeMap::new();
        if cursor >= order.len() {
            order = shuffled(rows.len(), config.seed.wrapping_add(epoch));
            epoch += 1;
            cursor = 0;
        }
        // A step never crosses an epoch's end: the last one of an epoch takes
        // the micro-batches left, the last of them possibly partial, so every
        // row is trained once per epoch.
        let micro_batches = accum.min((order.len() - cursor).div_ceil(micro));
        let batches: Vec<Vec<Cow<O::Item>>> = (0..micro_batches)
            .map(|m| {
                let start = cursor + m * micro;
                let picked: Vec<usize> =
                    order[start..(start + micro).min(order.len())].iter().map(|&i| rows[i]).collect();
                fetch(items, &picked, step)
            })
            .collect::<Result<_, _>>()?;
        cursor = (cursor + micro_batches * micro).min(order.len());
        // Each micro-batch's loss counts by its share of the step's weight
        // (trained tokens for token-level losses).
        let weights: Vec<f64> = batches.iter().map(|b| b.iter().map(|i| objective.weight(i)).sum()).collect();
        let total_weight: f64 = weights.iter().sum();
        for (micro_index, batch) in batches.iter().enumerate() {
            let share =
                if total_weight > 0.0 { weights[micro_index] / total_weight } else { 1.0 / micro_batches as f64 };
            // Dropout masks depend on the seed, the step and the micro-batch
            // only, so a resumed run draws the same ones.
            let dropout_seed = config.seed ^ ((step as u64) << 20) ^ micro_index as u64;
            let batch: Vec<&O::Item> = batch.iter().map(Cow::as_ref).collect();
            let out = objective.loss(model, &batch, Some(dropout_seed), step)?;
            tokens += out.tokens;
            for (key, value) in out.logged {
                *extra.entry(key).or_insert(0.0) += value * share;
            }
            let loss = with_router_aux_loss(out.loss, &out.aux, config.router_aux_loss_coef, model, step)?;
            if let Some(aux) = router_aux_loss(&out.aux, model)? {
                let value = aux.flatten_all().and_then(|a| a.to_vec1::<f32>()).map_err(compute)?[0];
                *extra.entry(ROUTER_AUX_LOSS.into()).or_insert(0.0) += value as f64 * share;
            }
            let value = loss.to_scalar::<f32>().map_err(compute)?;
            if !value.is_finite() {
                return Err(TrainError::NonFinite { what: "loss", value: value as f64, step, last_checkpoint });
            }
            loss_sum += value as f64 * share;
            let mut grads = (loss * share).and_then(|l| l.backward()).map_err(compute)?;
            model.merge_block_gradients(&mut grads).map_err(compute)?;
            for (slot, var) in summed.iter_mut().zip(&vars) {
                if let Some(g) = grads.get(var.as_tensor()) {
                    // Gradients of bf16/f16 parameters are summed (and
                    // clipped) in f32, as their master copies are updated.
                    let g = match g.dtype() {
                        DType::BF16 | DType::F16 => g.to_dtype(DType::F32).map_err(compute)?,
                        _ => g.clone(),
                    };
                    *slot = Some(match slot.take() {
                        Some(acc) => (acc + g).map_err(compute)?,
                        None => g,
                    });
                }
            }
        }
        let grad_norm = global_norm(&summed).map_err(compute)?;
        if !grad_norm.is_finite() {
            return Err(TrainError::NonFinite { what: "gradient norm", value: grad_norm, step, last_checkpoint });
        }
        if config.max_grad_norm > 0.0 && grad_norm > config.max_grad_norm {
            let factor = config.max_grad_norm / (grad_norm + 1e-6);
            for g in summed.iter_mut().flatten() {
                *g = (&*g * factor).map_err(compute)?;
            }
        }
        let lr = config.schedule.lr(config.learning_rate, step - 1, warmup, total);
        optimizer.step(&summed, lr).map_err(compute)?;
        let train_seconds = started.elapsed().as_secs_f64();
        let evaluate_now =
            !eval_rows.is_empty() && (config.eval_steps.is_some_and(|n| n > 0 && step % n == 0) || step == total);
        let eval_loss =
            if evaluate_now { Some(evaluate(model, objective, eval_items, &eval_rows, micro)?) } else { None };
        let m = StepMetrics {
            step,
            total_steps: total,
            loss: loss_sum,
            lr,
            grad_norm,
            tokens_per_s: tokens as f64 / train_seconds,
            seconds: train_seconds,
            epoch: (epoch - 1) as f64 + cursor as f64 / rows.len() as f64,
            memory_mib: oxtune_engine::memory::peak_resident_bytes().map(|b| b as f64 / (1u64 << 20) as f64),
            eval_loss,
            extra,
        };
        if let Some((file, path)) = metrics_file.as_mut() {
            writeln!(file, "{}", json!(m)).map_err(|cause| TrainError::Io { path: path.clone(), source: cause })?;
        }
        if let Some(bar) = &bar {
            let eval = m.eval_loss.map(|l| format!(" eval {l:.4}")).unwrap_or_default();
            bar.set_message(format!("loss {:.4}{eval} lr {:.2e} {:.0} tok/s", m.loss, m.lr, m.tokens_per_s));
            bar.set_position(step as u64);
        }
        out.push(m);
        let save_now = config.save_steps.is_some_and(|n| n > 0 && step % n == 0) || step == total;
        if let (Some(dir), true) = (&config.output_dir, save_now) {
            let checkpoint = dir.join(format!("checkpoint-{step}"));
            let state = TrainerState {
                step,
                epoch,
                cursor,
                total_steps: total,
                rows: rows.len(),
                identity: config.identity.clone(),
            };
            save_checkpoint(model, &checkpoint, &state, &optimizer, config.max_shard_bytes)?;
            last_checkpoint = checkpoint.display().to_string();
            draw_curves(dir);
            if let Some(keep) = config.save_total_limit {
                checkpoints::prune(dir, keep).map_err(|cause| TrainError::Io { path: dir.clone(), source: cause })?;
            }
        }
    }
    if let Some(bar) = bar {
        bar.finish();
    }
    if let Some(dir) = &config.output_dir {
        draw_curves(dir);
    }
    Ok(out)
}

/// Redraws `training_curves.png` from the run's `metrics.jsonl`. A picture
/// that cannot be drawn is reported and never stops training.
fn draw_curves(dir: &std::path::Path) {
    if let Err(e) = oxtune_plot::write_training_curves(dir) {
        tracing::warn!("training curves not drawn: {e}");
    }
}
