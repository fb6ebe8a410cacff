"""The step's learning phases, every Megatron pass on the micro-batches the update will run:

    graded rollouts -> advantages
      -> mini_batches:   each PPO mini-batch's micro-batches, cut to its longest row or packed
      -> old_logprobs:   Megatron's log-probs under the weights that sampled (PPO's pi_old), and
                         the rollout/trainer gap `rollout/logprob_diff` against vLLM's
      -> correction:     rollouts whose pi_old / pi_rollout sequence ratio is out of bounds leave
                         the loss (loss.rollout_seq_mask); metrics of the correction's weights
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

Rollouts that leave the loss (loss.mask_truncated, loss.rollout_seq_mask) keep their rows, so the
micro-batch layout never changes: only their response mask is cleared, which takes them out of
the loss sum and of its count (tokens or rollouts, loss.agg_mode) alike.
"""

from __future__ import annotations

import math

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
                pack: bool = False, max_tokens: int = 0, mask: torch.Tensor | None = None) -> list[MicroBatch]:
    """Micro-batches of one mini-batch, cut to the width of its longest row (less padding)."""
    mask = batch.response_mask if mask is None else mask
    lengths = mask[rows].float().cumsum(1).argmax(1) + 1  # last response token + 1
    cols = slice(0, int(lengths.max()))
    return make_micro_batches(micro_batch_size, pack, max_tokens, tokens=batch.tokens[rows, cols],
                              response_mask=mask[rows, cols], advantages=advantages[rows],
                              rollout_logprobs=batch.rollout_logprobs[rows, cols])


def mini_batches(batch, advantages: torch.Tensor, num_mini_batches: int, micro_batch_size: int,
                 pack: bool = False, max_tokens: int = 0,
                 loss_rows: torch.Tensor | None = None) -> list[list[MicroBatch]]:
    """This rank's rollouts as `num_mini_batches` lists of micro-batches, exactly as the updates
    run them. pack / max_tokens: make_micro_batches' (ppo.pack_sequences / max_tokens_per_micro_batch).
    loss_rows: [B] bool, False for a rollout out of the loss (its response mask cleared: a packed
    row then shrinks to one token, a padded one costs its padding only). No mini-batch: []."""
    if num_mini_batches == 0:
        return []
    rows_per_update = batch.tokens.size(0) // num_mini_batches
    advantages = advantages.to(torch.float32)
    mask = None if loss_rows is None else batch.response_mask & loss_rows.bool().unsqueeze(1)
    return [_mini_batch(batch, slice(k * rows_per_update, (k + 1) * rows_per_update), advantages,
                        micro_batch_size, pack, max_tokens, mask) for k in range(num_mini_batches)]


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


def rollout_correction_pass(batches: list[list[MicroBatch]], cfg: LossConfig) -> dict[str, float]:
    """Once per step, after old_logprob_pass: clear the response mask of every rollout whose
    sequence ratio pi_old / pi_rollout leaves [1/C, C] (loss.rollout_seq_mask), and return the
    `rollout_corr/*` metrics, the same on every rank (sums over PP, where only the last stage has
    old log-probs, then DP; maxima likewise):

        token_ratio_mean, token_ratio_max   pi_old / pi_rollout over the tokens left in the loss
        tis_weight_mean, tis_clipped_frac   min(ratio, C) and the fraction above C (rollout_tis_cap)
        seq_masked_frac, seq_ratio_min/max  the fraction of rollouts masked and the range of the
                                            sequence ratios (rollout_seq_mask; over the rollouts
                                            with response tokens, before masking)
    Nothing (no collective) when no correction is on."""
    if not cfg.corrects_rollouts:
        return {}
    from megatron.core import parallel_state

    from megatron_lead.policy.loss import (
        rollout_log_ratio, segment_ids, sequence_keep, sequence_log_ratio)
    from megatron_lead.policy.parallel import reduce_scalars

    # tokens, sum ratio, sum tis weight, clipped tokens, rollouts, masked rollouts | max log ratio,
    # max seq log ratio, max -seq log ratio
    sums, maxima = [0.0] * 6, [-math.inf] * 3
    for mbs in batches:
        for mb in mbs:
            if mb.old_logprobs is None:  # not the last pipeline stage: nothing to compute here
                continue
            mask = mb.response_mask.bool()
            if cfg.rollout_seq_mask > 0:
                seg, n = segment_ids(mask.shape, getattr(mb, "cu_seqlens", None))
                log_seq, count = sequence_log_ratio(mb.old_logprobs, mb.rollout_logprobs, mask, seg, n,
                                                    cfg.rollout_seq_ratio)
                present = count > 0
                keep = sequence_keep(log_seq, cfg.rollout_seq_mask) | ~present
                mask = mask & keep[seg]
                mb.response_mask = mask
                sums[4] += float(present.sum())
                sums[5] += float((~keep).sum())
                if bool(present.any()):
                    maxima[1] = max(maxima[1], float(log_seq[present].max()))
                    maxima[2] = max(maxima[2], float(-log_seq[present].min()))
            log_ratio = rollout_log_ratio(mb.old_logprobs, mb.rollout_logprobs, mask)
            ratio = torch.exp(log_ratio.clamp(-20.0, 20.0))
            sums[0] += float(mask.sum())
            sums[1] += float(ratio[mask].sum())
            if cfg.rollout_tis_cap > 0:
                sums[2] += float(ratio[mask].clamp_max(cfg.rollout_tis_cap).sum())
                sums[3] += float((ratio[mask] > cfg.rollout_tis_cap).sum())
            if bool(mask.any()):
                maxima[0] = max(maxima[0], float(log_ratio[mask].max()))
    groups = [parallel_state.get_pipeline_model_parallel_group(), parallel_state.get_data_parallel_group()]
    sums = reduce_scalars(sums, groups)
    maxima = reduce_scalars(maxima, groups, torch.distributed.ReduceOp.MAX)
    tokens, rollouts = max(sums[0], 1.0), max(sums[4], 1.0)
    out = {"rollout_corr/token_ratio_mean": sums[1] / tokens,
           "rollout_corr/token_ratio_max": math.exp(maxima[0]) if math.isfinite(maxima[0]) else 0.0}
    if cfg.rollout_tis_cap > 0:
        out.update({"rollout_corr/tis_weight_mean": sums[2] / tokens, "rollout_corr/tis_clipped_frac": sums[3] / tokens})
    if cfg.rollout_seq_mask > 0:
        out.update({"rollout_corr/seq_masked_frac": sums[5] / rollouts,
                    "rollout_corr/seq_ratio_max": math.exp(maxima[1]) if math.isfinite(maxima[1]) else 0.0,
                    "rollout_corr/seq_ratio_min": math.exp(-maxima[2]) if math.isfinite(maxima[2]) else 0.0})
    return out


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
    With options that mask rollouts, `train/empty_updates` counts mini-batches left without a
    loss token (not taken). No mini-batch (group filtering kept too few groups): zeros.
    """
    sums = {k: 0.0 for k in _TOKEN_MEANS}
    tokens, norms, skipped, empty, lr, first = 0.0, [], 0.0, 0.0, 0.0, None
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
            empty += m["empty"]
            lr = m["lr"]
    out = {f"train/{k}": v / max(tokens, 1.0) for k, v in sums.items()
           if k in _TOKEN_MEANS[:4] or (k == "kl_ref" and loss_cfg.uses_reference)
           or (k == "entropy" and loss_cfg.wants_entropy)}
    out.update({"train/grad_norm": sum(norms) / max(len(norms), 1), "train/grad_norm_max": max(norms, default=0.0),
                "train/lr": lr if norms else float(optimizer.param_groups[0]["lr"]), "train/skipped_updates": skipped,
                "train/updates": float(len(norms)), "train/tokens": tokens,
                "train/first_update_ppo_kl": first["ppo_kl"] if first else 0.0,
                "train/first_update_clip_frac": first["clip_frac"] if first else 0.0})
    if loss_cfg.masks_rollouts:
        out["train/empty_updates"] = empty
    return out
