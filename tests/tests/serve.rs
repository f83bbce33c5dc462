//! `oxtune serve` end to end: the official `openai` Python client (chat
//! and completions, streamed and not, the same text at temperature 0; completions with
//! echo and log-probabilities equal to oxtune's own; token-id prompts;
//! errors as client exceptions), every kind of bad request answered with
//! the right status and an OpenAI error object while the server goes on
//! serving, the API key, and the 429 of a full queue.

use std::time::Duration;

use candle_core::{DType, Device, Tensor, D};
use oxtune_data::TextAssets;
use oxtune_engine::backend::BatchInfo;
use oxtune_engine::model::{LoadOptions, LoadedModel};
use oxtune_registry::Registry;
use oxtune_tests::{fixtures, workspace_root, Server};
use serde_json::{json, Value};

fn model_dir() -> String {
    fixtures().join("models/tiny-qwen3").display().to_string()
}

fn agent() -> ureq::Agent {
    ureq::Agent::config_builder()
        .timeout_global(Some(Duration::from_secs(60)))
        .http_status_as_error(false)
        .build()
        .into()
}

/// POSTs `body` (raw bytes) and returns the status and the JSON answer.
fn post(url: &str, body: &[u8], key: Option<&str>) -> (u16, Value) {
    let mut request = agent().post(url).header("content-type", "application/json");
    if let Some(key) = key {
        request = request.header("authorization", &format!("Bearer {key}"));
    }
    let mut response = request.send(body).unwrap();
    let status = response.status().as_u16();
    let text = response.body_mut().read_to_string().unwrap();
    (status, serde_json::from_str(&text).unwrap_or(Value::String(text)))
}

fn chat(url: &str, body: Value) -> (u16, Value) {
    post(&format!("{url}/chat/completions"), body.to_string().as_bytes(), None)
}

/// Asserts an OpenAI error object with `status`, naming `needle`.
fn is_error(answer: &(u16, Value), status: u16, needle: &str) {
    let (got, body) = answer;
    assert_eq!(*got, status, "{body}");
    let message = body["error"]["message"].as_str().unwrap_or_else(|| panic!("not an OpenAI error: {body}"));
    assert!(
        body["error"]["type"].is_string()
            && body["error"].get("param").is_some()
            && body["error"].get("code").is_some()
    );
    assert!(message.contains(needle) || body["error"]["param"] == needle || body["error"]["code"] == needle, "{body}");
}

/// What `tests/serve/openai_client.py URL ARGS...` saw (the official
/// client against the server at `url`); `None` when the client is missing
/// (which CI must not be).
fn openai_client(url: &str, args: &[&str]) -> Option<Value> {
    let found = std::process::Command::new("python3").args(["-c", "import openai"]).status().is_ok_and(|s| s.success());
    if !found {
        assert!(
            std::env::var_os("CI").is_none(),
            "the openai client is missing: .ci/run installs it (.ci/fetch-openai)"
        );
        eprintln!("skipping: the openai Python client is missing (run .ci/fetch-openai)");
        return None;
    }
    let script = workspace_root().join("tests/serve/openai_client.py");
    let out = std::process::Command::new("python3").arg(&script).arg(url).args(args).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    Some(serde_json::from_slice(&out.stdout).unwrap())
}

#[test]
fn the_openai_client_chats_streams_and_scores() {
    let server = Server::start(&["--model", &model_dir()]);
    let Some(seen) = openai_client(&server.url, &["tiny-qwen3"]) else { return };
    assert_eq!(seen["models"], json!(["tiny-qwen3"]));
    assert_eq!(seen["chat_role"], "assistant");
    assert_eq!(seen["stream_first_role"], "assistant");
    assert_eq!(seen["stream_text"], seen["chat_text"], "streamed and plain text at temperature 0");
    assert_eq!(seen["stream_finish"], json!([seen["chat_finish"].clone()]));
    assert_eq!(seen["stream_usage"], seen["chat_usage"], "the usage chunk");
    assert_eq!(seen["stream_last_choices"], 0, "the usage chunk has no choices");
    assert_eq!(seen["chat_usage"]["completion_tokens"], 8);
    assert_eq!(seen["ids_completion_tokens"], 3);
    assert_eq!(seen["completion_stream_text"], seen["completion_text"], "streamed and plain completions");
    assert_eq!(seen["completion_stream_finish"], json!(["length"]));
    assert_eq!(seen["errors"]["unknown_model"], json!([404, "model_not_found"]));
    assert_eq!(seen["errors"]["empty_messages"], json!([400, "messages"]));

    // Echoed log-probabilities are oxtune's own: log-softmax of the logits.
    let prompt = "hello world, this is";
    assert_eq!(seen["echo_text"], prompt);
    let assets = TextAssets::load(std::path::Path::new(&model_dir())).unwrap();
    let ids = assets.tokenizer.encode(prompt, true).unwrap();
    let model = LoadedModel::load(
        &Registry::with_builtins().unwrap(),
        std::path::Path::new(&model_dir()),
        &LoadOptions::default(),
    )
    .unwrap();
    let input = Tensor::new(ids.as_slice(), &Device::Cpu).unwrap().unsqueeze(0).unwrap();
    let logits = model
        .forward(&input, &BatchInfo::default(), None, None)
        .unwrap()
        .squeeze(0)
        .unwrap()
        .to_dtype(DType::F64)
        .unwrap();
    let shifted = logits.broadcast_sub(&logits.max_keepdim(D::Minus1).unwrap()).unwrap();
    let rows = shifted
        .broadcast_sub(&shifted.exp().unwrap().sum_keepdim(D::Minus1).unwrap().log().unwrap())
        .unwrap()
        .to_vec2::<f64>()
        .unwrap();
    let got = seen["echo_token_logprobs"].as_array().unwrap();
    assert_eq!(got.len(), ids.len());
    assert!(got[0].is_null(), "the first token has no log-probability");
    for t in 1..ids.len() {
        let want = rows[t - 1][ids[t] as usize];
        assert!((got[t].as_f64().unwrap() - want).abs() < 1e-5, "token {t}: {} vs {want}", got[t]);
        assert_eq!(seen["echo_top_logprobs"][t].as_object().unwrap().len(), 2);
    }
    let offsets: Vec<u64> = seen["echo_text_offset"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap()).collect();
    assert_eq!(offsets[0], 0);
    assert!(offsets.windows(2).all(|w| w[0] < w[1]) && *offsets.last().unwrap() < prompt.len() as u64);
}

#[test]
fn bad_requests_get_openai_errors_and_the_server_goes_on() {
    let server = Server::start(&["--model", &model_dir(), "--max-body-bytes", "4000"]);
    let url = &server.url;
    let ok = json!({"model": "tiny-qwen3", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2});
    is_error(&post(&format!("{url}/chat/completions"), b"{not json", None), 400, "not valid JSON");
    is_error(&chat(url, json!({"model": "tiny-qwen3", "messages": "hi"})), 400, "messages");
    is_error(
        &chat(url, json!({"model": "tiny-qwen3", "messages": [{"role": "user", "content": "hi"}], "max_tokens": "2"})),
        400,
        "max_tokens",
    );
    is_error(
        &chat(url, json!({"model": "gpt-4", "messages": [{"role": "user", "content": "hi"}]})),
        404,
        "model_not_found",
    );
    is_error(&chat(url, json!({"model": "tiny-qwen3", "messages": []})), 400, "messages");
    is_error(
        &chat(url, json!({"model": "tiny-qwen3", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 512})),
        400,
        "context_length_exceeded",
    );
    is_error(
        &chat(url, json!({"model": "tiny-qwen3", "messages": [{"role": "user", "content": "hi"}], "temperature": 5})),
        400,
        "temperature",
    );
    let big = json!({"model": "tiny-qwen3", "messages": [{"role": "user", "content": "x".repeat(5000)}]});
    is_error(&chat(url, big), 413, "body");
    is_error(
        &post(
            &format!("{url}/completions"),
            json!({"model": "tiny-qwen3", "prompt": [1, 999999]}).to_string().as_bytes(),
            None,
        ),
        400,
        "vocabulary",
    );
    let image = json!({"model": "tiny-qwen3", "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:image/png;base64,xx"}}]}]});
    is_error(&chat(url, image), 400, "base64");
    // After all that, a good request is answered.
    let (status, body) = chat(url, ok);
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["usage"]["completion_tokens"], 2);
    let metrics = agent()
        .get(&format!("{}/metrics", url.trim_end_matches("/v1")))
        .call()
        .unwrap()
        .body_mut()
        .read_to_string()
        .unwrap();
    assert!(metrics.contains("oxtune_requests_total{status=\"4xx\"} 10"), "{metrics}");
}

#[test]
fn the_api_key_guards_every_endpoint_but_health() {
    let server = Server::start(&["--model", &model_dir(), "--api-key", "sesame"]);
    let base = server.url.trim_end_matches("/v1").to_owned();
    let body =
        json!({"model": "tiny-qwen3", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}).to_string();
    is_error(&post(&format!("{}/chat/completions", server.url), body.as_bytes(), None), 401, "invalid_api_key");
    is_error(
        &post(&format!("{}/chat/completions", server.url), body.as_bytes(), Some("wrong")),
        401,
        "invalid_api_key",
    );
    assert_eq!(post(&format!("{}/chat/completions", server.url), body.as_bytes(), Some("sesame")).0, 200);
    let models = agent().get(&format!("{}/models", server.url)).call().unwrap();
    assert_eq!(models.status().as_u16(), 401);
    let health = agent().get(&format!("{base}/health")).call().unwrap();
    assert_eq!(health.status().as_u16(), 200);
}

#[test]
fn a_full_queue_answers_429() {
    let server = Server::start(&["--model", &model_dir(), "--queue-capacity", "1"]);
    let url = server.url.clone();
    let statuses: Vec<u16> = (0..8)
        .map(|_| {
            let url = url.clone();
            std::thread::spawn(move || {
                let body = json!({"model": "tiny-qwen3", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 200, "temperature": 0});
                let answer = chat(&url, body);
                if answer.0 == 429 {
                    is_error(&answer, 429, "rate_limit_exceeded");
                }
                answer.0
            })
        })
        .collect::<Vec<_>>()
        .into_iter()
        .map(|h| h.join().unwrap())
        .collect();
    assert!(statuses.contains(&429) && statuses.contains(&200), "{statuses:?}");
    assert!(statuses.iter().all(|s| *s == 200 || *s == 429), "{statuses:?}");
}

/// The value of a counter in the server's `/metrics`.
fn counter(base: &str, name: &str) -> u64 {
    let text = agent().get(&format!("{base}/metrics")).call().unwrap().body_mut().read_to_string().unwrap();
    text.lines().find_map(|l| l.strip_prefix(&format!("{name} "))).and_then(|v| v.trim().parse().ok()).unwrap_or(0)
}

#[test]
fn a_client_that_disconnects_stops_its_generation() {
    use std::io::{BufRead, BufReader, Write};
    let server = Server::start(&["--model", &model_dir()]);
    let base = server.url.trim_end_matches("/v1").to_owned();
    let address = base.trim_start_matches("http://").to_owned();
    // A long streamed answer (480 tokens); the client reads the first chunk and leaves.
    let body = json!({"model": "tiny-qwen3", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 480,
                      "temperature": 0, "stream": true})
    .to_string();
    {
        let mut stream = std::net::TcpStream::connect(&address).unwrap();
        write!(stream, "POST /v1/chat/completions HTTP/1.1\r\nHost: {address}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}", body.len()).unwrap();
        let mut reader = BufReader::new(stream.try_clone().unwrap());
        let mut line = String::new();
        while !line.starts_with("data:") {
            line.clear();
            reader.read_line(&mut line).unwrap();
        }
    }
    // The worker notices, stops, and counts it; wait for that (bounded).
    let mut waited = 0;
    while counter(&base, "oxtune_cancelled_total") == 0 {
        assert!(waited < 600, "the generation was never stopped");
        std::thread::sleep(Duration::from_millis(100));
        waited += 1;
    }
    let tokens = counter(&base, "oxtune_cancelled_tokens_total");
    assert!(tokens < 480, "it stopped early: {tokens} of 480 tokens");
    // And the server goes on.
    let (status, _) = chat(
        &server.url,
        json!({"model": "tiny-qwen3", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}),
    );
    assert_eq!(status, 200);
}

#[test]
fn chat_logprobs_and_tools_are_served() {
    let server = Server::start(&["--model", &model_dir()]);
    let messages = json!([{"role": "user", "content": "hi"}]);
    let (status, body) = chat(
        &server.url,
        json!({"model": "tiny-qwen3", "messages": messages, "max_tokens": 4, "temperature": 0, "logprobs": true, "top_logprobs": 2}),
    );
    assert_eq!(status, 200, "{body}");
    let content = body["choices"][0]["logprobs"]["content"].as_array().unwrap();
    assert_eq!(content.len(), 4, "one entry per generated token");
    for entry in content {
        let logprob = entry["logprob"].as_f64().unwrap();
        let top = entry["top_logprobs"].as_array().unwrap();
        assert_eq!(top.len(), 2);
        // Greedy: the chosen token is the most likely one.
        assert!((top[0]["logprob"].as_f64().unwrap() - logprob).abs() < 1e-9 && logprob <= 0.0, "{entry}");
        assert_eq!(entry["bytes"].as_array().unwrap().len(), entry["token"].as_str().unwrap().len());
    }
    // Tools reach the template and are accepted; a bad tool_choice is named.
    let tools = json!([{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]);
    let (status, body) =
        chat(&server.url, json!({"model": "tiny-qwen3", "messages": messages, "max_tokens": 2, "tools": tools}));
    assert_eq!(status, 200, "{body}");
    let choice = json!({"type": "function", "function": {"name": "nope"}});
    is_error(
        &chat(&server.url, json!({"model": "tiny-qwen3", "messages": messages, "tools": tools, "tool_choice": choice})),
        400,
        "tool_choice",
    );
}

/// The text of a streamed chat answer, read from its server-sent events.
fn streamed_text(url: &str, body: &Value) -> String {
    use std::io::BufRead;
    let mut response = agent().post(&format!("{url}/chat/completions")).send_json(body).unwrap();
    assert_eq!(response.status().as_u16(), 200);
    let mut text = String::new();
    for line in std::io::BufReader::new(response.body_mut().as_reader()).lines() {
        let line = line.unwrap();
        let Some(data) = line.strip_prefix("data: ") else { continue };
        if data == "[DONE]" {
            break;
        }
        let chunk: Value = serde_json::from_str(data).unwrap();
        text.push_str(chunk.pointer("/choices/0/delta/content").and_then(Value::as_str).unwrap_or(""));
    }
    text
}

/// A copy of the fixture LoRA adapter with its B matrices scaled ×40, so
/// that its greedy answers differ from the base model's.
fn strong_adapter(test: &str) -> std::path::PathBuf {
    let source = fixtures().join("peft/tiny-qwen3-lora");
    let out = std::env::temp_dir().join(format!("oxtune-serve-{test}-{}/strong", std::process::id()));
    std::fs::create_dir_all(&out).unwrap();
    std::fs::copy(source.join("adapter_config.json"), out.join("adapter_config.json")).unwrap();
    let tensors = candle_core::safetensors::load(source.join("adapter_model.safetensors"), &Device::Cpu).unwrap();
    let scaled: std::collections::HashMap<String, Tensor> = tensors
        .into_iter()
        .map(|(name, t)| {
            let t = if name.contains("lora_B") { (t * 40.0).unwrap() } else { t };
            (name, t)
        })
        .collect();
    candle_core::safetensors::save(&scaled, out.join("adapter_model.safetensors")).unwrap();
    out
}

/// What oxtune itself answers to a one-message chat at temperature 0,
/// alone, with the adapter in `adapter` attached.
fn answer_alone(adapter: Option<&std::path::Path>, content: &str, max_tokens: usize) -> String {
    let registry = Registry::with_builtins().unwrap();
    let dir = std::path::PathBuf::from(model_dir());
    let mut model = LoadedModel::load(&registry, &dir, &LoadOptions::default()).unwrap();
    if let Some(adapter) = adapter {
        model.attach_adapter(&registry, adapter, oxtune_engine::model::checkpoint::Trainable::None).unwrap();
    }
    let assets = TextAssets::load(&dir).unwrap();
    let messages = [json!({"role": "user", "content": content})];
    let request = oxtune_data::ChatRequest { messages: &messages, add_generation_prompt: true, ..Default::default() };
    let ids = assets.tokenizer.encode(&assets.render_chat(&request).unwrap(), false).unwrap();
    let params = oxtune_engine::generate::SamplingParams {
        max_new_tokens: max_tokens,
        eos_token_ids: assets.eos_token_ids.clone(),
        ..Default::default()
    };
    oxtune_engine::generate::generate(&model, Some(&assets.tokenizer), &[ids], &params, |_, _| {})
        .unwrap()
        .remove(0)
        .text
}

#[test]
fn adapters_are_chosen_per_request_in_one_decode_batch() {
    let adapter = strong_adapter("batch");
    let server = Server::start(&["--model", &model_dir(), "--adapters", &format!("strong={}", adapter.display())]);
    let base = server.url.trim_end_matches("/v1").to_owned();
    let models: Value = agent().get(&format!("{}/models", server.url)).call().unwrap().body_mut().read_json().unwrap();
    assert_eq!(models["data"][1]["id"], "strong");
    assert_eq!(models["data"][1]["parent"], "tiny-qwen3");
    let prompts: Vec<String> = (0..6).map(|i| format!("tell me about item {i}")).collect();
    let max_tokens = 10;
    // 12 requests at once: each prompt to the base model and to the adapter.
    let steps_before = counter(&base, "oxtune_decode_steps_total");
    let handles: Vec<_> = prompts
        .iter()
        .flat_map(|p| [("tiny-qwen3", p.clone()), ("strong", p.clone())])
        .map(|(model, p)| {
            let url = server.url.clone();
            std::thread::spawn(move || {
                let body = json!({"model": model, "messages": [{"role": "user", "content": p}],
                                  "max_tokens": max_tokens, "temperature": 0});
                let (status, answer) = chat(&url, body);
                assert_eq!(status, 200, "{answer}");
                assert_eq!(answer["model"], model);
                (
                    answer["choices"][0]["message"]["content"].as_str().unwrap().to_owned(),
                    answer["usage"]["completion_tokens"].as_u64().unwrap(),
                )
            })
        })
        .collect();
    let answers: Vec<(String, u64)> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    let steps = counter(&base, "oxtune_decode_steps_total") - steps_before;
    let tokens: u64 = answers.iter().map(|a| a.1).sum();
    // Decoded together: far fewer steps than tokens (one at a time takes one step per token).
    assert!(steps * 3 < tokens, "{steps} decode steps for {tokens} tokens: the requests were not batched");
    let mut differ = 0;
    for (i, p) in prompts.iter().enumerate() {
        let want_base = answer_alone(None, p, max_tokens);
        let want_adapter = answer_alone(Some(&adapter), p, max_tokens);
        assert_eq!(answers[2 * i].0, want_base, "prompt {i}, base model");
        assert_eq!(answers[2 * i + 1].0, want_adapter, "prompt {i}, adapter");
        differ += usize::from(want_base != want_adapter);
    }
    assert!(differ > 0, "the adapter changes no answer: the test cannot tell adapters apart");
}

#[test]
fn the_openai_client_selects_an_adapter_by_name() {
    let adapter = strong_adapter("client");
    let server = Server::start(&["--model", &model_dir(), "--adapters", &format!("strong={}", adapter.display())]);
    let Some(seen) = openai_client(&server.url, &["tiny-qwen3", "--adapter", "strong"]) else { return };
    assert_eq!(seen["models"], json!({"tiny-qwen3": null, "strong": "tiny-qwen3"}));
    let content = "Say something.";
    assert_eq!(seen["base_text"], answer_alone(None, content, 8));
    assert_eq!(seen["adapter_text"], answer_alone(Some(&adapter), content, 8));
    assert_ne!(seen["adapter_text"], seen["base_text"]);
    assert_eq!(seen["adapter_stream_text"], seen["adapter_text"]);
    assert_eq!(seen["adapter_model"], "strong");
}

fn vl_dir() -> std::path::PathBuf {
    fixtures().join("vlm/tiny-qwen2.5-vl")
}

/// The Qwen2.5-VL plugin, built as a dynamic library (the server binary
/// has no vision plugin built in).
fn vl_plugin() -> String {
    oxtune_tests::build_cdylib("oxtune-plugin-qwen2-5-vl", &["cdylib"]).display().to_string()
}

/// `oxtune serve` of the VL fixture with `extra` flags.
fn vl_server(extra: &[&str]) -> Server {
    let (plugin, dir) = (vl_plugin(), vl_dir().display().to_string());
    let mut args = vec!["--plugin", &plugin, "--model", &dir];
    args.extend_from_slice(extra);
    Server::start(&args)
}

/// What oxtune itself answers, alone, to the VL fixture's picture and a question.
fn image_answer_alone(question: &str, max_tokens: usize) -> String {
    let mut registry = Registry::with_builtins().unwrap();
    registry.load_path(std::path::Path::new(&vl_plugin()), &Default::default()).unwrap();
    let model = LoadedModel::load(&registry, &vl_dir(), &LoadOptions::default()).unwrap();
    let assets = TextAssets::load(&vl_dir()).unwrap();
    let messages = vec![json!({"role": "user", "content": format!("<image>{question}")})];
    let media = vec![oxtune_engine::media::MediaRef {
        kind: oxtune_engine::media::MediaKind::Image,
        sources: vec![vl_dir().join("test_image.png")],
    }];
    let prompt = oxtune_data::Prompt::Chat(messages, media);
    let row = oxtune_data::encode_prompt(&model, &assets, &prompt, &Default::default()).unwrap();
    let params = oxtune_engine::generate::SamplingParams {
        max_new_tokens: max_tokens,
        eos_token_ids: assets.eos_token_ids.clone(),
        ..Default::default()
    };
    let rows = [(row.input_ids.as_slice(), row.media.as_ref())];
    oxtune_engine::generate::generate_with_media(&model, Some(&assets.tokenizer), &rows, &params, |_, _| {})
        .unwrap()
        .remove(0)
        .text
}

#[test]
fn the_openai_client_sends_an_image() {
    let server = vl_server(&[]);
    let image = vl_dir().join("test_image.png").display().to_string();
    let Some(seen) = openai_client(&server.url, &["tiny-qwen2.5-vl", "--image", &image]) else { return };
    let want = image_answer_alone("What is in the picture?", 8);
    assert!(!want.is_empty());
    assert_eq!(seen["image_text"], want, "the image chat equals oxtune's own answer");
    assert_eq!(seen["image_stream_text"], want);
}

#[test]
fn image_parts_are_checked_and_local_files_need_a_flag() {
    use base64::Engine as _;
    let image = vl_dir().join("test_image.png");
    let png = std::fs::read(&image).unwrap();
    let data_url =
        |bytes: &[u8]| format!("data:image/png;base64,{}", base64::engine::general_purpose::STANDARD.encode(bytes));
    let ask = |url: &str| {
        json!({"model": "tiny-qwen2.5-vl", "max_tokens": 3, "temperature": 0, "messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "What is it?"}]}]})
    };
    let server = vl_server(&["--max-image-pixels", "4096"]);
    let url = &server.url;
    let local = image.display().to_string();
    is_error(&chat(url, ask(&local)), 400, "--allow-local-files");
    is_error(&chat(url, ask(&format!("file://{local}"))), 400, "--allow-local-files");
    is_error(&chat(url, ask("https://example.com/cat.png")), 400, "not fetched");
    is_error(&chat(url, ask("data:image/png;base64,!!!")), 400, "base64");
    is_error(&chat(url, ask(&data_url(b"not an image at all"))), 400, "not a PNG");
    // A 4096-pixel cap refuses a larger picture from its header alone.
    let (w, h) = image::image_dimensions(&image).unwrap();
    assert!(w * h > 4096);
    is_error(&chat(url, ask(&data_url(&png))), 400, "limit of 4096 pixels");
    drop(server);

    // With the flag a local file is read, and answers as the same image sent inline.
    let server = vl_server(&["--allow-local-files"]);
    let (status, from_file) = chat(&server.url, ask(&local));
    assert_eq!(status, 200, "{from_file}");
    let (status, inline) = chat(&server.url, ask(&data_url(&png)));
    assert_eq!(status, 200, "{inline}");
    assert_eq!(from_file["choices"][0]["message"], inline["choices"][0]["message"]);
    assert!(from_file["usage"]["prompt_tokens"].as_u64().unwrap() > 10, "the image's tokens count in the prompt");
    drop(server);

    // A text-only model says so.
    let server = Server::start(&["--model", &model_dir()]);
    let mut body = ask(&data_url(&png));
    body["model"] = json!("tiny-qwen3");
    is_error(&chat(&server.url, body), 400, "reads text only");
}

#[test]
fn thirty_two_concurrent_streaming_clients_all_get_their_answer() {
    let server = Server::start(&["--model", &model_dir()]);
    let prompts: Vec<String> = (0..32).map(|i| format!("question number {i}")).collect();
    // Each prompt's answer, asked alone and not streamed.
    let expected: Vec<String> = prompts
        .iter()
        .map(|p| {
            let body = json!({"model": "tiny-qwen3", "messages": [{"role": "user", "content": p}], "max_tokens": 6, "temperature": 0});
            let (status, answer) = chat(&server.url, body);
            assert_eq!(status, 200, "{answer}");
            answer["choices"][0]["message"]["content"].as_str().unwrap().to_owned()
        })
        .collect();
    let handles: Vec<_> = prompts
        .iter()
        .map(|p| {
            let url = server.url.clone();
            let body = json!({"model": "tiny-qwen3", "messages": [{"role": "user", "content": p}], "max_tokens": 6,
                              "temperature": 0, "stream": true});
            std::thread::spawn(move || streamed_text(&url, &body))
        })
        .collect();
    for (i, (handle, want)) in handles.into_iter().zip(&expected).enumerate() {
        assert_eq!(&handle.join().unwrap(), want, "client {i}");
    }
    // They decoded together: the batch ran far fewer steps than the 32 answers' tokens.
    let base = server.url.trim_end_matches("/v1");
    let tokens: u64 = expected.len() as u64 * 6;
    let steps = counter(base, "oxtune_decode_steps_total");
    let alone_steps: u64 = 32 * 5;
    assert!(steps < alone_steps + tokens / 3, "{steps} steps: the 32 streams were not batched");
}

/// The quick-start model taught, by a short full fine-tune with the CLI,
/// to answer a weather question with a Hermes tool call.
fn model_that_calls_tools() -> std::path::PathBuf {
    use oxtune_tests::cli::{fresh_dir, oxtune, succeeded};
    let dir = fresh_dir("serve-tool-model");
    std::fs::create_dir_all(&dir).unwrap();
    let rows: String = ["Paris", "Rome", "Oslo", "Lima", "Cairo", "Tokyo", "Berlin", "Madrid"]
        .iter()
        .map(|city| {
            let call = format!(
                "<tool_call>\n{{\"name\": \"get_weather\", \"arguments\": {{\"city\": \"{city}\"}}}}\n</tool_call>"
            );
            let row = json!({"messages": [{"role": "user", "content": format!("What is the weather in {city}?")},
                                          {"role": "assistant", "content": call}]});
            format!("{row}\n")
        })
        .collect();
    let data = dir.join("tools.jsonl");
    std::fs::write(&data, rows).unwrap();
    let model = workspace_root().join("examples/quickstart/model");
    let out = dir.join("run");
    let (model, data, out_dir) = (model.display().to_string(), data.display().to_string(), out.display().to_string());
    succeeded(&oxtune(
        &[
            "sft",
            "--model",
            &model,
            "--dataset",
            &data,
            "--output-dir",
            &out_dir,
            "--tuner",
            "full",
            "--learning-rate",
            "3e-3",
            "--warmup-ratio",
            "0",
            "--max-steps",
            "250",
            "--save-steps",
            "250",
            "--per-device-train-batch-size",
            "8",
            "--gradient-checkpointing",
            "false",
            "--split-ratio",
            "0",
        ],
        &[],
    ));
    out.join("checkpoint-250")
}

#[test]
fn the_openai_client_gets_tool_calls_plain_and_streamed() {
    let model = model_that_calls_tools();
    let server = Server::start(&["--model", &model.display().to_string()]);
    let Some(seen) = openai_client(&server.url, &["checkpoint-250", "--tools", "Oslo"]) else { return };
    assert_eq!(seen["finish"], "tool_calls", "{seen}");
    assert_eq!(seen["content"], Value::Null, "nothing but the call");
    assert_eq!(seen["calls"].as_array().unwrap().len(), 1, "{seen}");
    assert_eq!(seen["calls"][0]["name"], "get_weather");
    assert!(seen["calls"][0]["id"].as_str().unwrap().starts_with("call_"));
    let arguments: Value = serde_json::from_str(seen["calls"][0]["arguments"].as_str().unwrap()).unwrap();
    assert_eq!(arguments, json!({"city": "Oslo"}));
    // Streamed: the same call, no content leaked from the held-back markup.
    assert_eq!(seen["stream_finish"], "tool_calls");
    assert_eq!(seen["stream_content"], "");
    assert_eq!(seen["stream_calls"], json!([{"name": "get_weather", "arguments": seen["calls"][0]["arguments"]}]));
}

#[test]
fn n_sampled_choices_stream_with_their_indices_as_they_answer_plainly() {
    use std::io::BufRead;
    let server = Server::start(&["--model", &model_dir()]);
    let body = json!({"model": "tiny-qwen3", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8,
                      "temperature": 1.0, "seed": 3, "n": 3});
    let (status, plain) = chat(&server.url, body.clone());
    assert_eq!(status, 200, "{plain}");
    let want: Vec<&str> = (0..3).map(|i| plain["choices"][i]["message"]["content"].as_str().unwrap()).collect();
    assert!(want[0] != want[1] || want[1] != want[2], "different seeds sample differently: {want:?}");
    let mut streamed = body;
    streamed["stream"] = json!(true);
    let mut response = agent().post(&format!("{}/chat/completions", server.url)).send_json(&streamed).unwrap();
    let (mut texts, mut roles, mut finishes) = (vec![String::new(); 3], 0, 0);
    for line in std::io::BufReader::new(response.body_mut().as_reader()).lines() {
        let line = line.unwrap();
        let Some(data) = line.strip_prefix("data: ") else { continue };
        if data == "[DONE]" {
            break;
        }
        let chunk: Value = serde_json::from_str(data).unwrap();
        let choice = &chunk["choices"][0];
        let i = choice["index"].as_u64().unwrap() as usize;
        roles += usize::from(choice["delta"]["role"] == "assistant");
        finishes += usize::from(choice["finish_reason"].is_string());
        texts[i].push_str(choice["delta"]["content"].as_str().unwrap_or(""));
    }
    assert_eq!((roles, finishes), (3, 3));
    assert_eq!(texts, want, "each streamed choice is the plain choice with the same seed");
}
