"""Plots of the evaluation: accuracy against mean response length, one point per model.

Up and to the left is better (more accurate, shorter). `eval` draws one panel per benchmark;
`compare` draws one point per method with error bars (spread over seeds) and the warm start.
"""

from __future__ import annotations


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def accuracy_vs_length(rows: list[dict], out_png: str, base: str | None = None) -> str:
    """One panel per benchmark, one labelled point per model; the base model drawn as a star."""
    plt = _pyplot()
    benches = list(dict.fromkeys(r["benchmark"] for r in rows))
    fig, axes = plt.subplots(1, len(benches), figsize=(5.2 * len(benches), 4.2), squeeze=False)
    for ax, bench in zip(axes[0], benches):
        for r in (r for r in rows if r["benchmark"] == bench):
            is_base = r["model"] == base
            ax.scatter(r["mean_length"], 100 * r["accuracy"], marker="*" if is_base else "o",
                       s=140 if is_base else 40, zorder=3)
            ax.annotate(r["model"], (r["mean_length"], 100 * r["accuracy"]), fontsize=8,
                        textcoords="offset points", xytext=(4, 4))
        ax.set_title(bench)
        ax.set_xlabel("mean response length (tokens)")
        ax.set_ylabel("accuracy (%)")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
    return out_png


def compare_plot(table: list[dict], out_png: str, title: str = "") -> str:
    """Left: sampled accuracy vs mean length per method (mean over seeds, bars = standard error).
    Right: sampled accuracy per level and method, where over-compression of hard problems shows."""
    plt = _pyplot()
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(13, 5))
    for r in table:
        is_base = r["method"] == "warm_start"
        ax.errorbar(r["mean_length"], 100 * r["accuracy"], xerr=r.get("mean_length_se") or 0,
                    yerr=100 * (r.get("accuracy_se") or 0), fmt="*" if is_base else "o",
                    markersize=12 if is_base else 6, capsize=3)
        ax.annotate(r["method"], (r["mean_length"], 100 * r["accuracy"]), fontsize=8,
                    textcoords="offset points", xytext=(4, 4))
    ax.set_xlabel("mean response length (tokens), sampled at T=1")
    ax.set_ylabel("accuracy (%), sampled at T=1")
    ax.set_title("held-out: accuracy vs length (mean ± SE over seeds)")
    ax.grid(alpha=0.3)
    levels = list(table[0]["levels"]) if table else []
    for r in table:
        ax2.plot(levels, [100 * (r["levels"][lv].get("accuracy") or 0) for lv in levels], "o-",
                 label=r["method"], linewidth=2.5 if r["method"] in ("warm_start", "lead", "grpo") else 1)
    ax2.set_xlabel("level (operations)")
    ax2.set_ylabel("accuracy (%), sampled at T=1")
    ax2.set_title("accuracy per level")
    ax2.legend(fontsize=7, ncol=2)
    ax2.grid(alpha=0.3)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
    return out_png


def weights_plot(runs: dict[str, list[str]], out_png: str, title: str = "") -> str:
    """`lead/w_eff` over the steps per method, the mean over its seeds' metrics.jsonl: where PSI
    moves the efficiency weight (LEAD) and where it stays fixed (static weights)."""
    import json
    import os

    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.2))
    # Methods with fixed weights draw the same line (0.5, or 0 without an efficiency reward): a
    # thicker solid line below, thinner dashed ones on top, so none hides another.
    styles = ["-", "--", "-.", ":"]
    for i, (method, folders) in enumerate(runs.items()):
        per_step: dict[int, list[float]] = {}
        for folder in folders:
            path = os.path.join(folder, "metrics.jsonl")
            if not os.path.isfile(path):
                continue
            for line in open(path):
                m = json.loads(line)
                if "lead/w_eff" in m:
                    per_step.setdefault(m["step"], []).append(m["lead/w_eff"])
        steps = sorted(per_step)
        if steps:
            ax.plot(steps, [sum(per_step[s]) / len(per_step[s]) for s in steps], label=method,
                    linestyle=styles[i % len(styles)], linewidth=max(3.0 - 0.5 * i, 1.0))
    ax.set_xlabel("step")
    ax.set_ylabel("w_eff used")
    ax.set_title(f"efficiency weight over the steps{': ' + title if title else ''}")
    ax.legend(fontsize=7, ncol=2)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
    return out_png
