//! Datasets larger than memory: records read one at a time from JSONL,
//! CSV and Parquet (the same records whatever the format, bad ones named
//! by file and row), and `--streaming` runs that encode into a tokenised
//! dataset on disk, train exactly what the in-memory path trains, reuse
//! the encoding on the next run and never leave a half-written one.

use std::path::{Path, PathBuf};

use oxtune_data::read_records;
use oxtune_tests::cli::{fails_with, fresh_dir, metrics, oxtune, scratch, succeeded, tiny};
use oxtune_tests::fixtures;
use serde_json::Value;

fn data(name: &str) -> PathBuf {
    fixtures().join("data").join(name)
}

fn values(path: &Path) -> Vec<Value> {
    read_records(path).unwrap().into_iter().map(|r| Value::Object(r.value)).collect()
}

#[test]
fn parquet_and_csv_records_equal_their_jsonl_twins() {
    let chats = values(&data("chats.parquet"));
    assert_eq!(chats.len(), 16, "both row groups are read");
    assert_eq!(chats, values(&data("chats.jsonl")));
    assert_eq!(values(&data("alpaca.csv")), values(&data("alpaca.jsonl")), "empty cells are null, quotes kept");
    // CSV records are numbered by the line they start on (a quoted newline spans two).
    let lines: Vec<usize> = read_records(&data("alpaca.csv")).unwrap().iter().map(|r| r.line).collect();
    assert_eq!(lines, vec![2, 3, 4, 6]);
}

#[test]
fn a_corrupt_parquet_page_a_ragged_csv_row_and_a_non_parquet_file_are_named() {
    let err = read_records(&data("chats-corrupt.parquet")).unwrap_err().to_string();
    assert!(err.contains("chats-corrupt.parquet:9: row 9"), "the first row of the broken row group: {err}");
    let ragged = scratch("ragged.csv", "instruction,input,output\na,b,c\nd,e\n");
    let err = read_records(&ragged).unwrap_err().to_string();
    assert!(err.contains("ragged.csv:3: 2 fields where the header has 3"), "{err}");
    let not_parquet = scratch("not.parquet", "{\"text\": \"a\"}\n");
    let err = read_records(&not_parquet).unwrap_err().to_string();
    assert!(err.contains("not.parquet:0: not a readable Parquet file"), "{err}");
}

/// `oxtune sft` on tiny-qwen3 with `extra` flags, writing into `out`.
fn sft(dataset: &str, out: &Path, extra: &[&str]) -> std::process::Output {
    let model = tiny("tiny-qwen3");
    let mut args = vec!["sft", "--model", &model, "--dataset", dataset, "--output-dir", out.to_str().unwrap()];
    args.extend(["--max-steps", "3", "--split-ratio", "0.2", "--per-device-train-batch-size", "2"]);
    args.extend(extra);
    oxtune(&args, &[])
}

/// Each step's loss and evaluation loss.
fn curve(out: &Path) -> Vec<(f64, Option<f64>)> {
    metrics(out).iter().map(|m| (m["loss"].as_f64().unwrap(), m["eval_loss"].as_f64())).collect()
}

/// Cache entries (finished or partial) under `cache`.
fn entries(cache: &Path) -> Vec<String> {
    let Ok(dir) = std::fs::read_dir(cache) else { return Vec::new() };
    let mut names: Vec<String> = dir.map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    names.sort();
    names
}

#[test]
fn a_streamed_run_trains_what_an_in_memory_run_trains_and_reuses_its_encoding() {
    let cache = fresh_dir("stream-cache");
    let cache_flag = cache.to_str().unwrap();
    // 16 Parquet records sampled to 20 (a whole copy and 4 drawn), a held-out share.
    let dataset = format!("{}#20", data("chats.parquet").display());
    for packing in ["false", "true"] {
        let layout = ["--packing", packing, "--max-length", "64"];
        let in_memory = fresh_dir(&format!("stream-off-{packing}"));
        succeeded(&sft(&dataset, &in_memory, &layout));
        let streamed = fresh_dir(&format!("stream-on-{packing}"));
        let run = sft(
            &dataset,
            &streamed,
            &[&layout[..], &["--streaming", "true", "--dataset-cache-dir", cache_flag]].concat(),
        );
        succeeded(&run);
        let curve = curve(&streamed);
        assert_eq!(curve, self::curve(&in_memory), "packing {packing}: the same rows in the same order");
        assert!(curve.last().unwrap().1.is_some(), "the held-out rows are evaluated");
    }
    assert_eq!(entries(&cache).len(), 1, "one tokenised dataset: {:?}", entries(&cache));
    // The next run reuses it; another --max-length is another entry (rows cut, counted); the
    // cache can be bypassed.
    let again = fresh_dir("stream-again");
    let run = sft(&dataset, &again, &["--streaming", "true", "--dataset-cache-dir", cache_flag, "--max-length", "64"]);
    let stderr = String::from_utf8_lossy(&run.stderr).into_owned();
    assert!(run.status.success() && stderr.contains("reused"), "{stderr}");
    let shorter = fresh_dir("stream-shorter");
    let cut = ["--max-length", "40", "--truncation-strategy", "right"];
    let run =
        sft(&dataset, &shorter, &[&["--streaming", "true", "--dataset-cache-dir", cache_flag][..], &cut].concat());
    let stderr = String::from_utf8_lossy(&run.stderr).into_owned();
    assert!(run.status.success() && stderr.contains("longer than --max-length 40 were cut on the right"), "{stderr}");
    assert_eq!(entries(&cache).len(), 2, "{:?}", entries(&cache));
    let fresh = fresh_dir("stream-fresh");
    let flags = [
        "--streaming",
        "true",
        "--dataset-cache-dir",
        cache_flag,
        "--max-length",
        "64",
        "--load-from-cache-file",
        "false",
    ];
    let run = sft(&dataset, &fresh, &flags);
    let stderr = String::from_utf8_lossy(&run.stderr).into_owned();
    assert!(run.status.success() && stderr.contains("encoded in"), "{stderr}");
    assert_eq!(curve(&fresh), curve(&again), "encoding again gives the same rows");
}

#[test]
fn a_bad_record_stops_a_streamed_run_naming_it_and_leaves_no_tokenised_dataset() {
    let cache = fresh_dir("stream-bad-cache");
    let cache_flag = cache.to_str().unwrap();
    let good = std::fs::read_to_string(data("chats.jsonl")).unwrap();
    let mut lines: Vec<&str> = good.lines().collect();
    lines.insert(5, "{\"messages\": [{\"role\": \"user\"");
    let bad = scratch("stream-bad.jsonl", &(lines.join("\n") + "\n"));
    let bad = bad.to_str().unwrap();
    let out = fresh_dir("stream-bad");
    let run = sft(bad, &out, &["--streaming", "true", "--dataset-cache-dir", cache_flag]);
    fails_with(&run, &["stream-bad.jsonl:6:"]);
    assert!(entries(&cache).is_empty(), "nothing half-written is left: {:?}", entries(&cache));
    let out = fresh_dir("stream-bad-skipped");
    let run = sft(bad, &out, &["--streaming", "true", "--dataset-cache-dir", cache_flag, "--skip-bad-records"]);
    let stderr = String::from_utf8_lossy(&run.stderr).into_owned();
    assert!(run.status.success() && stderr.contains("skipped 1 bad record(s)"), "{stderr}");
    // Without the flag, the entry that skipped it is not silently used.
    let out = fresh_dir("stream-bad-again");
    fails_with(
        &sft(bad, &out, &["--streaming", "true", "--dataset-cache-dir", cache_flag]),
        &["stream-bad.jsonl:6:", "--skip-bad-records"],
    );
}

/// `oxtune rlhf --rlhf-type ALGO` on tiny-qwen3 with `extra` flags.
fn rlhf(algo: &str, dataset: &Path, out: &Path, extra: &[&str]) -> std::process::Output {
    let model = tiny("tiny-qwen3");
    let mut args = vec!["rlhf", "--rlhf-type", algo, "--model", &model, "--dataset", dataset.to_str().unwrap()];
    args.extend(["--output-dir", out.to_str().unwrap(), "--max-steps", "2", "--per-device-train-batch-size", "2"]);
    args.extend(["--split-ratio", "0.25"]);
    args.extend(extra);
    oxtune(&args, &[])
}

#[test]
fn streamed_preference_pairs_and_kto_completions_train_as_in_memory() {
    let cache = fresh_dir("stream-pref-cache");
    let cache_flag = cache.to_str().unwrap();
    let topics = ["sky", "grass", "snow", "sun", "sea", "night", "leaf", "rose"];
    let pairs: String = topics
        .iter()
        .map(|t| {
            format!(
                "{{\"prompt\": \"Colour of the {t}?\", \"chosen\": \"It is bright.\", \"rejected\": \"No idea.\"}}\n"
            )
        })
        .collect();
    let pairs = scratch("stream-pairs.jsonl", &pairs);
    let kto: String = topics
        .iter()
        .enumerate()
        .map(|(i, t)| {
            format!("{{\"prompt\": \"Colour of the {t}?\", \"completion\": \"Maybe.\", \"label\": {}}}\n", i % 2 == 0)
        })
        .collect();
    let kto = scratch("stream-kto.jsonl", &kto);
    for (algo, data) in [("dpo", &pairs), ("kto", &kto)] {
        let in_memory = fresh_dir(&format!("stream-{algo}-off"));
        succeeded(&rlhf(algo, data, &in_memory, &[]));
        let streamed = fresh_dir(&format!("stream-{algo}-on"));
        succeeded(&rlhf(algo, data, &streamed, &["--streaming", "true", "--dataset-cache-dir", cache_flag]));
        assert_eq!(curve(&streamed), curve(&in_memory), "{algo}: the same items in the same order");
    }
    assert_eq!(entries(&cache).len(), 2, "pairs and completions are entries of their own: {:?}", entries(&cache));
}

#[test]
fn streaming_is_refused_where_a_dataset_is_read_into_memory() {
    let model = tiny("tiny-qwen3");
    let prompts = scratch("stream-prompts.jsonl", "{\"prompt\": \"a\"}\n");
    let out = fresh_dir("stream-grpo");
    let args = ["rlhf", "--rlhf-type", "grpo", "--model", &model, "--dataset", prompts.to_str().unwrap()];
    let extra = ["--output-dir", out.to_str().unwrap(), "--streaming", "true", "--reward-funcs", "format"];
    let run = oxtune(&[&args[..], &extra].concat(), &[]);
    fails_with(&run, &["--streaming: `rlhf --rlhf-type grpo` reads its dataset into memory"]);
}
