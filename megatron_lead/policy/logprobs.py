"""Per-token log-probs (and entropy) from vocab-parallel logits.

Each tensor-parallel rank holds a slice of the vocabulary. The full softmax is never formed on
one rank: the max, the sum of exps, the target logit and (for the entropy) sum p*log p are
all-reduced over the TP group, as in Megatron's vocab-parallel cross entropy.

Memory: with a vocabulary of 152k, an fp32 copy of a micro-batch's logits is gigabytes (8k tokens:
4.6 GB per copy at TP=1). The default path is therefore chunked over tokens
(`_ChunkedVocabParallelLogProbs`, `chunk_tokens` rows at a time): its extra memory is a few
[chunk_tokens, vocab/tp] fp32 buffers plus per-token statistics, and the backward recomputes the
softmax chunk by chunk from the caller's logits. `chunk_tokens=0` selects the unchunked
`_VocabParallelLogProbs` (one [tokens, vocab/tp] fp32 softmax buffer kept for the backward and
overwritten by the gradient there), the reference the chunked path is tested against.

Log-probs are of logits / temperature, the distribution vLLM sampled from.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist

DEFAULT_CHUNK_TOKENS = 1024
"""Tokens per chunk: 1024 x 152k vocab x 4 bytes = 0.6 GB per fp32 buffer at TP=1."""
_LOG_TINY = math.log(torch.finfo(torch.float32).tiny)


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


class _ChunkedVocabParallelLogProbs(torch.autograd.Function):
    """The same result as _VocabParallelLogProbs, computed `chunk` tokens at a time.

    No [tokens, vocab/tp] fp32 tensor exists at any point: the forward converts one chunk of the
    caller's logits to fp32 at a time and keeps only per-token statistics (the max, log of the
    sum of exps, the entropy); the backward recomputes each chunk's softmax from the caller's
    logits (saved by reference, not copied) and writes its gradient into the one [tokens, vocab/tp]
    gradient buffer in the logits' own dtype, which the output layer's backward needs anyway.
    Two TP all-reduces per call whatever the number of chunks: each rank first reduces its chunk
    against its OWN max, and the partial sums are rescaled to the global max afterwards.
    """

    @staticmethod
    def forward(ctx, logits, target, temperature, with_entropy, group, vocab_size, chunk):
        tp_rank = dist.get_rank(group) if group is not None and dist.is_initialized() else 0
        part = logits.size(-1)
        start = tp_rank * part
        first_pad = part if vocab_size is None else min(max(vocab_size - start, 0), part)
        x = logits.reshape(-1, part)  # a view for the contiguous logits Megatron returns
        t = target.reshape(-1)
        n = x.size(0)
        outside = (t < start) | (t >= start + part)
        local_t = (t - start).masked_fill(outside, 0)
        stats = torch.zeros(4, n, dtype=torch.float32, device=logits.device)  # max, sum e, target, sum e*z
        for i in range(0, n, chunk):
            j = min(i + chunk, n)
            z = x[i:j].to(torch.float32, copy=True).div_(temperature)
            if first_pad < part:
                z[:, first_pad:] = float("-inf")
            m = z.amax(dim=-1)
            stats[0, i:j] = m
            z.sub_(m.masked_fill(torch.isinf(m), 0.0).unsqueeze(-1))  # a slice of padding only: m = -inf
            stats[2, i:j] = z.gather(-1, local_t[i:j].unsqueeze(-1)).squeeze(-1)
            e = z.exp()
            stats[1, i:j] = e.sum(dim=-1)
            if with_entropy:
                stats[3, i:j] = torch.special.xlogy(e, e).sum(dim=-1)  # sum e z, 0 where e == 0
            del z, e
        local_max = stats[0].masked_fill(torch.isinf(stats[0]), 0.0)
        global_max = stats[0].clone()
        _all_reduce(global_max, dist.ReduceOp.MAX, group)
        # Rescale this rank's partial sums from its own max to the global one, then one all-reduce.
        shift = local_max - global_max
        scale = shift.exp()
        sums = torch.stack([(stats[2] + shift).masked_fill(outside, 0.0), stats[1] * scale,
                            scale * (stats[3] + shift * stats[1])])
        _all_reduce(sums, dist.ReduceOp.SUM, group)
        log_sum = sums[1].log()
        logp = sums[0] - log_sum
        entropy = (log_sum - sums[2] / sums[1]) if with_entropy else None
        ctx.save_for_backward(logits, local_t, outside, global_max, log_sum,
                              entropy if with_entropy else global_max)
        ctx.set_materialize_grads(False)
        ctx.args = (temperature, with_entropy, chunk, first_pad)
        shape = target.shape
        return logp.view(shape), None if entropy is None else entropy.view(shape)

    @staticmethod
    def backward(ctx, grad_logp, grad_entropy):
        logits, local_t, outside, global_max, log_sum, entropy = ctx.saved_tensors
        temperature, with_entropy, chunk, first_pad = ctx.args
        part = logits.size(-1)
        x = logits.reshape(-1, part)
        n = x.size(0)
        g_logp = torch.zeros(n, dtype=torch.float32, device=x.device) if grad_logp is None \
            else grad_logp.reshape(-1).to(torch.float32)
        g_ent = None if (not with_entropy or grad_entropy is None) else grad_entropy.reshape(-1).to(torch.float32)
        grad = torch.empty_like(x)
        own = (~outside).to(torch.float32) * g_logp
        for i in range(0, n, chunk):
            j = min(i + chunk, n)
            logq = x[i:j].to(torch.float32, copy=True).div_(temperature)
            if first_pad < part:
                logq[:, first_pad:] = float("-inf")
            logq.sub_((global_max[i:j] + log_sum[i:j]).unsqueeze(-1))  # log p
            p = logq.exp()
            gl = g_logp[i:j].unsqueeze(-1)
            if g_ent is not None:
                # d logp(y)/dz_v = 1[v == y] - p_v ;  d H/dz_v = -p_v (log p_v + H)
                w = logq.clamp_min_(_LOG_TINY)  # finite where p underflowed (as the unchunked path)
                w.add_(entropy[i:j].unsqueeze(-1)).mul_(g_ent[i:j].unsqueeze(-1)).add_(gl)
                g = w.mul_(p).neg_()
            else:
                g = p.mul_(-gl)
            g.scatter_add_(-1, local_t[i:j].unsqueeze(-1), own[i:j].unsqueeze(-1))
            grad[i:j] = g.div_(temperature)
            del logq, p, g
        return grad.view(logits.shape), None, None, None, None, None, None


def vocab_parallel_logprobs(
    logits: torch.Tensor,
    target: torch.Tensor,
    temperature: float = 1.0,
    with_entropy: bool = False,
    group=None,
    vocab_size: int | None = None,
    chunk_tokens: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """log softmax(logits / T)[target] and the entropy of softmax(logits / T), vocab-parallel.

    logits: [..., V / tp] (this rank's vocab slice, slices in TP-rank order); target: [...] ids
    in the FULL vocabulary. group defaults to Megatron's tensor-parallel group (none when Megatron's
    groups are not set up: the whole vocabulary is here). vocab_size: the
    real vocabulary (HF config); ids at or above it (Megatron's padding) are left out.
    chunk_tokens: tokens per chunk (None: DEFAULT_CHUNK_TOKENS; 0: unchunked).
    Returns fp32 tensors shaped like target (entropy None unless asked for).
    """
    if temperature <= 0:
        raise ValueError(f"temperature={temperature} must be positive")
    if logits.shape[:-1] != target.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and target {tuple(target.shape)} do not match")
    if group is None and dist.is_initialized():
        group = _tp_group()
    chunk = DEFAULT_CHUNK_TOKENS if chunk_tokens is None else int(chunk_tokens)
    if chunk < 0:
        raise ValueError(f"chunk_tokens={chunk_tokens} must be >= 0 (0: unchunked)")
    if chunk == 0:
        return _VocabParallelLogProbs.apply(logits, target, float(temperature), bool(with_entropy), group,
                                            vocab_size)
    return _ChunkedVocabParallelLogProbs.apply(logits, target, float(temperature), bool(with_entropy),
                                               group, vocab_size, chunk)


def sequence_logprobs(
    logits: torch.Tensor,
    tokens: torch.Tensor,
    temperature: float = 1.0,
    with_entropy: bool = False,
    group=None,
    vocab_size: int | None = None,
    chunk_tokens: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Log-prob of every token given the ones before it, aligned with `tokens`.

    logits: [b, s, V / tp] from a forward over tokens [b, s] (position t predicts token t+1).
    Returns [b, s] tensors whose column t belongs to tokens[:, t]; column 0 has no prediction
    and is 0, so a response mask aligned with the tokens selects the right entries.
    Every position is scored (the last one against a dummy target, then dropped) so the logits
    are used whole: slicing off the last position would make them non-contiguous, and the
    chunked path would then copy all of them.
    """
    target = torch.cat([tokens[:, 1:], tokens[:, :1]], dim=1)  # last column: dummy, dropped
    logp, ent = vocab_parallel_logprobs(logits, target, temperature, with_entropy, group, vocab_size,
                                        chunk_tokens)
    pad = logp.new_zeros(logp.size(0), 1)
    logp = torch.cat([pad, logp[:, :-1]], dim=1)
    if ent is not None:
        ent = torch.cat([pad, ent[:, :-1]], dim=1)
    return logp, ent
