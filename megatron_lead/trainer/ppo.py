"""The step's learning phases: graded rollouts -> advantages -> reference log-probs -> PPO updates.

The data-parallel rank's rollouts arrive from `rollout_step` in mini-batch order (part d of each
consecutive PPO mini-batch, see rollout.step.data_parallel_rows), so mini-batch k of this rank is
simply its k-th equal slice of rows; every rank runs the same number of updates.
"""

from __future__ import annotations

import torch

from megatron_lead.lead import AdvantageComputer, LeadResult, RolloutShard
from megatron_lead.policy.loss import LossConfig
from megatron_lead.policy.train_step import MicroBatch, make_micro_batches, reference_logprobs, train_step

# Token-mean metrics of train_step, averaged over the step's updates weighted by their tokens.
_TOKEN_MEANS = ("loss", "pg_loss", "ppo_kl", "clip_frac", "kl_ref", "entropy")


def compute_advantages(lead: AdvantageComputer, batch, scores: list[float], num_prompts: int) -> LeadResult:
    """LEAD (or the configured baseline) over this DP rank's rollouts; statistics over the DP group.

    scores: the correctness score of every rollout of the step (global list order).
    """
    shard = RolloutShard(prompt_index=[r.prompt_index for r in batch.rollouts],
                         length=batch.response_lens, score=[scores[i] for i in batch.rows],
                         num_prompts=num_prompts)
    return lead(shard)


def reference_pass(model: list, reference, batch, micro_batch_size: int, temperature: float,
                   pack: bool = False, max_tokens: int = 0):
    """Log-probs of this rank's rollouts under the frozen reference (last pipeline stage), or None.
    pack / max_tokens: make_micro_batches' (ppo.pack_sequences / max_tokens_per_micro_batch)."""
    if reference is None:
        return None
    mbs = make_micro_batches(micro_batch_size, pack, max_tokens, tokens=batch.tokens,
                             response_mask=batch.response_mask, advantages=torch.zeros(batch.tokens.size(0)))
    parts = reference_logprobs(model, reference, mbs, temperature)
    return torch.cat(parts) if parts else None


def _mini_batch(batch, rows: slice, advantages: torch.Tensor, ref_logprobs, micro_batch_size: int,
                pack: bool = False, max_tokens: int = 0) -> list[MicroBatch]:
    """Micro-batches of one mini-batch, cut to the width of its longest row (less padding)."""
    lengths = batch.response_mask[rows].float().cumsum(1).argmax(1) + 1  # last response token + 1
    width = int(lengths.max())
    cols = slice(0, width)

    def cut(t):
        return None if t is None else t[rows, cols]

    return make_micro_batches(micro_batch_size, pack, max_tokens, tokens=cut(batch.tokens),
                              response_mask=cut(batch.response_mask), advantages=advantages[rows],
                              old_logprobs=cut(batch.old_logprobs), ref_logprobs=cut(ref_logprobs))


def ppo_update(model: list, optimizer, scheduler, batch, advantages: torch.Tensor, ref_logprobs,
               loss_cfg: LossConfig, num_mini_batches: int, epochs: int, micro_batch_size: int,
               pack: bool = False, max_tokens: int = 0) -> dict[str, float]:
    """`epochs` passes of `num_mini_batches` optimizer updates over this rank's rollouts.

    Returns the updates' metrics: token-weighted means of the loss terms, mean and max grad norm,
    the last learning rate, and how many updates were skipped (non-finite gradients).
    """
    rows_per_update = batch.tokens.size(0) // num_mini_batches
    advantages = advantages.to(torch.float32)
    sums = {k: 0.0 for k in _TOKEN_MEANS}
    tokens, norms, skipped, lr = 0.0, [], 0.0, 0.0
    for _ in range(epochs):
        for k in range(num_mini_batches):
            rows = slice(k * rows_per_update, (k + 1) * rows_per_update)
            m = train_step(model, optimizer, scheduler,
                           _mini_batch(batch, rows, advantages, ref_logprobs, micro_batch_size, pack, max_tokens),
                           loss_cfg)
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
                "train/tokens": tokens})
    return out
