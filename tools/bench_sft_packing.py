"""Seconds per SFT step of the built-in task's warm start: right-padded against packed rows.

    .venv/bin/python tools/bench_sft_packing.py [--steps 20] [--batch-size 32]

Runs `megatron-lead sft`'s loop (`trainer/sft.run_sft`, one process, the demo's model and data)
for a few steps in each layout: right-padded micro-batches, and packs of at most 2,048 / 8,192
tokens with each CPU attention backend of `policy/attention.py` (`loop`: one causal SDPA call
per row; `mask`: one call with a block-diagonal mask). Prints one JSON line per layout with the
mean seconds per step and the loss after the last step (the layouts must agree on it: packing
changes the cost, not the update). Figures: docs/BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile


def _one(rank, world, cfg):
    from megatron_lead.trainer.sft import run_sft

    return run_sft(cfg, progress=False)


def main() -> None:
    from megatron_lead.trainer import warmstart
    from megatron_lead.launch import run_local
    from megatron_lead.trainer.sft import SFTConfig

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--batch-size", type=int, default=32)
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        base, _ = warmstart.prepare(tmp, args.steps)
        layouts = [("padded", 0, None), ("packed 2048, loop", 2048, "loop"), ("packed 8192, loop", 8192, "loop"),
                   ("packed 2048, mask", 2048, "mask"), ("packed 8192, mask", 8192, "mask")]
        for name, pack, backend in layouts:
            if backend:
                os.environ["MEGATRON_LEAD_PACKED_ATTENTION"] = backend
            cfg = SFTConfig(**{**vars(base), "out": os.path.join(tmp, name.replace(" ", "_")),
                               "batch_size": args.batch_size, "micro_batch_size": args.batch_size,
                               "warmup_steps": 2, "pack_max_tokens": pack})
            result = run_local(_one, 1, cfg, timeout=None)[0]
            print(json.dumps({"layout": name, "steps": args.steps, "batch_size": args.batch_size,
                              "seconds_per_step": round(result["seconds"] / args.steps, 4),
                              "loss_last_20": round(result["final_loss"], 6)}), flush=True)
            os.environ.pop("MEGATRON_LEAD_PACKED_ATTENTION", None)


if __name__ == "__main__":
    main()
