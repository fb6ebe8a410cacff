"""Rollout metrics the trainer logs every step."""

from __future__ import annotations

import torch


def logprob_diff(rollout_logprobs: torch.Tensor, recomputed_logprobs: torch.Tensor,
                 response_mask: torch.Tensor) -> float:
    """`rollout/logprob_diff`: mean |logp_vLLM - logp_recomputed| over response tokens.

    All three are [batch, seq] (or any equal shape); response_mask is 1 (True) on the response
    tokens that count. A large value means vLLM sampled from other weights than the trainer's
    (a stale or broken weight sync) or a numerics gap between the two.
    """
    if rollout_logprobs.shape != recomputed_logprobs.shape or rollout_logprobs.shape != response_mask.shape:
        raise ValueError(f"shape mismatch: rollout {tuple(rollout_logprobs.shape)}, recomputed "
                         f"{tuple(recomputed_logprobs.shape)}, mask {tuple(response_mask.shape)}")
    mask = response_mask.bool()
    count = int(mask.sum())
    if count == 0:
        return 0.0
    # where(), not a product: padding may hold -inf, and -inf * 0 is nan.
    diff = (rollout_logprobs.double() - recomputed_logprobs.double()).abs()
    return float(torch.where(mask, diff, 0.0).sum() / count)
