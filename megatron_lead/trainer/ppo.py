"""The step's learning phases, every Megatron pass on the micro-batches the update will run:

    graded rollouts -> advantages
      -> mini_batches:   each PPO mini-batch's micro-batches, cut to its longest row or packed
      -> old_logprobs:   Megatron's log-probs under the weights that sampled (PPO's pi_old), and
                         the rollout/trainer gap `rollout/logprob_diff` against vLLM's
      -> reference:      log-probs under the frozen reference (KL term)
      -> ppo_update:     the optimizer updates

Why the old log-probs are computed here, on these micro-batches, and not right after generation
over the whole padded batch: in bf16 the same row rounds differently in a batch of another width
or another pack, so PPO's ratio on the first mini-batch would not start at exactly 1. Computed on
the very tensors the first update runs, pi / pi_old is exactly 1 there, and ppo_kl and clip_frac
of that update are exactly 0 (tests/test_trainer_ppo.py, bf16 on CPU).

The data-parallel rank's rollouts arrive from `rollout_step` in mini-batch order (part d of each
consecutive PPO mini-batch, see rollout.step.data_parallel_rows), so mini-batch k of this rank is
simply its k-th equal slice of rows; every rank runs the same number of updates.
"""

from __future__ import annotations

import torch

from megatron_lead.lead import AdvantageComputer, LeadResult, RolloutShard
from megatron_lead.policy.loss import LossConfig
from megatron_lead.policy.train_step import (
    MicroBatch, forward_logprobs, make_micro_batches, reference_logprobs, train_step)
from megatron_lead.rollout.metrics import logprob_diff

# Token-mean metrics of train_step, averaged over the step's updates weighted by their tokens.
_TOKEN_MEANS = ("loss", "pg_loss", "ppo_kl", "clip_frac", "kl_ref", "entropy")


def compute_advantages(lead: AdvantageComputer, batch, scores: list[float], num_prompts: int) -> LeadResult:
    """LEAD (or the configured baseline) over this DP rank's rollouts; statistics over the DP group.

    scores: the correctness score of every rollout of the step (global list order).
    """
    tokens = batch.response_mask.sum(1).clamp_min(1)
    shard = RolloutShard(prompt_index=[r.prompt_index for r in batch.rollouts],
                         length=batch.response_lens, score=[scores[i] for i in batch.rows],
                         num_prompts=num_prompts,  # vLLM's mean log-prob: DRPO's score of a rollout
                         mean_logprob=batch.rollout_logprobs.double().sum(1) / tokens)
    return lead(shard)


def _mini_batch(batch, rows: slice, advantages: torch.Tensor, micro_batch_size: int,
                pack: bool = False, max_tokens: int = 0) -> list[MicroBatch]:
    """Micro-batches of one mini-batch, cut to the width of its longest row (less padding)."""
    lengths = batch.response_mask[rows].float().cumsum(1).argmax(1) + 1  # last response token + 1
    cols = slice(0, int(lengths.max()))
    return make_micro_batches(micro_batch_size, pack, max_tokens, tokens=batch.tokens[rows, cols],
                              response_mask=batch.response_mask[rows, cols], advantages=advantages[rows],
                              rollout_logprobs=batch.rollout_logprobs[rows, cols])


def mini_batches(batch, advantages: torch.Tensor, num_mini_batches: int, micro_batch_size: int,
                 pack: bool = False, max_tokens: int = 0) -> list[list[MicroBatch]]:
    """This rank's rollouts as `num_mini_batches` lists of micro-batches, exactly as the updates
    run them. pack / max_tokens: make_micro_batches' (ppo.pack_sequences / max_tokens_per_micro_batch)."""
    rows_per_update = batch.tokens.size(0) // num_mini_batches
    advantages = advantages.to(torch.float32)
    return [_mini_batch(batch, slice(k * rows_per_update, (k + 1) * rows_per_update), advantages,
                        micro_batch_size, pack, max_tokens) for k in range(num_mini_batches)]


def old_logprob_pass(model: list, batches: list[list[MicroBatch]], temperature: float) -> dict[str, float]:
    """Set every micro-batch's old_logprobs (last pipeline stage; other stages need none) and
    return `rollout/logprob_diff`: mean |vLLM's sampling log-prob - Megatron's| over the step's
    response tokens, the same on every rank (summed over PP, where only the last stage has it,
    then token-weighted over DP)."""
    from megatron.core import parallel_state

    from megatron_lead.policy.parallel import reduce_scalars

    diff_sum, tokens = 0.0, 0.0
    for mbs in batches:
        for mb, logp in zip(mbs, forward_logprobs(model, mbs, temperature, unpack_packed=False)):
            mb.old_logprobs = logp
            n = float(mb.response_mask.sum())
            diff_sum += logprob_diff(mb.rollout_logprobs, logp, mb.response_mask) * n
        tokens += float(sum(mb.response_mask.sum() for mb in mbs))
    (diff_sum,) = reduce_scalars([diff_sum], [parallel_state.get_pipeline_model_parallel_group()])
    diff_sum, tokens = reduce_scalars([diff_sum, tokens], [parallel_state.get_data_parallel_group()])
    return {"rollout/logprob_diff": diff_sum / max(tokens, 1.0)}


def reference_pass(model: list, reference, batches: list[list[MicroBatch]], temperature: float) -> None:
    """Set every micro-batch's ref_logprobs under the frozen reference (last pipeline stage);
    nothing to do when the KL term is off (reference None)."""
    if reference is None:
        return
    for mbs in batches:
        for mb, logp in zip(mbs, reference_logprobs(model, reference, mbs, temperature, unpack_packed=False)):
            mb.ref_logprobs = logp


def ppo_update(model: list, optimizer, scheduler, batches: list[list[MicroBatch]], loss_cfg: LossConfig,
               epochs: int) -> dict[str, float]:
    """`epochs` passes of one optimizer update per mini-batch.

    Returns the updates' metrics: token-weighted means of the loss terms, mean and max grad norm,
    the last learning rate, how many updates were skipped (non-finite gradients), and the first
    update's ppo_kl and clip_frac (exactly 0: its ratio is exactly 1, see the module docstring).
    """
    sums = {k: 0.0 for k in _TOKEN_MEANS}
    tokens, norms, skipped, lr, first = 0.0, [], 0.0, 0.0, None
    for _ in range(epochs):
        for mbs in batches:
            m = train_step(model, optimizer, scheduler, mbs, loss_cfg)
            first = first or m
            for name in _TOKEN_MEANS:
                if name in m:
                    sums[name] += m[name] * m["num_tokens"]
            tokens += m["num_tokens"]
            norms.append(m["grad_norm"])
            skipped += m["skipped"]
            lr = m["lr"]
    out = {f"train/{k}": v / max(tokens, 1.0) for k, v in sums.items()
           if k in _TOKEN_MEANS[:4] or (k == "kl_ref" and loss_cfg.uses_reference)
           or (k == "entropy" and loss_cfg.wants_entropy)}
    out.update({"train/grad_norm": sum(norms) / len(norms), "train/grad_norm_max": max(norms),
                "train/lr": lr, "train/skipped_updates": skipped, "train/updates": float(len(norms)),
                "train/tokens": tokens, "train/first_update_ppo_kl": first["ppo_kl"],
                "train/first_update_clip_frac": first["clip_frac"]})
    return out
