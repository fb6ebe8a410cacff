"""Core attention on torch's scaled_dot_product_attention, for Megatron's local layer spec.

Megatron's own DotProductAttention materialises the [b, heads, s, s] score matrix (unfused);
SDPA dispatches to flash / memory-efficient kernels on GPU. Measured on an H200 for a
Qwen2.5-1.5B shape at seq 4096: 2x the training throughput of the local spec, at half the memory.

Packed sequences (policy/packing.py: Megatron's PackedSeqParams, qkv_format "thd") need
attention within each sequence only, without Transformer Engine. `packed_attention` picks:
  varlen  torch.nn.attention.varlen.varlen_attn (flash varlen; CUDA, fp16/bf16): no mask, no padding
  loop    one causal SDPA call per sequence (exact everywhere; the CPU default, and the GPU
          fallback when varlen is missing: flash kernels, one host sync for the boundaries)
  mask    one SDPA call over the pack with a block-diagonal causal mask ([T, T] booleans; no
          host sync, but its cost grows with T^2: on the 2-core CPU an SFT step of 32 packed
          task rows took 0.71 s in packs of 2,048 tokens and 1.52 s in packs of 8,192, against
          0.33 s with `loop` and 0.68 s right-padded; docs/BENCHMARKS.md). Used on CPU inside
          torch.compile, where the loop's host read of the boundaries would break the graph
MEGATRON_LEAD_PACKED_ATTENTION=varlen|loop|mask overrides the choice (tests, GPU checks).
"""

from __future__ import annotations

import inspect
import os
from typing import Optional

import torch
import torch.nn.functional as F

from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig


class SDPACoreAttention(MegatronModule):
    """Drop-in for `core_attention` in `get_gpt_layer_local_spec()` (same constructor and forward).

    Inputs are Megatron's [s, b, heads, head_dim] query and [s, b, kv_heads, head_dim] key/value
    (this rank's TP share of heads); output is [s, b, heads * head_dim].
    attention_mask: None means causal. Otherwise a bool tensor broadcastable to [b, 1, s, s]
    where True marks positions NOT attended (Megatron's convention); it replaces the causal mask.
    """

    def __init__(self, config: TransformerConfig, layer_number: int, attn_mask_type: AttnMaskType,
                 attention_type: str = "self", attention_dropout: Optional[float] = None,
                 softmax_scale: Optional[float] = None, cp_comm_type: Optional[str] = None,
                 pg_collection=None):
        super().__init__(config=config)
        if config.context_parallel_size != 1:
            raise ValueError("SDPACoreAttention does not support context parallelism")
        self.attn_mask_type = attn_mask_type
        self.dropout_p = config.attention_dropout if attention_dropout is None else attention_dropout
        self.softmax_scale = softmax_scale  # None: SDPA's default 1/sqrt(head_dim)
        # A Python bool from the config, not from the tensors' shapes: under torch.compile with
        # dynamic shapes those are symbolic, and SDPA rejects a symbolic enable_gqa.
        self.gqa = config.num_query_groups not in (None, config.num_attention_heads)

    def forward(self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None,
                packed_seq_params=None):
        if attention_bias is not None:
            raise ValueError("SDPACoreAttention does not support attention bias")
        if packed_seq_params is not None:
            if packed_seq_params.qkv_format != "thd" or attention_mask is not None:
                raise ValueError("SDPACoreAttention: packed sequences need qkv_format='thd' and no mask")
            # Megatron squeezed the batch dim: q [T, heads, d], k/v [T, kv_heads, d].
            out = packed_attention(query, key, value, packed_seq_params.cu_seqlens_q,
                                   packed_seq_params.max_seqlen_q, self.softmax_scale, self.gqa)
            return out.reshape(out.size(0), -1)
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))  # [b, heads, s, d]
        mask_type = attn_mask_type if attn_mask_type is not None else self.attn_mask_type
        causal = attention_mask is None and mask_type == AttnMaskType.causal
        attn_mask = None if attention_mask is None else ~attention_mask.bool()
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_mask, is_causal=causal,
            dropout_p=self.dropout_p if self.training else 0.0, scale=self.softmax_scale,
            enable_gqa=self.gqa)
        b, n, s, d = out.shape
        return out.permute(2, 0, 1, 3).reshape(s, b, n * d)


def _varlen_fn():
    """torch's varlen_attn and its keyword for causality, or None (torch < 2.9, or no CUDA)."""
    if not torch.cuda.is_available():
        return None
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    return varlen_attn, set(inspect.signature(varlen_attn).parameters)


def packed_backend(query: torch.Tensor) -> str:
    """varlen | loop | mask for this query (see the module docstring)."""
    forced = os.environ.get("MEGATRON_LEAD_PACKED_ATTENTION", "")
    if forced:
        if forced not in ("varlen", "loop", "mask"):
            raise ValueError(f"MEGATRON_LEAD_PACKED_ATTENTION={forced!r}: use varlen, loop or mask")
        return forced
    if query.is_cuda:
        half = query.dtype in (torch.float16, torch.bfloat16)
        return "varlen" if half and _varlen_fn() is not None else "loop"
    # Compiled CPU layers keep the mask: the loop reads the boundaries on the host (a graph break).
    return "mask" if torch.compiler.is_compiling() else "loop"


def packed_attention(q, k, v, cu_seqlens: torch.Tensor, max_seqlen: int, scale=None,
                     gqa: bool | None = None) -> torch.Tensor:
    """Causal attention within each packed sequence: q [T, hq, d], k/v [T, hk, d] -> [T, hq, d].
    gqa: whether hk < hq (default: from the shapes; pass it under torch.compile)."""
    backend = packed_backend(q)
    gqa = bool(k.size(1) != q.size(1)) if gqa is None else gqa
    if backend == "varlen":
        found = _varlen_fn()
        if found is None:
            raise RuntimeError("varlen attention needs torch >= 2.9 with CUDA")
        varlen_attn, params = found
        kw = {"window_size": (-1, 0)} if "window_size" in params else {"is_causal": True}
        if scale is not None:
            kw["scale"] = scale
        if gqa and "enable_gqa" in params:
            kw["enable_gqa"] = True
        elif gqa:  # older torch: K/V heads repeated (query head i reads kv head i // group)
            k, v = (t.repeat_interleave(q.size(1) // k.size(1), dim=1) for t in (k, v))
        cu = cu_seqlens.to(device=q.device, dtype=torch.int32)
        q, k, v = (t.contiguous() for t in (q, k, v))  # v is a view into the fused QKV output
        return varlen_attn(q, k, v, cu, cu, max_seqlen, max_seqlen, **kw)  # no int(): may be symbolic
    qh, kh, vh = (t.transpose(0, 1).unsqueeze(0) for t in (q, k, v))  # [1, heads, T, d]
    if backend == "loop":
        bounds = cu_seqlens.tolist()
        outs = [F.scaled_dot_product_attention(qh[..., a:b, :], kh[..., a:b, :], vh[..., a:b, :],
                                               is_causal=True, scale=scale, enable_gqa=gqa)
                for a, b in zip(bounds[:-1], bounds[1:])]
        out = torch.cat(outs, dim=2)
    else:
        total = q.size(0)
        cu = cu_seqlens.to(q.device)
        seq_id = torch.bucketize(torch.arange(total, device=q.device), cu[1:], right=True)
        pos = torch.arange(total, device=q.device)
        allowed = (seq_id[:, None] == seq_id[None, :]) & (pos[None, :] <= pos[:, None])
        out = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=allowed, scale=scale, enable_gqa=gqa)
    return out.squeeze(0).transpose(0, 1)
