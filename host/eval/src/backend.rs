//! What a benchmark asks of a model — the log-likelihood of continuations
//! and greedy generations — answered by a model in this process
//! ([`LocalModel`]) or by an OpenAI-compatible server's `/v1/completions`
//! ([`ApiModel`], as lm-evaluation-harness's `local-completions` asks).

use std::time::Duration;

use candle_core::Tensor;
use oxtune_data::TextAssets;
use oxtune_engine::backend::BatchInfo;
use oxtune_engine::generate::{generate, SamplingParams};
use oxtune_engine::loss::IGNORE_INDEX;
use oxtune_engine::model::LoadedModel;
use serde_json::{json, Value};

use crate::scoring::cut_at_stop;
use crate::EvalError;

/// A continuation whose log-likelihood after a context is asked.
#[derive(Clone, Debug, PartialEq)]
pub struct LoglikelihoodRequest {
    /// The text before.
    pub context: String,
    /// The text scored.
    pub continuation: String,
}

impl LoglikelihoodRequest {
    /// lm-eval's split: the context's trailing whitespace moves to the
    /// continuation (so a tokenizer that joins a space to the next word
    /// sees the two as the text will have them).
    pub fn normalised(&self) -> (String, String) {
        let trimmed = self.context.trim_end();
        let moved = &self.context[trimmed.len()..];
        (trimmed.to_owned(), format!("{moved}{}", self.continuation))
    }
}

/// A model a benchmark runs on.
pub trait LanguageModel {
    /// The summed log-probability of each request's continuation given its context.
    fn loglikelihoods(&mut self, requests: &[LoglikelihoodRequest]) -> Result<Vec<f64>, EvalError>;
    /// Greedy continuations of `prompts`, each cut at the first of `until`.
    fn generate(&mut self, prompts: &[String], until: &[String], max_tokens: usize) -> Result<Vec<String>, EvalError>;
    /// What it is, for the results (`the model folder`, `URL model`).
    fn describe(&self) -> String;
}

/// A model loaded in this process, with its tokenizer.
pub struct LocalModel {
    /// The model (with its adapter, if any).
    pub model: LoadedModel,
    /// Its tokenizer and generation settings.
    pub assets: TextAssets,
    /// Requests per forward pass.
    pub batch_size: usize,
}

impl LocalModel {
    fn encode(&self, text: &str) -> Result<Vec<u32>, EvalError> {
        self.assets.tokenizer.encode(text, false).map_err(|e| EvalError::Model(Box::new(e)))
    }

    /// The context and continuation token ids of a request, split as
    /// lm-eval splits them: the continuation is what encoding the whole
    /// text adds after the context's own tokens.
    pub fn request_tokens(&self, request: &LoglikelihoodRequest) -> Result<(Vec<u32>, Vec<u32>), EvalError> {
        let (context, _) = request.normalised();
        let context_ids = self.encode(&context)?;
        self.split_tokens(request, &context_ids)
    }

    /// [`request_tokens`](Self::request_tokens) given the context's ids
    /// (the choices of a question share them).
    fn split_tokens(
        &self,
        request: &LoglikelihoodRequest,
        context_ids: &[u32],
    ) -> Result<(Vec<u32>, Vec<u32>), EvalError> {
        let (context, continuation) = request.normalised();
        let context_ids = context_ids.to_vec();
        let whole = self.encode(&format!("{context}{continuation}"))?;
        let split = context_ids.len().min(whole.len());
        let continuation_ids = whole[split..].to_vec();
        if context_ids.is_empty() || continuation_ids.is_empty() {
            return Err(EvalError::Request(format!(
                "a request needs text before and after the split, got {context:?} + {continuation:?}"
            )));
        }
        Ok((context_ids, continuation_ids))
    }

    fn score_batch(&self, rows: &[(Vec<u32>, Vec<u32>)]) -> Result<Vec<f64>, EvalError> {
        let width = rows.iter().map(|(c, x)| c.len() + x.len()).max().unwrap_or(0);
        let (mut ids, mut labels, mut mask) = (Vec::new(), Vec::new(), Vec::new());
        for (context, continuation) in rows {
            let len = context.len() + continuation.len();
            ids.extend(context.iter().chain(continuation).copied().chain(std::iter::repeat_n(0, width - len)));
            labels.extend(
                std::iter::repeat_n(IGNORE_INDEX, context.len())
                    .chain(continuation.iter().map(|&t| i64::from(t)))
                    .chain(std::iter::repeat_n(IGNORE_INDEX, width - len)),
            );
            mask.extend(std::iter::repeat_n(1u32, len).chain(std::iter::repeat_n(0, width - len)));
        }
        let device = self.model.device();
        let candle = |e: candle_core::Error| EvalError::Model(Box::new(e));
        let shape = (rows.len(), width);
        let ids = Tensor::from_vec(ids, shape, device).map_err(candle)?;
        let labels = Tensor::from_vec(labels, shape, device).map_err(candle)?;
        let info = BatchInfo {
            attention_mask: Some(Tensor::from_vec(mask, shape, device).map_err(candle)?),
            ..Default::default()
        };
        let out = self.model.label_logps(&ids, &info, &labels).map_err(|e| EvalError::Model(Box::new(e)))?;
        let sums = out.logps.to_dtype(candle_core::DType::F64).and_then(|p| p.sum(1)).and_then(|s| s.to_vec1::<f64>());
        sums.map_err(candle)
    }
}

impl LanguageModel for LocalModel {
    fn loglikelihoods(&mut self, requests: &[LoglikelihoodRequest]) -> Result<Vec<f64>, EvalError> {
        // A question's choices share their (long, few-shot) context: encode it once.
        let mut contexts: std::collections::HashMap<String, Vec<u32>> = std::collections::HashMap::new();
        let mut rows = Vec::with_capacity(requests.len());
        for request in requests {
            let (context, _) = request.normalised();
            if !contexts.contains_key(&context) {
                let ids = self.encode(&context)?;
                contexts.insert(context.clone(), ids);
            }
            rows.push(self.split_tokens(request, &contexts[&context])?);
        }
        // Longest first, so a batch pads little; answers go back in order.
        let mut order: Vec<usize> = (0..rows.len()).collect();
        order.sort_by_key(|&i| std::cmp::Reverse(rows[i].0.len() + rows[i].1.len()));
        let mut out = vec![0.0; rows.len()];
        for chunk in order.chunks(self.batch_size.max(1)) {
            let batch: Vec<(Vec<u32>, Vec<u32>)> = chunk.iter().map(|&i| rows[i].clone()).collect();
            for (&i, ll) in chunk.iter().zip(self.score_batch(&batch)?) {
                out[i] = ll;
            }
        }
        Ok(out)
    }

    fn generate(&mut self, prompts: &[String], until: &[String], max_tokens: usize) -> Result<Vec<String>, EvalError> {
        let params = SamplingParams {
            max_new_tokens: max_tokens,
            temperature: 0.0,
            eos_token_ids: self.assets.eos_token_ids.clone(),
            stop: until.to_vec(),
            ..Default::default()
        };
        let mut out = Vec::with_capacity(prompts.len());
        for chunk in prompts.chunks(self.batch_size.max(1)) {
            let ids = chunk.iter().map(|p| self.encode(p)).collect::<Result<Vec<_>, _>>()?;
            let generated = generate(&self.model, Some(&self.assets.tokenizer), &ids, &params, |_, _| {})
                .map_err(|e| EvalError::Model(Box::new(e)))?;
            out.extend(generated.into_iter().map(|g| cut_at_stop(&g.text, until)));
        }
        Ok(out)
    }

    fn describe(&self) -> String {
        self.model.dir().display().to_string()
    }
}

/// An OpenAI-compatible server (`oxtune serve`, vLLM, llama.cpp's server):
/// log-likelihoods from `/completions` with `echo` and `logprobs`, greedy
/// generations from `/completions` at temperature 0.
pub struct ApiModel {
    url: String,
    model: String,
    api_key: Option<String>,
    agent: ureq::Agent,
    /// Prompts per request.
    pub batch_size: usize,
}

impl ApiModel {
    /// A client for the server at `base_url` (`http://127.0.0.1:8000/v1`)
    /// asking for `model`, waiting at most `timeout` per request.
    pub fn new(base_url: &str, model: &str, api_key: Option<String>, timeout: Duration) -> ApiModel {
        let base = base_url.trim_end_matches('/');
        let url = if base.ends_with("/completions") { base.to_owned() } else { format!("{base}/completions") };
        let config = ureq::Agent::config_builder().timeout_global(Some(timeout)).http_status_as_error(false).build();
        ApiModel { url, model: model.to_owned(), api_key, agent: config.into(), batch_size: 8 }
    }

    fn post(&self, body: &Value) -> Result<Vec<Value>, EvalError> {
        let error = |message: String| EvalError::Api { url: self.url.clone(), message };
        let mut request = self.agent.post(&self.url);
        if let Some(key) = &self.api_key {
            request = request.header("Authorization", &format!("Bearer {key}"));
        }
        let mut response = request.send_json(body).map_err(|e| error(e.to_string()))?;
        let status = response.status();
        let reply: Value =
            response.body_mut().read_json().map_err(|e| error(format!("HTTP {status}, not JSON: {e}")))?;
        if !status.is_success() {
            let message = reply["error"]["message"].as_str().map(str::to_owned).unwrap_or_else(|| reply.to_string());
            return Err(error(format!("HTTP {status}: {message}")));
        }
        let mut choices =
            reply["choices"].as_array().cloned().ok_or_else(|| error(format!("no `choices` in {reply}")))?;
        choices.sort_by_key(|c| c["index"].as_u64().unwrap_or(0));
        Ok(choices)
    }
}

impl LanguageModel for ApiModel {
    fn loglikelihoods(&mut self, requests: &[LoglikelihoodRequest]) -> Result<Vec<f64>, EvalError> {
        let mut out = Vec::with_capacity(requests.len());
        for chunk in requests.chunks(self.batch_size.max(1)) {
            let split: Vec<(String, String)> = chunk.iter().map(LoglikelihoodRequest::normalised).collect();
            let prompts: Vec<String> = split.iter().map(|(c, x)| format!("{c}{x}")).collect();
            let body = json!({"model": self.model, "prompt": prompts, "max_tokens": 0, "echo": true,
                              "logprobs": 1, "temperature": 0});
            let choices = self.post(&body)?;
            if choices.len() != chunk.len() {
                return Err(EvalError::Api {
                    url: self.url.clone(),
                    message: format!("{} choices for {} prompts", choices.len(), chunk.len()),
                });
            }
            for ((context, _), choice) in split.iter().zip(&choices) {
                let logprobs = &choice["logprobs"];
                let (Some(values), Some(offsets)) =
                    (logprobs["token_logprobs"].as_array(), logprobs["text_offset"].as_array())
                else {
                    return Err(EvalError::Api {
                        url: self.url.clone(),
                        message: "a choice has no `logprobs.token_logprobs` / `text_offset` (echo with logprobs)"
                            .into(),
                    });
                };
                // The continuation's tokens are those starting at or after the context's end.
                let boundary = context.chars().count() as u64;
                let sum: f64 = values
                    .iter()
                    .zip(offsets)
                    .filter(|(_, offset)| offset.as_u64().is_some_and(|o| o >= boundary))
                    .map(|(v, _)| v.as_f64().unwrap_or(f64::NEG_INFINITY))
                    .sum();
                out.push(sum);
            }
        }
        Ok(out)
    }

    fn generate(&mut self, prompts: &[String], until: &[String], max_tokens: usize) -> Result<Vec<String>, EvalError> {
        let mut out = Vec::with_capacity(prompts.len());
        for chunk in prompts.chunks(self.batch_size.max(1)) {
            // OpenAI takes at most four stop sequences; the rest are cut here.
            let stop: Vec<&String> = until.iter().take(4).collect();
            let body = json!({"model": self.model, "prompt": chunk, "max_tokens": max_tokens, "temperature": 0,
                              "stop": stop});
            for choice in self.post(&body)? {
                out.push(cut_at_stop(choice["text"].as_str().unwrap_or_default(), until));
            }
        }
        Ok(out)
    }

    fn describe(&self) -> String {
        format!("{} ({})", self.url, self.model)
    }
}
