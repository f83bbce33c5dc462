//! Turning a conversation into training tokens: ids and labels that cover
//! the assistant's turns only.
//!
//! The loss mask is derived from the model's own chat template, not written
//! per model: rendering the conversation up to an assistant turn (with the
//! generation prompt) and through it gives the turn's span in the text; the
//! span ends at the end-of-turn token. Tokens inside a span are labelled
//! with themselves, all others with -100. A message with `"loss": false` is
//! not trained on.

use serde_json::Value;

use super::{ChatRequest, TextAssets, TextError};
use oxtune_engine::loss::IGNORE_INDEX;

/// One encoded training row.
#[derive(Clone, Debug, PartialEq)]
pub struct EncodedRow {
    /// The token ids of the whole rendered conversation.
    pub input_ids: Vec<u32>,
    /// Per token: its own id where trained on, [`IGNORE_INDEX`] elsewhere.
    pub labels: Vec<i64>,
    /// The row's images and videos, preprocessed, and its positions (for
    /// vision-language models); `None` for text.
    pub media: Option<oxtune_engine::media::RowMedia>,
}

impl EncodedRow {
    /// The row as a generation prompt: its ids and laid-out media.
    pub fn as_prompt(&self) -> (&[u32], Option<&oxtune_engine::media::RowMedia>) {
        (&self.input_ids, self.media.as_ref())
    }
}

fn render(
    assets: &TextAssets,
    messages: &[Value],
    tools: Option<&[Value]>,
    add_generation_prompt: bool,
) -> Result<String, TextError> {
    assets.render_chat(&ChatRequest { messages, tools, add_generation_prompt, ..Default::default() })
}

/// The byte spans of the rendered text that belong to trained assistant turns.
fn assistant_spans(
    assets: &TextAssets,
    messages: &[Value],
    tools: Option<&[Value]>,
    full: &str,
) -> Result<Vec<(usize, usize)>, TextError> {
    let end_of_turn = assets.template_eos_token();
    let mut spans = Vec::new();
    for (i, message) in messages.iter().enumerate() {
        if message.get("role").and_then(Value::as_str) != Some("assistant") {
            continue;
        }
        if message.get("loss").and_then(Value::as_bool) == Some(false) {
            continue;
        }
        let before = render(assets, &messages[..i], tools, true)?;
        let through = render(assets, &messages[..=i], tools, false)?;
        if !through.starts_with(&before) || !full.starts_with(&through) {
            return Err(TextError::Codec(format!(
                "the chat template does not render turn {i} as an extension of the turns before it, \
                 so the assistant's tokens cannot be located"
            )));
        }
        let mut end = through.len();
        if let Some(eot) = end_of_turn.as_deref() {
            if let Some(at) = through[before.len()..].rfind(eot) {
                end = before.len() + at + eot.len();
            }
        }
        spans.push((before.len(), end));
    }
    Ok(spans)
}

/// Encodes a conversation (with the tool definitions its template shows,
/// if any) for training on its assistant turns.
pub fn encode_chat(assets: &TextAssets, messages: &[Value], tools: Option<&[Value]>) -> Result<EncodedRow, TextError> {
    let full = render(assets, messages, tools, false)?;
    let spans = assistant_spans(assets, messages, tools, &full)?;
    let encoding = assets.tokenizer.encode_with_offsets(&full, false)?;
    let labels = encoding
        .iter()
        .map(|&(id, (start, end))| {
            // Byte-level tokenizers trim the offsets of whitespace-only
            // tokens (`Ġ`, indentation) to the empty point after them:
            // such a token is inside when the character before that point is.
            let inside = spans.iter().any(|&(s, e)| match end > start {
                true => start >= s && end <= e,
                false => start > s && start <= e,
            });
            if inside {
                i64::from(id)
            } else {
                IGNORE_INDEX
            }
        })
        .collect();
    Ok(EncodedRow { input_ids: encoding.iter().map(|(id, _)| *id).collect(), labels, media: None })
}
