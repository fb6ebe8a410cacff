"""Training throughput (fwd + bwd) of the policy model on one GPU, three ways, one JSON line each.

  hf_sdpa         transformers Qwen2ForCausalLM, attn_implementation="sdpa"
  megatron_sdpa   our Megatron GPTModel (policy.model.build_model, local spec + SDPA core attention)
  megatron_local  Megatron's plain local spec (unfused DotProductAttention, explicit causal mask)

Model: Qwen2.5-1.5B shape (hidden 1536, 28 layers, 12 heads, 2 KV heads, ffn 8960, vocab 151936,
tied embeddings), random init, bf16, batch 1 x seq 4096, TP=1 in one process. MFU uses the FLOP
count of /work/shared/tools/gpu_baseline_probe.py: 6 N + 12 L h S per token, 989 TFLOP/s peak.
Reference on an H200 (probe, untied embeddings): HF+SDPA 33.5k tok/s (43% MFU), local spec
14.8k (19%), local spec + SDPA 29.6k (38%).

Needs torch, transformers 5 and megatron-core (no Transformer Engine, Apex or vLLM).
  python tools/bench_policy_gpu.py            # on a GPU machine, a few minutes at most
  python tools/bench_policy_gpu.py --tiny     # tiny model on CPU or GPU, a smoke test (< 1 min)
Writes the lines also to $OUT/bench_policy_gpu.jsonl when OUT is set.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time
import traceback

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

PEAK_FLOPS = 989e12  # H100 / H200 dense bf16

FULL = dict(vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
            num_attention_heads=12, num_key_value_heads=2, rope_theta=1e6, rms_norm_eps=1e-6,
            tie_word_embeddings=True, max_position_embeddings=32768)
TINY = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, rope_theta=1e6, rms_norm_eps=1e-6,
            tie_word_embeddings=True, max_position_embeddings=512)


def flops_per_token(cfg: dict, seq: int) -> tuple[float, float]:
    """(training FLOPs per token, parameter count N) exactly as the baseline probe counts them."""
    h, L, ffn, V = (cfg["hidden_size"], cfg["num_hidden_layers"], cfg["intermediate_size"],
                    cfg["vocab_size"])
    kv_ratio = cfg["num_key_value_heads"] / cfg["num_attention_heads"]
    attn_proj = h * h * (1 + 2 * kv_ratio) + h * h
    mlp = 3 * h * ffn
    n = L * (attn_proj + mlp) + 2 * V * h
    return 6 * n + 12 * L * h * seq, int(n)


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def time_steps(step, warmup: int, steps: int) -> float:
    for _ in range(warmup):
        step()
    sync()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    sync()
    return (time.perf_counter() - start) / steps


def free_memory():
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def peak_memory_gb() -> float | None:
    return torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None


def bench_hf(cfg, ids, dtype, device, warmup, steps):
    import transformers

    config = transformers.Qwen2Config(**cfg)
    with torch.device(device):
        model = transformers.Qwen2ForCausalLM._from_config(config, attn_implementation="sdpa",
                                                          dtype=dtype)
    model.train()

    def step():
        model(input_ids=ids, labels=ids).loss.backward()
        model.zero_grad(set_to_none=True)

    try:
        return time_steps(step, warmup, steps)
    finally:
        del model


def bench_megatron(cfg, ids, dtype, attention, warmup, steps):
    from megatron_lead.policy.model import build_model

    hf_config = dict(cfg, architectures=["Qwen2ForCausalLM"], model_type="qwen2")
    model = build_model(hf_config, dtype=dtype, attention=attention)[0]
    model.train()
    seq = ids.size(1)
    positions = torch.arange(seq, device=ids.device).unsqueeze(0)
    # Megatron's unfused attention needs the mask spelled out; SDPA is causal without one.
    mask = (torch.triu(torch.ones(seq, seq, dtype=torch.bool, device=ids.device), 1).view(1, 1, seq, seq)
            if attention == "local" else None)

    def step():
        loss = model(input_ids=ids, position_ids=positions, attention_mask=mask, labels=ids)
        loss.float().mean().backward()
        model.zero_grad(set_to_none=True)

    try:
        return time_steps(step, warmup, steps)
    finally:
        del model


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tiny", action="store_true", help="tiny model, short sequence (smoke test)")
    p.add_argument("--seq", type=int, default=None, help="sequence length (4096; 128 with --tiny)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps (3; 1 with --tiny)")
    p.add_argument("--steps", type=int, default=None, help="timed steps (8; 2 with --tiny)")
    p.add_argument("--configs", default="hf_sdpa,megatron_sdpa,megatron_local",
                   help="comma-separated subset of hf_sdpa, megatron_sdpa, megatron_local")
    args = p.parse_args(argv)

    configs = args.configs.split(",")
    unknown = set(configs) - {"hf_sdpa", "megatron_sdpa", "megatron_local"}
    if unknown:
        p.error(f"unknown --configs entries: {', '.join(sorted(unknown))}")
    cuda = torch.cuda.is_available()
    if not cuda and not args.tiny:
        p.error("no CUDA device: run with --tiny for the CPU smoke test")
    cfg = TINY if args.tiny else FULL
    seq = args.seq or (128 if args.tiny else 4096)
    warmup = args.warmup if args.warmup is not None else (1 if args.tiny else 3)
    steps = args.steps or (2 if args.tiny else 8)
    dtype = torch.bfloat16 if cuda else torch.float32
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    fpt, n_params = flops_per_token(cfg, seq)

    torch.manual_seed(0)
    ids = torch.randint(0, cfg["vocab_size"], (1, seq), device=device)
    common = {"seq": seq, "batch": 1, "dtype": str(dtype).removeprefix("torch."),
              "device": torch.cuda.get_device_name() if cuda else "cpu", "params": n_params,
              "tied_embeddings": cfg["tie_word_embeddings"], "warmup": warmup, "steps": steps}
    from megatron_lead.policy.parallel import init_parallel

    init_parallel(1, 1)  # a process group of one (nccl on GPU, gloo on CPU)
    out_path = os.path.join(os.environ["OUT"], "bench_policy_gpu.jsonl") if os.environ.get("OUT") else None

    failed = False
    for name in configs:
        free_memory()
        result = {"config": name, **common}
        try:
            if name == "hf_sdpa":
                t = bench_hf(cfg, ids, dtype, device, warmup, steps)
            else:
                t = bench_megatron(cfg, ids, dtype, name.split("_")[1], warmup, steps)
            result.update(step_s=round(t, 4), tokens_per_s=round(seq / t, 1),
                          mfu=round(seq * fpt / t / PEAK_FLOPS, 4) if cuda else None,
                          peak_mem_gb=round(peak_memory_gb(), 2) if cuda else None)
        except Exception as e:  # noqa: BLE001 - report and go on with the other configs
            failed = True
            result["error"] = f"{type(e).__name__}: {e}"[:500]
            result["traceback"] = traceback.format_exc()[-1500:]
        line = json.dumps(result)
        print(line, flush=True)
        if out_path:
            with open(out_path, "a") as f:
                f.write(line + "\n")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
