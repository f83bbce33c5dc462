//! Makes the raw material of the quick-start model: a small generated
//! corpus of plain facts, a byte-level BPE tokenizer trained on it with
//! `tokenizers`, a Qwen3-architecture config sized for two CPU cores, and
//! randomly initialised weights (normal, std 0.02; norms at one).
//!
//! `examples/quickstart/make.sh` runs this, then pretrains the model with
//! `oxtune pt` and writes the SFT dataset; the result ships in
//! `examples/quickstart/model`.
//!
//! Usage: `cargo run -p oxtune-data --example quickstart_init -- OUT_DIR`

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use oxtune_engine::rng::SplitMix64;
use serde_json::json;
use tokenizers::models::bpe::{BpeTrainerBuilder, BPE};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::{AddedToken, DecoderWrapper, NormalizerWrapper, PostProcessorWrapper, PreTokenizerWrapper};

const NUMBERS: [&str; 21] = [
    "zero",
    "one",
    "two",
    "three",
    "four",
    "five",
    "six",
    "seven",
    "eight",
    "nine",
    "ten",
    "eleven",
    "twelve",
    "thirteen",
    "fourteen",
    "fifteen",
    "sixteen",
    "seventeen",
    "eighteen",
    "nineteen",
    "twenty",
];
const COLOURS: [(&str, &str); 10] = [
    ("the sky", "blue"),
    ("grass", "green"),
    ("snow", "white"),
    ("the sun", "yellow"),
    ("coal", "black"),
    ("a ripe tomato", "red"),
    ("an orange", "orange"),
    ("a lemon", "yellow"),
    ("the sea", "blue"),
    ("a plum", "purple"),
];
const SOUNDS: [(&str, &str); 8] = [
    ("dog", "woof"),
    ("cat", "meow"),
    ("cow", "moo"),
    ("duck", "quack"),
    ("sheep", "baa"),
    ("owl", "hoot"),
    ("lion", "roar"),
    ("frog", "croak"),
];

/// The special tokens: end of text, and ChatML's turn markers.
const SPECIAL: [&str; 3] = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"];

/// ChatML, as Qwen models render it.
const CHAT_TEMPLATE: &str = "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}";

/// One fact, as a sentence: a sum, a colour or an animal's sound.
fn fact(rng: &mut SplitMix64) -> String {
    let pick = |rng: &mut SplitMix64, n: usize| (rng.next_u64() % n as u64) as usize;
    match pick(rng, 3) {
        0 => {
            let a = pick(rng, 11);
            let b = pick(rng, 11);
            format!("{} plus {} is {}.", NUMBERS[a], NUMBERS[b], NUMBERS[a + b])
        }
        1 => {
            let (thing, colour) = COLOURS[pick(rng, COLOURS.len())];
            format!("{thing} is {colour}.")
        }
        _ => {
            let (animal, sound) = SOUNDS[pick(rng, SOUNDS.len())];
            let article = if animal.starts_with(['a', 'e', 'i', 'o', 'u']) { "an" } else { "a" };
            format!("{article} {animal} says {sound}.")
        }
    }
}

/// `count` short paragraphs of facts, one per line.
fn corpus(count: usize, seed: u64) -> Vec<String> {
    let mut rng = SplitMix64::new(seed);
    (0..count)
        .map(|_| {
            let sentences = 2 + (rng.next_u64() % 3) as usize;
            let text: Vec<String> = (0..sentences).map(|_| fact(&mut rng)).collect();
            let mut text = text.join(" ");
            text[..1].make_ascii_uppercase();
            text
        })
        .collect()
}

/// Chat rows asking for the same facts, for the quick start's SFT: every
/// sum of two numbers up to ten, every colour and every sound, each asked
/// in one of a few phrasings.
fn chat_rows(seed: u64) -> Vec<serde_json::Value> {
    let mut rng = SplitMix64::new(seed);
    let mut rows = Vec::new();
    let mut ask = |question: String, answer: String| {
        let mut answer = answer;
        answer[..1].make_ascii_uppercase();
        rows.push(
            json!({"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]}),
        );
    };
    for a in 0..=10 {
        for b in 0..=10 {
            let question = match rng.next_u64() % 2 {
                0 => format!("What is {} plus {}?", NUMBERS[a], NUMBERS[b]),
                _ => format!("How much is {} plus {}?", NUMBERS[a], NUMBERS[b]),
            };
            ask(question, format!("{} plus {} is {}.", NUMBERS[a], NUMBERS[b], NUMBERS[a + b]));
        }
    }
    for _ in 0..4 {
        for (thing, colour) in COLOURS {
            ask(format!("What colour is {thing}?"), format!("{thing} is {colour}."));
        }
        for (animal, sound) in SOUNDS {
            let article = if animal.starts_with(['a', 'e', 'i', 'o', 'u']) { "an" } else { "a" };
            ask(format!("What does {article} {animal} say?"), format!("{article} {animal} says {sound}."));
        }
    }
    rows
}

/// Arithmetic prompts with their answers (a word), for the GRPO example:
/// the accuracy reward compares a completion's last word with `solution`.
fn grpo_prompts() -> Vec<serde_json::Value> {
    let mut rows = Vec::new();
    for a in 0..=10 {
        for b in 0..=10 {
            rows.push(
                json!({"query": format!("What is {} plus {}?", NUMBERS[a], NUMBERS[b]), "solution": NUMBERS[a + b]}),
            );
        }
    }
    rows
}

fn train_tokenizer(corpus_file: &Path, out: &Path) -> tokenizers::Result<usize> {
    let mut trainer = BpeTrainerBuilder::new()
        .vocab_size(640)
        .min_frequency(2)
        .show_progress(false)
        .special_tokens(SPECIAL.iter().map(|t| AddedToken::from(*t, true)).collect())
        .initial_alphabet(ByteLevel::alphabet().into_iter().collect())
        .build();
    let mut tokenizer = tokenizers::TokenizerBuilder::<
        BPE,
        NormalizerWrapper,
        PreTokenizerWrapper,
        PostProcessorWrapper,
        DecoderWrapper,
    >::new()
    .with_model(BPE::default())
    .with_normalizer(None)
    .with_pre_tokenizer(Some(ByteLevel::new(false, true, true).into()))
    .with_post_processor(Some(ByteLevel::new(false, true, true).into()))
    .with_decoder(Some(ByteLevel::new(false, true, true).into()))
    .build()?;
    tokenizer.train_from_files(&mut trainer, vec![corpus_file.display().to_string()])?;
    tokenizer.save(out.join("tokenizer.json"), true)?;
    Ok(tokenizer.get_vocab_size(true))
}

/// Random parameters for a Qwen3 config: N(0, 0.02) matrices, unit norms.
fn init_weights(config: &serde_json::Value, seed: u64) -> candle_core::Result<HashMap<String, Tensor>> {
    let get = |k: &str| config[k].as_u64().expect("set below") as usize;
    let (hidden, inter, vocab, layers) =
        (get("hidden_size"), get("intermediate_size"), get("vocab_size"), get("num_hidden_layers"));
    let (heads, kv_heads, head_dim) = (get("num_attention_heads"), get("num_key_value_heads"), get("head_dim"));
    let mut rng = SplitMix64::new(seed);
    let mut tensors = HashMap::new();
    let mut normal = |name: String, shape: (usize, usize), tensors: &mut HashMap<String, Tensor>| {
        let values: Vec<f32> = (0..shape.0 * shape.1).map(|_| (rng.normal() * 0.02) as f32).collect();
        tensors.insert(name, Tensor::from_vec(values, shape, &Device::Cpu).expect("sizes match"));
    };
    let ones = |n: usize| Tensor::ones(n, candle_core::DType::F32, &Device::Cpu);
    normal("model.embed_tokens.weight".into(), (vocab, hidden), &mut tensors);
    for i in 0..layers {
        let p = format!("model.layers.{i}");
        normal(format!("{p}.self_attn.q_proj.weight"), (heads * head_dim, hidden), &mut tensors);
        normal(format!("{p}.self_attn.k_proj.weight"), (kv_heads * head_dim, hidden), &mut tensors);
        normal(format!("{p}.self_attn.v_proj.weight"), (kv_heads * head_dim, hidden), &mut tensors);
        normal(format!("{p}.self_attn.o_proj.weight"), (hidden, heads * head_dim), &mut tensors);
        normal(format!("{p}.mlp.gate_proj.weight"), (inter, hidden), &mut tensors);
        normal(format!("{p}.mlp.up_proj.weight"), (inter, hidden), &mut tensors);
        normal(format!("{p}.mlp.down_proj.weight"), (hidden, inter), &mut tensors);
        tensors.insert(format!("{p}.self_attn.q_norm.weight"), ones(head_dim)?);
        tensors.insert(format!("{p}.self_attn.k_norm.weight"), ones(head_dim)?);
        tensors.insert(format!("{p}.input_layernorm.weight"), ones(hidden)?);
        tensors.insert(format!("{p}.post_attention_layernorm.weight"), ones(hidden)?);
    }
    tensors.insert("model.norm.weight".into(), ones(hidden)?);
    Ok(tensors)
}

fn main() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let out: PathBuf = std::env::args().nth(1).ok_or("usage: quickstart_init OUT_DIR")?.into();
    let model = out.join("init");
    std::fs::create_dir_all(&model)?;
    let paragraphs = corpus(6000, 1);
    let corpus_file = out.join("corpus.txt");
    std::fs::write(&corpus_file, paragraphs.join("\n") + "\n")?;
    let pretrain: String = paragraphs.iter().map(|p| format!("{}\n", json!({"text": p}))).collect();
    std::fs::write(out.join("pretrain.jsonl"), pretrain)?;
    let sft: String = chat_rows(3).iter().map(|r| format!("{r}\n")).collect();
    std::fs::write(out.join("sft.jsonl"), sft)?;
    let grpo: String = grpo_prompts().iter().map(|r| format!("{r}\n")).collect();
    std::fs::write(out.join("grpo.jsonl"), grpo)?;
    let vocab = train_tokenizer(&corpus_file, &model)?;
    let tokenizer = tokenizers::Tokenizer::from_file(model.join("tokenizer.json"))?;
    let id = |t: &str| tokenizer.token_to_id(t).expect("special tokens are in the vocabulary");
    let tokenizer_config = json!({
        "bos_token": null, "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>", "unk_token": null,
        "chat_template": CHAT_TEMPLATE, "model_max_length": 512, "tokenizer_class": "PreTrainedTokenizerFast",
    });
    std::fs::write(model.join("tokenizer_config.json"), serde_json::to_string_pretty(&tokenizer_config)?)?;
    let generation =
        json!({"eos_token_id": [id("<|im_end|>"), id("<|endoftext|>")], "pad_token_id": id("<|endoftext|>")});
    std::fs::write(model.join("generation_config.json"), serde_json::to_string_pretty(&generation)?)?;
    let config = json!({
        "architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "attention_bias": false,
        "hidden_size": 128, "intermediate_size": 384, "num_hidden_layers": 4, "num_attention_heads": 4,
        "num_key_value_heads": 2, "head_dim": 32, "hidden_act": "silu", "max_position_embeddings": 512,
        "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "tie_word_embeddings": true, "vocab_size": vocab,
        "bos_token_id": null, "eos_token_id": id("<|im_end|>"), "pad_token_id": id("<|endoftext|>"),
        "torch_dtype": "float32", "use_sliding_window": false,
    });
    std::fs::write(model.join("config.json"), serde_json::to_string_pretty(&config)?)?;
    candle_core::safetensors::save(&init_weights(&config, 2)?, model.join("model.safetensors"))?;
    println!(
        "{}: corpus of {} paragraphs, SFT chats, tokenizer of {vocab} tokens, random weights",
        out.display(),
        paragraphs.len()
    );
    Ok(())
}
