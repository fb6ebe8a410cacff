"""The grading phase: every rank grades a share of the step's responses; all ranks get all scores.

Responses are decoded with the run's tokenizer and graded by `rewards.Grader` (worker processes,
per-answer timeout). A truncated rollout has no final answer: it scores 0 with reason `truncated`
without reaching the grader (LEAD_SPEC section 11: truncation at L_max is always wrong).
"""

from __future__ import annotations

from collections import Counter

import torch.distributed as dist

TRUNCATED = "truncated"


def grade_rollouts(grader, decode, rollouts: list, answers: list[str],
                   grade_truncated: bool = False) -> tuple[list[float], list[str]]:
    """Collective: (score, reason) of every rollout of the step, the same lists on every rank.

    rollouts: the step's global list (the same on every rank); answers[i]: gold answer of the
    prompt at global position i (rollout.prompt_index). Rank r grades rollouts r, r + world, ...
    grade_truncated: grade truncated rollouts as any other (`megatron-lead eval` does, so its
    per-sample files re-grade to the same scores) instead of scoring them 0.
    """
    world, rank = dist.get_world_size(), dist.get_rank()
    mine = list(range(rank, len(rollouts), world))
    todo = [i for i in mine if grade_truncated or not rollouts[i].truncated]
    results = grader.grade([decode(rollouts[i].response_ids) for i in todo],
                           [answers[rollouts[i].prompt_index] for i in todo])
    graded = {i: (1.0 if g.correct else 0.0, g.reason) for i, g in zip(todo, results)}
    local = [(i, *graded.get(i, (0.0, TRUNCATED))) for i in mine]
    parts: list = [None] * world
    dist.all_gather_object(parts, local)
    scores, reasons = [0.0] * len(rollouts), [""] * len(rollouts)
    for part in parts:
        for i, score, reason in part:
            scores[i], reasons[i] = score, reason
    return scores, reasons


def reason_counts(reasons: list[str], prefix: str = "grader") -> dict[str, float]:
    """{prefix/<reason>: count} for the reasons seen this step."""
    return {f"{prefix}/{reason}": float(n) for reason, n in sorted(Counter(reasons).items())}
