"""A run's before/after report: the per-level table printed at the end, and the PNG plot.

Inputs are the run folder's own files (`summary.json`, `metrics.jsonl`), so a report can be
redrawn for any finished run: `python -m megatron_lead.eval.report RUN_DIR`.
"""

from __future__ import annotations

import json
import os
import sys


def _levels(block: dict) -> dict:
    return block.get("levels") or {}


def change(before: float, after: float) -> float:
    """Relative change in percent (after vs before); 0 when before is 0."""
    return 100.0 * (after - before) / before if before else 0.0


def table(before: dict, after: dict) -> str:
    """Per level and overall: accuracy and mean response length before and after, as text."""
    rows = [("level", "n", "acc before", "acc after", "len before", "len after", "len change")]
    blocks = [(level, _levels(before)[level], _levels(after).get(level, {})) for level in _levels(before)]
    blocks.append(("all", before, after))
    for name, b, a in blocks:
        rows.append((str(name), str(b.get("count", "")), f"{100 * b['accuracy']:.1f}%",
                     f"{100 * a.get('accuracy', 0):.1f}%", f"{b['mean_length']:.1f}",
                     f"{a.get('mean_length', 0):.1f}", f"{change(b['mean_length'], a.get('mean_length', 0)):+.1f}%"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def read_metrics(run_dir: str) -> list[dict]:
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.isfile(path):
        return []
    out = []
    with open(path) as f:
        for line in f:
            try:
                out.append(json.loads(line))
            except ValueError:
                continue  # a line torn by a crash
    return out


def _lead_settings(run_dir: str) -> dict:
    """The run's `lead` section (method, weighting) from its config.yaml; {} if there is none."""
    import yaml

    try:
        with open(os.path.join(run_dir, "config.yaml")) as f:
            return (yaml.safe_load(f) or {}).get("lead") or {}
    except OSError:
        return {}


def plot(run_dir: str, out_png: str | None = None) -> str:
    """Length and accuracy per level before/after; reward, length and w_eff over the steps."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with open(os.path.join(run_dir, "summary.json")) as f:
        summary = json.load(f)
    before, after = summary.get("before", {}), summary.get("after", {})
    steps = read_metrics(run_dir)
    out_png = out_png or os.path.join(run_dir, "report.png")
    lead = _lead_settings(run_dir)
    method = lead.get("method", "lead")

    fig, axes = plt.subplots(2, 2, figsize=(11, 7.5))
    levels = list(_levels(before))
    x = range(len(levels))
    for ax, key, label in ((axes[0][0], "mean_length", "mean response length (tokens)"),
                           (axes[0][1], "accuracy", "accuracy")):
        ax.bar([i - 0.2 for i in x], [_levels(before)[lv][key] for lv in levels], 0.4, label="before RL")
        ax.bar([i + 0.2 for i in x], [_levels(after).get(lv, {}).get(key, 0) for lv in levels], 0.4,
               label="after RL")
        ax.set_xticks(list(x), levels)
        ax.set_xlabel("level")
        ax.set_title(f"held-out {label}")
        if key == "accuracy":  # room above the bars for the legend
            ax.set_ylim(0, 1.25)
            ax.set_yticks([0, 0.25, 0.5, 0.75, 1.0])
        ax.legend(loc="upper left", ncol=2)
    s = [m["step"] for m in steps]
    ax = axes[1][0]
    ax.plot(s, [m.get("reward/correct_mean", float("nan")) for m in steps], label="accuracy (rollouts)")
    ax.set_xlabel("step")
    ax.set_ylabel("rollout accuracy")
    ax2 = ax.twinx()
    ax2.plot(s, [m.get("response/length_mean", float("nan")) for m in steps], color="tab:red", label="length")
    ax2.set_ylabel("mean response length", color="tab:red")
    ax.set_title("training rollouts")
    ax = axes[1][1]
    ax.plot(s, [m.get("lead/w_eff", float("nan")) for m in steps], label="w_eff used")
    ax.plot(s, [m.get("lead/psi_w_eff_ema", float("nan")) for m in steps], "--", label="w_eff EMA")
    ax.set_xlabel("step")
    ax.set_title("efficiency weight (PSI controller)" if lead.get("weighting", "psi") == "psi"
                 else "efficiency weight (static: no controller)")
    ax.legend()
    fig.suptitle(f"{'LEAD' if method == 'lead' else method} on the built-in task")
    fig.tight_layout()
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
    return out_png


def main(argv: list[str] | None = None) -> int:
    run_dir = (argv or sys.argv[1:] or ["."])[0]
    with open(os.path.join(run_dir, "summary.json")) as f:
        summary = json.load(f)
    print(table(summary["before"], summary["after"]))
    print(f"plot: {plot(run_dir)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
