#!/usr/bin/env bash
# Rebuilds the quick-start model and data from nothing, with oxtune itself:
# a generated corpus of plain facts, a BPE tokenizer trained on it, a small
# Qwen3-architecture model pretrained with `oxtune pt` (about 3.5 minutes on
# two cores), and the chat dataset `oxtune sft` fine-tunes it on.
set -euo pipefail
cd "$(dirname "$0")/../.."
work=target/quickstart-build
rm -rf "$work"
cargo run -q -p oxtune-data --example quickstart_init -- "$work"
cargo run -q -p oxtune -- pt --model "$work/init" --dataset "$work/pretrain.jsonl" --tuner full \
    --output-dir "$work/pt" --max-steps 1200 --per-device-train-batch-size 16 --learning-rate 3e-3 \
    --warmup-ratio 0.03 --weight-decay 0.01 --split-ratio 0.02 --eval-steps 300 --save-total-limit 1
dest=examples/quickstart
rm -rf "$dest/model"
mkdir -p "$dest/model"
for file in config.json model.safetensors tokenizer.json tokenizer_config.json generation_config.json; do
    cp "$work/pt/checkpoint-1200/$file" "$dest/model/"
done
cp "$work/sft.jsonl" "$dest/sft.jsonl"
cp "$work/grpo.jsonl" "$dest/grpo.jsonl"
cp "$work/pt/metrics.jsonl" "$dest/pretrain-metrics.jsonl"
echo "wrote $dest/model, $dest/sft.jsonl, $dest/grpo.jsonl and $dest/pretrain-metrics.jsonl"
