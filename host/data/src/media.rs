//! Images and videos in rows and requests (the engine's
//! `oxtune_engine::media` holds the types a forward pass reads).
//!
//! A row names its media as ms-swift does (`<image>` / `<video>` tags in
//! message text with `images` / `videos` lists beside `messages`), as
//! content parts (`{"type": "image", "image": PATH}`), or as media with no
//! tag at all (then they go before the first user message). The host finds
//! them ([`collect`]) and asks the model plugin to preprocess the files;
//! then it replaces each tag with the item's prompt text (the model's
//! placeholder, or what the plugin asked for, such as Qwen3-VL's
//! timestamped frame groups) and renders the chat template. The plugin
//! says which token stands for each item and where its vision tokens sit
//! on each position axis; the host repeats the placeholder token once per
//! vision token ([`expand`]) and numbers the row's positions: text tokens
//! advance by one on every axis, and text after a media item continues one
//! past its largest position (M-RoPE). Training rows keep the layout and
//! read their pixels again per batch ([`with_pixels`]). Nothing here is
//! model-specific.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use oxtune_engine::loss::IGNORE_INDEX;
use oxtune_engine::media::{MediaInput, MediaKind, MediaRef, MediaSpec, RowMedia};
use oxtune_engine::model::LoadedModel;
use serde_json::Value;

use crate::error::{EncodeError, OrInvalid};
use crate::text::{encode_chat, ChatRequest, EncodedRow, TextAssets};

fn resolve(path: &str, base: Option<&Path>) -> PathBuf {
    let p = PathBuf::from(path);
    match base {
        Some(dir) if p.is_relative() && !p.exists() => dir.join(p),
        _ => p,
    }
}

fn source_list(value: &Value, what: &str, base: Option<&Path>) -> Result<Vec<PathBuf>, EncodeError> {
    match value {
        Value::String(s) => Ok(vec![resolve(s, base)]),
        Value::Object(o) => match o.get("path").or_else(|| o.get("url")).and_then(Value::as_str) {
            Some(s) => Ok(vec![resolve(s.strip_prefix("file://").unwrap_or(s), base)]),
            None => bail!("{what} must be a file path (or {{\"path\": ...}}), not {value}"),
        },
        Value::Array(frames) => frames.iter().map(|f| source_list(f, what, base).map(|mut v| v.remove(0))).collect(),
        _ => bail!("{what} must be a file path, not {value}"),
    }
}

/// The media of a row (`images` / `videos` beside `messages`, or content
/// parts) with every message's content turned into text carrying one tag
/// per item, and the items in tag order per kind. Relative paths that do
/// not exist from the working folder are read from `base` (the dataset's
/// folder). Tags and items must agree in number; media with no tag at all
/// go before the first user message.
pub fn collect(row: &Value, base: Option<&Path>) -> Result<(Vec<Value>, Vec<MediaRef>), EncodeError> {
    let mut messages = row.get("messages").and_then(Value::as_array).cloned().unwrap_or_default();
    let mut found: Vec<MediaRef> = Vec::new();
    let mut from_parts = false;
    for (i, message) in messages.iter_mut().enumerate() {
        let Some(Value::Array(parts)) = message.get("content") else { continue };
        let mut text = String::new();
        for part in parts {
            let kind = part.get("type").and_then(Value::as_str).unwrap_or("");
            let image = part.get("image").or_else(|| part.get("image_url").map(|u| u.get("url").unwrap_or(u)));
            if kind == "image" || kind == "image_url" || image.is_some() {
                let source = image.or_invalid(format!("message {i}: an image part has no `image`"))?;
                found.push(MediaRef { kind: MediaKind::Image, sources: source_list(source, "an image", base)? });
                text.push_str("<image>");
            } else if kind == "video" || part.get("video").is_some() {
                let source = part.get("video").or_invalid(format!("message {i}: a video part has no `video`"))?;
                found.push(MediaRef { kind: MediaKind::Video, sources: source_list(source, "a video", base)? });
                text.push_str("<video>");
            } else if let Some(t) = part.get("text").and_then(Value::as_str) {
                text.push_str(t);
            }
            from_parts = true;
        }
        message["content"] = Value::String(text);
    }
    for (key, kind) in [("images", MediaKind::Image), ("videos", MediaKind::Video)] {
        let listed = match row.get(key) {
            None | Some(Value::Null) => Vec::new(),
            Some(Value::Array(items)) => items.clone(),
            Some(single) => vec![single.clone()],
        };
        if listed.is_empty() {
            continue;
        }
        if from_parts {
            bail!("the row has media both in message parts and in `{key}`");
        }
        for item in &listed {
            let what = format!("an entry of `{key}`");
            found.push(MediaRef { kind, sources: source_list(item, &what, base)? });
        }
        let tags: usize =
            messages.iter().filter_map(|m| m["content"].as_str()).map(|c| c.matches(kind.tag()).count()).sum();
        if tags == 0 {
            let first_user = messages.iter_mut().find(|m| m["role"] == "user");
            let message = first_user.or_invalid(format!("the row has {key} but no user message to put them in"))?;
            let content = message["content"].as_str().unwrap_or_default().to_owned();
            message["content"] = Value::String(format!("{}{content}", kind.tag().repeat(listed.len())));
        } else if tags != listed.len() {
            bail!("the row has {tags} {} tag(s) but {} {}(s) in `{key}`", kind.tag(), listed.len(), kind.as_str());
        }
    }
    for kind in [MediaKind::Image, MediaKind::Video] {
        let tags: usize =
            messages.iter().filter_map(|m| m["content"].as_str()).map(|c| c.matches(kind.tag()).count()).sum();
        let items = found.iter().filter(|m| m.kind == kind).count();
        if tags != items {
            bail!("the row has {tags} {} tag(s) but {items} {}(s)", kind.tag(), kind.as_str());
        }
    }
    Ok((messages, found))
}

/// Fails, naming the file, if a media file or frame folder is missing.
pub fn check_exists(media: &[MediaRef]) -> Result<(), EncodeError> {
    for item in media {
        for source in &item.sources {
            if !source.exists() {
                bail!("{} {} does not exist", item.kind.as_str(), source.display());
            }
        }
    }
    Ok(())
}

/// `messages` with every tag replaced by its item's prompt text: the
/// model's placeholder, or what the plugin asked for that item (`prepared`
/// inputs name their request, an index into `media`). The k-th tag of a
/// kind is the k-th item of that kind.
pub fn replace_tags(
    messages: &[Value],
    spec: &MediaSpec,
    media: &[MediaRef],
    prepared: &[MediaInput],
) -> Result<Vec<Value>, EncodeError> {
    let mut texts: BTreeMap<&str, std::collections::VecDeque<String>> = BTreeMap::new();
    for (request, item) in media.iter().enumerate() {
        let default = match item.kind {
            MediaKind::Image => &spec.image_placeholder,
            MediaKind::Video => &spec.video_placeholder,
        };
        let asked = prepared.iter().find(|p| p.request == request).and_then(|p| p.prompt_text.clone());
        let text = match asked.or_else(|| default.clone()) {
            Some(text) => text,
            None => bail!("this model does not read {}s", item.kind.as_str()),
        };
        texts.entry(item.kind.tag()).or_default().push_back(text);
    }
    let mut out = messages.to_vec();
    for message in &mut out {
        let Some(content) = message["content"].as_str() else { continue };
        let mut text = String::with_capacity(content.len());
        let mut rest = content;
        while let Some((at, tag)) =
            ["<image>", "<video>"].iter().filter_map(|t| rest.find(t).map(|i| (i, *t))).min_by_key(|(i, _)| *i)
        {
            text.push_str(&rest[..at]);
            let replacement = texts.get_mut(tag).and_then(|q| q.pop_front());
            text.push_str(&replacement.or_invalid(format!("more {tag} tags than items"))?);
            rest = &rest[at + tag.len()..];
        }
        text.push_str(rest);
        message["content"] = Value::String(text);
    }
    Ok(out)
}

/// A conversation with media, encoded for training on its assistant
/// turns: tags replaced by the model's placeholders, rendered and labelled
/// as text, then each placeholder expanded to the item's vision tokens.
pub fn encode_chat_with_media(
    model: &LoadedModel,
    assets: &TextAssets,
    messages: &[Value],
    media: &[MediaRef],
    tools: Option<&[Value]>,
    options: &Value,
) -> Result<EncodedRow, EncodeError> {
    let spec = model.media_spec().or_invalid("the row has images or videos, and this model reads text only")?;
    check_exists(media)?;
    let prepared = model.prepare_media(media, options)?;
    let messages = replace_tags(messages, spec, media, &prepared)?;
    let encoded = encode_chat(assets, &messages, tools)?;
    expand(encoded, prepared, spec.position_axes)
}

/// A prompt with media, ready for generation: the conversation rendered
/// with the generation prompt, placeholders expanded.
pub fn encode_prompt_with_media(
    model: &LoadedModel,
    assets: &TextAssets,
    messages: &[Value],
    media: &[MediaRef],
    options: &Value,
) -> Result<EncodedRow, EncodeError> {
    let spec = model.media_spec().or_invalid("images were given, and this model reads text only")?;
    check_exists(media)?;
    let prepared = model.prepare_media(media, options)?;
    let messages = replace_tags(messages, spec, media, &prepared)?;
    let request = ChatRequest { messages: &messages, add_generation_prompt: true, ..Default::default() };
    let ids = assets.tokenizer.encode(&assets.render_chat(&request)?, false)?;
    let row = EncodedRow { labels: vec![IGNORE_INDEX; ids.len()], input_ids: ids, media: None };
    expand(row, prepared, spec.position_axes)
}

/// Repeats each item's placeholder token once per vision token (labelled
/// -100) and numbers the row's positions. Items are matched to placeholder
/// occurrences in order, per token.
pub fn expand(row: EncodedRow, items: Vec<MediaInput>, axes: usize) -> Result<EncodedRow, EncodeError> {
    let mut queues: BTreeMap<u32, std::collections::VecDeque<&MediaInput>> = BTreeMap::new();
    for item in &items {
        queues.entry(item.placeholder_token).or_default().push_back(item);
    }
    let (mut ids, mut labels) = (Vec::new(), Vec::new());
    let mut positions = vec![Vec::new(); axes];
    let mut ordered = Vec::with_capacity(items.len());
    let mut next = 0u32;
    for (&id, &label) in row.input_ids.iter().zip(&row.labels) {
        match queues.get_mut(&id).and_then(|q| q.pop_front()) {
            Some(item) => {
                let count = item.positions.first().map_or(0, Vec::len);
                if item.positions.len() != axes || item.positions.iter().any(|p| p.len() != count) {
                    bail!("the model plugin gave positions on {} axes for a {axes}-axis model", item.positions.len());
                }
                let mut largest = next;
                for (axis, rel) in item.positions.iter().enumerate() {
                    for &r in rel {
                        positions[axis].push(next + r);
                        largest = largest.max(next + r);
                    }
                }
                ids.extend(std::iter::repeat_n(id, count));
                labels.extend(std::iter::repeat_n(IGNORE_INDEX, count));
                ordered.push(item.clone());
                next = largest + 1;
            }
            None => {
                if queues.contains_key(&id) {
                    bail!("the prompt has more media placeholders than the row has media");
                }
                ids.push(id);
                labels.push(label);
                positions.iter_mut().for_each(|p| p.push(next));
                next += 1;
            }
        }
    }
    if let Some(left) = queues.values().map(|q| q.len()).find(|&n| n > 0) {
        bail!("{left} media item(s) have no placeholder in the rendered prompt (does the chat template drop them?)");
    }
    Ok(EncodedRow { input_ids: ids, labels, media: Some(RowMedia { items: ordered, positions, sources: None }) })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn item(token: u32, h: u32, w: u32) -> MediaInput {
        let (mut t_, mut h_, mut w_) = (Vec::new(), Vec::new(), Vec::new());
        for y in 0..h {
            for x in 0..w {
                t_.push(0);
                h_.push(y);
                w_.push(x);
            }
        }
        MediaInput {
            pixels_input: "pixel_values".into(),
            pixels: vec![0.0; (h * w * 4 * 2) as usize],
            features: 2,
            grid_input: "image_grid_thw".into(),
            grid: vec![1, 2 * h as usize, 2 * w as usize],
            placeholder_token: token,
            positions: vec![t_, h_, w_],
            request: 0,
            prompt_text: None,
        }
    }

    #[test]
    fn placeholders_expand_and_positions_continue_past_each_item() {
        let row = EncodedRow {
            input_ids: vec![5, 6, 9, 7, 9, 8],
            labels: vec![-100, -100, -100, -100, -100, 8],
            media: None,
        };
        let out = expand(row, vec![item(9, 2, 3), item(9, 1, 2)], 3).unwrap();
        assert_eq!(out.input_ids, vec![5, 6, 9, 9, 9, 9, 9, 9, 7, 9, 9, 8]);
        assert_eq!(out.labels.iter().filter(|&&l| l == 8).count(), 1);
        let p = &out.media.as_ref().unwrap().positions;
        // The first image starts at 2 and reaches 4 (its last column), so
        // the text after it is at 5; the second starts at 6 and reaches 7.
        assert_eq!(p[0], vec![0, 1, 2, 2, 2, 2, 2, 2, 5, 6, 6, 8]);
        assert_eq!(p[1], vec![0, 1, 2, 2, 2, 3, 3, 3, 5, 6, 6, 8]);
        assert_eq!(p[2], vec![0, 1, 2, 3, 4, 2, 3, 4, 5, 6, 7, 8]);
        let row = EncodedRow { input_ids: vec![9, 9], labels: vec![-100; 2], media: None };
        assert!(expand(row, vec![item(9, 1, 1)], 3).unwrap_err().to_string().contains("more media placeholders"));
        let row = EncodedRow { input_ids: vec![1], labels: vec![-100], media: None };
        assert!(expand(row, vec![item(9, 1, 1)], 3).unwrap_err().to_string().contains("no placeholder"));
    }

    #[test]
    fn tags_and_media_must_agree() {
        let dir = std::env::temp_dir().join(format!("oxtune-media-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("a.png"), b"x").unwrap();
        let base = Some(dir.as_path());
        let untagged = json!({"messages": [{"role": "user", "content": "Hi"}], "images": ["a.png", "a.png"]});
        let (messages, media) = collect(&untagged, base).unwrap();
        assert_eq!(messages[0]["content"], "<image><image>Hi");
        assert_eq!(media.len(), 2);
        let mismatched = json!({"messages": [{"role": "user", "content": "<image> and <image>"}], "images": ["a.png"]});
        let err = collect(&mismatched, base).unwrap_err().to_string();
        assert!(err.contains("2 <image> tag(s) but 1 image(s)"), "{err}");
        let parts = json!({"messages": [{"role": "user", "content": [{"type": "image", "image": "a.png"}, {"type": "text", "text": "What?"}]}]});
        let (messages, media) = collect(&parts, base).unwrap();
        assert_eq!((messages[0]["content"].as_str().unwrap(), media[0].kind), ("<image>What?", MediaKind::Image));
        let missing = json!({"messages": [{"role": "user", "content": "<image>"}], "images": ["nope.png"]});
        let (_, media) = collect(&missing, base).unwrap();
        assert!(check_exists(&media).unwrap_err().to_string().contains("nope.png does not exist"));
    }
}
