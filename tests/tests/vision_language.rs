//! The Qwen2.5-VL, Qwen3-VL and InternVL plugins against transformers, loaded the
//! way users load them: built as cdylibs and opened at run time. For each
//! tiny reference checkpoint (`tests/fixtures/vlm`, transformers 5.24):
//! the processor's pixel rows and grid for `test_image.png`, the M-RoPE
//! position ids of the expanded prompt, and the logits. Then the `oxtune`
//! binary, built without these plugins, runs them: inference with
//! `--image`, LoRA SFT on image rows, the `--freeze-*` flags, and the
//! errors bad media rows get.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use oxtune_data::media::{encode_chat_with_media, encode_prompt_with_media, expand};
use oxtune_data::text::{EncodedRow, TextAssets};
use oxtune_engine::backend::BatchInfo;
use oxtune_engine::generate::{generate_with_media, SamplingParams};
use oxtune_engine::loss::causal_lm_loss;
use oxtune_engine::media::{batch_inputs, MediaKind, MediaRef};
use oxtune_engine::model::checkpoint::Trainable;
use oxtune_engine::model::{LoadOptions, LoadedModel};
use oxtune_registry::{Registry, SandboxConfig};
use oxtune_tests::cli::{fails_with, fresh_dir, metrics, oxtune, scratch, succeeded};
use oxtune_tests::{build_cdylib, fixtures, oxtune_bin};
use serde_json::json;

/// (fixture folder, plugin package) of the Qwen VL family.
const MODELS: [(&str, &str); 2] =
    [("tiny-qwen2.5-vl", "oxtune-plugin-qwen2-5-vl"), ("tiny-qwen3-vl", "oxtune-plugin-qwen3-vl")];

/// InternVL (dynamic tiles, 1-D positions).
const INTERNVL: (&str, &str) = ("tiny-internvl", "oxtune-plugin-internvl");

/// Every VL plugin, for what they all must do alike.
fn all_models() -> impl Iterator<Item = (&'static str, &'static str)> {
    MODELS.into_iter().chain([INTERNVL])
}

fn model_dir(name: &str) -> PathBuf {
    fixtures().join("vlm").join(name)
}

fn load(name: &str, package: &str) -> LoadedModel {
    load_with(name, package, LoadOptions::default())
}

fn load_with(name: &str, package: &str, options: LoadOptions) -> LoadedModel {
    let mut registry = Registry::with_builtins().unwrap();
    registry.load_path(&build_cdylib(package, &["cdylib"]), &SandboxConfig::default()).unwrap();
    LoadedModel::load(&registry, &model_dir(name), &options).unwrap_or_else(|e| panic!("{name}: {e}"))
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    let b = b.to_dtype(a.dtype()).unwrap();
    (a - b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap()
}

/// An integer tensor's values, flattened.
fn ints(t: &Tensor) -> Vec<i64> {
    t.flatten_all().unwrap().to_vec1::<i64>().unwrap()
}

/// Asserts that pixel rows (`features` values each) equal the processor's
/// `expected` rows within 1e-5.
fn assert_pixel_rows(name: &str, rows: Vec<f32>, features: usize, expected: &Tensor) {
    let pixels = Tensor::from_vec(rows, ((), features), &Device::Cpu).unwrap();
    assert_eq!(pixels.dims(), expected.dims(), "{name}: pixel rows");
    let diff = max_abs_diff(&pixels, expected);
    assert!(diff < 1e-5, "{name}: pixel values differ by {diff}");
}

fn image(path: &Path) -> MediaRef {
    MediaRef { kind: MediaKind::Image, sources: vec![path.to_owned()] }
}

#[test]
fn preprocessing_positions_and_logits_match_transformers() {
    for (name, package) in MODELS {
        let model = load(name, package);
        let dir = model_dir(name);
        let reference = candle_core::safetensors::load(dir.join("reference.safetensors"), &Device::Cpu).unwrap();
        let prepared = model.prepare_media(&[image(&dir.join("test_image.png"))], &serde_json::json!({})).unwrap();
        assert_eq!(prepared.len(), 1);
        let item = &prepared[0];
        let expected_grid: Vec<usize> = ints(&reference["image_grid_thw"]).iter().map(|&g| g as usize).collect();
        assert_eq!(item.grid, expected_grid, "{name}: grid");
        assert_pixel_rows(name, item.pixels.clone(), item.features, &reference["pixel_values"]);

        // The prompt as the chat template renders it: one placeholder.
        let template_ids = vec![5u32, 6, 1002, 1000, 1003, 7, 8, 9];
        let row = EncodedRow { labels: vec![-100; template_ids.len()], input_ids: template_ids, media: None };
        let row = expand(row, prepared, model.position_axes()).unwrap();
        let expected_ids: Vec<u32> = ints(&reference["input_ids"]).iter().map(|&t| t as u32).collect();
        assert_eq!(row.input_ids, expected_ids, "{name}: expanded ids");
        let media = row.media.as_ref().unwrap();
        let expected_positions = reference["position_ids"].squeeze(1).unwrap().to_vec2::<i64>().unwrap();
        let positions: Vec<Vec<i64>> =
            media.positions.iter().map(|axis| axis.iter().map(|&p| p as i64).collect()).collect();
        assert_eq!(positions, expected_positions, "{name}: M-RoPE positions");

        let n = row.input_ids.len();
        let (position_ids, inputs) = batch_inputs(&[(n, Some(media))], n, false, 3, &Device::Cpu).unwrap();
        let ids = Tensor::from_vec(row.input_ids.clone(), (1, n), &Device::Cpu).unwrap();
        let batch = BatchInfo { position_ids, media: inputs, ..Default::default() };
        let logits = model.forward(&ids, &batch, None, None).unwrap();
        let diff = max_abs_diff(&logits.to_dtype(DType::F32).unwrap(), &reference["logits"]);
        eprintln!("{name}: logits max diff {diff}");
        assert!(diff < 1e-4, "{name}: logits differ by {diff}");
    }
}

/// InternVL against transformers (`vlm/tiny-internvl`): the 4 tiles and
/// thumbnail of `test_image.png`, the `<img>` `<IMG_CONTEXT>`×20 `</img>`
/// expansion with plain positions, the projected image features, the
/// logits, the loss and the reference's gradients (vision tower,
/// projector and language model).
#[test]
fn internvl_tiles_features_logits_and_gradients_match_transformers() {
    let (name, package) = INTERNVL;
    let options = LoadOptions { trainable: Trainable::All, ..Default::default() };
    let model = load_with(name, package, options);
    let dir = model_dir(name);
    let r = candle_core::safetensors::load(dir.join("reference.safetensors"), &Device::Cpu).unwrap();
    let prepared = model.prepare_media(&[image(&dir.join("test_image.png"))], &json!({})).unwrap();
    assert_eq!(prepared.len(), 1);
    assert_eq!(prepared[0].grid, vec![5, 4, 4], "4 tiles and a thumbnail of 4x4 patches");
    let tiles = r["pixel_values"].flatten_from(1).unwrap();
    assert_pixel_rows(name, prepared[0].pixels.clone(), prepared[0].features, &tiles);

    // The prompt as the processor sees it: one <img><IMG_CONTEXT></img>.
    let template_ids = vec![5u32, 6, 1004, 1006, 1005, 7, 8, 9];
    let row = EncodedRow { labels: vec![-100; template_ids.len()], input_ids: template_ids, media: None };
    let row = expand(row, prepared, model.position_axes()).unwrap();
    let expected_ids: Vec<u32> = ints(&r["input_ids"]).iter().map(|&t| t as u32).collect();
    assert_eq!(row.input_ids, expected_ids, "expanded ids");
    let media = row.media.as_ref().unwrap();
    assert_eq!(media.positions, vec![(0..27).collect::<Vec<u32>>()], "text and image tokens count up by one");

    let n = row.input_ids.len();
    let (position_ids, inputs) = batch_inputs(&[(n, Some(media))], n, false, 1, &Device::Cpu).unwrap();
    let ids = Tensor::from_vec(row.input_ids.clone(), (1, n), &Device::Cpu).unwrap();
    let batch = BatchInfo { position_ids, media: inputs, ..Default::default() };
    let (logits, aux) = model.forward_with_aux(&ids, &batch).unwrap();
    let features = aux.get("image_features").expect("the plugin reports its image features");
    let diff = max_abs_diff(features, &r["image_features"]);
    assert!(diff < 1e-4, "image features differ by {diff}");
    let logits_diff = max_abs_diff(&logits, &r["logits"]);
    eprintln!("internvl: image features max diff {diff}, logits max diff {logits_diff}");
    assert!(logits_diff < 1e-4, "logits differ by {logits_diff}");

    let loss = causal_lm_loss(&logits, &r["labels"]).unwrap();
    let (got, want) = (loss.to_scalar::<f32>().unwrap(), r["loss"].flatten_all().unwrap().to_vec1::<f32>().unwrap()[0]);
    assert!((got - want).abs() < 1e-5, "loss {got} vs transformers {want}");
    let grads = loss.backward().unwrap();
    let mut checked = 0;
    for (key, want) in r.iter().filter(|(k, _)| k.starts_with("grad.")) {
        let param = &key["grad.".len()..];
        let var = model.weights().var(param).unwrap_or_else(|| panic!("{param} is not a trainable weight"));
        let got = grads.get(var.as_tensor()).unwrap_or_else(|| panic!("no gradient for {param}"));
        let scale = want.abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap().max(1e-8);
        let diff = max_abs_diff(got, want);
        assert!(diff <= 1e-4 * scale, "gradient of {param} differs by {diff} (scale {scale})");
        checked += 1;
    }
    assert_eq!(checked, 9, "the reference's nine gradients");
}

fn plugin(package: &str) -> String {
    build_cdylib(package, &["cdylib"]).display().to_string()
}

fn test_image(name: &str) -> String {
    model_dir(name).join("test_image.png").display().to_string()
}

#[test]
fn two_images_and_an_untagged_image_are_placed_where_they_belong() {
    let (name, package) = MODELS[0];
    let model = load(name, package);
    let assets = TextAssets::load(&model_dir(name)).unwrap();
    let img = model_dir(name).join("test_image.png");
    let two = [image(&img), image(&img)];
    let messages = vec![
        json!({"role": "user", "content": "First <image> then <image> compare."}),
        json!({"role": "assistant", "content": "Same."}),
    ];
    let options = json!({"max_pixels": 3136});
    let row = encode_chat_with_media(&model, &assets, &messages, &two, None, &options).unwrap();
    let media = row.media.as_ref().unwrap();
    // max_pixels 3136 shrinks 100x70 to 56x28 pixels (smart resize floors
    // both sides by the same factor): 2x4 patches, 2 tokens each.
    assert_eq!(media.items.iter().map(|i| i.grid.clone()).collect::<Vec<_>>(), vec![vec![1, 2, 4], vec![1, 2, 4]]);
    let pads: Vec<usize> = row.input_ids.iter().enumerate().filter(|(_, &t)| t == 1000).map(|(i, _)| i).collect();
    assert_eq!(pads.len(), 4);
    // Each image's two tokens sit between its own vision start and end.
    for block in pads.chunks(2) {
        assert_eq!(row.input_ids[block[0] - 1], 1002);
        assert_eq!(row.input_ids[block[1] + 1], 1003);
        assert_eq!(block[1] - block[0], 1);
    }
    assert!(pads[2] > pads[1] + 2, "text separates the two images");
    // Only the answer is labelled, never a vision token.
    assert!(pads.iter().all(|&p| row.labels[p] == -100));
    let positions = &media.positions;
    // The two tokens of an image share time and row, and differ in column.
    let at = |axis: usize, i: usize| positions[axis][pads[i]];
    assert_eq!((at(0, 1), at(1, 1), at(2, 1)), (at(0, 0), at(1, 0), at(2, 0) + 1));

    // An image with no tag goes before the first user message's text.
    let (messages, media) = oxtune_data::media::collect(
        &json!({"messages": [{"role": "user", "content": "Describe."}], "images": [img.display().to_string()]}),
        None,
    )
    .unwrap();
    let prompt = encode_prompt_with_media(&model, &assets, &messages, &media, &json!({})).unwrap();
    let first_pad = prompt.input_ids.iter().position(|&t| t == 1000).unwrap();
    let pads = prompt.input_ids.iter().filter(|&&t| t == 1000).count();
    assert_eq!(pads, 8, "the 1x4x8 grid of the full-size image makes 8 tokens");
    let describe = assets.tokenizer.encode("Describe.", false).unwrap();
    let text_at = prompt.input_ids.windows(describe.len()).position(|w| w == describe.as_slice()).unwrap();
    assert!(first_pad < text_at, "the untagged image precedes the text");
    // Released pixels (as training rows hold them) come back identical.
    let mut released = row.media.clone().unwrap();
    released.release_pixels(two.to_vec(), options.clone());
    assert!(released.items.iter().all(|i| i.pixels.is_empty()));
    assert_eq!(oxtune_engine::media::with_pixels(&model, &released).unwrap().items, row.media.as_ref().unwrap().items);
    // Both images' pixel rows reach the model, in order, and it runs.
    let n = row.input_ids.len();
    let (position_ids, inputs) = batch_inputs(&[(n, row.media.as_ref())], n, false, 3, &Device::Cpu).unwrap();
    assert_eq!(inputs.iter().find(|(k, _)| k == "pixel_values").unwrap().1.dims(), &[16, 1176]);
    let ids = Tensor::from_vec(row.input_ids.clone(), (1, n), &Device::Cpu).unwrap();
    let batch = BatchInfo { position_ids, media: inputs, ..Default::default() };
    assert_eq!(model.forward(&ids, &batch, None, None).unwrap().dims(), &[1, n, 1024]);
}

#[test]
fn a_binary_built_without_the_plugins_answers_about_an_image() {
    // The host binary first, the plugin cdylibs afterwards: nothing of
    // them is linked in.
    oxtune_bin();
    for (name, package) in all_models() {
        let dir = model_dir(name).display().to_string();
        let without = oxtune(&["infer", "--model", &dir, "--prompt", "Hi"], &[]);
        fails_with(&without, &["no", "Conditional"]);
        let so = plugin(package);
        let args = ["infer", "--plugin", &so, "--model", &dir, "--image", &test_image(name), "--prompt", "Describe."];
        let out = oxtune(&[&args[..], &["--max-new-tokens", "6"]].concat(), &[]);
        succeeded(&out);
        // The same request in process gives the same greedy answer.
        let model = load(name, package);
        let assets = TextAssets::load(&model_dir(name)).unwrap();
        let (messages, media) = oxtune_data::media::collect(
            &json!({"messages": [{"role": "user", "content": "Describe."}], "images": [test_image(name)]}),
            None,
        )
        .unwrap();
        let prompt = encode_prompt_with_media(&model, &assets, &messages, &media, &json!({})).unwrap();
        let params =
            SamplingParams { max_new_tokens: 6, eos_token_ids: assets.eos_token_ids.clone(), ..Default::default() };
        let expected =
            generate_with_media(&model, Some(&assets.tokenizer), &[prompt.as_prompt()], &params, |_, _| {}).unwrap();
        assert_eq!(String::from_utf8_lossy(&out.stdout).trim_end_matches('\n'), expected[0].text, "{name}");
        assert!(!expected[0].tokens.is_empty());
        // Image rows of a dataset are answered the same way.
        let data = image_dataset(name);
        let args =
            ["infer", "--plugin", &so, "--model", &dir, "--dataset", data.to_str().unwrap(), "--max-new-tokens", "6"];
        let out = oxtune(&args, &[]);
        succeeded(&out);
        let answers: Vec<serde_json::Value> =
            String::from_utf8_lossy(&out.stdout).lines().map(|l| serde_json::from_str(l).unwrap()).collect();
        assert_eq!(answers.len(), 3, "{name}");
        assert_eq!(answers[2]["labels"], "Tiny.");
        assert!(answers.iter().all(|a| a["response"].is_string()));
    }
}

/// Three image rows: two in ms-swift's messages form, one in the
/// `{"image", "text", "answer"}` form.
fn image_dataset(name: &str) -> PathBuf {
    let img = test_image(name);
    let mut rows: Vec<String> = [("What is shown?", "A small picture."), ("Colours?", "Red and blue.")]
        .iter()
        .map(|(q, a)| {
            json!({"messages": [{"role": "user", "content": format!("<image>{q}")}, {"role": "assistant", "content": a}],
                   "images": [img]})
            .to_string()
        })
        .collect();
    rows.push(json!({"image": img, "text": "Size?", "answer": "Tiny."}).to_string());
    scratch(&format!("vl-{name}.jsonl"), &rows.join("\n"))
}

fn sft(name: &str, package: &str, out: &Path, extra: &[&str]) -> std::process::Output {
    let (so, dir, data) = (plugin(package), model_dir(name).display().to_string(), image_dataset(name));
    let mut args = vec!["sft", "--plugin", &so, "--model", &dir, "--dataset", data.to_str().unwrap()];
    let out = out.to_str().unwrap();
    args.extend(["--output-dir", out, "--lora-dropout", "0"]);
    args.extend(extra);
    if !extra.contains(&"--learning-rate") {
        args.extend(["--learning-rate", "5e-3"]);
    }
    if !extra.contains(&"--max-steps") {
        args.extend(["--max-steps", "8"]);
    }
    oxtune(&args, &[])
}

#[test]
fn lora_sft_on_image_rows_lowers_the_loss() {
    for (name, package) in all_models() {
        let out = fresh_dir(&format!("vl-lora-{name}"));
        let flags = ["--per-device-train-batch-size", "3", "--max-steps", "16", "--learning-rate", "1e-2"];
        succeeded(&sft(name, package, &out, &flags));
        let losses: Vec<f64> = metrics(&out).iter().map(|m| m["loss"].as_f64().unwrap()).collect();
        // From ln(1024) = 6.93 (a random tiny model) down by at least 0.5.
        assert!(losses.last().unwrap() < &(losses[0] - 0.5), "{name}: {losses:?}");
        // Default freezing: LoRA on the language model only.
        let adapter = out.join("checkpoint-16").join("adapter_model.safetensors");
        let names: Vec<String> = candle_core::safetensors::load(&adapter, &Device::Cpu).unwrap().into_keys().collect();
        assert!(names.iter().any(|n| n.contains("layers.0.self_attn.q_proj.lora_A")), "{names:?}");
        let vision = |n: &String| n.contains("visual") || n.contains("vision_tower") || n.contains("projector");
        assert!(!names.iter().any(vision), "{name}: the vision tower was adapted: {names:?}");
    }
    // Asked to, LoRA reaches the vision tower too.
    let (name, package) = MODELS[0];
    let out = fresh_dir("vl-lora-vit");
    succeeded(&sft(name, package, &out, &["--freeze-vit", "false", "--max-steps", "2"]));
    let adapter = out.join("checkpoint-2").join("adapter_model.safetensors");
    let names: Vec<String> = candle_core::safetensors::load(&adapter, &Device::Cpu).unwrap().into_keys().collect();
    assert!(names.iter().any(|n| n.contains("visual.blocks.0.attn.qkv.lora_A")), "{names:?}");
}

#[test]
fn freezing_flags_leave_frozen_parameters_bit_identical() {
    let (name, package) = MODELS[1];
    let base = candle_core::safetensors::load(model_dir(name).join("model.safetensors"), &Device::Cpu).unwrap();
    type Case = (&'static [&'static str], fn(&str) -> bool);
    let cases: [Case; 2] = [
        (&["--freeze-vit", "true", "--freeze-aligner", "true"], |n| n.starts_with("model.visual.")),
        (&["--freeze-vit", "false", "--freeze-aligner", "false", "--freeze-llm", "true"], |n| {
            n.starts_with("model.language_model.") || n == "lm_head.weight"
        }),
    ];
    for (flags, frozen) in cases {
        let out = fresh_dir("vl-full");
        succeeded(&sft(name, package, &out, &[&["--tuner", "full", "--max-steps", "2"], flags].concat()));
        let saved = out.join("checkpoint-2").join("model.safetensors");
        let trained = candle_core::safetensors::load(&saved, &Device::Cpu).unwrap();
        for (param, before) in &base {
            let diff = max_abs_diff(&trained[param], before);
            if frozen(param) {
                assert_eq!(diff, 0.0, "{flags:?}: frozen `{param}` changed");
            }
        }
        let changed = base.iter().filter(|(p, b)| !frozen(p) && max_abs_diff(&trained[p.as_str()], b) > 0.0).count();
        assert!(changed > 10, "{flags:?}: only {changed} trainable parameters changed");
    }
}

#[test]
fn bad_media_rows_are_clear_errors() {
    let (name, package) = MODELS[0];
    let (so, dir) = (plugin(package), model_dir(name).display().to_string());
    let img = test_image(name);
    let corrupt = scratch("corrupt.png", "\u{89}PNG\r\n\u{1a}\nthis is not an image");
    let cases: Vec<(String, Vec<String>)> = vec![
        (
            json!({"messages": [{"role": "user", "content": "<image>Hi"}, {"role": "assistant", "content": "Yo"}],
                   "images": ["missing.png"]})
            .to_string(),
            vec!["bad.jsonl:2".into(), "missing.png does not exist".into()],
        ),
        (
            json!({"messages": [{"role": "user", "content": "<image>Hi"}, {"role": "assistant", "content": "Yo"}],
                   "images": [corrupt.display().to_string()]})
            .to_string(),
            vec!["bad.jsonl:2".into(), "corrupt.png is not a readable image".into()],
        ),
        (
            json!({"messages": [{"role": "user", "content": "<image><image>Hi"}, {"role": "assistant", "content": "Yo"}],
                   "images": [img]})
            .to_string(),
            vec!["bad.jsonl:2".into(), "2 <image> tag(s) but 1 image(s)".into()],
        ),
    ];
    let good = json!({"messages": [{"role": "user", "content": "<image>Hi"}, {"role": "assistant", "content": "Yo"}],
                      "images": [img]})
    .to_string();
    for (bad, needles) in cases {
        let data = scratch("bad.jsonl", &format!("{good}\n{bad}\n"));
        let out = fresh_dir("vl-bad");
        let args = [
            "sft",
            "--plugin",
            &so,
            "--model",
            &dir,
            "--dataset",
            data.to_str().unwrap(),
            "--output-dir",
            out.to_str().unwrap(),
        ];
        let needles: Vec<&str> = needles.iter().map(String::as_str).collect();
        fails_with(&oxtune(&args, &[]), &needles);
    }
    // A large image is scaled into the pixel budget, not rejected.
    let out = oxtune(
        &[
            "infer",
            "--plugin",
            &so,
            "--model",
            &dir,
            "--image",
            &img,
            "--prompt",
            "Hi",
            "--max-pixels",
            "3136",
            "--max-new-tokens",
            "1",
        ],
        &[],
    );
    succeeded(&out);
    let missing = oxtune(&["infer", "--plugin", &so, "--model", &dir, "--image", "nope.png", "--prompt", "Hi"], &[]);
    fails_with(&missing, &["nope.png does not exist"]);
}

#[test]
fn a_folder_of_frames_is_a_video_with_time_positions() {
    let (name, package) = MODELS[0];
    let model = load(name, package);
    let frames = fresh_dir("vl-frames");
    std::fs::create_dir_all(&frames).unwrap();
    for i in 0..3 {
        std::fs::copy(model_dir(name).join("test_image.png"), frames.join(format!("frame-{i}.png"))).unwrap();
    }
    let video = MediaRef { kind: MediaKind::Video, sources: vec![frames.clone()] };
    let prepared = model.prepare_media(std::slice::from_ref(&video), &json!({"fps": 2.0})).unwrap();
    let item = &prepared[0];
    // Three frames padded to four make two temporal patches.
    assert_eq!((item.grid.clone(), item.pixels_input.as_str()), (vec![2, 4, 8], "pixel_values_videos"));
    // Qwen2.5-VL spaces temporal patches by their duration: 2 frames at
    // 2 fps is one second, times tokens_per_second (4 in this config).
    assert_eq!(item.positions[0], [vec![0; 8], vec![4; 8]].concat());
    assert_eq!(item.placeholder_token, 1001);
    let assets = TextAssets::load(&model_dir(name)).unwrap();
    let messages = vec![json!({"role": "user", "content": "<video>What happens?"})];
    let prompt =
        encode_prompt_with_media(&model, &assets, &messages, std::slice::from_ref(&video), &json!({"fps": 2.0}))
            .unwrap();
    assert_eq!(prompt.input_ids.iter().filter(|&&t| t == 1001).count(), 16);
    let params = SamplingParams { max_new_tokens: 3, ..Default::default() };
    let out = generate_with_media(&model, None, &[prompt.as_prompt()], &params, |_, _| {}).unwrap();
    assert_eq!(out[0].tokens.len(), 3);

    // Qwen3-VL: each temporal patch is its own group, announced by its
    // time; one pixel budget (16384 here) covers all four padded frames,
    // so the frames shrink to 64x32 pixels: 2 tokens per group.
    let (name, package) = MODELS[1];
    let model = load(name, package);
    let assets = TextAssets::load(&model_dir(name)).unwrap();
    let prompt = encode_prompt_with_media(&model, &assets, &messages, &[video], &json!({"fps": 2.0})).unwrap();
    let media = prompt.media.as_ref().unwrap();
    assert_eq!(media.items.iter().map(|i| i.grid.clone()).collect::<Vec<_>>(), vec![vec![1, 2, 4], vec![1, 2, 4]]);
    let text = assets.tokenizer.decode(&prompt.input_ids, false).unwrap();
    assert_eq!(text.matches(" seconds><|vision_start|><|video_pad|><|video_pad|><|vision_end|>").count(), 2, "{text}");
    assert!(text.contains("<1.0 seconds>"), "{text}");
    // Each group's tokens sit at time 0 of their own block, as images do.
    let pads: Vec<usize> = prompt.input_ids.iter().enumerate().filter(|(_, &t)| t == 1001).map(|(i, _)| i).collect();
    let p = &media.positions;
    assert_eq!((p[0][pads[0]], p[0][pads[1]]), (p[1][pads[0]], p[1][pads[1]]));
    assert!(p[0][pads[2]] > p[0][pads[1]] + 1, "the timestamp text separates the groups");
    let out = generate_with_media(&model, None, &[prompt.as_prompt()], &params, |_, _| {}).unwrap();
    assert_eq!(out[0].tokens.len(), 3);
}

#[test]
fn packed_and_padding_free_image_rows_train_as_padded_rows() {
    // Three image rows per step: padded, laid end to end in one row, and
    // packed into one bin must train the same thing — which needs each
    // sample's M-RoPE positions restarted, its images in order, and
    // attention kept within it.
    for (name, package) in all_models() {
        let run = |tag: &str, extra: &[&str]| {
            let out = fresh_dir(&format!("vl-pack-{name}-{tag}"));
            let mut args = vec!["--max-steps", "3", "--per-device-train-batch-size", "3"];
            args.extend_from_slice(extra);
            succeeded(&sft(name, package, &out, &args));
            metrics(&out).iter().map(|m| m["loss"].as_f64().unwrap()).collect::<Vec<f64>>()
        };
        let padded = run("padded", &[]);
        assert_eq!(padded.len(), 3);
        let packed: [(&str, &[&str]); 2] =
            [("free", &["--padding-free", "true"]), ("packed", &["--packing", "true", "--max-length", "4096"])];
        for (tag, extra) in packed {
            let got = run(tag, extra);
            assert_eq!(got.len(), 3, "{name} {tag}");
            for (step, (a, b)) in got.iter().zip(&padded).enumerate() {
                assert!((a - b).abs() <= 1e-4 * b.abs().max(1e-3), "{name} {tag} step {}: {a} vs padded {b}", step + 1);
            }
        }
    }
}

/// Videos through each model's own video processor settings
/// (`vlm/*/video`: 6 frames of 84x56 stated as 2 fps, all kept, made with
/// transformers 5.24): pixel rows, grids, the expanded ids (Qwen3-VL's
/// timestamps included), M-RoPE positions and logits.
///
/// The one rule oxtune chooses: after a Qwen2.5-VL video the text resumes
/// one past the video's largest position (Qwen's `get_rope_index`, and
/// transformers up to 5.2: what the released checkpoints were trained
/// with); transformers 5.24 resumes at `start + max(h, w) / 2`, below the
/// video's last time position. Everything up to the end of the video is
/// the same under both rules and is compared exactly; the text after it
/// is compared shifted by the difference, and the logits with the
/// reference's own positions fed in must match everywhere.
#[test]
fn video_preprocessing_ids_positions_and_logits_match_transformers() {
    for (name, package) in MODELS {
        let model = load(name, package);
        let dir = model_dir(name).join("video");
        let reference = candle_core::safetensors::load(dir.join("reference.safetensors"), &Device::Cpu).unwrap();
        let config: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(dir.join("video_preprocessor_config.json")).unwrap())
                .unwrap();
        let frames: Vec<PathBuf> = (0..6).map(|i| dir.join(format!("frames/frame_{i:03}.png"))).collect();
        let video = MediaRef { kind: MediaKind::Video, sources: frames };
        let options = json!({"video": config, "fps": 2.0});
        let assets = TextAssets::load(&model_dir(name)).unwrap();
        let messages = vec![json!({"role": "user", "content": "<video>What happens?"})];
        let prompt = encode_prompt_with_media(&model, &assets, &messages, &[video], &options).unwrap();
        let media = prompt.media.as_ref().unwrap();

        // Qwen3-VL gives each temporal patch its own item: [1, h, w] each.
        let expected_grid: Vec<usize> = ints(&reference["video_grid_thw"]).iter().map(|&g| g as usize).collect();
        let t: usize = media.items.iter().map(|i| i.grid[0]).sum();
        assert!(media.items.iter().all(|i| i.grid[1..] == expected_grid[1..]), "{name}: grids");
        assert_eq!(t, expected_grid[0], "{name}: temporal patches");
        let rows: Vec<f32> = media.items.iter().flat_map(|i| i.pixels.clone()).collect();
        assert_pixel_rows(name, rows, media.items[0].features, &reference["pixel_values_videos"]);

        let expected_ids: Vec<u32> = ints(&reference["input_ids"]).iter().map(|&t| t as u32).collect();
        assert_eq!(prompt.input_ids, expected_ids, "{name}: expanded ids");

        let expected_positions = reference["position_ids"].squeeze(1).unwrap().to_vec2::<i64>().unwrap();
        let positions: Vec<Vec<i64>> =
            media.positions.iter().map(|axis| axis.iter().map(|&p| p as i64).collect()).collect();
        let last_video = prompt.input_ids.iter().rposition(|&t| t == 1001).unwrap();
        let shift = match name {
            // One past the video's largest position, vs 5.24's resume point.
            "tiny-qwen2.5-vl" => {
                let largest = (0..3).map(|a| positions[a][..=last_video].iter().copied().max().unwrap()).max().unwrap();
                largest + 1 - expected_positions[0][last_video + 1]
            }
            _ => 0,
        };
        for axis in 0..3 {
            assert_eq!(positions[axis][..=last_video], expected_positions[axis][..=last_video], "{name}: axis {axis}");
            let after: Vec<i64> = expected_positions[axis][last_video + 1..].iter().map(|p| p + shift).collect();
            assert_eq!(positions[axis][last_video + 1..], after, "{name}: axis {axis} after the video");
        }
        if name == "tiny-qwen2.5-vl" {
            assert_eq!(shift, 6, "the fixture's note: 5.24 resumes at 23, max + 1 is 29");
        }

        let n = prompt.input_ids.len();
        let (position_ids, inputs) = batch_inputs(&[(n, Some(media))], n, false, 3, &Device::Cpu).unwrap();
        let ids = Tensor::from_vec(prompt.input_ids.clone(), (1, n), &Device::Cpu).unwrap();
        let batch = BatchInfo { position_ids, media: inputs.clone(), ..Default::default() };
        let logits = model.forward(&ids, &batch, None, None).unwrap().to_dtype(DType::F32).unwrap();
        let upto = last_video + 1;
        let diff = max_abs_diff(&logits.narrow(1, 0, upto).unwrap(), &reference["logits"].narrow(1, 0, upto).unwrap());
        assert!(diff < 1e-4, "{name}: logits up to the end of the video differ by {diff}");
        let theirs = reference["position_ids"].to_dtype(DType::U32).unwrap();
        let batch = BatchInfo { position_ids: Some(theirs), media: inputs, ..Default::default() };
        let logits = model.forward(&ids, &batch, None, None).unwrap().to_dtype(DType::F32).unwrap();
        let diff = max_abs_diff(&logits, &reference["logits"]);
        assert!(diff < 1e-4, "{name}: logits with transformers' positions differ by {diff}");
    }
}
