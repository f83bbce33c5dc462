"""The peer of `oxtune bench encode`: Hugging Face `datasets` + a
transformers tokenizer encode the same JSONL of conversations as ms-swift
does (the chat template rendered up to the answer with the generation
prompt, and through it; labels on the answer's tokens), with `num_proc`
worker processes, into an Arrow cache in a scratch folder.

Prints one JSON record: rows/s, and the peak resident memory of the main
process and of its largest worker (`datasets` runs `num_proc` workers, each
holding its own tokenizer).

usage: encode_peer.py MODEL DATA.jsonl --threads N --scratch DIR
MODEL is a Hugging Face folder or a GGUF file (its tokenizer and chat
template are read with `gguf_file=`, which needs the `gguf` package).
"""
import argparse
import json
import os
import resource
import time


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("model")
    parser.add_argument("data")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--scratch", required=True)
    args = parser.parse_args()
    os.environ.setdefault("HF_DATASETS_CACHE", os.path.join(args.scratch, "hf-cache"))
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    import datasets
    import pyarrow.compute
    from transformers import AutoTokenizer

    if args.model.endswith(".gguf"):
        tokenizer = AutoTokenizer.from_pretrained(os.path.dirname(os.path.abspath(args.model)),
                                                  gguf_file=os.path.basename(args.model))
    else:
        tokenizer = AutoTokenizer.from_pretrained(args.model)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e3

    def encode(row):
        messages = row["messages"]
        prompt = tokenizer.apply_chat_template(messages[:-1], add_generation_prompt=True, tokenize=True)
        ids = tokenizer.apply_chat_template(messages, tokenize=True)
        if hasattr(prompt, "keys"):  # transformers 5 returns a BatchEncoding
            prompt, ids = prompt["input_ids"], ids["input_ids"]
        labels = [-100] * len(prompt) + ids[len(prompt):]
        return {"input_ids": ids, "labels": labels}

    started = time.perf_counter()
    data = datasets.load_dataset("json", data_files=args.data, split="train")
    encoded = data.map(encode, num_proc=args.threads if args.threads > 1 else None,
                       remove_columns=data.column_names)
    lengths = pyarrow.compute.list_value_length(encoded.data.column("input_ids"))
    tokens = pyarrow.compute.sum(lengths).as_py()
    seconds = time.perf_counter() - started
    main_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e3
    worker_peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1e3
    print(json.dumps({
        "peer": "datasets+transformers",
        "rows": len(encoded),
        "threads": args.threads,
        "seconds": seconds,
        "rows_per_s": len(encoded) / seconds,
        "tokens_per_s": tokens / seconds,
        "memory_before_mb": before,
        "peak_memory_mb": main_peak,
        "worker_peak_memory_mb": worker_peak,
    }))


if __name__ == "__main__":
    main()
