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
    """Left: accuracy vs mean length per method (mean over seeds, bars = std). Right: accuracy
    on the easiest and hardest level per method, where over-compression shows first."""
    plt = _pyplot()
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(12, 4.8))
    for r in table:
        is_base = r["method"] == "warm_start"
        ax.errorbar(r["mean_length"], 100 * r["accuracy"], xerr=r.get("mean_length_std") or 0,
                    yerr=100 * (r.get("accuracy_std") or 0), fmt="*" if is_base else "o",
                    markersize=12 if is_base else 6, capsize=3)
        ax.annotate(r["method"], (r["mean_length"], 100 * r["accuracy"]), fontsize=8,
                    textcoords="offset points", xytext=(4, 4))
    ax.set_xlabel("mean response length (tokens)")
    ax.set_ylabel("accuracy (%)")
    ax.set_title("held-out split: accuracy vs length (mean ± std over seeds)")
    ax.grid(alpha=0.3)
    x = list(range(len(table)))
    ax2.bar([i - 0.2 for i in x], [100 * (r.get("easy_accuracy") or 0) for r in table], 0.4,
            label=f"easiest level ({table[0].get('easy_level', '')})" if table else "easiest")
    ax2.bar([i + 0.2 for i in x], [100 * (r.get("hard_accuracy") or 0) for r in table], 0.4,
            label=f"hardest level ({table[0].get('hard_level', '')})" if table else "hardest")
    ax2.set_xticks(x, [r["method"] for r in table], rotation=40, ha="right", fontsize=8)
    ax2.set_ylabel("accuracy (%)")
    ax2.set_title("accuracy on the easiest and hardest level")
    ax2.legend()
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
    return out_png
