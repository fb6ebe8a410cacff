"""`megatron-lead plan`: which layouts of a model fit a cluster for an RL step, and why.

    megatron-lead plan --model ckpt/r1-1.5b --nodes 1 --gpus-per-node 8 --gpu-memory-gb l40s --pack
    megatron-lead plan --config examples/recipes/qwen2.5_7b_2node.yaml --model qwen7b/config.json \\
        --nodes 2 --gpu-memory-gb h100 [key=value ...] [--json]

The model is an HF folder or just its config.json (no weights); with --config it defaults to the
config's model.path. The workload comes from the config (the same keys as `train`, overrides
included) and/or flags. Prints the config's own layout term by term (with --config), the layouts
that fit ranked (fewest model-parallel ranks, then the largest micro-batch), one line for each
layout that does not, and the YAML keys of the first. Runs without a GPU, Megatron or vLLM.
"""

from __future__ import annotations

import argparse
import json
import os
from dataclasses import replace

HELP = "plan GPU memory of an RL run: the layouts that fit a cluster, phase by phase (no GPU needed)"

GPUS = {"h100": 79.1, "h200": 139.8, "a100-80gb": 79.1, "a100-40gb": 39.4, "l40s": 44.4, "l40": 44.4}
"""GiB torch reports for common GPUs (total_memory / 2**30): an H100 80GB reports 79.1, an L40S
48 GB 44.4 (decimal gigabytes, less what the driver keeps)."""


def gpu_memory(text: str) -> float:
    """--gpu-memory-gb: a number of GiB or a GPU name."""
    key = str(text).strip().lower()
    if key in GPUS:
        return GPUS[key]
    try:
        value = float(key)
    except ValueError:
        raise ValueError(f"--gpu-memory-gb {text!r} is neither a number of GiB nor one of "
                         f"{', '.join(sorted(GPUS))}") from None
    if value <= 0:
        raise ValueError(f"--gpu-memory-gb {text} must be positive")
    return value


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help="HF model folder or config.json (default: the config's model.path)")
    p.add_argument("--config", help="training YAML (the keys of `train`)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted overrides of the config")
    g = p.add_argument_group("cluster")
    g.add_argument("--nodes", type=int, default=1)
    g.add_argument("--gpus-per-node", type=int, default=8)
    g.add_argument("--gpu-memory-gb", default="h100",
                   help=f"GiB per GPU as torch reports it, or a name: {', '.join(sorted(GPUS))} (default h100)")
    g.add_argument("--reserve", type=float, default=0.05,
                   help="fraction of each GPU kept free for what the plan cannot know (default 0.05)")
    w = p.add_argument_group("workload (flags override the config)")
    w.add_argument("--prompts-per-step", type=int)
    w.add_argument("--rollouts-per-prompt", type=int)
    w.add_argument("--max-prompt-len", type=int)
    w.add_argument("--max-response-len", type=int)
    w.add_argument("--mini-batch-prompts", type=int)
    w.add_argument("--micro-batch-size", type=int)
    w.add_argument("--pack", action="store_true", default=None, help="pack micro-batches (ppo.pack_sequences)")
    w.add_argument("--max-tokens-per-micro-batch", type=int)
    w.add_argument("--fp32", action="store_true", default=None, help="fp32 params (default bf16)")
    w.add_argument("--no-distributed-optimizer", action="store_true", default=None)
    w.add_argument("--no-offload", action="store_true", default=None,
                   help="keep gradients and optimizer on the GPU during generation")
    w.add_argument("--offload-weights", action="store_true", default=None)
    w.add_argument("--no-kl", action="store_true", default=None, help="no KL reference")
    w.add_argument("--kernels", choices=("gpu", "gpu-local", "cpu"),
                   help="saved-activation profile (default from model.attention: gpu = Transformer Engine)")
    w.add_argument("--block-size", type=int, default=16, help="vLLM's KV block size (16 on GPU)")
    o = p.add_argument_group("output")
    o.add_argument("--json", action="store_true", help="JSON for scripts")
    o.add_argument("--top", type=int, default=10, help="layouts that fit to list (default 10)")
    o.add_argument("--comment", action="store_true", help="print only the recipe memory comment of the config")


def _apply_flags(w, args):
    from megatron_lead.plan.planner import Workload

    direct = {"prompts_per_step": args.prompts_per_step, "rollouts_per_prompt": args.rollouts_per_prompt,
              "max_prompt_len": args.max_prompt_len, "max_response_len": args.max_response_len,
              "mini_batch_prompts": args.mini_batch_prompts, "micro_batch_size": args.micro_batch_size,
              "max_tokens_per_micro_batch": args.max_tokens_per_micro_batch, "kernels": args.kernels}
    changes = {k: v for k, v in direct.items() if v is not None}
    if args.pack or args.max_tokens_per_micro_batch:
        changes["pack_sequences"] = True
    for flag, key, value in ((args.fp32, "bf16", False),
                             (args.no_distributed_optimizer, "distributed_optimizer", False),
                             (args.no_offload, "offload_train_state", False),
                             (args.offload_weights, "offload_weights", True),
                             (args.no_kl, "kl_reference", False)):
        if flag:
            changes[key] = value
    changes["kv_block_size"] = args.block_size
    w = replace(w, **changes) if w is not None else Workload(**changes)
    for key in ("prompts_per_step", "rollouts_per_prompt", "max_prompt_len", "max_response_len",
                "mini_batch_prompts", "micro_batch_size", "kv_block_size"):
        if getattr(w, key) < 1:
            raise ValueError(f"{key.replace('_', '-')} must be >= 1, got {getattr(w, key)}")
    if w.prompts_per_step % w.mini_batch_prompts:
        raise ValueError(f"prompts per step {w.prompts_per_step} is not divisible by mini-batch prompts "
                         f"{w.mini_batch_prompts}")
    return w


def recipe_command(args: argparse.Namespace, model: str) -> str:
    """The command a recipe's memory comment names (the recipe test runs the same one)."""
    return (f"megatron-lead plan --config {args.config} --model {model} --nodes {args.nodes} "
            f"--gpus-per-node {args.gpus_per_node} --gpu-memory-gb {args.gpu_memory_gb}")


def run(args: argparse.Namespace) -> int:
    from megatron_lead.plan import planner as P
    from megatron_lead.plan import report as R
    from megatron_lead.plan.config import config_layout, workload_from_config
    from megatron_lead.plan.shapes import load_shape

    cluster = P.Cluster(nodes=args.nodes, gpus_per_node=args.gpus_per_node,
                        gpu_memory_gib=gpu_memory(args.gpu_memory_gb), reserve=args.reserve)
    if cluster.nodes < 1 or cluster.gpus_per_node < 1:
        raise ValueError("--nodes and --gpus-per-node must be >= 1")
    if not 0 <= cluster.reserve < 1:
        raise ValueError(f"--reserve {args.reserve} must be in [0, 1)")
    cfg = None
    if args.config or args.overrides:
        from megatron_lead.trainer.config import load_config

        cfg = load_config(args.config, args.overrides)
        cfg.validate(check_paths=False)
    model = args.model or (cfg.model.path if cfg is not None else "")
    if not model:
        raise ValueError("no model: pass --model (an HF folder or its config.json) or a --config with model.path")
    if not os.path.exists(model):
        raise FileNotFoundError(f"--model {model}: no such file or folder (an HF folder or its config.json)")
    shape = load_shape(model)
    workload = _apply_flags(workload_from_config(cfg) if cfg is not None else None, args)
    problem = P.check_workload(shape, workload)
    if problem:
        raise ValueError(problem)

    own = None
    if cfg is not None:
        layout, micro, problem = config_layout(cfg, shape, workload, cluster.world)
        if problem:
            raise ValueError(problem)
        own = P.evaluate(shape, workload, cluster, layout, micro)
    if args.comment:
        if own is None:
            raise ValueError("--comment needs --config")
        print("\n".join(f"#   {line}" for line in R.recipe_comment(own, workload, recipe_command(args, model))))
        return 0
    # Both optimizers and offload on/off are candidates, unless a flag pins one.
    layouts = P.candidate_layouts(shape, workload, cluster,
                                  distributed=(False,) if args.no_distributed_optimizer else (True, False),
                                  offload=(False,) if args.no_offload else (True, False))
    fits, rejected = P.plan(shape, workload, cluster, layouts)
    if args.json:
        out = {"model": shape.arch.to_dict(), "cluster": vars(cluster),
               "this_config": None if own is None else R.as_json(own, workload),
               "fits": [R.as_json(e, workload) for e in fits],
               "rejected": [{"layout": e.layout.label(), "problem": e.problem} for e in rejected]}
        print(json.dumps(out, indent=2))
        return 0
    lines = R.header(shape, workload, cluster)
    if own is not None:
        lines += ["", f"this config: {own.layout.label()}, {own.micro.label(workload.max_len)}: "
                  + ("fits" if own.fits else f"DOES NOT FIT: {own.problem}")]
        lines += R.phase_table(own)
        if workload.gpu_memory_utilization is not None or workload.kv_cache_memory_bytes is not None:
            planned = P.evaluate(shape, replace(workload, gpu_memory_utilization=None, kv_cache_memory_bytes=None),
                                 cluster, own.layout, own.micro)
            lines.append(f"  the plan's gpu_memory_utilization for this layout: {planned.gpu_memory_utilization:.2f} "
                         f"(KV cache for {planned.concurrency:.0%} of the sequences at once)")
        best = P.best_micro_batch(shape, workload, cluster, own.layout)
        if best.fits:
            key = (f"ppo.max_tokens_per_micro_batch={best.micro.max_tokens}" if best.micro.pack
                   else f"ppo.micro_batch_size={best.micro.micro_batch_size}")
            lines.append(f"  the largest micro-batch this layout fits: {best.micro.label(workload.max_len)} ({key}), "
                         f"training peak {P.gib(best.training.total)} GiB")
    lines += ["", f"layouts that fit ({len(fits)}; fewest model-parallel ranks first, then the largest micro-batch):"]
    lines += R.layouts_table(fits, workload, args.top) if fits else ["  none"]
    if rejected:
        lines += ["", f"layouts that do not fit ({len(rejected)}):"]
        lines += [f"  {e.layout.label()}: {e.problem}" for e in rejected]
    if fits and own is None:
        lines += ["", "the first layout, term by term:"] + R.phase_table(fits[0])
    if fits:
        lines += ["", "its keys (YAML):"] + [f"  {ln}" for ln in R.yaml_keys(fits[0], workload)]
    print("\n".join(lines))
    return 0
