//! The generation engine shared by `infer`, evaluation, GRPO rollouts and
//! serving: batched, KV-cached decoding with greedy or sampled tokens
//! (temperature, top-k, top-p, min-p, repetition penalty, a seed), end
//! tokens, stop strings, and streaming of text as it is produced.
//!
//! Prompts of different lengths are left-padded into one batch; the
//! padding is masked out of attention and positions count only real
//! tokens, so each row decodes exactly as it would alone.

use candle_core::{DType, Device, Tensor};

use crate::backend::{BatchInfo, OpError};
use crate::media::{batch_inputs, RowMedia};
use crate::model::{LoadedModel, ModelError};
use crate::rng::SplitMix64 as Rng;

mod continuous;
pub use continuous::{ContinuousBatch, RowRequest, StepEvent};

/// Turns generated ids back into text, for streaming and stop strings.
/// `oxtune-data`'s tokenizer implements it; the engine knows no tokenizer.
pub trait Detokenizer {
    /// The text of `ids`, special tokens left out.
    fn detokenize(&self, ids: &[u32]) -> Result<String, String>;
}

/// How tokens are chosen and when generation stops.
#[derive(Clone, Debug)]
pub struct SamplingParams {
    /// Most tokens to generate per row.
    pub max_new_tokens: usize,
    /// 0 means greedy (arg-max); otherwise logits are divided by it.
    pub temperature: f32,
    /// Keep only the `k` most likely tokens (0: off).
    pub top_k: usize,
    /// Keep the smallest set of tokens whose probability reaches `p` (1: off).
    pub top_p: f32,
    /// Drop tokens less likely than `min_p` × the most likely one (0: off).
    pub min_p: f32,
    /// transformers' repetition penalty over prompt and output (1: off).
    pub repetition_penalty: f32,
    /// Seed of the sampler.
    pub seed: u64,
    /// Tokens that end a row.
    pub eos_token_ids: Vec<u32>,
    /// Strings that end a row (not included in its text).
    pub stop: Vec<String>,
}

impl Default for SamplingParams {
    fn default() -> Self {
        SamplingParams {
            max_new_tokens: 256,
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            min_p: 0.0,
            repetition_penalty: 1.0,
            seed: 0,
            eos_token_ids: Vec::new(),
            stop: Vec::new(),
        }
    }
}

/// Why a row stopped.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum FinishReason {
    /// It produced an end token.
    Eos,
    /// It produced a stop string.
    Stop,
    /// It reached `max_new_tokens`.
    Length,
}

impl FinishReason {
    /// The OpenAI-style name (`stop` for both end tokens and stop strings).
    pub fn as_str(self) -> &'static str {
        match self {
            FinishReason::Eos | FinishReason::Stop => "stop",
            FinishReason::Length => "length",
        }
    }
}

/// One row's output.
#[derive(Clone, Debug, PartialEq)]
pub struct Generation {
    /// The generated ids (an end token included, if one ended the row).
    pub tokens: Vec<u32>,
    /// Their text (without special tokens, cut before a stop string);
    /// empty when no tokenizer was given.
    pub text: String,
    /// Why the row stopped.
    pub finish_reason: FinishReason,
}

/// Picks the next token from one row's logits.
fn choose(logits: &mut [f32], history: &[u32], params: &SamplingParams, rng: &mut Rng) -> u32 {
    if params.repetition_penalty != 1.0 {
        let mut seen = history.to_vec();
        seen.sort_unstable();
        seen.dedup();
        for &t in &seen {
            if let Some(l) = logits.get_mut(t as usize) {
                *l = if *l < 0.0 { *l * params.repetition_penalty } else { *l / params.repetition_penalty };
            }
        }
    }
    let argmax = |l: &[f32]| {
        l.iter().enumerate().fold((0usize, f32::NEG_INFINITY), |best, (i, &v)| if v > best.1 { (i, v) } else { best }).0
            as u32
    };
    if params.temperature <= 0.0 {
        return argmax(logits);
    }
    let mut candidates: Vec<(u32, f32)> =
        logits.iter().enumerate().map(|(i, &l)| (i as u32, l / params.temperature)).collect();
    candidates.sort_by(|a, b| b.1.total_cmp(&a.1));
    if params.top_k > 0 {
        candidates.truncate(params.top_k);
    }
    let max = candidates[0].1;
    let mut probs: Vec<f64> = candidates.iter().map(|c| ((c.1 - max) as f64).exp()).collect();
    let total: f64 = probs.iter().sum();
    probs.iter_mut().for_each(|p| *p /= total);
    let mut keep = probs.len();
    if params.top_p < 1.0 {
        let mut cumulative = 0.0;
        for (i, p) in probs.iter().enumerate() {
            cumulative += p;
            if cumulative >= params.top_p as f64 {
                keep = i + 1;
                break;
            }
        }
    }
    if params.min_p > 0.0 {
        let floor = probs[0] * params.min_p as f64;
        keep = keep.min(probs.iter().take_while(|&&p| p >= floor).count().max(1));
    }
    let kept_total: f64 = probs[..keep].iter().sum();
    let mut r = rng.uniform() * kept_total;
    for (i, p) in probs[..keep].iter().enumerate() {
        r -= p;
        if r <= 0.0 {
            return candidates[i].0;
        }
    }
    candidates[keep - 1].0
}

/// A row's text so far: decoded in full each step, with a trailing
/// incomplete UTF-8 sequence held back until its bytes arrive.
#[derive(Default)]
struct RowText {
    emitted: usize,
    text: String,
}

/// One row's decoding: its sampler, the tokens it saw and made, its text,
/// and whether it has finished.
struct RowState {
    rng: Rng,
    history: Vec<u32>,
    outputs: Vec<u32>,
    finished: Option<FinishReason>,
    text: RowText,
}

impl RowState {
    fn new(prompt: &[u32], seed: u64) -> RowState {
        RowState {
            rng: Rng::new(seed),
            history: prompt.to_vec(),
            outputs: Vec::new(),
            finished: None,
            text: RowText::default(),
        }
    }

    /// Chooses the next token from `logits` and records it; returns the
    /// token and the text it settled (empty when none yet: an incomplete
    /// character, or what may be the start of a stop string).
    fn advance(
        &mut self,
        logits: &mut [f32],
        params: &SamplingParams,
        tokenizer: Option<&dyn Detokenizer>,
    ) -> Result<(u32, String), ModelError> {
        let token = choose(logits, &self.history, params, &mut self.rng);
        self.history.push(token);
        self.outputs.push(token);
        if params.eos_token_ids.contains(&token) {
            self.finished = Some(FinishReason::Eos);
        }
        let Some(tok) = tokenizer else { return Ok((token, String::new())) };
        let decoded = tok.detokenize(&self.outputs).map_err(|message| ModelError::Forward {
            model: "generation".into(),
            source: OpError::Invalid { op: "decode", message },
        })?;
        let row = &mut self.text;
        row.text = decoded;
        if let Some(cut) = params.stop.iter().filter_map(|s| row.text.find(s.as_str())).min() {
            row.text.truncate(cut);
            self.finished = Some(FinishReason::Stop);
        }
        // Hold back an incomplete character (U+FFFD) and a possible
        // stop-string prefix until the next token settles them (there is
        // none after the last token).
        let last = self.finished.is_some() || self.outputs.len() >= params.max_new_tokens;
        let mut ready = if last { row.text.len() } else { row.text.trim_end_matches('\u{FFFD}').len() };
        if !last {
            for s in &params.stop {
                for k in (1..s.len()).rev() {
                    if s.is_char_boundary(k) && row.text[..ready].ends_with(&s[..k]) {
                        ready = ready.min(row.text.len() - k);
                    }
                }
            }
        }
        if ready > row.emitted && row.text.is_char_boundary(ready) && row.text.is_char_boundary(row.emitted) {
            let delta = row.text[row.emitted..ready].to_owned();
            row.emitted = ready;
            return Ok((token, delta));
        }
        Ok((token, String::new()))
    }

    /// Whether the row has produced `max` tokens or finished otherwise.
    fn done(&self, max: usize) -> bool {
        self.finished.is_some() || self.outputs.len() >= max
    }

    fn into_generation(self) -> Generation {
        Generation {
            tokens: self.outputs,
            text: self.text.text,
            finish_reason: self.finished.unwrap_or(FinishReason::Length),
        }
    }
}

/// The seed of row `r` of a batch generated with `seed`.
fn row_seed(seed: u64, r: u64) -> u64 {
    seed.wrapping_add(r.wrapping_mul(0x5851_F42D))
}

fn candle_error(source: candle_core::Error) -> ModelError {
    ModelError::Forward { model: "generation".into(), source: OpError::Candle { op: "generate", source: source } }
}

/// Generates a continuation of each prompt (token ids). `on_text(row,
/// delta)` receives each row's new text as it is produced (needs a
/// tokenizer).
pub fn generate(
    model: &LoadedModel,
    tokenizer: Option<&dyn Detokenizer>,
    prompts: &[Vec<u32>],
    params: &SamplingParams,
    on_text: impl FnMut(usize, &str),
) -> Result<Vec<Generation>, ModelError> {
    let rows: Vec<(&[u32], Option<&RowMedia>)> = prompts.iter().map(|p| (p.as_slice(), None)).collect();
    generate_with_media(model, tokenizer, &rows, params, on_text)
}

/// [`generate`] for prompts that may carry images or videos (ids with
/// their laid-out media, as `oxtune-data` encodes a prompt with media):
/// the media inputs go with the first step, and each row's positions
/// continue after its largest one.
pub fn generate_with_media(
    model: &LoadedModel,
    tokenizer: Option<&dyn Detokenizer>,
    prompt_rows: &[(&[u32], Option<&RowMedia>)],
    params: &SamplingParams,
    on_text: impl FnMut(usize, &str),
) -> Result<Vec<Generation>, ModelError> {
    generate_until(model, tokenizer, prompt_rows, params, on_text, &|| false)
}

/// [`generate_with_media`] that stops early, between two tokens, once
/// `cancelled` says so (a server's client went away): the rows keep what
/// they have, finished for [`FinishReason::Length`].
pub fn generate_until(
    model: &LoadedModel,
    tokenizer: Option<&dyn Detokenizer>,
    prompt_rows: &[(&[u32], Option<&RowMedia>)],
    params: &SamplingParams,
    mut on_text: impl FnMut(usize, &str),
    cancelled: &dyn Fn() -> bool,
) -> Result<Vec<Generation>, ModelError> {
    let prompts: Vec<Vec<u32>> = prompt_rows.iter().map(|(ids, _)| ids.to_vec()).collect();
    let rows = prompts.len();
    if rows == 0 {
        return Ok(Vec::new());
    }
    if prompts.iter().any(|p| p.is_empty()) {
        return Err(ModelError::Forward {
            model: "generation".into(),
            source: OpError::Invalid { op: "generate", message: "an empty prompt".into() },
        });
    }
    let device = model.device().clone();
    let width = prompts.iter().map(Vec::len).max().unwrap_or(0);
    // Left-pad: row r's prompt ends at column `width - 1`.
    let mut mask: Vec<Vec<u32>> =
        prompts.iter().map(|p| [vec![0; width - p.len()], vec![1; p.len()]].concat()).collect();
    let ids: Vec<u32> = prompts.iter().flat_map(|p| [vec![0; width - p.len()], p.clone()].concat()).collect();
    let mut next_position: Vec<u32> = prompt_rows
        .iter()
        .map(|(p, media)| match media {
            Some(m) => m.positions.iter().flatten().max().map_or(0, |&p| p + 1),
            None => p.len() as u32,
        })
        .collect();
    let mut input = Tensor::from_vec(ids, (rows, width), &device).map_err(candle_error)?;
    let axes = model.position_axes();
    let lengths: Vec<(usize, Option<&RowMedia>)> = prompt_rows.iter().map(|(p, m)| (p.len(), *m)).collect();
    let (media_positions, mut media) = batch_inputs(&lengths, width, true, axes, &device).map_err(candle_error)?;
    let mut position_ids = match media_positions {
        Some(p) => p,
        None => {
            let positions: Vec<u32> = prompts
                .iter()
                .flat_map(|p| [vec![0; width - p.len()], (0..p.len() as u32).collect()].concat())
                .collect();
            Tensor::from_vec(positions, (rows, width), &device).map_err(candle_error)?
        }
    };

    let mut cache = model.new_kv_cache();
    let mut states: Vec<RowState> =
        prompts.iter().enumerate().map(|(r, p)| RowState::new(p, row_seed(params.seed, r as u64))).collect();

    for _ in 0..params.max_new_tokens {
        let attention_mask = mask_tensor(&mask, &device)?;
        let batch = BatchInfo {
            position_ids: Some(position_ids.clone()),
            attention_mask: Some(attention_mask),
            // Media enter with the prompt; later steps see only new tokens.
            media: std::mem::take(&mut media),
            ..Default::default()
        };
        let logits = model.forward_last(&input, &batch, Some(&mut cache), None)?;
        let last = logits.squeeze(1).and_then(|l| l.to_dtype(DType::F32)?.to_vec2::<f32>()).map_err(candle_error)?;
        let mut next = vec![0u32; rows];
        for (r, mut row_logits) in last.into_iter().enumerate() {
            let state = &mut states[r];
            if state.finished.is_some() {
                next[r] = params.eos_token_ids.first().copied().unwrap_or(0);
                continue;
            }
            let (token, delta) = state.advance(&mut row_logits, params, tokenizer)?;
            next[r] = token;
            if !delta.is_empty() {
                on_text(r, &delta);
            }
        }
        if states.iter().all(|s| s.finished.is_some()) || cancelled() {
            break;
        }
        for (r, m) in mask.iter_mut().enumerate() {
            m.push(1);
            next_position[r] += 1;
        }
        input = Tensor::from_vec(next, (rows, 1), &device).map_err(candle_error)?;
        let pos: Vec<u32> = next_position.iter().map(|p| p - 1).collect();
        position_ids = Tensor::from_vec(pos, (rows, 1), &device).map_err(candle_error)?;
        if axes > 1 {
            position_ids = position_ids.unsqueeze(0).and_then(|p| p.repeat((axes, 1, 1))).map_err(candle_error)?;
        }
    }
    Ok(states.into_iter().map(RowState::into_generation).collect())
}

fn mask_tensor(mask: &[Vec<u32>], device: &Device) -> Result<Tensor, ModelError> {
    let (rows, cols) = (mask.len(), mask[0].len());
    Tensor::from_vec(mask.concat(), (rows, cols), device).map_err(candle_error)
}

/// Greedy decoding of one prompt (`[1, n]` ids) with no end token: the
/// next `max_new_tokens` arg-max tokens.
pub fn greedy(model: &LoadedModel, prompt: &Tensor, max_new_tokens: usize) -> Result<Vec<u32>, ModelError> {
    let prompt: Vec<u32> =
        prompt.to_dtype(DType::U32).and_then(|p| p.flatten_all()?.to_vec1()).map_err(candle_error)?;
    let params = SamplingParams { max_new_tokens, ..Default::default() };
    let out = generate(model, None, &[prompt], &params, |_, _| {})?;
    Ok(out.into_iter().next().map(|g| g.tokens).unwrap_or_default())
}

/// The arg-max token of each row's last position (`logits`: `[batch, seq, vocab]`).
pub fn last_argmax(logits: &Tensor) -> candle_core::Result<Vec<u32>> {
    let last = logits.narrow(1, logits.dim(1)? - 1, 1)?;
    last.argmax(candle_core::D::Minus1)?.flatten_all()?.to_vec1::<u32>()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greedy_and_filters_pick_what_they_should() {
        let params = SamplingParams::default();
        let mut rng = Rng::new(1);
        assert_eq!(choose(&mut [0.1, 2.0, 0.5], &[], &params, &mut rng), 1);
        // top-k 1 makes sampling greedy.
        let sampled = SamplingParams { temperature: 1.0, top_k: 1, ..Default::default() };
        for _ in 0..20 {
            assert_eq!(choose(&mut [0.1, 2.0, 1.9], &[], &sampled, &mut rng), 1);
        }
        // min-p 0.5 drops the token at < half the top probability.
        let min_p = SamplingParams { temperature: 1.0, min_p: 0.5, ..Default::default() };
        for _ in 0..50 {
            assert_ne!(choose(&mut [0.0, 0.0, -5.0], &[], &min_p, &mut rng), 2);
        }
        // A repetition penalty steers greedy decoding off a seen token.
        let penalised = SamplingParams { repetition_penalty: 2.0, ..Default::default() };
        assert_eq!(choose(&mut [1.0, 1.5, 0.0], &[1], &penalised, &mut rng), 0);
    }

    #[test]
    fn sampling_follows_the_distribution_and_the_seed() {
        let params = SamplingParams { temperature: 1.0, ..Default::default() };
        let logits = [0.0f32, (3.0f32).ln()]; // probabilities 1/4, 3/4
        let mut rng = Rng::new(7);
        let ones = (0..4000).filter(|_| choose(&mut logits.to_vec(), &[], &params, &mut rng) == 1).count();
        assert!((2800..3200).contains(&ones), "{ones}");
        let draw = |seed| {
            let mut rng = Rng::new(seed);
            (0..10).map(|_| choose(&mut logits.to_vec(), &[], &params, &mut rng)).collect::<Vec<_>>()
        };
        assert_eq!(draw(3), draw(3));
    }
}
