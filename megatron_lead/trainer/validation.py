"""Validation: greedy answers to a fixed prompt set, graded; accuracy and length, overall and per level.

Runs on the same vLLM replicas as the rollouts (each generates its slice of the prompts) after
pushing the current weights, so it measures the policy as it is at that step.
"""

from __future__ import annotations

from collections import defaultdict

from megatron_lead.rollout.engine import SamplingConfig
from megatron_lead.rollout.step import generate_with_current_weights
from megatron_lead.trainer.grading import grade_rollouts


def validate(model: list, engine, weight_sync, grader, decode, prompts: list[list[int]],
             answers: list[str], levels: list[str | None], max_response_len: int, vllm_tp: int) -> dict:
    """Collective: {accuracy, mean_length, truncated_frac, count, levels: {level: the same}}."""
    if not prompts:
        return {}
    greedy = SamplingConfig(n=1, temperature=0.0, max_response_len=max_response_len)
    rollouts = generate_with_current_weights(model, engine, weight_sync, prompts, [0] * len(prompts), greedy,
                                             vllm_tp=vllm_tp).rollouts
    scores, _ = grade_rollouts(grader, decode, rollouts, answers)
    lengths = [len(r.response_ids) for r in rollouts]
    out = summarise(scores, lengths, [r.truncated for r in rollouts])
    by_level: dict[str, list[int]] = defaultdict(list)
    for i, r in enumerate(rollouts):
        if levels[r.prompt_index] is not None:
            by_level[str(levels[r.prompt_index])].append(i)
    if by_level:
        out["levels"] = {level: summarise([scores[i] for i in idx], [lengths[i] for i in idx],
                                          [rollouts[i].truncated for i in idx])
                         for level, idx in sorted(by_level.items(), key=lambda kv: _level_key(kv[0]))}
    return out


def _level_key(level: str):
    return (0, float(level), "") if level.replace(".", "", 1).isdigit() else (1, 0.0, level)


def summarise(scores: list[float], lengths: list[int], truncated: list[bool]) -> dict[str, float]:
    n = max(len(scores), 1)
    return {"accuracy": sum(scores) / n, "mean_length": sum(lengths) / n,
            "truncated_frac": sum(truncated) / n, "count": len(scores)}


def flatten(result: dict, prefix: str) -> dict[str, float]:
    """The nested result as metric names: prefix/accuracy, prefix/level_3/mean_length, ..."""
    out = {f"{prefix}/{k}": float(v) for k, v in result.items() if k != "levels"}
    for level, block in result.get("levels", {}).items():
        out.update({f"{prefix}/level_{level}/{k}": float(v) for k, v in block.items()})
    return out
