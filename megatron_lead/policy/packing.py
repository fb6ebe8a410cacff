"""Sequence packing: a micro-batch's rollouts as ONE sequence of their real tokens, no padding.

RL batches are long-tailed (most answers short, a few near the length cap), so right-padding
every row of a micro-batch to its longest wastes most of the compute on padding. Packing
concatenates the rows into tokens [1, T] (T = the sum of their lengths) and hands Megatron-Core
its packed-sequence parameters (`PackedSeqParams`, qkv_format "thd", `cu_seqlens` = the
cumulative lengths). Megatron then
  - applies RoPE per sequence, each from position 0 (`_apply_rotary_pos_emb_thd` splits the
    pack at `cu_seqlens`), so a packed row sees exactly the positions of its padded twin;
  - hands the core attention q [T, heads, d] and k/v [T, kv_heads, d] with the same parameters:
    our `SDPACoreAttention` (policy/attention.py) attends within each sequence only (flash varlen
    on GPU, one causal SDPA call per sequence on CPU); Transformer Engine's attention does it
    natively.

Micro-batches can be sized by tokens (`max_tokens`): consecutive rows are packed while their
total length fits, so every forward does about the same work whatever the lengths. The loss is
a token SUM divided by the global token count (policy/loss.py), so how rows are grouped does
not change the gradient. Row order is kept, so results unpack to the caller's rows.

Every tensor of a `PackedMicroBatch` is [1, T] and aligned with its tokens, exactly like a
padded MicroBatch's [b, s], so the loss code is the same for both.

`use_traceable_thd_rope` (build_model calls it) swaps Megatron's reference "thd" RoPE for one
computing the same values without reading the boundaries on the host: Megatron's splits the pack
with `cu_seqlens.tolist()` in every layer (a GPU sync per layer, and a graph break plus one
compiled graph per distinct list of lengths under torch.compile).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from megatron_lead.policy.logprobs import sequence_logprobs


@dataclass
class PackedMicroBatch:
    """Rows of a right-padded batch concatenated into one sequence (see the module docstring)."""

    tokens: torch.Tensor
    """[1, T] int64: the rows' tokens, back to back."""
    positions: torch.Tensor
    """[1, T] int64: position in its own sequence (0, 1, ..., len-1, 0, 1, ...)."""
    cu_seqlens: torch.Tensor
    """[n + 1] int32: sequence i is tokens[0, cu_seqlens[i]:cu_seqlens[i + 1]]."""
    max_seqlen: int
    """Longest sequence in the pack (sizes RoPE's table and the varlen kernel)."""
    rows: list[int]
    """Index of each packed sequence in the source batch."""
    width: int
    """Width s of the source batch (unpack returns [n, width])."""
    response_mask: torch.Tensor
    """[1, T] bool."""
    advantages: torch.Tensor | None = None
    """[1, T] float (a per-rollout advantage is broadcast to its tokens), or None (SFT)."""
    old_logprobs: torch.Tensor | None = None
    """[1, T] or None."""
    ref_logprobs: torch.Tensor | None = None
    """[1, T] or None."""
    rollout_logprobs: torch.Tensor | None = None
    """[1, T] or None."""

    @property
    def lengths(self) -> list[int]:
        return (self.cu_seqlens[1:] - self.cu_seqlens[:-1]).tolist()

    def as_dict(self) -> dict:
        return {k: v for k, v in vars(self).items() if v is not None}


def row_lengths(response_mask: torch.Tensor) -> torch.Tensor:
    """[b] tokens per right-padded row: up to its last response token (at least 1)."""
    mask = response_mask.bool()
    last = mask.int().cumsum(1).argmax(1)  # first column where the count is final
    return torch.where(mask.any(1), last + 1, torch.ones_like(last))


def group_rows(lengths: list[int], micro_batch_size: int = 1, max_tokens: int = 0) -> list[list[int]]:
    """Consecutive rows per micro-batch: `micro_batch_size` rows each, or (max_tokens > 0) as many
    rows as fit in max_tokens tokens (a longer row gets a micro-batch of its own)."""
    if max_tokens <= 0:
        if micro_batch_size < 1:
            raise ValueError(f"micro_batch_size={micro_batch_size} must be >= 1")
        return [list(range(i, min(i + micro_batch_size, len(lengths))))
                for i in range(0, len(lengths), micro_batch_size)]
    groups, current, used = [], [], 0
    for i, n in enumerate(lengths):
        if current and used + n > max_tokens:
            groups.append(current)
            current, used = [], 0
        current.append(i)
        used += n
    if current:
        groups.append(current)
    return groups


def _pack_rows(t: torch.Tensor, rows: list[int], lengths: list[int]) -> torch.Tensor:
    return torch.cat([t[r, :n] for r, n in zip(rows, lengths)]).unsqueeze(0)


def pack_micro_batches(micro_batch_size: int = 1, max_tokens: int = 0, lengths: torch.Tensor | None = None,
                       **tensors: torch.Tensor | None) -> list[PackedMicroBatch]:
    """Packed counterpart of train_step.split_micro_batches (the same keyword tensors).

    tokens / response_mask / old_logprobs / ref_logprobs / rollout_logprobs: [B, s], right-padded;
    advantages: [B, s] or [B] (optional, like the log-probs: SFT has none). lengths: [B] tokens per
    row (default: row_lengths(response_mask)). Rows are grouped by group_rows(micro_batch_size,
    max_tokens), in order.
    """
    tokens, mask = tensors["tokens"], tensors["response_mask"]
    lengths = row_lengths(mask) if lengths is None else lengths
    lengths = [int(n) for n in lengths]
    width = tokens.size(1)
    if any(n < 1 or n > width for n in lengths):
        raise ValueError(f"row lengths must be in 1..{width}, got {lengths}")
    adv = tensors.get("advantages")
    if adv is not None and adv.dim() == 1:
        tensors = {**tensors, "advantages": adv.unsqueeze(1).expand(-1, width)}
    out = []
    for rows in group_rows(lengths, micro_batch_size, max_tokens):
        lens = [lengths[r] for r in rows]
        cu = torch.zeros(len(rows) + 1, dtype=torch.int32)
        cu[1:] = torch.tensor(lens).cumsum(0)
        opt = {k: None if tensors.get(k) is None else _pack_rows(tensors[k], rows, lens)
               for k in ("advantages", "old_logprobs", "ref_logprobs", "rollout_logprobs")}
        out.append(PackedMicroBatch(
            tokens=_pack_rows(tokens, rows, lens),
            positions=torch.cat([torch.arange(n) for n in lens]).unsqueeze(0),
            cu_seqlens=cu, max_seqlen=max(lens), rows=list(rows), width=width,
            response_mask=_pack_rows(mask.bool(), rows, lens), **opt))
    return out


def packed_seq_params(cu_seqlens: torch.Tensor, max_seqlen: int):
    """Megatron-Core's parameters for one packed sequence of the given boundaries ("thd")."""
    from megatron.core.packed_seq_params import PackedSeqParams

    cu = cu_seqlens.to(torch.int32)
    return PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu,
                           max_seqlen_q=int(max_seqlen), max_seqlen_kv=int(max_seqlen))


def sequence_starts(cu_seqlens: torch.Tensor, total: int) -> torch.Tensor:
    """[1, T] bool, True at the first token of each packed sequence."""
    starts = torch.zeros(total, dtype=torch.bool, device=cu_seqlens.device)
    starts[cu_seqlens[:-1].long()] = True
    return starts.unsqueeze(0)


def packed_sequence_logprobs(logits: torch.Tensor, tokens: torch.Tensor, cu_seqlens: torch.Tensor,
                             temperature: float = 1.0, with_entropy: bool = False,
                             vocab_size: int | None = None):
    """logprobs.sequence_logprobs over a pack [1, T]: each sequence's first token has no
    prediction and gets 0 (as column 0 of a padded row); the last token of one sequence never
    predicts the first of the next."""
    logp, ent = sequence_logprobs(logits, tokens, temperature, with_entropy, vocab_size=vocab_size)
    starts = sequence_starts(cu_seqlens.to(logp.device), logp.size(1))
    logp = logp.masked_fill(starts, 0.0)
    return logp, None if ent is None else ent.masked_fill(starts, 0.0)


def unpack(values: torch.Tensor, cu_seqlens: torch.Tensor, width: int) -> torch.Tensor:
    """[1, T] (or [T]) per-token values of a pack -> [n, width], right-padded with zeros."""
    flat = values.reshape(-1)
    bounds = cu_seqlens.tolist()
    out = flat.new_zeros(len(bounds) - 1, width)
    for i, (a, b) in enumerate(zip(bounds[:-1], bounds[1:])):
        out[i, :b - a] = flat[a:b]
    return out


def _thd_rope(t, cu_seqlens, freqs, rotary_interleaved=False, multi_latent_attention=False, mscale=1.0,
              cp_group=None):
    """Megatron's `_apply_rotary_pos_emb_thd` (t [T, heads, d]) for context-parallel size 1, with
    every token's position computed on the device: arange(T) - start of its sequence.

    Megatron's has a second mode for a table of T rows (positions NOT restarting, for VLMs);
    GPTModel's table has max_seqlen rows, which equals T only for a pack of one sequence,
    where both modes agree.
    """
    from megatron.core.models.common.embeddings import rope_utils

    if cp_group is not None and cp_group.size() > 1:
        return _ORIGINAL_THD_ROPE[0](t, cu_seqlens, freqs, rotary_interleaved=rotary_interleaved,
                                     multi_latent_attention=multi_latent_attention, mscale=mscale,
                                     cp_group=cp_group)
    total = t.size(0)
    index = torch.arange(total, device=t.device)
    cu = cu_seqlens.to(device=t.device, dtype=torch.int64)
    seq_id = torch.bucketize(index, cu[1:], right=True)
    positions = index - cu[seq_id]
    return rope_utils._apply_rotary_pos_emb_bshd(
        t.unsqueeze(1), freqs[positions], rotary_interleaved=rotary_interleaved,
        multi_latent_attention=multi_latent_attention, mscale=mscale).squeeze(1)


_ORIGINAL_THD_ROPE: list = []


def use_traceable_thd_rope() -> None:
    """Install _thd_rope in place of Megatron's (idempotent; see the module docstring)."""
    from megatron.core.models.common.embeddings import rope_utils

    if not _ORIGINAL_THD_ROPE:
        from megatron_lead.versions import require
        require("megatron-core")  # a private Megatron function, replaced with its 0.16.1 signature
        _ORIGINAL_THD_ROPE.append(rope_utils._apply_rotary_pos_emb_thd)
        rope_utils._apply_rotary_pos_emb_thd = _thd_rope
