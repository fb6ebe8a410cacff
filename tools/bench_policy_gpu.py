"""Training throughput (fwd + bwd) of the policy on one GPU against HF transformers, one JSON line
per (config, workload).

Workloads (the same token ids for every config):
  single  one sequence of 4,096 tokens
  rl      an RL batch: --rl-seqs sequences with long-tailed lengths (lognormal, sigma 0.9, mean
          about 3k before the 8k cap; the longest is set to the cap, as a truncated rollout;
          fixed seed), processed as one step of gradient accumulation over micro-batches
Configs:
  ours             our policy path: Megatron GPTModel (local spec + SDPA core attention), sequences
                   packed without padding (Megatron's PackedSeqParams; flash varlen attention on
                   GPU), micro-batches of at most --max-tokens tokens, every transformer layer
                   torch.compiled (dynamic shapes), log-probs chunked over tokens, through
                   policy.model.forward_backward (Megatron's schedule), loss = -mean log-prob
  ours_eager       the same without torch.compile
  hf_sdpa          transformers Qwen2ForCausalLM, attn_implementation="sdpa", padded micro-batches
                   of --hf-micro-batch sequences (attention mask, labels -100 on padding), LM loss
  hf_sdpa_compile  the same under torch.compile(model)
  megatron_sdpa    (single only) the previous row: one padded sequence, Megatron's fused LM loss
  megatron_local   (single only) Megatron's plain local spec (unfused attention, explicit mask)

Model: Qwen2.5-1.5B shape (hidden 1536, 28 layers, 12 heads, 2 KV heads, ffn 8960, vocab 151936,
tied embeddings), random init, bf16, TP=1 in one process. Throughput counts real tokens only
(padding is waste); MFU = useful FLOPs / s / 989 TFLOP/s, with useful FLOPs per sequence of length
S = S (6 N + 12 L h S), the FLOP count of ../shared/tools/gpu_baseline_probe.py summed per sequence.
Timing: warm-up passes (compilation happens there), then timed passes; peak memory is
torch.cuda.max_memory_allocated over the config's run.

Needs torch, transformers 5 and megatron-core (no Transformer Engine, Apex or vLLM).
  python tools/bench_policy_gpu.py                        # a GPU machine; tools/gpu_session.sh runs it
  python tools/bench_policy_gpu.py --tiny                 # tiny model on CPU or GPU, a smoke test
  python tools/bench_policy_gpu.py --configs ours --workloads rl
Appends the lines also to $OUT/bench_policy_gpu.jsonl when OUT is set.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
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
CONFIGS = ("ours", "ours_eager", "hf_sdpa", "hf_sdpa_compile", "megatron_sdpa", "megatron_local")
SINGLE_ONLY = ("megatron_sdpa", "megatron_local")


def flops_per_token(cfg: dict, seq: int) -> tuple[float, float]:
    """(training FLOPs per token of a sequence of length seq, parameter count N), as the probe."""
    h, L, ffn, V = (cfg["hidden_size"], cfg["num_hidden_layers"], cfg["intermediate_size"],
                    cfg["vocab_size"])
    kv_ratio = cfg["num_key_value_heads"] / cfg["num_attention_heads"]
    attn_proj = h * h * (1 + 2 * kv_ratio) + h * h
    mlp = 3 * h * ffn
    n = L * (attn_proj + mlp) + 2 * V * h
    return 6 * n + 12 * L * h * seq, int(n)


def useful_flops(cfg: dict, lengths: list[int]) -> float:
    return sum(n * flops_per_token(cfg, n)[0] for n in lengths)


def rl_lengths(n: int, mean: float, cap: int, floor: int, seed: int) -> list[int]:
    """Long-tailed lengths (see the module docstring); the same list for a given seed."""
    g = torch.Generator().manual_seed(seed)
    sigma = 0.9
    mu = math.log(mean) - sigma ** 2 / 2  # lognormal mean = exp(mu + sigma^2 / 2)
    draws = torch.exp(mu + sigma * torch.randn(n, generator=g, dtype=torch.float64))
    lengths = [int(min(max(x, floor), cap)) for x in draws.tolist()]
    lengths[max(range(n), key=lambda i: lengths[i])] = cap
    return lengths


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def free_memory():
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def timed(step, warmup: int, steps: int) -> tuple[float, float, int]:
    """(seconds per step, seconds of the warm-up (compilation included), graphs torch.compile
    built during the timed steps: anything but 0 means the timing includes compilation)."""
    from torch._dynamo.utils import counters

    start = time.perf_counter()
    for _ in range(warmup):
        step()
    sync()
    warm = time.perf_counter() - start
    graphs = counters["stats"]["unique_graphs"]
    start = time.perf_counter()
    for _ in range(steps):
        step()
    sync()
    return (time.perf_counter() - start) / steps, warm, counters["stats"]["unique_graphs"] - graphs


# ----------------------------------------------------------------------------- HF transformers

def hf_step(cfg, dtype, device, seqs: list[torch.Tensor], micro_batch: int, compile_model: bool):
    """One pass of fwd+bwd over seqs in padded micro-batches; returns (step, padded token count)."""
    import transformers

    config = transformers.Qwen2Config(**cfg)
    with torch.device(device):
        model = transformers.Qwen2ForCausalLM._from_config(config, attn_implementation="sdpa", dtype=dtype)
    model.train()
    run = torch.compile(model) if compile_model else model
    batches, padded = [], 0
    for i in range(0, len(seqs), micro_batch):
        group = seqs[i:i + micro_batch]
        width = max(len(s) for s in group)
        ids = torch.zeros(len(group), width, dtype=torch.long, device=device)
        mask = torch.zeros(len(group), width, dtype=torch.long, device=device)
        for r, s in enumerate(group):
            ids[r, :len(s)] = s
            mask[r, :len(s)] = 1
        labels = ids.masked_fill(mask == 0, -100)
        batches.append((ids, None if len(group) == 1 else mask, labels))
        padded += len(group) * width

    def step():
        for ids, mask, labels in batches:
            run(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
        model.zero_grad(set_to_none=True)

    return step, padded


# ----------------------------------------------------------------------------- Megatron (ours)

def ours_step(cfg, dtype, seqs: list[torch.Tensor], max_tokens: int, compile_layers: bool):
    """One pass of fwd+bwd over seqs packed into micro-batches of at most max_tokens tokens,
    through policy.model.forward_backward with chunked log-probs."""
    from megatron_lead.policy.model import build_model, forward_backward
    from megatron_lead.policy.packing import pack_micro_batches
    from megatron_lead.policy.train_step import _token_logprobs

    hf_config = dict(cfg, architectures=["Qwen2ForCausalLM"], model_type="qwen2")
    model = build_model(hf_config, dtype=dtype, attention="sdpa", compile_layers=compile_layers)
    width = max(len(s) for s in seqs)
    tokens = torch.zeros(len(seqs), width, dtype=torch.long)
    mask = torch.zeros(len(seqs), width, dtype=torch.bool)
    for r, s in enumerate(seqs):
        tokens[r, :len(s)] = s.cpu()
        mask[r, 1:len(s)] = True  # every predicted token counts, as the LM loss
    mbs = [mb.as_dict() for mb in pack_micro_batches(max_tokens=max_tokens, tokens=tokens, response_mask=mask,
                                                     advantages=torch.zeros(len(seqs)))]

    def loss_fn(logits, batch):
        logp, _ = _token_logprobs(logits, batch, 1.0)
        m = batch["response_mask"].to(logp.device)
        n = m.sum()
        return -(logp * m).sum(), n, {}

    def step():
        forward_backward(model, mbs, loss_fn, forward_only=False)
        model[0].zero_grad(set_to_none=True)

    return step, len(mbs)


def megatron_single_step(cfg, ids, dtype, attention):
    """The previous bench row: one padded sequence, Megatron's own (fused on GPU) LM loss."""
    from megatron_lead.policy.model import build_model

    hf_config = dict(cfg, architectures=["Qwen2ForCausalLM"], model_type="qwen2")
    model = build_model(hf_config, dtype=dtype, attention=attention)[0]
    model.train()
    seq = ids.size(1)
    positions = torch.arange(seq, device=ids.device).unsqueeze(0)
    mask = (torch.triu(torch.ones(seq, seq, dtype=torch.bool, device=ids.device), 1).view(1, 1, seq, seq)
            if attention == "local" else None)

    def step():
        loss = model(input_ids=ids, position_ids=positions, attention_mask=mask, labels=ids)
        loss.float().mean().backward()
        model.zero_grad(set_to_none=True)

    return step


# ----------------------------------------------------------------------------- driver

def run_one(name: str, workload: str, cfg: dict, seqs: list[torch.Tensor], args, dtype, device) -> dict:
    lengths = [len(s) for s in seqs]
    result = {"config": name, "workload": workload, "sequences": len(seqs), "tokens": sum(lengths),
              "max_len": max(lengths), "mean_len": round(sum(lengths) / len(lengths), 1)}
    warmup, steps = (args.warmup, args.steps) if workload == "single" else (args.rl_warmup, args.rl_steps)
    if name.startswith("hf_sdpa"):
        step, padded = hf_step(cfg, dtype, device, seqs, args.hf_micro_batch, name.endswith("compile"))
        result.update(padded_tokens=padded, micro_batch=args.hf_micro_batch)
    elif name.startswith("ours"):
        step, n_mbs = ours_step(cfg, dtype, seqs, args.max_tokens, name == "ours")
        result.update(micro_batches=n_mbs, max_tokens=args.max_tokens, compiled=name == "ours")
    else:
        step = megatron_single_step(cfg, seqs[0].unsqueeze(0), dtype, name.split("_")[1])
    t, warm, late_graphs = timed(step, warmup, steps)
    cuda = torch.cuda.is_available()
    result.update(step_s=round(t, 4), warmup_s=round(warm, 1), graphs_compiled_while_timed=late_graphs,
                  tokens_per_s=round(sum(lengths) / t, 1),
                  mfu=round(useful_flops(cfg, lengths) / t / PEAK_FLOPS, 4) if cuda else None,
                  peak_mem_gb=round(torch.cuda.max_memory_allocated() / 2**30, 2) if cuda else None,
                  warmup=warmup, steps=steps)
    return result


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tiny", action="store_true", help="tiny model, short sequences (smoke test)")
    p.add_argument("--configs", default="ours,ours_eager,hf_sdpa,hf_sdpa_compile",
                   help=f"comma-separated subset of {', '.join(CONFIGS)}")
    p.add_argument("--workloads", default="single,rl", help="single, rl or both")
    p.add_argument("--seq", type=int, default=None, help="single workload length (4096; 128 tiny)")
    p.add_argument("--rl-seqs", type=int, default=None, help="sequences of the RL batch (16; 8 tiny)")
    p.add_argument("--rl-mean", type=float, default=None, help="RL mean length before the cap (3000; 96 tiny)")
    p.add_argument("--rl-max", type=int, default=None, help="RL length cap (8192; 256 tiny)")
    p.add_argument("--max-tokens", type=int, default=None, help="ours: tokens per packed micro-batch (16384; 512 tiny)")
    p.add_argument("--hf-micro-batch", type=int, default=2, help="HF: sequences per padded micro-batch")
    p.add_argument("--warmup", type=int, default=None, help="single: untimed steps (3; 1 tiny)")
    p.add_argument("--steps", type=int, default=None, help="single: timed steps (8; 2 tiny)")
    p.add_argument("--rl-warmup", type=int, default=2, help="rl: untimed passes over the batch")
    p.add_argument("--rl-steps", type=int, default=None, help="rl: timed passes (3; 1 tiny)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    configs = args.configs.split(",")
    workloads = args.workloads.split(",")
    if set(configs) - set(CONFIGS) or set(workloads) - {"single", "rl"}:
        p.error(f"unknown --configs / --workloads entries: {configs} {workloads}")
    cuda = torch.cuda.is_available()
    if not cuda and not args.tiny:
        p.error("no CUDA device: run with --tiny for the CPU smoke test")
    tiny = args.tiny
    cfg = TINY if tiny else FULL
    seq = args.seq or (128 if tiny else 4096)
    args.warmup = args.warmup if args.warmup is not None else (1 if tiny else 3)
    args.steps = args.steps or (2 if tiny else 8)
    args.rl_steps = args.rl_steps or (1 if tiny else 3)
    args.max_tokens = args.max_tokens or (512 if tiny else 16384)
    lengths = rl_lengths(args.rl_seqs or (8 if tiny else 16), args.rl_mean or (96 if tiny else 3000),
                         args.rl_max or (256 if tiny else 8192), 16 if tiny else 256, args.seed)
    dtype = torch.bfloat16 if cuda else torch.float32
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    torch.manual_seed(args.seed)
    data = {"single": [torch.randint(0, cfg["vocab_size"], (seq,), device=device)],
            "rl": [torch.randint(0, cfg["vocab_size"], (n,), device=device) for n in lengths]}
    common = {"dtype": str(dtype).removeprefix("torch."), "params": flops_per_token(cfg, 1)[1],
              "device": torch.cuda.get_device_name() if cuda else "cpu", "torch": torch.__version__,
              "tiny": tiny, "date": time.strftime("%Y-%m-%d")}
    from megatron_lead.policy.parallel import init_parallel

    init_parallel(1, 1)  # a process group of one (nccl on GPU, gloo on CPU)
    out_path = os.path.join(os.environ["OUT"], "bench_policy_gpu.jsonl") if os.environ.get("OUT") else None

    failed = False
    for workload in workloads:
        for name in configs:
            if workload != "single" and name in SINGLE_ONLY:
                continue
            free_memory()
            try:
                result = {**run_one(name, workload, cfg, data[workload], args, dtype, device), **common}
            except Exception as e:  # noqa: BLE001 - report and go on with the other configs
                failed = True
                result = {"config": name, "workload": workload, **common,
                          "error": f"{type(e).__name__}: {e}"[:500], "traceback": traceback.format_exc()[-1500:]}
            line = json.dumps(result)
            print(line, flush=True)
            if out_path:
                with open(out_path, "a") as f:
                    f.write(line + "\n")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
