"""Per-token log-probs (and entropy) from vocab-parallel logits.

Each tensor-parallel rank holds a slice of the vocabulary. The full softmax is never formed on
one rank: the max, the sum of exps, the target logit and (for the entropy) sum p*log p are
all-reduced over the TP group, as in Megatron's vocab-parallel cross entropy. Extra memory is
one [tokens, vocab/tp] fp32 softmax buffer per rank, kept for the backward and overwritten by
the gradient there (plus one more such buffer in the backward when the entropy has a gradient).

Log-probs are of logits / temperature, the distribution vLLM sampled from.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def _tp_group():
    """Megatron's TP group, or None (one rank holds the whole vocabulary) before it is set up."""
    from megatron.core import parallel_state

    if not parallel_state.model_parallel_is_initialized():
        return None
    return parallel_state.get_tensor_model_parallel_group()


def _all_reduce(t: torch.Tensor, op, group) -> torch.Tensor:
    if group is not None and dist.get_world_size(group) > 1:
        dist.all_reduce(t, op=op, group=group)
    return t


class _VocabParallelLogProbs(torch.autograd.Function):
    """(logits [..., V/tp], target [...]) -> (log p(target) [...], entropy [...] or None)."""

    @staticmethod
    def forward(ctx, logits, target, temperature, with_entropy, group, vocab_size):
        tp_rank = dist.get_rank(group) if group is not None and dist.is_initialized() else 0
        part = logits.size(-1)
        start = tp_rank * part

        # A fresh fp32 tensor, so the caller's logits are never modified in place.
        z = logits.to(torch.float32, copy=True).div_(temperature)
        if vocab_size is not None and vocab_size < start + part:
            # Megatron pads the vocabulary to a multiple of 128 x TP; those rows are not tokens
            # (vLLM and HF never sample them), so they get no probability mass.
            z[..., max(vocab_size - start, 0):] = float("-inf")
        z_max = z.amax(dim=-1)
        _all_reduce(z_max, dist.ReduceOp.MAX, group)
        z.sub_(z_max.unsqueeze(-1))

        # Target logit: only the rank whose slice holds the id contributes (others add 0).
        outside = (target < start) | (target >= start + part)
        local_target = (target - start).masked_fill(outside, 0)
        target_logit = z.gather(-1, local_target.unsqueeze(-1)).squeeze(-1).masked_fill(outside, 0.0)

        probs = z.exp_()  # reuse the buffer: z now holds exp(z - max)
        # One all-reduce for both sums.
        sums = torch.stack([target_logit, probs.sum(dim=-1)])
        _all_reduce(sums, dist.ReduceOp.SUM, group)
        target_logit, sum_exp = sums[0], sums[1]
        logp = target_logit - sum_exp.log()
        probs.div_(sum_exp.unsqueeze(-1))  # softmax slice

        entropy = None
        if with_entropy:
            # H = -sum_v p log p; xlogy gives 0 where p underflowed to 0.
            entropy = -torch.special.xlogy(probs, probs).sum(dim=-1)
            _all_reduce(entropy, dist.ReduceOp.SUM, group)
            ctx.save_for_backward(probs, local_target, outside, entropy)
        else:
            ctx.save_for_backward(probs, local_target, outside)
        ctx.set_materialize_grads(False)  # an unused entropy gets grad None, not a zero tensor
        ctx.temperature = temperature
        ctx.with_entropy = with_entropy
        ctx.in_dtype = logits.dtype
        return logp, entropy

    @staticmethod
    def backward(ctx, grad_logp, grad_entropy):
        if ctx.with_entropy:
            probs, local_target, outside, entropy = ctx.saved_tensors
        else:
            probs, local_target, outside = ctx.saved_tensors
            entropy = None
        # Written into the saved softmax buffer (as Megatron does): no second [tokens, vocab/tp]
        # tensor without entropy, one with it. Backward can therefore run only once.
        g_logp = torch.zeros_like(probs[..., 0]) if grad_logp is None else grad_logp
        if entropy is not None and grad_entropy is not None:
            # d logp(y)/dz_v = 1[v == y] - p_v ;  d H/dz_v = -p_v (log p_v + H)
            # => grad_v = 1[v == y] g_logp - p_v (g_logp + g_H (log p_v + H))
            w = probs.clamp_min(torch.finfo(probs.dtype).tiny).log_()  # finite where p underflowed
            w.add_(entropy.unsqueeze(-1)).mul_(grad_entropy.unsqueeze(-1)).add_(g_logp.unsqueeze(-1))
            grad = w.mul_(probs).neg_()
        else:
            grad = probs.mul_(-g_logp.unsqueeze(-1))
        own = (~outside).to(grad.dtype) * g_logp
        grad.scatter_add_(-1, local_target.unsqueeze(-1), own.unsqueeze(-1))
        grad.div_(ctx.temperature)
        return grad.to(ctx.in_dtype), None, None, None, None, None


def vocab_parallel_logprobs(
    logits: torch.Tensor,
    target: torch.Tensor,
    temperature: float = 1.0,
    with_entropy: bool = False,
    group=None,
    vocab_size: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """log softmax(logits / T)[target] and the entropy of softmax(logits / T), vocab-parallel.

    logits: [..., V / tp] (this rank's vocab slice, slices in TP-rank order); target: [...] ids
    in the FULL vocabulary. group defaults to Megatron's tensor-parallel group (none when Megatron's
    groups are not set up: the whole vocabulary is here). vocab_size: the
    real vocabulary (HF config); ids at or above it (Megatron's padding) are left out.
    Returns fp32 tensors shaped like target (entropy None unless asked for).
    """
    if temperature <= 0:
        raise ValueError(f"temperature={temperature} must be positive")
    if logits.shape[:-1] != target.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and target {tuple(target.shape)} do not match")
    if group is None and dist.is_initialized():
        group = _tp_group()
    return _VocabParallelLogProbs.apply(logits, target, float(temperature), bool(with_entropy), group,
                                        vocab_size)


def sequence_logprobs(
    logits: torch.Tensor,
    tokens: torch.Tensor,
    temperature: float = 1.0,
    with_entropy: bool = False,
    group=None,
    vocab_size: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Log-prob of every token given the ones before it, aligned with `tokens`.

    logits: [b, s, V / tp] from a forward over tokens [b, s] (position t predicts token t+1).
    Returns [b, s] tensors whose column t belongs to tokens[:, t]; column 0 has no prediction
    and is 0, so a response mask aligned with the tokens selects the right entries.
    """
    logp, ent = vocab_parallel_logprobs(logits[:, :-1], tokens[:, 1:], temperature, with_entropy, group,
                                        vocab_size)
    pad = logp.new_zeros(logp.size(0), 1)
    logp = torch.cat([pad, logp], dim=1)
    if ent is not None:
        ent = torch.cat([pad, ent], dim=1)
    return logp, ent
