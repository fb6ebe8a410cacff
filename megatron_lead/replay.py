"""`megatron-lead replay`: rerun LEAD's advantage computation on logged rollouts.

Users tune and debug the controller offline from a training log; `--ranks N` checks that a
data-parallel layout gives the same numbers as one process (each rank holds a random share of
every prompt's rollouts).

Input, one JSON object per line per step, in order:
    {"step": 0, "prompts": [{"id": "q1", "lengths": [812, 640], "correct": [1, 0]}, ...]}
Output, one line per step:
    {"step", "w_corr", "w_eff", "w_corr_ema", "targets": {id: L*}, "advantages": {id: [A, ...]},
     "metrics": {...}}
"""

from __future__ import annotations

import argparse
import json
import random
from dataclasses import asdict
from pathlib import Path

from megatron_lead.jsonl import fail, iter_objects

HELP = "replay LEAD's advantage computation on logged rollout lengths/correctness (JSONL)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    from .lead.config import METHODS, NORMALISATIONS, REWARDS, TARGETS, WEIGHTINGS

    p.add_argument("input", type=Path, help="JSONL file, one training step per line")
    p.add_argument("--out", type=Path, required=True, help="JSONL file to write, one line per step")
    p.add_argument("--method", default="lead", choices=list(METHODS), help="preset (default: lead)")
    p.add_argument("--l-min", type=float, help="lower clamp of the target length (default 1000)")
    p.add_argument("--l-max", type=float, help="upper clamp and unsolved sentinel (default 8000)")
    p.add_argument("--beta", type=float, help="EMA factor of the PSI weights (default 0.95)")
    p.add_argument("--lambda-min", type=float, help="floor of the correctness weight (default 0.3)")
    p.add_argument("--alpha", type=float, help="exponent of the potentials (default 1)")
    p.add_argument("--eps", type=float, help="epsilon of CV and weight normalisation (default 1e-8)")
    p.add_argument("--global-target", type=float, help="length budget B for --target global")
    p.add_argument("--static-w-corr", type=float, help="correctness weight for static weighting")
    p.add_argument("--target", choices=TARGETS, help="override the preset's target aggregator")
    p.add_argument("--reward", choices=REWARDS, help="override the preset's efficiency reward")
    p.add_argument("--normalisation", choices=NORMALISATIONS, help="override the preset's normalisation")
    p.add_argument("--weighting", choices=WEIGHTINGS, help="override the preset's weighting")
    p.add_argument("--whiten", action=argparse.BooleanOptionalAction, default=None,
                   help="whiten the advantages over the batch's response tokens "
                        "(default: the preset's, on for every method but grpo)")
    p.add_argument("--ranks", type=int, default=1, help="run on N local gloo processes (default 1)")
    p.add_argument("--split-seed", type=int, default=0, help="seed of the rollout-to-rank split")


def lead_config_from_args(args):
    from .lead.config import LeadConfig

    overrides = {k: getattr(args, k) for k in ("l_min", "l_max", "beta", "lambda_min", "alpha", "eps",
                                               "global_target", "static_w_corr", "target", "reward",
                                               "normalisation", "weighting", "whiten")}
    return LeadConfig.for_method(args.method, **overrides)


# ------------------------------------------------------------------------------- input

def read_steps(path: Path) -> list[dict]:
    """Parse and validate the whole log up front: a bad line is reported before any work."""
    steps, last_step = [], None
    for line_no, obj in iter_objects(path):
        step = obj.get("step")
        if not isinstance(step, int) or isinstance(step, bool):
            fail(path, line_no, "field 'step' is missing or not an integer")
        if last_step is not None and step <= last_step:
            fail(path, line_no, f"field 'step' ({step}) does not follow the previous step ({last_step})")
        prompts = obj.get("prompts")
        if not isinstance(prompts, list) or not prompts:
            fail(path, line_no, "field 'prompts' is missing or empty")
        seen = set()
        for i, p in enumerate(prompts):
            where = f"prompts[{i}]"
            if not isinstance(p, dict):
                fail(path, line_no, f"{where} is not an object")
            pid = p.get("id")
            if not isinstance(pid, str) or not pid:
                fail(path, line_no, f"{where}.id is missing or not a string")
            if pid in seen:
                fail(path, line_no, f"{where}.id {pid!r} appears twice in this step")
            seen.add(pid)
            lengths, correct = p.get("lengths"), p.get("correct")
            if not isinstance(lengths, list) or not lengths:
                fail(path, line_no, f"{where}.lengths is missing or empty")
            if not isinstance(correct, list):
                fail(path, line_no, f"{where}.correct is missing")
            if len(lengths) != len(correct):
                fail(path, line_no, f"{where}: lengths has {len(lengths)} entries but correct has {len(correct)}")
            for j, n in enumerate(lengths):
                if not isinstance(n, int) or isinstance(n, bool) or n < 0:
                    fail(path, line_no, f"{where}.lengths[{j}] = {n!r} is not a non-negative integer")
            for j, c in enumerate(correct):
                if c not in (0, 1):
                    fail(path, line_no, f"{where}.correct[{j}] = {c!r} is not 0 or 1")
        steps.append(obj)
        last_step = step
    if not steps:
        raise ValueError(f"{path}: no steps found")
    return steps


# ----------------------------------------------------------------------------- compute

def _flatten(step: dict):
    """(prompt index, rollout index within prompt, length, correct) of every rollout."""
    rows = []
    for q, p in enumerate(step["prompts"]):
        rows += [(q, j, n, c) for j, (n, c) in enumerate(zip(p["lengths"], p["correct"]))]
    return rows


def replay_rank(rank: int, world_size: int, steps: list[dict], cfg_dict: dict, split_seed: int):
    """One rank's replay: its share of every step's rollouts -> (positions, advantages, globals)."""
    import torch.distributed as dist

    from .lead import AdvantageComputer, LeadConfig, RolloutShard

    group = dist.group.WORLD if world_size > 1 else None
    computer = AdvantageComputer(LeadConfig(**cfg_dict), group=group)
    out = []
    for step in steps:
        rows = _flatten(step)
        # Every rank draws the same split, then keeps its own rollouts.
        rng = random.Random(split_seed * 1_000_003 + step["step"])
        owner = [rng.randrange(world_size) for _ in rows]
        mine = [r for r, o in zip(rows, owner) if o == rank]
        shard = RolloutShard(prompt_index=[r[0] for r in mine], length=[r[2] for r in mine],
                             score=[float(r[3]) for r in mine], num_prompts=len(step["prompts"]))
        res = computer(shard)
        psi = computer.cfg.weighting == "psi"
        out.append(dict(
            positions=[(r[0], r[1]) for r in mine], advantages=res.advantages.tolist(),
            w_corr=res.w_corr, w_eff=res.w_eff,
            w_corr_ema=computer.controller.state.w_corr_ema if psi else None,
            targets=res.targets.tolist(), metrics=res.metrics))
    return out


def replay(steps: list[dict], cfg, ranks: int = 1, split_seed: int = 0) -> list[dict]:
    """The output records of `megatron-lead replay` (one per step)."""
    if ranks < 1:
        raise ValueError(f"--ranks must be at least 1, got {ranks}")
    if ranks == 1:
        per_rank = [replay_rank(0, 1, steps, asdict(cfg), split_seed)]
    else:
        from .launch import run_local

        per_rank = run_local(replay_rank, ranks, steps, asdict(cfg), split_seed, cpu_only=True)  # CPU math

    return merge_ranks(steps, per_rank)


def merge_ranks(steps: list[dict], per_rank: list[list[dict]]) -> list[dict]:
    """Put every rank's advantages back in input order; global values come from rank 0."""
    records = []
    for s, step in enumerate(steps):
        first = per_rank[0][s]
        adv = {p["id"]: [None] * len(p["lengths"]) for p in step["prompts"]}
        ids = [p["id"] for p in step["prompts"]]
        for rank_out in per_rank:
            for (q, j), a in zip(rank_out[s]["positions"], rank_out[s]["advantages"]):
                adv[ids[q]][j] = a
        records.append({
            "step": step["step"], "w_corr": first["w_corr"], "w_eff": first["w_eff"],
            "w_corr_ema": first["w_corr_ema"],
            "targets": dict(zip(ids, first["targets"])), "advantages": adv,
            "metrics": {k: v for k, v in first["metrics"].items() if k != "lead/collectives"},
        })
    return records


def run(args) -> int:
    cfg = lead_config_from_args(args)
    steps = read_steps(args.input)
    records = replay(steps, cfg, ranks=args.ranks, split_seed=args.split_seed)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_name(args.out.name + ".tmp")
    with open(tmp, "w") as f:
        for rec in records:
            f.write(json.dumps(rec) + "\n")
    tmp.replace(args.out)
    last = records[-1]
    print(f"replayed {len(records)} steps ({cfg.method}, {args.ranks} rank(s)) -> {args.out}; "
          f"last step {last['step']}: w_corr={last['w_corr']:.4f} w_eff={last['w_eff']:.4f}")
    return 0
