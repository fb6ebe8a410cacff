"""Validation: greedy answers to a fixed prompt set, graded; accuracy and length, overall and per level.

Runs on the same vLLM replicas as the rollouts (each generates its slice of the prompts) after
pushing the current weights, so it measures the policy as it is at that step.
"""

from __future__ import annotations

from collections import defaultdict

from megatron_lead.rollout.engine import SamplingConfig
from megatron_lead.rollout.step import generate_distributed
from megatron_lead.rollout.sync import sync_policy_weights
from megatron_lead.trainer.grading import grade_rollouts


def validate(model: list, engine, weight_sync, grader, decode, prompts: list[list[int]],
             answers: list[str], levels: list[str | None], max_response_len: int, vllm_tp: int,
             prefix: str = "val") -> dict[str, float]:
    """Collective: {prefix/accuracy, prefix/length_mean, prefix/truncated_frac, and per level}."""
    if not prompts:
        return {}
    engine.wake_up()
    sync_policy_weights(model, weight_sync)
    greedy = SamplingConfig(n=1, temperature=0.0, max_response_len=max_response_len)
    rollouts, _ = generate_distributed(engine, prompts, [0] * len(prompts), greedy, vllm_tp)
    engine.sleep()
    scores, _ = grade_rollouts(grader, decode, rollouts, answers)
    lengths = [len(r.response_ids) for r in rollouts]
    out = summarise(scores, lengths, [r.truncated for r in rollouts], prefix)
    by_level: dict[str, list[int]] = defaultdict(list)
    for i, r in enumerate(rollouts):
        if levels[r.prompt_index] is not None:
            by_level[str(levels[r.prompt_index])].append(i)
    for level, idx in sorted(by_level.items()):
        out.update(summarise([scores[i] for i in idx], [lengths[i] for i in idx],
                             [rollouts[i].truncated for i in idx], f"{prefix}/level_{level}"))
    return out


def summarise(scores: list[float], lengths: list[int], truncated: list[bool], prefix: str) -> dict[str, float]:
    n = max(len(scores), 1)
    return {f"{prefix}/accuracy": sum(scores) / n, f"{prefix}/length_mean": sum(lengths) / n,
            f"{prefix}/truncated_frac": sum(truncated) / n, f"{prefix}/count": float(len(scores))}
