"""The main job's claim with its control: `megatron-lead demo` with LEAD and with correctness-only
GRPO at the same settings, over seeds, sampled evaluation first (issue 18).

    .venv/bin/python tools/demo_seeds.py [--seeds 3] [--methods lead,grpo] [--out runs/demo_seeds]

Each (method, seed) is one `megatron-lead demo --out OUT/METHOD_sSEED lead.method=METHOD seed=SEED`
(the demo's settings, the cached warm start; a run whose summary.json has its sampled block is
skipped). Then per method: the held-out split's accuracy and mean length after RL, sampled
(temperature 1, 4 per problem: the primary figures) and greedy, mean ± standard error over seeds,
the change from the warm start, and LEAD against GRPO worded by eval/compare_table.verdict (inside
two standard errors: "no measurable difference"). Writes OUT/summary.md and OUT/summary.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _run(out: str, method: str, seed: int) -> dict:
    path = os.path.join(out, "summary.json")
    if os.path.isfile(path):
        summary = json.load(open(path))
        if "sampled" in summary and summary.get("steps_done"):
            print(f"{out}: done before", flush=True)
            return summary
    cmd = [sys.executable, "-m", "megatron_lead.cli", "demo", "--out", out, f"lead.method={method}", f"seed={seed}",
           "logging.progress=false"]
    print(" ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)
    return json.load(open(path))


def main() -> int:
    from megatron_lead.eval.compare_table import difference, mean_se, verdict

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--methods", default="lead,grpo")
    p.add_argument("--out", default="runs/demo_seeds")
    args = p.parse_args()
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    runs = {m: [_run(os.path.join(args.out, f"{m}_s{s}"), m, s) for s in range(args.seeds)] for m in methods}

    def figures(summaries):
        out = {}
        for key, get in (("sampled_accuracy", lambda s: s["sampled"]["after"]["accuracy"]),
                         ("sampled_length", lambda s: s["sampled"]["after"]["mean_length"]),
                         ("greedy_accuracy", lambda s: s["after"]["accuracy"]),
                         ("greedy_length", lambda s: s["after"]["mean_length"])):
            out[key] = mean_se([get(s) for s in summaries])
        return out

    first = runs[methods[0]][0]
    warm = {"sampled_accuracy": first["sampled"]["before"]["accuracy"],
            "sampled_length": first["sampled"]["before"]["mean_length"],
            "greedy_accuracy": first["before"]["accuracy"], "greedy_length": first["before"]["mean_length"]}
    table = {m: figures(s) for m, s in runs.items()}
    lines = [f"| method | seeds | accuracy, sampled (T=1) | length, sampled | length change | accuracy, greedy | "
             f"length, greedy | length change, greedy |", "|---|---|---|---|---|---|---|---|",
             f"| warm start | - | {100 * warm['sampled_accuracy']:.1f}% | {warm['sampled_length']:.1f} | - | "
             f"{100 * warm['greedy_accuracy']:.1f}% | {warm['greedy_length']:.1f} | - |"]
    for m, f in table.items():
        sa, sl, ga, gl = f["sampled_accuracy"], f["sampled_length"], f["greedy_accuracy"], f["greedy_length"]
        lines.append(f"| {m} | {args.seeds} | {100 * sa[0]:.1f} ± {100 * sa[1]:.1f}% | {sl[0]:.1f} ± {sl[1]:.1f} | "
                     f"{100 * (sl[0] / warm['sampled_length'] - 1):+.1f}% | {100 * ga[0]:.1f} ± {100 * ga[1]:.1f}% | "
                     f"{gl[0]:.1f} ± {gl[1]:.1f} | {100 * (gl[0] / warm['greedy_length'] - 1):+.1f}% |")
    if "lead" in table and "grpo" in table:
        lines.append("")
        for key, unit, scale in (("sampled_length", " tokens", 1), ("sampled_accuracy", " points", 100),
                                 ("greedy_length", " tokens", 1), ("greedy_accuracy", " points", 100)):
            d = difference(table["lead"][key], table["grpo"][key])
            lines.append(f"- LEAD - GRPO, {key.replace('_', ' ')}: {verdict(d, unit, scale)}")
    text = "\n".join(lines)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "summary.md"), "w") as f:
        f.write(text + "\n")
    with open(os.path.join(args.out, "summary.json"), "w") as f:
        json.dump({"warm_start": warm, "methods": table, "seeds": args.seeds}, f, indent=1)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
