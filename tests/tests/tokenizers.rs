//! Tokenizers and chat templates against the Python stack: every encoding
//! and every chat rendering (text and ids) in the fixtures' `cases.json`,
//! made with `tokenizers` and transformers' `apply_chat_template`.

use oxtune_data::text::{ChatRequest, TextAssets};
use oxtune_tests::fixtures;
use serde_json::Value;

#[test]
fn encodings_and_chat_renderings_match_transformers() {
    for name in ["qwen2.5", "smollm2"] {
        let dir = fixtures().join("tokenizers").join(name);
        let assets = TextAssets::load(&dir).unwrap_or_else(|e| panic!("{name}: {e}"));
        let cases: Value = serde_json::from_str(&std::fs::read_to_string(dir.join("cases.json")).unwrap()).unwrap();
        let encodings = cases["encode"].as_array().unwrap();
        assert!(encodings.len() >= 5, "{name}: too few cases");
        for case in encodings {
            let text = case["text"].as_str().unwrap();
            let expected: Vec<u32> = serde_json::from_value(case["ids"].clone()).unwrap();
            assert_eq!(assets.tokenizer.encode(text, true).unwrap(), expected, "{name}: encoding of {text:?}");
            assert_eq!(assets.tokenizer.decode(&expected, false).unwrap(), text, "{name}: decoding of {text:?}");
        }
        for case in cases["chat"].as_array().unwrap() {
            let messages = case["messages"].as_array().unwrap();
            let request = ChatRequest {
                messages,
                add_generation_prompt: case["add_generation_prompt"].as_bool().unwrap(),
                ..Default::default()
            };
            let rendered = assets.render_chat(&request).unwrap();
            assert_eq!(rendered, case["rendered"].as_str().unwrap(), "{name}: rendering of {messages:?}");
            let expected: Vec<u32> = serde_json::from_value(case["ids"].clone()).unwrap();
            assert_eq!(assets.tokenizer.encode(&rendered, false).unwrap(), expected, "{name}: ids of the rendering");
        }
    }
}

#[test]
fn the_qwen_template_renders_tools_as_transformers_does() {
    let dir = fixtures().join("tokenizers/qwen2.5");
    let assets = TextAssets::load(&dir).unwrap();
    let tools = [serde_json::json!({"type": "function", "function": {"name": "get_weather",
        "description": "Weather in a city", "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}})];
    let messages = [serde_json::json!({"role": "user", "content": "Weather in Paris?"})];
    let rendered = assets
        .render_chat(&ChatRequest {
            messages: &messages,
            tools: Some(&tools),
            add_generation_prompt: true,
            ..Default::default()
        })
        .unwrap();
    // json.dumps separators and key order, as Python writes them.
    assert!(
        rendered.contains(r#"<tools>
{"type": "function", "function": {"name": "get_weather", "description": "Weather in a city", "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}
</tools>"#),
        "{rendered}"
    );
    assert!(rendered.ends_with("<|im_start|>user\nWeather in Paris?<|im_end|>\n<|im_start|>assistant\n"), "{rendered}");
}

#[test]
fn whitespace_only_tokens_of_an_answer_are_labelled() {
    // Byte-level tokenizers give a lone space or an indentation token an
    // empty (trimmed) offset span; the answer's tokens are all labelled
    // anyway, so a model learns to write `": "` and indented code.
    let answer = "{\"city\": \"Paris\"}\ndef f():\n        return  1";
    let messages = [
        serde_json::json!({"role": "user", "content": "Go."}),
        serde_json::json!({"role": "assistant", "content": answer}),
    ];
    // The quick-start tokenizer trims offsets (`trim_offsets` in its byte-level pre-tokenizer).
    let quickstart = oxtune_tests::workspace_root().join("examples/quickstart/model");
    for dir in [fixtures().join("tokenizers/qwen2.5"), fixtures().join("tokenizers/smollm2"), quickstart] {
        let assets = TextAssets::load(&dir).unwrap();
        let row = oxtune_data::text::encode_chat(&assets, &messages, None).unwrap();
        let labelled: Vec<u32> =
            row.input_ids.iter().zip(&row.labels).filter(|(_, l)| **l >= 0).map(|(id, _)| *id).collect();
        let text = assets.tokenizer.decode(&labelled, false).unwrap();
        assert_eq!(text, format!("{answer}<|im_end|>"), "{}: every token of the answer is labelled", dir.display());
    }
}

#[test]
fn loss_masks_cover_exactly_the_assistant_turns_and_their_end_token() {
    let messages = [
        serde_json::json!({"role": "system", "content": "You are terse."}),
        serde_json::json!({"role": "user", "content": "2+2?"}),
        serde_json::json!({"role": "assistant", "content": "4"}),
        serde_json::json!({"role": "user", "content": "And 3+3?"}),
        serde_json::json!({"role": "assistant", "content": "It is 6."}),
    ];
    for name in ["qwen2.5", "smollm2"] {
        let assets = TextAssets::load(&fixtures().join("tokenizers").join(name)).unwrap();
        let row = oxtune_data::text::encode_chat(&assets, &messages, None).unwrap();
        assert_eq!(row.input_ids.len(), row.labels.len());
        // The labelled tokens, in runs, are each assistant turn plus <|im_end|>.
        let mut runs: Vec<Vec<u32>> = Vec::new();
        let mut previous_labelled = false;
        for (&id, &label) in row.input_ids.iter().zip(&row.labels) {
            if label >= 0 {
                assert_eq!(label, i64::from(id));
                if !previous_labelled {
                    runs.push(Vec::new());
                }
                runs.last_mut().unwrap().push(id);
            }
            previous_labelled = label >= 0;
        }
        let texts: Vec<String> = runs.iter().map(|r| assets.tokenizer.decode(r, false).unwrap()).collect();
        assert_eq!(texts, vec!["4<|im_end|>", "It is 6.<|im_end|>"], "{name}");
        // The ids are those of the plain rendering.
        let rendered = assets.render_chat(&ChatRequest { messages: &messages, ..Default::default() }).unwrap();
        assert_eq!(row.input_ids, assets.tokenizer.encode(&rendered, false).unwrap(), "{name}");

        // `"loss": false` leaves a turn out.
        let mut skipped = messages.to_vec();
        skipped[2]["loss"] = serde_json::json!(false);
        let row = oxtune_data::text::encode_chat(&assets, &skipped, None).unwrap();
        let labelled: Vec<u32> =
            row.input_ids.iter().zip(&row.labels).filter(|(_, l)| **l >= 0).map(|(id, _)| *id).collect();
        assert_eq!(assets.tokenizer.decode(&labelled, false).unwrap(), "It is 6.<|im_end|>", "{name}");
    }
    // A row's tool definitions are rendered (Qwen2.5 lists them in the
    // system turn) and never labelled.
    let assets = TextAssets::load(&fixtures().join("tokenizers/qwen2.5")).unwrap();
    let tools = [serde_json::json!({"type": "function", "function": {"name": "add", "parameters": {}}})];
    let row = oxtune_data::text::encode_chat(&assets, &messages, Some(&tools)).unwrap();
    let text = assets.tokenizer.decode(&row.input_ids, false).unwrap();
    assert!(text.contains("<tools>") && text.contains("\"name\": \"add\""), "{text}");
    let labelled: Vec<u32> =
        row.input_ids.iter().zip(&row.labels).filter(|(_, l)| **l >= 0).map(|(id, _)| *id).collect();
    assert_eq!(assets.tokenizer.decode(&labelled, false).unwrap(), "4<|im_end|>It is 6.<|im_end|>");
}
