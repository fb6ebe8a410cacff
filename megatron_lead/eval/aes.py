"""Accuracy, length and the Accuracy-Efficiency Score (AES) of one model on one benchmark.

Pure Python on per-sample records, so the numbers can be checked by hand and recomputed from the
per-sample JSONL that `megatron-lead eval` writes. A *sample* is one response to one problem; a
benchmark evaluated with n samples per problem has n x problems samples, and every metric below
is a mean over samples (so each problem weighs the same, n being the same for all).

AES (LEAD_SPEC section 9, the O1-Pruner form), against a base model's accuracy A_b and mean length L_b:

    dL = (L_b - L) / L_b        dA = (A - A_b) / A_b
    AES = alpha_len * dL + beta * dA       if dA >= 0
    AES = alpha_len * dL - gamma * |dA|    if dA < 0

Shorter answers raise it, lost accuracy costs more (gamma > beta) than gained accuracy earns.
"""

from __future__ import annotations

import statistics
from collections import defaultdict
from dataclasses import dataclass
from typing import Iterable


@dataclass(frozen=True)
class AESConstants:
    """The three constants of the AES formula; the paper's are not public, (1, 3, 5) is the common choice."""

    alpha_len: float = 1.0
    """Weight of the relative length reduction dL."""
    beta: float = 3.0
    """Weight of a relative accuracy gain (dA >= 0)."""
    gamma: float = 5.0
    """Weight of a relative accuracy loss (dA < 0)."""

    @classmethod
    def parse(cls, text: str) -> "AESConstants":
        """'1,3,5' -> AESConstants(1, 3, 5); one-line ValueError otherwise."""
        try:
            a, b, g = (float(x) for x in text.split(","))
        except ValueError:
            raise ValueError(f"AES constants {text!r} must be three numbers 'alpha_len,beta,gamma'") from None
        return cls(a, b, g)


def aes(accuracy: float, mean_length: float, base_accuracy: float, base_mean_length: float,
        constants: AESConstants = AESConstants()) -> float | None:
    """The AES of (accuracy, mean_length) against the base; None when the base has zero accuracy
    or zero length (the relative changes are undefined)."""
    if base_accuracy <= 0 or base_mean_length <= 0:
        return None
    d_len = (base_mean_length - mean_length) / base_mean_length
    d_acc = (accuracy - base_accuracy) / base_accuracy
    if d_acc >= 0:
        return constants.alpha_len * d_len + constants.beta * d_acc
    return constants.alpha_len * d_len - constants.gamma * abs(d_acc)


def summarise(samples: Iterable[dict]) -> dict:
    """Metrics of a list of per-sample records ({"correct", "length", "truncated"}):

    accuracy            correct samples / samples
    mean_length         mean response tokens over samples
    median_length       median response tokens over samples
    truncated_frac      samples cut off at the maximum length / samples
    tokens_per_correct  all response tokens / correct samples (None when nothing is correct):
                        what one right answer costs, wrong answers' tokens included
    samples, problems   counts
    """
    samples = list(samples)
    n = len(samples)
    if not n:
        return {"accuracy": 0.0, "mean_length": 0.0, "median_length": 0.0, "truncated_frac": 0.0,
                "tokens_per_correct": None, "samples": 0, "problems": 0}
    lengths = [int(s["length"]) for s in samples]
    correct = sum(bool(s["correct"]) for s in samples)
    return {
        "accuracy": correct / n,
        "mean_length": sum(lengths) / n,
        "median_length": float(statistics.median(lengths)),
        "truncated_frac": sum(bool(s["truncated"]) for s in samples) / n,
        "tokens_per_correct": sum(lengths) / correct if correct else None,
        "samples": n,
        "problems": len({s.get("id") for s in samples}),
    }


def level_key(level: str):
    """Sort key of level names: numbers in numeric order, then the rest alphabetically."""
    try:
        return (0, float(level), "")
    except (TypeError, ValueError):
        return (1, 0.0, str(level))


def summarise_by_level(samples: Iterable[dict]) -> dict[str, dict]:
    """{level: summarise(samples of that level)} in level order; {} when no sample has a level."""
    groups: dict[str, list[dict]] = defaultdict(list)
    for s in samples:
        if s.get("level") is not None:
            groups[str(s["level"])].append(s)
    return {level: summarise(groups[level]) for level in sorted(groups, key=level_key)}
