"""Time split of an RL step by phase, on CPU: `megatron-lead train` on a small random Qwen2.

    .venv/bin/python tools/bench_train_cpu.py [--steps 6] [--nproc 1] [--hidden 256] [--layers 4]
        [--prompts 8] [--n 8] [--max-response 64]

Builds a random Qwen2-shaped HF folder (character tokenizer) and a prompt file in a temporary
folder, runs the real trainer (vLLM replicas, grader pool, LEAD, Megatron PPO), and prints the
median over the steps after the first (warm-up) of each phase's seconds and its share of the step,
plus LEAD's own computation (`time/advantages_seconds`) as a fraction of the step.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PHASES = ("data", "rollout", "grade", "advantages", "old_logprobs", "reference", "train")


def make_inputs(folder: str, hidden: int, layers: int, prompts: int) -> None:
    sys.path.insert(0, os.path.join(ROOT, "tests"))
    import torch
    import transformers
    from tiny_tokenizer import save_tiny_tokenizer

    cfg = transformers.Qwen2Config(vocab_size=256, hidden_size=hidden, intermediate_size=2 * hidden,
                                   num_hidden_layers=layers, num_attention_heads=hidden // 32,
                                   num_key_value_heads=max(hidden // 64, 1), max_position_embeddings=512,
                                   tie_word_embeddings=True, eos_token_id=255, bos_token_id=254)
    torch.manual_seed(0)
    transformers.Qwen2ForCausalLM(cfg).save_pretrained(os.path.join(folder, "model"))
    save_tiny_tokenizer(os.path.join(folder, "model"))
    with open(os.path.join(folder, "train.jsonl"), "w") as f:
        for i in range(4 * prompts):
            f.write(json.dumps({"problem": f"{i} + {i + 1} = ?", "answer": str(2 * i + 1)}) + "\n")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--nproc", type=int, default=1)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--n", type=int, default=8)
    p.add_argument("--max-response", type=int, default=64)
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        make_inputs(folder, args.hidden, args.layers, args.prompts)
        run_dir = os.path.join(folder, "run")
        overrides = {
            "run_dir": run_dir, "model.path": os.path.join(folder, "model"),
            "data.train_path": os.path.join(folder, "train.jsonl"), "data.max_prompt_len": 128,
            "data.prompts_per_step": args.prompts, "rollout.n": args.n, "rollout.max_response_len": args.max_response,
            "rollout.dtype": "float32", "rollout.kv_cache_memory_bytes": 64 << 20,
            "ppo.steps": args.steps, "ppo.mini_batch_prompts": max(args.prompts // 2, 1),
            "ppo.micro_batch_size": 4, "lead.l_min": 4, "optim.lr": 1e-5, "checkpoint.every": 0,
            "validation.every": 0, "logging.progress": False, "grading.workers": 1,
        }
        cmd = [sys.executable, "-m", "megatron_lead.cli", "train", "--nproc", str(args.nproc)]
        cmd += [f"{k}={v}" for k, v in overrides.items()]
        subprocess.run(cmd, check=True, cwd=ROOT)
        with open(os.path.join(run_dir, "metrics.jsonl")) as f:
            steps = [json.loads(line) for line in f][1:]  # the first step warms vLLM and Megatron up
    med = {k: statistics.median(s[k] for s in steps) for k in steps[0]}
    total = med["time/step_seconds"]
    print(f"\nmedian over {len(steps)} steps (after 1 warm-up), {args.nproc} process(es), Qwen2 hidden "
          f"{args.hidden} x {args.layers} layers, {args.prompts} prompts x {args.n} rollouts, "
          f"<= {args.max_response} response tokens")
    print(f"{'phase':<12}{'seconds':>10}{'share':>9}")
    for phase in PHASES:
        sec = med.get(f"time/{phase}_seconds", 0.0)
        print(f"{phase:<12}{sec:>10.4f}{100 * sec / total:>8.2f}%")
        if phase == "rollout":  # its parts: weight sync, vLLM generation, the rest (sharing, padding)
            parts = {"  sync": med["rollout/sync_seconds"], "  generate": med["rollout/generate_seconds"]}
            parts["  other"] = sec - sum(parts.values())
            for name, part in parts.items():
                print(f"{name:<12}{part:>10.4f}{100 * part / total:>8.2f}%")
    print(f"{'step':<12}{total:>10.4f}{100.0:>8.2f}%")
    print(f"LEAD's computation: {100 * med['lead/compute_fraction']:.3f}% of the step; "
          f"generation {med['perf/generated_tokens_per_second']:.0f} tokens/s, "
          f"training {med['perf/train_tokens_per_second']:.0f} tokens/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
