"""Benchmark the Megatron -> vLLM weight sync on CPU, next to this machine's memcpy bandwidth.

For each model shape (random weights): build the Megatron policy at TP x PP on `run_local` ranks,
start a colocated vLLM engine (in-process, TP=1) on every rank, then time full syncs
(`sync_policy_weights`: gather TP shards / PP stages into HF names + bucket + vLLM reload) and the
gather alone (the stream drained without an engine). Prints one table; rank 0's times.

    .venv/bin/python tools/bench_weight_sync.py                  # tiny + qwen2.5-0.5b, TP=1
    .venv/bin/python tools/bench_weight_sync.py --models tiny --tp 2
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

import torch

MODELS = {
    # The rollout tests' tiny Qwen2.
    "tiny": dict(vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False),
    # Qwen2.5-0.5B's shapes (494M parameters; tied embeddings).
    "qwen2.5-0.5b": dict(vocab_size=151936, hidden_size=896, intermediate_size=4864,
                         num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
                         tie_word_embeddings=True),
}


def save_random_qwen2(shape: dict, out_dir: str) -> int:
    """A Qwen2 HF folder with random weights (no HF init pass: tensors are drawn directly)."""
    import transformers
    from safetensors.torch import save_file

    config = transformers.Qwen2Config(**shape, max_position_embeddings=4096, rope_theta=1e6,
                                      rms_norm_eps=1e-6, torch_dtype="float32")
    with torch.device("meta"):
        names = {k: v.shape for k, v in transformers.Qwen2ForCausalLM(config).state_dict().items()}
    if config.tie_word_embeddings:
        names.pop("lm_head.weight", None)
    g = torch.Generator().manual_seed(0)
    tensors = {k: (torch.ones(s) if k.endswith("norm.weight") else 0.02 * torch.randn(s, generator=g))
               for k, s in names.items()}
    save_file(tensors, os.path.join(out_dir, "model.safetensors"), metadata={"format": "pt"})
    config.save_pretrained(out_dir)
    return sum(t.numel() for t in tensors.values())


def memcpy_gb_per_s(nbytes: int = 512 << 20, repeats: int = 5) -> float:
    src = torch.empty(nbytes // 4).uniform_()
    dst = torch.empty_like(src)
    dst.copy_(src)  # touch the pages first
    best = min(_timed(lambda: dst.copy_(src)) for _ in range(repeats))
    return nbytes / best / 1e9


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _bench_rank(rank, world, tp, pp, hf_dir, repeats, bucket_bytes):
    from megatron_lead.policy.model import build_model
    from megatron_lead.policy.parallel import init_parallel
    from megatron_lead.rollout.engine import EngineConfig, RolloutEngine
    from megatron_lead.rollout.sync import make_weight_sync, sync_policy_weights

    init_parallel(tp=tp, pp=pp)
    model = build_model(hf_dir, dtype=torch.float32, init_weights=False)
    engine = RolloutEngine(EngineConfig(model_path=hf_dir, dtype="float32", max_model_len=256,
                                        kv_cache_memory_bytes=32 << 20, enforce_eager=True))
    gather_only = make_weight_sync(None)
    to_vllm = make_weight_sync(engine)
    sync_policy_weights(model, to_vllm, bucket_bytes=bucket_bytes)  # warm-up
    gathers = [sync_policy_weights(model, gather_only, bucket_bytes=bucket_bytes) for _ in range(repeats)]
    syncs = [sync_policy_weights(model, to_vllm, bucket_bytes=bucket_bytes) for _ in range(repeats)]
    engine.close()
    return dict(bytes=syncs[0].bytes, buckets=syncs[0].buckets,
                sync_s=statistics.median(s.seconds for s in syncs),
                gather_s=statistics.median(s.seconds for s in gathers))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="tiny,qwen2.5-0.5b", help=f"comma list of {sorted(MODELS)}")
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--pp", type=int, default=1)
    parser.add_argument("--bucket-mb", type=float, default=512)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    from megatron_lead.launch import run_local

    names = args.models.split(",")
    for name in names:
        if name not in MODELS:
            raise SystemExit(f"bench_weight_sync: unknown model {name!r}; use {sorted(MODELS)}")
    memcpy = memcpy_gb_per_s()
    rows = []
    for name in names:
        with tempfile.TemporaryDirectory(prefix=f"bench_sync_{name}_") as hf_dir:
            params = save_random_qwen2(MODELS[name], hf_dir)
            r = run_local(_bench_rank, args.tp * args.pp, args.tp, args.pp, hf_dir, args.repeats,
                          int(args.bucket_mb * (1 << 20)))[0]
        rows.append((name, params, r))

    print(f"\nweight sync on CPU ({os.cpu_count()} cores), fp32, Megatron TP={args.tp} PP={args.pp} -> "
          f"vLLM TP=1 in-process (reload), buckets of {args.bucket_mb:g} MB, median of {args.repeats}")
    header = f"{'model':<14} {'params':>8} {'MB':>9} {'buckets':>7} {'sync s':>8} {'GB/s':>7} " \
             f"{'gather s':>9} {'memcpy GB/s':>11}"
    print(header)
    print("-" * len(header))
    for name, params, r in rows:
        print(f"{name:<14} {params / 1e6:>7.1f}M {r['bytes'] / 1e6:>9.1f} {r['buckets']:>7} "
              f"{r['sync_s']:>8.3f} {r['bytes'] / r['sync_s'] / 1e9:>7.3f} {r['gather_s']:>9.3f} "
              f"{memcpy:>11.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
