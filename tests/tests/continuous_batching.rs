//! The continuous batch of the generation engine: rows that join at
//! different steps, with prompts of different lengths, their own sampling
//! settings and seeds, and rows that leave early, each decode exactly what
//! they decode alone — on a plain decoder and on Gemma-3's sliding-window
//! layers — and the cache shrinks when the longest rows leave.

use oxtune_data::TextAssets;
use oxtune_engine::generate::{generate, ContinuousBatch, Generation, RowRequest, SamplingParams, StepEvent};
use oxtune_engine::model::{LoadOptions, LoadedModel};
use oxtune_registry::Registry;
use oxtune_tests::fixtures;

fn load(name: &str) -> (LoadedModel, TextAssets) {
    let dir = fixtures().join("models").join(name);
    let model = LoadedModel::load(&Registry::with_builtins().unwrap(), &dir, &LoadOptions::default()).unwrap();
    (model, TextAssets::load(&dir).unwrap())
}

/// Rows: (prompt, settings, the step at which it joins).
fn rows(vocab: u32) -> Vec<(Vec<u32>, SamplingParams, usize)> {
    let prompt = |n: usize, salt: u32| (0..n as u32).map(|i| (i * 7 + salt * 13 + 3) % vocab).collect::<Vec<u32>>();
    let greedy = |max| SamplingParams { max_new_tokens: max, ..Default::default() };
    vec![
        (prompt(5, 1), greedy(12), 0),
        (prompt(17, 2), greedy(6), 2),
        (prompt(3, 3), SamplingParams { temperature: 0.9, top_k: 20, seed: 11, ..greedy(9) }, 2),
        (prompt(11, 4), SamplingParams { repetition_penalty: 1.3, ..greedy(10) }, 5),
        (prompt(40, 5), greedy(4), 7),
    ]
}

/// Runs `rows` through one continuous batch (each joining at its step);
/// returns each row's generation.
fn run_batched(
    model: &LoadedModel,
    assets: &TextAssets,
    rows: &[(Vec<u32>, SamplingParams, usize)],
) -> Vec<Generation> {
    let mut batch: ContinuousBatch<'_, usize> = ContinuousBatch::new(model);
    let mut done: Vec<Option<Generation>> = vec![None; rows.len()];
    let mut texts = vec![String::new(); rows.len()];
    let mut record = |events: Vec<StepEvent<usize>>, done: &mut Vec<Option<Generation>>| {
        for e in events {
            match e {
                StepEvent::Text(k, t) => texts[k].push_str(&t),
                StepEvent::Finished(k, g) => done[k] = Some(g),
            }
        }
    };
    let mut step = 0;
    while done.iter().any(Option::is_none) {
        for (k, (prompt, params, at)) in rows.iter().enumerate() {
            if *at == step {
                let request = RowRequest { prompt, media: None, params: params.clone(), adapter: None };
                let events = batch.join(k, request, &[], Some(&assets.tokenizer)).unwrap();
                record(events, &mut done);
            }
        }
        let events = batch.step(&[], Some(&assets.tokenizer)).unwrap();
        record(events, &mut done);
        step += 1;
        assert!(step < 100, "the batch never finished");
    }
    assert!(batch.is_empty() && batch.width() == 0);
    let out: Vec<Generation> = done.into_iter().map(Option::unwrap).collect();
    for (g, streamed) in out.iter().zip(&texts) {
        assert_eq!(&g.text, streamed, "the streamed pieces make the text");
    }
    out
}

fn rows_equal_alone(name: &str) {
    let (model, assets) = load(name);
    let rows = rows(model.vocab_size().unwrap() as u32);
    let batched = run_batched(&model, &assets, &rows);
    for (i, ((prompt, params, _), got)) in rows.iter().zip(&batched).enumerate() {
        let alone = generate(&model, Some(&assets.tokenizer), std::slice::from_ref(prompt), params, |_, _| {}).unwrap();
        assert_eq!(got.tokens, alone[0].tokens, "{name}: row {i}");
        assert_eq!(got.tokens.len(), params.max_new_tokens, "{name}: row {i} ran to its length");
    }
}

#[test]
fn rows_joining_and_leaving_decode_as_they_do_alone() {
    rows_equal_alone("tiny-qwen3");
}

#[test]
fn sliding_window_layers_decode_as_alone_in_a_continuous_batch() {
    rows_equal_alone("tiny-gemma3");
}

#[test]
fn the_cache_shrinks_when_the_longest_row_leaves_and_a_removed_row_keeps_its_tokens() {
    let (model, _) = load("tiny-qwen3");
    let greedy = |max| SamplingParams { max_new_tokens: max, ..Default::default() };
    let mut batch: ContinuousBatch<'_, &str> = ContinuousBatch::new(&model);
    let long: Vec<u32> = (0..60).map(|i| i % 50 + 1).collect();
    batch.join("long", RowRequest { prompt: &long, media: None, params: greedy(2), adapter: None }, &[], None).unwrap();
    batch
        .join("short", RowRequest { prompt: &[5, 6, 7], media: None, params: greedy(20), adapter: None }, &[], None)
        .unwrap();
    batch
        .join("gone", RowRequest { prompt: &[9, 9], media: None, params: greedy(20), adapter: None }, &[], None)
        .unwrap();
    assert_eq!((batch.len(), batch.width()), (3, 60));
    let finished = batch.step(&[], None).unwrap();
    assert!(matches!(&finished[..], [StepEvent::Finished("long", g)] if g.tokens.len() == 2), "{finished:?}");
    // The long prompt's columns were padding for the others: trimmed.
    assert_eq!((batch.len(), batch.width()), (2, 4));
    let gone: Generation = batch.remove(&"gone").unwrap().unwrap();
    assert_eq!(gone.tokens.len(), 2);
    assert_eq!((batch.len(), batch.width()), (1, 4));
    let alone = generate(&model, None, &[vec![5, 6, 7]], &greedy(20), |_, _| {}).unwrap();
    let mut rest = Vec::new();
    while !batch.is_empty() {
        rest.extend(batch.step(&[], None).unwrap());
    }
    assert!(matches!(&rest.last(), Some(StepEvent::Finished("short", g)) if g.tokens == alone[0].tokens));
}
