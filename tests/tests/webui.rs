//! `oxtune web-ui` end to end: headless Chromium (Debian's package, driven
//! by puppeteer-core through `tests/webui/browser.mjs`, installed by
//! `.ci/fetch-chromium`) loads the page, chats (the streamed answer equals
//! the server's plain answer) and launches a short LoRA run on the
//! quick-start model whose curve updates live; the screenshot lands in
//! `target/webui-screenshot.png`. Then the UI's API without a browser:
//! paths outside the workspace refused, chatting with a checkpoint,
//! exporting one, stopping a run.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use oxtune_tests::{workspace_root, Server};
use serde_json::{json, Value};

fn agent() -> ureq::Agent {
    ureq::Agent::config_builder()
        .timeout_global(Some(Duration::from_secs(120)))
        .http_status_as_error(false)
        .build()
        .into()
}

fn post(url: &str, body: &Value) -> (u16, Value) {
    let mut response = agent().post(url).send_json(body).unwrap();
    let status = response.status().as_u16();
    (status, response.body_mut().read_json().unwrap_or(Value::Null))
}

fn get(url: &str) -> Value {
    agent().get(url).call().unwrap().body_mut().read_json().unwrap()
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), to.join(entry.file_name())).unwrap();
    }
}

/// A workspace with the quick-start model and its chat dataset.
fn workspace(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("oxtune-webui-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let quickstart = workspace_root().join("examples/quickstart");
    copy_dir(&quickstart.join("model"), &dir.join("model"));
    std::fs::copy(quickstart.join("sft.jsonl"), dir.join("sft.jsonl")).unwrap();
    dir
}

fn web_ui(dir: &Path) -> Server {
    let model = dir.join("model").display().to_string();
    let workspace = dir.display().to_string();
    let server = Server::start_subcommand("web-ui", &["--model", &model, "--workspace", &workspace]);
    assert!(server.url.ends_with('/'), "{}", server.url);
    server
}

/// Waits (bounded) until run `id` is no longer running; its summary.
fn wait_for_run(base: &str, id: &str) -> Value {
    let started = Instant::now();
    loop {
        let runs = get(&format!("{base}api/runs"));
        let run = runs["runs"].as_array().unwrap().iter().find(|r| r["id"] == id).cloned().unwrap();
        if run["status"] != "running" {
            return run;
        }
        assert!(started.elapsed() < Duration::from_secs(300), "run {id} never ended");
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn a_browser_chats_and_launches_a_run_whose_curve_updates() {
    let driver = workspace_root().join("target/webui-test");
    let chromium = std::env::var("CHROMIUM").unwrap_or_else(|_| "/usr/bin/chromium".into());
    if !Path::new(&chromium).exists() || !driver.join("node_modules/puppeteer-core").is_dir() {
        assert!(std::env::var_os("CI").is_none(), "chromium or puppeteer-core is missing: .ci/run installs them");
        eprintln!("skipping: run .ci/fetch-chromium first");
        return;
    }
    let dir = workspace("browser");
    let server = web_ui(&dir);
    let screenshot = workspace_root().join("target/webui-screenshot.png");
    let _ = std::fs::remove_file(&screenshot);
    let out = std::process::Command::new("node")
        .arg(driver.join("browser.mjs"))
        // 400 steps: the quick-start model trains 40 in under a second, and
        // the page must see the curve grow between its 1-second polls.
        .args(["--url", &server.url, "--model-dir", "model", "--dataset", "sft.jsonl", "--max-steps", "400"])
        .args(["--message", "What is two plus five?", "--timeout", "280"])
        .arg("--screenshot")
        .arg(&screenshot)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let seen: Value = serde_json::from_slice(&out.stdout).unwrap();

    // The streamed chat answer is the server's answer to the same request.
    let mut request = seen["chat_request"].clone();
    request["stream"] = json!(false);
    let (status, plain) = post(&format!("{}v1/chat/completions", server.url), &request);
    assert_eq!(status, 200, "{plain}");
    let answer = plain["choices"][0]["message"]["content"].as_str().unwrap();
    assert!(!answer.is_empty());
    assert_eq!(seen["chat_answer"], answer, "the page's streamed answer");
    assert!(seen["chat_updates"].as_u64().unwrap() >= 1);

    // The form's command, the run, its live curve and checkpoints.
    let preview = seen["command_preview"].as_str().unwrap();
    assert!(preview.starts_with("oxtune sft ") && preview.contains("--max-steps 400"), "{preview}");
    assert_eq!(seen["run_status"], "finished");
    assert_eq!(seen["loss_points_last"], 400);
    let counts: Vec<u64> = seen["loss_points_seen"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap()).collect();
    assert!(counts.len() >= 2 && counts[0] < 400, "the curve grew while the page watched: {counts:?}");
    assert_eq!(seen["checkpoints"], json!(["checkpoint-200", "checkpoint-400"]));
    let metrics = std::fs::read_to_string(dir.join("runs/ui-run/metrics.jsonl")).unwrap();
    assert_eq!(metrics.lines().count(), 400, "the run the page launched wrote its metrics in the workspace");
    assert!(std::fs::metadata(&screenshot).unwrap().len() > 10_000, "a screenshot was written");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn the_ui_api_confines_runs_to_the_workspace_and_serves_checkpoints() {
    let dir = workspace("api");
    let server = web_ui(&dir);
    let base = &server.url;
    let info = get(&format!("{base}api/info"));
    assert_eq!(Path::new(info["workspace"].as_str().unwrap()), dir.canonicalize().unwrap());

    // Paths outside the workspace, other subcommands and bad flag names are refused.
    let form = |flags: Value| json!({"subcommand": "sft", "flags": flags});
    let (status, body) = post(&format!("{base}api/command"), &form(json!({"model": "/etc", "dataset": "sft.jsonl"})));
    assert_eq!(status, 403, "{body}");
    assert!(body["error"]["message"].as_str().unwrap().contains("outside the workspace"));
    let (status, _) = post(&format!("{base}api/runs"), &form(json!({"model": "model", "output_dir": "../../escape"})));
    assert_eq!(status, 403);
    let (status, body) = post(&format!("{base}api/runs"), &json!({"subcommand": "bash", "flags": {}}));
    assert_eq!(status, 400, "{body}");
    let (status, body) = post(&format!("{base}api/command"), &form(json!({"model": "model", "x;rm -rf": "1"})));
    assert_eq!(status, 400, "{body}");
    assert!(get(&format!("{base}api/runs"))["runs"].as_array().unwrap().is_empty(), "nothing was launched");

    // A short run; then chat with its checkpoint and export it.
    let flags = json!({"model": "model", "dataset": "sft.jsonl", "output_dir": "runs/short", "max_steps": "4", "save_steps": "4"});
    let (status, run) = post(&format!("{base}api/runs"), &form(flags.clone()));
    assert_eq!(status, 201, "{run}");
    let id = run["id"].as_str().unwrap().to_owned();
    let done = wait_for_run(base, &id);
    assert_eq!(done["status"], "finished", "{}", get(&format!("{base}api/runs/{id}/log")));
    assert_eq!((done["step"].as_u64(), done["total_steps"].as_u64()), (Some(4), Some(4)));
    assert_eq!(done["checkpoints"], json!(["checkpoint-4"]));
    let records = get(&format!("{base}api/runs/{id}/metrics"))["records"].as_array().unwrap().len();
    assert_eq!(records, 4);
    // The same output folder again would mix two runs: refused.
    assert_eq!(post(&format!("{base}api/runs"), &form(flags)).0, 400);

    let (status, body) =
        post(&format!("{base}api/adapters"), &json!({"name": "short/4", "path": "runs/short/checkpoint-4"}));
    assert_eq!(status, 200, "{body}");
    let models = get(&format!("{base}v1/models"));
    assert_eq!(
        models["data"][1],
        json!({"id": "short/4", "object": "model", "created": models["data"][1]["created"],
                                         "owned_by": "oxtune", "root": "model", "parent": "model"})
    );
    let chat = json!({"model": "short/4", "messages": [{"role": "user", "content": "What is two plus five?"}],
                      "max_tokens": 6, "temperature": 0});
    let (status, body) = post(&format!("{base}v1/chat/completions"), &chat);
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["model"], "short/4");
    let (status, _) = post(&format!("{base}api/adapters"), &json!({"name": "x", "path": "/tmp"}));
    assert_eq!(status, 403);

    let (status, export) =
        post(&format!("{base}api/export"), &json!({"checkpoint": "runs/short/checkpoint-4", "kind": "merge-lora"}));
    assert_eq!(status, 201, "{export}");
    let exported = wait_for_run(base, export["id"].as_str().unwrap());
    assert_eq!(exported["status"], "finished");
    assert!(dir.join("runs/short/checkpoint-4-merged/config.json").is_file());

    // A long run is stopped, and says so.
    let long = json!({"model": "model", "dataset": "sft.jsonl", "output_dir": "runs/long", "max_steps": "100000"});
    let (status, run) = post(&format!("{base}api/runs"), &form(long));
    assert_eq!(status, 201);
    let id = run["id"].as_str().unwrap();
    std::thread::sleep(Duration::from_millis(500));
    let (status, stopped) = post(&format!("{base}api/runs/{id}/stop"), &json!({}));
    assert_eq!((status, stopped["status"].as_str()), (200, Some("stopped")));
    assert_eq!(wait_for_run(base, id)["status"], "stopped");
    assert_eq!(agent().get(&format!("{base}api/runs/nope/log")).call().unwrap().status().as_u16(), 404);
    drop(server);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn the_api_key_guards_the_ui_api_but_not_the_page() {
    let dir = workspace("key");
    let (model, ws) = (dir.join("model").display().to_string(), dir.display().to_string());
    let server = Server::start_subcommand("web-ui", &["--model", &model, "--workspace", &ws, "--api-key", "sesame"]);
    let status = |path: &str, key: Option<&str>| {
        let mut request = agent().get(&format!("{}{path}", server.url));
        if let Some(key) = key {
            request = request.header("authorization", &format!("Bearer {key}"));
        }
        request.call().unwrap().status().as_u16()
    };
    assert_eq!(status("", None), 200, "the page loads, so the key can be typed in");
    assert_eq!(status("app.js", None), 200);
    for path in ["api/runs", "api/info", "v1/models"] {
        assert_eq!(status(path, None), 401, "{path}");
        assert_eq!(status(path, Some("wrong")), 401, "{path}");
        assert_eq!(status(path, Some("sesame")), 200, "{path}");
    }
    drop(server);
    let _ = std::fs::remove_dir_all(&dir);
}
