"""The gate of the `arith-shortcuts` task (issue 18), before any RL: does its warm start compress?

    .venv/bin/python tools/arith_shortcuts_gate.py [--warmstart runs/warmstart_arith_shortcuts]
        [--sft-steps 2000] [--n 8] [--out runs/gate] [--heldout-per-level N]

Trains (or reuses) the task's warm start (`megatron-lead sft`, the demo's settings), samples it at
temperature 1, n per held-out problem (`megatron-lead eval`), and sorts every sample by its shape
(data/arith_shortcuts.shape): step by step (every operation on a line of its own), with jumps
(a line doing several operations), or a direct answer (no computing line). The gate passes when

  1. direct answers appear at every level, jumps at every level >= 2 (level 1 has one operation);
  2. the accuracy of jumps and of direct answers falls with the level (level 2 above level 6 for
     jumps, level 1 above level 6 for direct answers, and no level more than 2 standard errors
     above the one before);
  3. the accuracy of step-by-step samples is at least 90% over all levels.

Prints the table per level and writes it to OUT/gate.json; exit 1 when the gate fails. If it
fails, the task is fixed, not the methods (issue 18).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from collections import defaultdict

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

TASK = "arith_shortcuts"


def classify(problem: str, response: str) -> str:
    from megatron_lead.data.arith_shortcuts import shape

    s = shape(problem, response)
    if s["stepped"] + s["jumped"] == 0:
        return "direct"
    return "jumps" if s["jumped"] > 0 else "steps"


def tabulate(samples: list[dict]) -> dict:
    """Per level and shape: count, accuracy and its binomial standard error; shares per level."""
    cells: dict = defaultdict(lambda: [0, 0])
    for s in samples:
        c = cells[(int(s["level"]), classify(s["problem"], s["response"]))]
        c[0] += 1
        c[1] += bool(s["correct"])
    levels = sorted({lv for lv, _ in cells})
    table = {}
    for lv in levels:
        total = sum(cells[(lv, k)][0] for k in ("steps", "jumps", "direct"))
        row = {}
        for k in ("steps", "jumps", "direct"):
            n, ok = cells[(lv, k)]
            acc = ok / n if n else None
            row[k] = {"n": n, "share": n / total if total else 0.0, "accuracy": acc,
                      "se": math.sqrt(acc * (1 - acc) / n) if n else None}
        table[lv] = row
    steps = [cells[(lv, "steps")] for lv in levels]
    n, ok = sum(c[0] for c in steps), sum(c[1] for c in steps)
    return {"levels": table, "steps_accuracy": ok / n if n else None, "samples": len(samples)}


def verdict(t: dict) -> list[str]:
    """The gate's failures (empty: passed)."""
    fails, lv = [], t["levels"]
    for level, row in lv.items():
        if row["direct"]["n"] == 0:
            fails.append(f"no direct answer at level {level}")
        if level >= 2 and row["jumps"]["n"] == 0:
            fails.append(f"no jump at level {level}")
    for kind, first in (("jumps", 2), ("direct", 1)):
        accs = [(level, lv[level][kind]) for level in sorted(lv) if level >= first and lv[level][kind]["n"]]
        if len(accs) >= 2 and not accs[0][1]["accuracy"] > accs[-1][1]["accuracy"]:
            fails.append(f"{kind}: accuracy at level {accs[0][0]} is not above level {accs[-1][0]}")
        for (a, x), (b, y) in zip(accs, accs[1:]):
            if y["accuracy"] - x["accuracy"] > 2 * math.hypot(x["se"], y["se"]):
                fails.append(f"{kind}: accuracy rises from level {a} to {b} by more than 2 standard errors")
    if t["steps_accuracy"] is None or t["steps_accuracy"] < 0.9:
        fails.append(f"step-by-step accuracy {t['steps_accuracy']} is below 90%")
    return fails


def markdown(t: dict) -> str:
    def cell(c):
        if not c["n"]:
            return "-"
        return f"{100 * c['share']:.0f}% / {100 * c['accuracy']:.1f} ± {100 * c['se']:.1f}"

    lines = ["| level | step by step: share / accuracy | with jumps | direct answer |", "|---|---|---|---|"]
    for level, row in t["levels"].items():
        lines.append(f"| {level} | {cell(row['steps'])} | {cell(row['jumps'])} | {cell(row['direct'])} |")
    return "\n".join(lines)


def main() -> int:
    from megatron_lead.trainer.warmstart import default_folder, default_steps

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--warmstart", default=default_folder(TASK))
    p.add_argument("--sft-steps", type=int, default=default_steps(TASK),
                   help="default: the task's (warmstart.SFT_STEPS)")
    p.add_argument("--n", type=int, default=8, help="samples per held-out problem (temperature 1)")
    p.add_argument("--out", default="runs/gate")
    p.add_argument("--heldout-per-level", type=int, default=0, help="the first N problems of each level only")
    args = p.parse_args()
    samples = sample_warm_start(args)
    t = tabulate(samples)
    fails = verdict(t)
    t["failures"] = fails
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "gate.json"), "w") as f:
        json.dump(t, f, indent=1)
    print(markdown(t))
    print(f"\nstep-by-step accuracy {100 * (t['steps_accuracy'] or 0):.1f}% over {t['samples']} samples; "
          + ("gate PASSED" if not fails else "gate FAILED: " + "; ".join(fails)))
    return 1 if fails else 0


def sample_warm_start(args) -> list[dict]:
    from megatron_lead.eval import cli as eval_cli
    from megatron_lead.eval.benchmarks import resolve
    from megatron_lead.eval.evaluate import EvalConfig, samples_path
    from megatron_lead.launch import run_local
    from megatron_lead.trainer.sft import _sft_rank, is_done
    from megatron_lead.trainer.warmstart import prepare

    sft, paths = prepare(args.warmstart, args.sft_steps, task=TASK)
    if not is_done(sft):
        print(f"warm start: {sft.steps} SFT steps on {paths['train']}", flush=True)
        run_local(_sft_rank, 1, sft, timeout=None)
    heldout = paths["heldout"]
    if args.heldout_per_level:
        rows = [json.loads(x) for x in open(heldout)]
        seen: dict = defaultdict(int)
        keep = []
        for r in rows:
            seen[r["level"]] += 1
            if seen[r["level"]] <= args.heldout_per_level:
                keep.append(r)
        heldout = os.path.join(args.out, "heldout_subset.jsonl")
        os.makedirs(args.out, exist_ok=True)
        with open(heldout, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in keep)
    bench = resolve(f"{TASK}={heldout}", n=args.n, temperature=1.0)
    cfg = EvalConfig(models=[], benchmarks=[bench], out=os.path.join(args.out, "eval"), dtype="float32")
    eval_cli.evaluate(cfg, [f"warm_start={sft.out}"], None)
    with open(samples_path(cfg.out, "warm_start", bench.name)) as f:
        return [json.loads(x) for x in f]


if __name__ == "__main__":
    sys.exit(main())
