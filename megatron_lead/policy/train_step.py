"""One PPO optimisation step of the policy, and the forward-only log-prob passes it needs.

    train_step:  zero grads -> forward+backward of every micro-batch (Megatron's schedule, so
                 PP > 1 works) -> clip + Adam update + lr schedule -> global token-mean metrics

Tensors of a micro-batch are [b, s] and aligned with its tokens (column t is about tokens[:, t];
see logprobs.sequence_logprobs). Rows are right-padded (the model needs position 0 first).
A micro-batch may instead be a packing.PackedMicroBatch (rows back to back, [1, T], no padding;
packing.pack_micro_batches): the same code runs it, and forward_logprobs unpacks its results.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from megatron_lead.policy.logprobs import sequence_logprobs
from megatron_lead.policy.loss import LossConfig, policy_loss
from megatron_lead.policy.model import forward_backward
from megatron_lead.policy.optim import optimizer_step
from megatron_lead.policy.packing import packed_sequence_logprobs, unpack
from megatron_lead.policy.parallel import reduce_scalars
from megatron_lead.policy.reference import ReferenceWeights


@dataclass
class MicroBatch:
    tokens: torch.Tensor
    """[b, s] int64 prompt + response ids, right-padded."""
    response_mask: torch.Tensor
    """[b, s] bool, True on response tokens (the ones the loss is over)."""
    advantages: torch.Tensor
    """[b, s] per token, or [b] per rollout (broadcast to its response tokens)."""
    old_logprobs: torch.Tensor | None = None
    """[b, s] log-probs of the tokens under the policy that sampled them, of logits / temperature.
    Read on the last pipeline stage only (forward_logprobs returns them there)."""
    ref_logprobs: torch.Tensor | None = None
    """[b, s] log-probs under the frozen reference, when the KL term is on. Last stage only."""
    rollout_logprobs: torch.Tensor | None = None
    """[b, s] vLLM's sampling log-probs of the same tokens (0 off the response), for the
    rollout/trainer gap (`rollout/logprob_diff`) and the loss's rollout correction
    (loss.rollout_tis_cap; trainer/ppo.rollout_correction_pass for loss.rollout_seq_mask)."""

    def as_dict(self) -> dict:
        return {k: v for k, v in vars(self).items() if v is not None}


def split_micro_batches(micro_batch_size: int, **tensors: torch.Tensor | None) -> list[MicroBatch]:
    """Cut [B, ...] tensors (the MicroBatch fields, by name) into micro-batches of the given size."""
    size = tensors["tokens"].size(0)
    if micro_batch_size < 1 or size % micro_batch_size:
        raise ValueError(f"batch size {size} is not divisible by micro_batch_size {micro_batch_size}")
    return [
        MicroBatch(**{k: None if v is None else v[i:i + micro_batch_size] for k, v in tensors.items()})
        for i in range(0, size, micro_batch_size)
    ]


def _token_logprobs(logits, batch: dict, temperature: float, with_entropy: bool = False):
    """Log-probs (and entropy) aligned with the micro-batch's tokens, padded or packed."""
    tokens = batch["tokens"].to(logits.device)
    if "cu_seqlens" in batch:
        return packed_sequence_logprobs(logits, tokens, batch["cu_seqlens"], temperature, with_entropy)
    return sequence_logprobs(logits, tokens, temperature, with_entropy)


def make_micro_batches(micro_batch_size: int, pack: bool = False, max_tokens: int = 0,
                       **tensors: torch.Tensor | None) -> list:
    """split_micro_batches, or (pack) packing.pack_micro_batches: rows packed without padding,
    micro_batch_size rows per pack, or as many as fit in max_tokens tokens when that is > 0."""
    if pack:
        from megatron_lead.policy.packing import pack_micro_batches

        return pack_micro_batches(micro_batch_size, max_tokens, **tensors)
    if max_tokens:
        raise ValueError("micro-batches sized by tokens need packing (padded micro-batches share one shape)")
    return split_micro_batches(micro_batch_size, **tensors)


@torch.no_grad()
def forward_logprobs(model: list, micro_batches: list[MicroBatch],
                     temperature: float = 1.0, unpack_packed: bool = True) -> list[torch.Tensor]:
    """Per-micro-batch token log-probs [b, s] (CPU) on the last pipeline stage; [] on the others.
    A packed micro-batch's come back unpacked, [its rows, source width] with zeros past each row,
    or (unpack_packed=False) in its own [1, T] layout, ready to be its old/ref log-probs."""

    def collect(logits, batch):
        logp = _token_logprobs(logits, batch, temperature)[0].cpu()
        if unpack_packed and "cu_seqlens" in batch:
            return unpack(logp, batch["cu_seqlens"], batch["width"])
        return logp

    inputs = ("tokens", "positions", "cu_seqlens", "max_seqlen", "width")
    return forward_backward(model, [{k: v for k, v in mb.as_dict().items() if k in inputs}
                                    for mb in micro_batches], None, forward_only=True, collect=collect)


def reference_logprobs(model: list, reference: ReferenceWeights, micro_batches: list[MicroBatch],
                       temperature: float = 1.0, unpack_packed: bool = True) -> list[torch.Tensor]:
    """forward_logprobs with the reference weights swapped into the policy module."""
    with reference.active():
        return forward_logprobs(model, micro_batches, temperature, unpack_packed)


def _loss_fn(cfg: LossConfig):
    def loss_fn(logits, batch):
        dev = logits.device
        logp, entropy = _token_logprobs(logits, batch, cfg.temperature, cfg.wants_entropy)
        ref, rollout = batch.get("ref_logprobs"), batch.get("rollout_logprobs")
        cu = batch.get("cu_seqlens")
        loss_sum, count, stats = policy_loss(
            logp, batch["old_logprobs"].to(dev), batch["advantages"].to(dev), batch["response_mask"].to(dev),
            cfg, ref_logp=None if ref is None else ref.to(dev), entropy=entropy,
            rollout_logp=rollout.to(dev) if rollout is not None and cfg.rollout_tis_cap > 0 else None,
            cu_seqlens=None if cu is None else cu.to(dev))
        # (sum, count, stats): with calculate_per_token_loss Megatron divides the gradient by
        # the count summed over micro-batches and DP ranks: a global token-mean, or a global
        # mean over rollouts (loss.agg_mode). Megatron hands back only the stats, which carry
        # the count (loss_count) and the token count (num_tokens) too.
        return loss_sum, count, stats

    return loss_fn


def _global_token_means(per_micro_batch: list[dict], cfg: LossConfig) -> dict[str, float]:
    """Sum the metric sums over micro-batches, PP (only the last stage has them) and DP; / tokens,
    but the loss / its own count (loss.agg_mode: tokens or rollouts)."""
    from megatron.core import parallel_state

    names = ["loss", "pg_loss", "ppo_kl", "clip_frac"]
    names += ["kl_ref"] if cfg.uses_reference else []
    names += ["entropy"] if cfg.wants_entropy else []
    keys = names + ["loss_count", "num_tokens"]
    sums = [0.0] * len(keys)  # stages other than the last have no micro-batch metrics
    if per_micro_batch:  # one device->host copy for all of them
        sums = torch.stack([torch.stack([s[k].double() for k in keys]) for s in per_micro_batch]).sum(0).tolist()
    sums = reduce_scalars(sums, [parallel_state.get_pipeline_model_parallel_group(),
                                 parallel_state.get_data_parallel_group()])
    count, tokens = sums[-2], sums[-1]
    out = {n: sums[i] / max(tokens, 1.0) for i, n in enumerate(names)}
    out["loss"] = sums[0] / max(count, 1.0)
    out["num_tokens"] = tokens
    return out


def train_step(model: list, optimizer, scheduler, micro_batches: list[MicroBatch],
               loss_cfg: LossConfig) -> dict[str, float]:
    """One optimizer update over all micro-batches of this rank (its share of the global batch).

    model: the DDP-wrapped chunks (optim.wrap_ddp); optimizer, scheduler: optim.build_optimizer.
    Returns global token-mean loss metrics plus grad_norm, lr, skipped; the same on every rank.
    A mini-batch without a single loss token on any rank (every rollout masked out: loss.mask_truncated,
    loss.rollout_seq_mask) has no gradient: its update is not taken (`empty` 1.0), so Adam's
    moments and the weight decay do not move the weights on no data.
    """
    from megatron.core import parallel_state

    loss_cfg.validate()
    if parallel_state.is_pipeline_last_stage():  # the only stage that computes the loss
        if any(mb.old_logprobs is None for mb in micro_batches):
            raise ValueError("every micro-batch needs old_logprobs on the last pipeline stage")
        if loss_cfg.uses_reference and any(mb.ref_logprobs is None for mb in micro_batches):
            raise ValueError(f"loss.kl_type={loss_cfg.kl_type} needs ref_logprobs in every micro-batch")
        if loss_cfg.rollout_tis_cap > 0 and any(mb.rollout_logprobs is None for mb in micro_batches):
            raise ValueError(f"loss.rollout_tis_cap={loss_cfg.rollout_tis_cap} needs rollout_logprobs in "
                             "every micro-batch")

    # 1. Fresh gradient buffers (Megatron's DDP accumulates into main_grad).
    for chunk in model:
        chunk.zero_grad_buffer()
    optimizer.zero_grad()

    # 2. Forward + backward of every micro-batch; grads reduced over DP and / global token count.
    per_micro_batch = forward_backward(model, [mb.as_dict() for mb in micro_batches],
                                       _loss_fn(loss_cfg), forward_only=False)

    # 3. Metrics over the global batch (the same on every rank), then clip, update, advance the
    #    lr schedule; an update with a non-finite loss or gradient is skipped, touching nothing.
    means = _global_token_means(per_micro_batch, loss_cfg)
    if means["num_tokens"] == 0:  # global: every rank takes the same branch
        return {**means, "grad_norm": 0.0, "lr": optimizer.param_groups[0]["lr"], "skipped": 0.0, "empty": 1.0}
    step = optimizer_step(optimizer, scheduler, loss_finite=math.isfinite(means["loss"]))
    return {**means, **step, "empty": 0.0}

