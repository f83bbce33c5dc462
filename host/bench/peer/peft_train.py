"""The PyTorch + PEFT peer of `oxtune bench train`: the same model, shapes and
tuner, trained with transformers + peft in a plain torch loop (AdamW, the
model in --dtype — f32 by default; under bf16/f16 PEFT keeps the adapter in
f32, its default `autocast_adapter_dtype` — every position labelled, a fixed
batch), printing one JSON object.

usage: python peft_train.py MODEL [--batch 4] [--seq 128] [--steps 3]
                            [--tuner lora|full] [--r 8] [--targets q_proj,v_proj|all-linear]
                            [--threads N] [--dtype f32|bf16|f16] [--cache DIR]

MODEL is a Hugging Face folder or a GGUF file. A GGUF file is dequantised to
f32 once (transformers + the `gguf` package, in a child process so its
memory does not count) and kept as a folder under --cache.
needs: pip install torch transformers peft gguf
"""
import argparse, hashlib, json, os, resource, subprocess, sys, time


def convert(gguf, out):
    """Writes `gguf` as a float32 Hugging Face folder `out`."""
    import torch
    from transformers import AutoModelForCausalLM

    d, f = os.path.dirname(os.path.abspath(gguf)), os.path.basename(gguf)
    model = AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=torch.float32)
    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    clean = type(model)(config)
    clean.load_state_dict(model.state_dict())
    tmp = out + ".partial"
    clean.save_pretrained(tmp)
    os.replace(tmp, out)


def folder_of(model, cache):
    """The Hugging Face folder to load: `model` itself, or its cached conversion."""
    if os.path.isdir(model):
        return model
    stat = os.stat(model)
    key = hashlib.sha256(f"{os.path.abspath(model)}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    out = os.path.join(cache, f"{os.path.basename(model)}-{key}")
    if not os.path.isdir(out):
        os.makedirs(cache, exist_ok=True)
        subprocess.run([sys.executable, __file__, "--convert", model, out], check=True)
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("model", nargs="?")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--steps", type=int, default=3, help="timed steps, after one warm-up step")
    ap.add_argument("--tuner", default="lora", choices=["lora", "full"])
    ap.add_argument("--r", type=int, default=8)
    ap.add_argument("--targets", default="q_proj,v_proj")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--dtype", default="f32", help="f32, bf16 or f16 (also float32, bfloat16, float16)")
    ap.add_argument("--gradient-checkpointing", action="store_true",
                    help="recompute each layer's activations in the backward pass (transformers' own)")
    ap.add_argument("--cache", default=os.path.join(os.environ.get("TMPDIR", "/tmp"), "oxtune-peer-models"))
    ap.add_argument("--convert", nargs=2, metavar=("GGUF", "OUT"), help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.convert:
        return convert(*a.convert)
    if a.model is None:
        ap.error("give MODEL, a Hugging Face folder or a GGUF file")

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    folder = folder_of(a.model, a.cache)
    import torch
    import transformers
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(a.threads)
    torch.set_num_interop_threads(1)
    torch.manual_seed(0)
    dtypes = {"f32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16,
              "bfloat16": torch.bfloat16, "f16": torch.float16, "float16": torch.float16}
    if a.dtype not in dtypes:
        ap.error(f"--dtype {a.dtype}: use f32, bf16 or f16")
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtypes[a.dtype])
    if a.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if a.tuner == "lora":
        import peft
        from peft import LoraConfig, get_peft_model

        targets = "all-linear" if a.targets == "all-linear" else a.targets.split(",")
        config = LoraConfig(r=a.r, lora_alpha=2 * a.r, lora_dropout=0.0, target_modules=targets, bias="none",
                            task_type="CAUSAL_LM")
        model = get_peft_model(model, config)
        versions = {"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__}
    else:
        versions = {"torch": torch.__version__, "transformers": transformers.__version__}
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-4)

    vocab = model.config.vocab_size
    ids = torch.tensor([[((r * a.seq + i) * 7919 + 13) % vocab for i in range(a.seq)] for r in range(a.batch)])
    times = []
    for _ in range(a.steps + 1):
        start = time.perf_counter()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - start)
    timed = times[1:]
    tokens = a.batch * a.seq
    print(json.dumps({
        "peer": "pytorch+peft" if a.tuner == "lora" else "pytorch",
        **versions,
        "threads": torch.get_num_threads(),
        "tuner": a.tuner,
        "batch_size": a.batch,
        "seq_len": a.seq,
        "gradient_checkpointing": a.gradient_checkpointing,
        "dtype": str(dtypes[a.dtype]).removeprefix("torch."),
        "timed_steps": len(timed),
        "seconds_per_step": sum(timed) / len(timed),
        "tokens_per_s": tokens * len(timed) / sum(timed),
        "trainable_params": sum(p.numel() for p in trainable),
        "loss_last": float(loss.item()),
        "peak_memory_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e6,
    }))


if __name__ == "__main__":
    main()
