"""The trainer's GPU-only configuration in one process without vLLM: bf16 params, Megatron DDP and the
distributed optimizer over an NCCL world of 1, checked where a lent GPU can (tools/gpu_session.sh).

    1. ppo:         the PPO phase (trainer/ppo.py: micro-batches, old log-probs, updates), padded and
                    packed: the first update's ratio is exactly 1 (ppo_kl = clip_frac = 0), grads
                    finite, and `memory/peak_train_gb` as the trainer computes it (gpu_memory.PeakMeter)
    2. offload:     policy/offload.TrainStateOffload: the bytes it frees are freed on the device
                    (torch.cuda.memory_allocated), the round trip is bit-exact, and its GB/s
    3. checkpoint:  trainer/checkpoint.py save + load of the distributed optimizer's state into a fresh
                    policy: weights, fp32 main params and Adam moments equal, seconds and host peak
What it cannot check (no vLLM on the lent machine, one GPU): generation, the weight sync, sleep /
wake-up, `memory/peak_generate_gb`, tensor / pipeline parallel over NCCL, several nodes.

    python tools/check_train_gpu.py            # GPU: a ~150M-parameter Qwen2 shape
    python tools/check_train_gpu.py --tiny     # CPU dry run (gloo; the test suite runs it)
One JSON line per check on stdout and in $OUT/check_train_gpu.jsonl when OUT is set; exit 1 if a
check fails.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

SHAPES = {
    "gpu": dict(vocab_size=32000, hidden_size=1024, intermediate_size=2816, num_hidden_layers=8,
                num_attention_heads=16, num_key_value_heads=4, lengths=(1024, 900, 120, 64, 700, 33, 512, 256) * 2),
    "tiny": dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, lengths=(20, 9, 3, 14, 30, 5, 12, 8)),
}


def _emit(record: dict, failures: list) -> None:
    if not record.get("ok", True):
        failures.append(record["check"])
    line = json.dumps(record, default=float)
    print(line, flush=True)
    if os.environ.get("OUT"):
        with open(os.path.join(os.environ["OUT"], "check_train_gpu.jsonl"), "a") as f:
            f.write(line + "\n")


def _hf_config(shape: dict) -> dict:
    return dict({k: v for k, v in shape.items() if k != "lengths"}, max_position_embeddings=4096,
                rope_theta=1e6, rms_norm_eps=1e-6, tie_word_embeddings=False, architectures=["Qwen2ForCausalLM"],
                model_type="qwen2")


def _policy(hf: dict):
    from megatron_lead.policy.model import build_model
    from megatron_lead.policy.optim import OptimConfig, build_optimizer, wrap_ddp

    cfg = OptimConfig(lr=1e-4, bf16=True, distributed_optimizer=True)
    torch.manual_seed(0)
    model = wrap_ddp(build_model(hf, dtype=torch.bfloat16), cfg)
    optimizer, scheduler = build_optimizer(model, cfg)
    return model, optimizer, scheduler


def _batch(shape: dict):
    from megatron_lead.rollout.engine import Rollout
    from megatron_lead.rollout.step import RolloutBatch, pack_rollouts

    g = torch.Generator().manual_seed(0)
    vocab = shape["vocab_size"]
    rollouts = [Rollout(prompt_index=i // 2, prompt_ids=torch.randint(0, vocab, (16,), generator=g).tolist(),
                        response_ids=torch.randint(0, vocab, (n,), generator=g).tolist(),
                        logprobs=(-torch.rand(n, generator=g)).tolist(), finish_reason="stop")
                for i, n in enumerate(shape["lengths"])]
    return RolloutBatch(rollouts=rollouts, rows=list(range(len(rollouts))), all_rollouts=rollouts,
                        **pack_rollouts(rollouts, pad_id=0))


def check_ppo(policy, shape, failures) -> None:
    from megatron_lead.gpu_memory import GB, PeakMeter
    from megatron_lead.policy.loss import LossConfig
    from megatron_lead.trainer.ppo import mini_batches, old_logprob_pass, ppo_update

    batch = _batch(shape)
    advantages = torch.linspace(-1.5, 1.5, batch.tokens.size(0))
    for pack in (False, True):
        meter = PeakMeter()
        start = time.perf_counter()
        batches = mini_batches(batch, advantages, 2, 2, pack=pack)
        old_logprob_pass(policy[0], batches, 1.0)
        m = ppo_update(*policy, batches, LossConfig(kl_coef=0.0), epochs=1)
        exact = m["train/first_update_ppo_kl"] == 0.0 and m["train/first_update_clip_frac"] == 0.0
        _emit({"check": "ppo", "pack": pack, "ok": exact and m["train/skipped_updates"] == 0,
               "first_update_ppo_kl": m["train/first_update_ppo_kl"],
               "first_update_clip_frac": m["train/first_update_clip_frac"], "ppo_kl": m["train/ppo_kl"],
               "grad_norm": m["train/grad_norm"], "tokens": m["train/tokens"],
               "seconds": time.perf_counter() - start,
               "peak_train_gb": None if not meter.active else meter.peak_bytes() / GB,
               "reserved_gb": None if not meter.active else meter.reserved_bytes() / GB}, failures)


def check_offload(policy, failures) -> None:
    from megatron_lead.policy.offload import TrainStateOffload

    offload = TrainStateOffload(policy[0], policy[1])
    kinds = ("grads", "optimizer", "weights")
    before = {k: [t.detach().clone() for t in offload._tensors(k)] for k in kinds}
    cuda = torch.cuda.is_available()
    allocated = torch.cuda.memory_allocated() if cuda else 0
    start = time.perf_counter()
    moved = offload.offload_optimizer_and_grads() + offload.offload_weights()
    out_seconds = time.perf_counter() - start
    freed = allocated - torch.cuda.memory_allocated() if cuda else None
    start = time.perf_counter()
    back = offload.reload()
    in_seconds = time.perf_counter() - start
    exact = all(torch.equal(a.view(torch.uint8), b.view(torch.uint8))
                for k in kinds for a, b in zip(before[k], offload._tensors(k)))
    ok = exact and back == moved and (freed is None or freed >= moved)
    _emit({"check": "offload", "ok": ok, "bit_exact": exact, "moved_gb": moved / 2**30,
           "device_freed_gb": None if freed is None else freed / 2**30,
           "offload_gb_per_s": moved / 1e9 / out_seconds, "reload_gb_per_s": back / 1e9 / in_seconds,
           "pinned": offload.pin}, failures)


def _state(policy) -> list[torch.Tensor]:
    from megatron_lead.policy.offload import TrainStateOffload

    offload = TrainStateOffload(policy[0], policy[1])
    return [t.detach().float().cpu().clone() for k in ("weights", "optimizer") for t in offload._tensors(k)]


def check_checkpoint(policy, hf, failures) -> None:
    from megatron_lead.trainer.checkpoint import load_checkpoint, save_checkpoint

    root = tempfile.mkdtemp(prefix="check_train_gpu_")
    start = time.perf_counter()
    path = save_checkpoint(root, 1, policy[0], policy[1], policy[2], {"step": 1})
    save_seconds = time.perf_counter() - start
    fresh = _policy(hf)
    start = time.perf_counter()
    load_checkpoint(path, fresh[0], fresh[1], fresh[2])
    load_seconds = time.perf_counter() - start
    saved, loaded = _state(policy), _state(fresh)
    equal = len(saved) == len(loaded) and all(torch.equal(a, b) for a, b in zip(saved, loaded))
    size = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)
    _emit({"check": "checkpoint", "ok": equal, "state_equal": equal, "tensors": len(saved),
           "save_seconds": save_seconds, "load_seconds": load_seconds, "bytes_on_disk": size,
           "host_peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}, failures)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="a tiny model (the CPU dry run)")
    args = parser.parse_args()
    from megatron_lead.policy.parallel import init_parallel

    init_parallel(1, 1)  # NCCL with CUDA, gloo without; a world of one process
    shape = SHAPES["tiny" if args.tiny else "gpu"]
    hf = _hf_config(shape)
    failures: list = []
    _emit({"check": "setup", "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
           "torch": torch.__version__, "backend": torch.distributed.get_backend()}, failures)
    policy = _policy(hf)
    for name, check in (("ppo", lambda: check_ppo(policy, shape, failures)),
                        ("offload", lambda: check_offload(policy, failures)),
                        ("checkpoint", lambda: check_checkpoint(policy, hf, failures))):
        try:
            check()
        except Exception as e:  # noqa: BLE001 - one check's failure must not hide the others
            _emit({"check": name, "ok": False, "error": f"{type(e).__name__}: {str(e)[:500]}"}, failures)
    print(json.dumps({"failures": failures}))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
