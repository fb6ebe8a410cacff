"""The comparison's numbers: per method, means over seeds with standard errors, per level, and each
method against the correctness-only GRPO control, worded as measured.

Sampled evaluation (temperature 1, n samples per problem) is the primary metric, greedy the
secondary. A method's value is the mean over its seeds; its standard error is the seeds' standard
deviation / sqrt(seeds) (it holds the evaluation's own sampling noise too, since every seed's model
is evaluated on its own samples). The binomial error of one evaluation, sqrt(p (1 - p) / samples),
is given beside it. A difference from the control is "no measurable difference" when it is within
two standard errors of the difference (sqrt(se_a^2 + se_b^2)); only then is a direction claimed.
"""

from __future__ import annotations

import math
import statistics
from collections import defaultdict

WARM = "warm_start"
CONTROL = "grpo"
METRICS = ("accuracy", "mean_length", "steps_share", "greedy_accuracy", "greedy_length")


def mean_se(values: list[float | None]) -> tuple[float | None, float | None]:
    """Mean and standard error (std / sqrt(n); 0 for one value) of the values that exist."""
    values = [v for v in values if v is not None]
    if not values:
        return None, None
    if len(values) == 1:
        return values[0], 0.0
    return statistics.fmean(values), statistics.stdev(values) / math.sqrt(len(values))


def difference(a: tuple, b: tuple) -> dict:
    """a - b for (mean, se) pairs; `measurable` when |a - b| > 2 se of the difference."""
    (ma, sa), (mb, sb) = a, b
    if ma is None or mb is None:
        return {"delta": None, "se": None, "measurable": False}
    se = math.hypot(sa or 0.0, sb or 0.0)
    delta = ma - mb
    return {"delta": delta, "se": se, "measurable": abs(delta) > 2 * se}


def model_metrics(sampled: list[dict], greedy: list[dict], shape=None) -> dict:
    """One evaluated model's numbers from its per-sample records (eval's samples JSONL): overall and
    per level. shape(problem, response) -> {"steps_share", ...} (data/arith_shortcuts.shape)."""
    def block(rows_s, rows_g):
        n = len(rows_s)
        acc = sum(bool(r["correct"]) for r in rows_s) / n if n else None
        out = {"accuracy": acc, "mean_length": sum(r["length"] for r in rows_s) / n if n else None,
               "samples": n, "binomial_se": math.sqrt(acc * (1 - acc) / n) if n else None,
               "steps_share": (statistics.fmean(shape(r["problem"], r["response"])["steps_share"] for r in rows_s)
                               if shape and n else None)}
        g = len(rows_g)
        out["greedy_accuracy"] = sum(bool(r["correct"]) for r in rows_g) / g if g else None
        out["greedy_length"] = sum(r["length"] for r in rows_g) / g if g else None
        return out

    by_level_s, by_level_g = defaultdict(list), defaultdict(list)
    for r in sampled:
        by_level_s[str(r.get("level"))].append(r)
    for r in greedy:
        by_level_g[str(r.get("level"))].append(r)
    out = block(sampled, greedy)
    out["levels"] = {lv: block(by_level_s[lv], by_level_g[lv]) for lv in sorted(by_level_s, key=_level_order)}
    return out


def _level_order(level: str):
    return (0, float(level), "") if level.replace(".", "", 1).isdigit() else (1, 0.0, level)


def summarise(models: dict[str, dict], runs: dict[str, list[str]]) -> list[dict]:
    """One line per method (the warm start first): mean and SE over seeds of every metric, overall
    and per level, and the comparison with the warm start (length change) and the GRPO control.

    models: model name -> model_metrics(...); runs: method -> its seeds' model names."""
    table = []
    for method, names in runs.items():
        line = {"method": method, "seeds": len(names), "levels": {}}
        for key in METRICS:
            line[key], line[f"{key}_se"] = mean_se([models[n][key] for n in names])
        line["binomial_se"] = statistics.fmean(models[n]["binomial_se"] or 0.0 for n in names)
        levels = list(models[names[0]]["levels"])
        for lv in levels:
            cell = {}
            for key in ("accuracy", "mean_length", "steps_share"):
                cell[key], cell[f"{key}_se"] = mean_se([models[n]["levels"].get(lv, {}).get(key) for n in names])
            line["levels"][lv] = cell
        table.append(line)
    by = {r["method"]: r for r in table}
    for r in table:
        for ref, tag in ((WARM, "vs_warm"), (CONTROL, "vs_grpo")):
            if ref in by and r["method"] != ref:
                for key in ("accuracy", "mean_length", "greedy_accuracy", "greedy_length"):
                    r[f"{tag}_{key}"] = difference((r[key], r[f"{key}_se"]), (by[ref][key], by[ref][f"{key}_se"]))
        if WARM in by and r["mean_length"] is not None and by[WARM]["mean_length"]:
            r["length_change_pct"] = 100 * (r["mean_length"] / by[WARM]["mean_length"] - 1)
    return table


def verdict(d: dict, unit: str = "", scale: float = 1.0) -> str:
    """'+1.2 ± 0.4' or 'no measurable difference (+0.3 ± 0.4)'."""
    if d is None or d.get("delta") is None:
        return "-"
    text = f"{scale * d['delta']:+.1f}{unit} ± {scale * d['se']:.1f}"
    return text if d["measurable"] else f"no measurable difference ({text})"


def _cell(r: dict, key: str, pct: bool = False) -> str:
    m, s = r.get(key), r.get(f"{key}_se")
    if m is None:
        return "-"
    k = 100 if pct else 1
    return f"{k * m:.1f}" + (f" ± {k * s:.1f}" if s else "")


def markdown(table: list[dict]) -> str:
    """The method table (sampled first, greedy beside it) and the per-level table."""
    head = ["method", "seeds", "accuracy % (T=1)", "binomial SE", "length (T=1)", "vs warm start",
            "steps one per line %", "greedy accuracy %", "greedy length", "accuracy vs GRPO (points)",
            "length vs GRPO (tokens)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in table:
        change = r.get("length_change_pct")
        lines.append("| " + " | ".join([
            r["method"], str(r["seeds"]), _cell(r, "accuracy", True),
            f"{100 * r['binomial_se']:.1f}" if r.get("binomial_se") else "-", _cell(r, "mean_length"),
            f"{change:+.1f}%" if change is not None and r["method"] != WARM else "-",
            _cell(r, "steps_share", True), _cell(r, "greedy_accuracy", True), _cell(r, "greedy_length"),
            verdict(r.get("vs_grpo_accuracy"), scale=100), verdict(r.get("vs_grpo_mean_length"))]) + " |")
    levels = list(table[0]["levels"]) if table else []
    lines += ["", "Per level, sampled (T=1): accuracy % / mean length / share of operations done one per line %", "",
              "| method | " + " | ".join(f"level {lv}" for lv in levels) + " |", "|---|" + "---|" * len(levels)]
    for r in table:
        cells = []
        for lv in levels:
            c = r["levels"].get(lv, {})
            share = c.get("steps_share")
            cells.append(f"{100 * c['accuracy']:.0f} / {c['mean_length']:.0f}" + (
                f" / {100 * share:.0f}" if share is not None else "") if c.get("accuracy") is not None else "-")
        lines.append(f"| {r['method']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
