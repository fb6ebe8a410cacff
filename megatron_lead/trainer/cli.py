"""`megatron-lead train`: LEAD RL of an HF checkpoint with Megatron-Core and vLLM.

    megatron-lead train --config run.yaml [key=value ...] [--resume] [--print-config] [--nproc N]
    torchrun --nproc-per-node 8 -m megatron_lead.cli train --config run.yaml     (one node)
    sbatch examples/slurm/train.sbatch run.yaml                                   (several nodes)

Under torchrun (WORLD_SIZE set) every process is one rank. Without it, `--nproc N` starts N local
processes joined in a gloo group (CPU runs), and the default is one process. The configuration is
resolved and validated before any process, model or engine starts.
"""

from __future__ import annotations

import argparse
import os
import sys

HELP = "train a policy with LEAD (or a baseline) RL: Megatron-Core policy, vLLM rollouts"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="YAML file of settings (trainer/config.py documents every key)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                   help="dotted overrides, e.g. rollout.n=8 optim.lr=2e-6 lead.method=grpo")
    p.add_argument("--resume", action="store_true",
                   help="continue from the newest complete checkpoint in run_dir/checkpoints (if any)")
    p.add_argument("--print-config", action="store_true", help="print the resolved settings and exit")
    p.add_argument("--nproc", type=int, default=None,
                   help="local processes without torchrun (CPU gloo group); default 1")


def _world_size(args) -> int:
    if "WORLD_SIZE" in os.environ:
        if args.nproc not in (None, int(os.environ["WORLD_SIZE"])):
            raise ValueError(f"--nproc {args.nproc} conflicts with torchrun's WORLD_SIZE={os.environ['WORLD_SIZE']}")
        return int(os.environ["WORLD_SIZE"])
    nproc = args.nproc or 1
    if nproc < 1:
        raise ValueError(f"--nproc {nproc} must be >= 1")
    return nproc


def _train_rank(rank: int, world_size: int, config_path, overrides, resume) -> dict:
    from megatron_lead.trainer.config import load_config
    from megatron_lead.trainer.loop import train

    return train(load_config(config_path, overrides), resume=resume)


def run(args: argparse.Namespace) -> int:
    from megatron_lead.trainer.config import dump_yaml, load_config

    cfg = load_config(args.config, args.overrides)
    if args.print_config:
        # A login node without GPUs prints any config: the world size is checked when a run
        # starts (below), not when the config is printed (a 16-GPU recipe prints on 1 process).
        cfg.validate(check_paths=False)
        sys.stdout.write(dump_yaml(cfg))
        return 0
    world = _world_size(args)
    cfg.validate(world_size=world)
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")  # vLLM's INFO lines drown the progress bar
    if "WORLD_SIZE" in os.environ or world == 1:
        from megatron_lead.trainer.loop import train

        summary = train(cfg, resume=args.resume)
    else:
        from megatron_lead.launch import run_local

        try:
            summary = run_local(_train_rank, world, args.config, args.overrides, args.resume, timeout=None)[0]
        except RuntimeError as e:  # a rank failed: "rank R: " + its last traceback line
            lines = [ln for ln in str(e).splitlines() if ln.strip()]
            message = lines[-1] if lines else str(e)
            first = lines[0] if lines else ""
            if first.startswith("rank ") and " died with exit code " in first:
                message = first  # the cause; what its peers then reported follows it
            elif first.startswith("rank ") and first.endswith(" failed:") and len(lines) > 1:
                message = f"{first[:-len(' failed:')]}: {message}"
            raise RuntimeError(message) from None
    print(f"done: {summary.get('steps_done', 0)} steps in {summary.get('wall_seconds', 0):.0f}s; "
          f"run folder {cfg.run_dir}")
    return 0
