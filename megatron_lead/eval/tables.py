"""The results of `megatron-lead eval` as a Markdown table, a CSV and a per-level table.

Rows come from results.json (one per model x benchmark); AES is added here, not stored, so a
different base or other constants only need a redraw (`megatron-lead eval --report-only`).
"""

from __future__ import annotations

import csv
import io

from megatron_lead.eval.aes import AESConstants, aes, level_key

COLUMNS = ("model", "benchmark", "accuracy", "mean_length", "median_length", "truncated_frac",
           "tokens_per_correct", "aes", "samples", "problems")


def with_aes(rows: list[dict], base: str | None, constants: AESConstants = AESConstants()) -> list[dict]:
    """Copies of the rows with "aes" against the base model's row of the same benchmark (None
    without a base, or when the base has no row there or no correct answer)."""
    bases = {r["benchmark"]: r for r in rows if base is not None and r["model"] == base}
    out = []
    for r in rows:
        b = bases.get(r["benchmark"])
        value = None if b is None else aes(r["accuracy"], r["mean_length"], b["accuracy"], b["mean_length"], constants)
        out.append({**r, "aes": value})
    return out


def _fmt(key: str, value) -> str:
    if value is None:
        return "-"
    if key in ("accuracy", "truncated_frac"):
        return f"{100 * value:.1f}%"
    if key in ("mean_length", "median_length", "tokens_per_correct"):
        return f"{value:.1f}"
    if key == "aes":
        return f"{value:+.3f}"
    return str(value)


def markdown(rows: list[dict], columns=COLUMNS) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for r in rows:
        lines.append("| " + " | ".join(_fmt(c, r.get(c)) for c in columns) + " |")
    return "\n".join(lines)


def levels_markdown(rows: list[dict]) -> str:
    """Per-level accuracy / mean length / truncated fraction, for the rows that have levels."""
    parts = []
    for r in rows:
        levels = r.get("levels") or {}
        if not levels:
            continue
        parts.append(f"**{r['model']} on {r['benchmark']}**\n")
        lv = [dict(level=k, **v) for k, v in sorted(levels.items(), key=lambda kv: level_key(kv[0]))]
        parts.append(markdown(lv, ("level", "accuracy", "mean_length", "median_length", "truncated_frac",
                                   "tokens_per_correct", "samples")) + "\n")
    return "\n".join(parts)


def to_csv(rows: list[dict]) -> str:
    """One line per model x benchmark, plain numbers (fractions, not percent), then one line per
    level with the level in its own column."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(list(COLUMNS) + ["level"])
    for r in rows:
        w.writerow([("" if r.get(c) is None else r.get(c)) for c in COLUMNS] + ["all"])
        for level, v in sorted((r.get("levels") or {}).items(), key=lambda kv: level_key(kv[0])):
            block = {**v, "model": r["model"], "benchmark": r["benchmark"], "aes": None}
            w.writerow([("" if block.get(c) is None else block.get(c)) for c in COLUMNS] + [level])
    return buf.getvalue()
