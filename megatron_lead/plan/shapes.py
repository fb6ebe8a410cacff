"""What a model is, in the numbers memory depends on: read from an HF config.json, no weights.

The architecture facts come from `policy.convert.arch` (the same reader the model builder and the
converter use), so the planner cannot disagree with the trainer about what a config means.
From them:

  - `megatron_params`: the parameter tensors one Megatron rank holds at TP x PP x EP (their
    element counts, in the order Megatron registers them), including what Megatron adds: the
    vocabulary padded to a multiple of 128 x TP, norms replicated on every TP rank (Qwen3's
    per-head q/k norms of head_dim too), for tied embeddings with PP > 1 the last stage's copy of
    the embedding, and for a MoE layer the router (replicated over TP) and this EP rank's
    num_experts / EP experts, each split over TP (Megatron's expert TP is its TP here);
  - `vllm_weight_bytes`: vLLM's copy of the weights on one of its TP ranks (its vocabulary is
    padded to a multiple of 64, KV heads are replicated when vLLM's TP exceeds them, and a MoE
    layer keeps every expert, each split over vLLM's TP: vLLM's default, expert parallelism off);
  - `kv_bytes_per_token`: the KV cache one token costs on one vLLM rank.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from megatron_lead.policy.convert.arch import ModelArch, arch_from_hf, load_hf_config, padded_vocab_size

VLLM_VOCAB_PADDING = 64
"""vLLM pads the vocabulary of its embedding and LM head to a multiple of this (its
`DEFAULT_VOCAB_PADDING_SIZE`), then splits it over its TP ranks."""


@dataclass(frozen=True)
class ParamTensor:
    """One parameter tensor of a Megatron rank."""

    name: str
    numel: int
    shared_embedding: bool = False
    """Megatron's `shared_embedding` flag (tied embeddings with PP > 1): with the distributed
    optimizer such a tensor gets a DDP bucket of its own, padded on its own."""
    norm: bool = False
    """A norm weight: fp32 under Megatron's local layer spec (torch.nn.RMSNorm is built without a
    dtype), bf16 inside Transformer Engine's fused norm-linear."""
    expert_parallel: bool = False
    """A routed expert's weight at EP > 1: Megatron marks it `allreduce=False`, and its DDP keeps it
    in separate expert-parallel buffers, reduced and sharded (distributed optimizer) over the
    expert-data-parallel group of world / (EP x TP x PP) = DP / EP ranks instead of DP. At EP = 1
    an expert's weight is an ordinary parameter of the dense buffer (False)."""


@dataclass(frozen=True)
class ModelShape:
    """The architecture plus where it came from (for messages)."""

    arch: ModelArch
    source: str = ""

    @property
    def num_params(self) -> int:
        """Parameters of the HF model (no vocabulary padding, tied embeddings counted once)."""
        a = self.arch
        per_layer = _layer_numels(a, 1, 1)
        embed = a.vocab_size * a.hidden_size
        return a.num_layers * sum(n for _, n, _ in per_layer) + a.hidden_size + embed * (1 if a.tie_embeddings else 2)

    @property
    def active_params(self) -> int:
        """Parameters one token goes through: for a MoE model its top-k experts of each layer, not
        all of them (the "3.3B activated" of Qwen3-30B-A3B); for a dense one num_params."""
        a = self.arch
        if not a.is_moe:
            return self.num_params
        idle = a.num_experts - a.moe_topk
        return self.num_params - a.num_layers * idle * 3 * a.moe_ffn_hidden_size * a.hidden_size


def load_shape(config: Any) -> ModelShape:
    """ModelShape from an HF model folder, a config.json path or a dict (one-line errors)."""
    source = str(config) if not isinstance(config, dict) else "config dict"
    cfg = load_hf_config(config)
    return ModelShape(arch=arch_from_hf(cfg), source=source)


def _layer_numels(a: ModelArch, tp: int, ep: int) -> list[tuple[str, int, bool]]:
    """(name, elements on one TP x EP rank, is an expert weight) of one transformer layer's
    tensors, in Megatron's registration order (local spec names: the attention's linear_proj is
    created before linear_qkv and its q/k norms; Transformer Engine's spec fuses the input norm into
    linear_qkv: same counts)."""
    h, d = a.hidden_size, a.head_dim
    qkv_rows = (a.num_heads + 2 * a.num_kv_heads) * d // tp
    out = [("input_layernorm.weight", h, False),
           ("self_attention.linear_proj.weight", h * a.num_heads * d // tp, False),
           ("self_attention.linear_qkv.weight", qkv_rows * h, False)]
    if a.qkv_bias:
        out.append(("self_attention.linear_qkv.bias", qkv_rows, False))
    if a.qk_norm:  # one RMSNorm weight of head_dim for all query heads, one for all key heads
        out += [("self_attention.q_layernorm.weight", d, False), ("self_attention.k_layernorm.weight", d, False)]
    out.append(("pre_mlp_layernorm.weight", h, False))
    if not a.is_moe:
        return out + [("mlp.linear_fc1.weight", 2 * a.ffn_hidden_size // tp * h, False),
                      ("mlp.linear_fc2.weight", h * a.ffn_hidden_size // tp, False)]
    f = a.moe_ffn_hidden_size // tp
    out.append(("mlp.router.weight", a.num_experts * h, False))
    for e in range(a.num_experts // ep):
        out += [(f"mlp.experts.local_experts.{e}.linear_fc1.weight", 2 * f * h, True),
                (f"mlp.experts.local_experts.{e}.linear_fc2.weight", h * f, True)]
    return out


def megatron_params(shape: ModelShape, tp: int, pp: int, stage: int, ep: int = 1) -> list[ParamTensor]:
    """The parameters pipeline stage `stage` of a TP x PP (x EP) Megatron GPTModel holds on one
    TP (and EP) rank, in registration order (embedding, layers, final norm, output layer)."""
    a = shape.arch
    vocab = padded_vocab_size(a.vocab_size, tp) // tp * a.hidden_size
    first, last = stage == 0, stage == pp - 1
    tied_copy = a.tie_embeddings and pp > 1
    out = []
    if first:
        out.append(ParamTensor("embedding.word_embeddings.weight", vocab, shared_embedding=tied_copy))
    for i in range(a.num_layers // pp):
        out += [ParamTensor(f"decoder.layers.{i}.{name}", n, norm=name.endswith("layernorm.weight"),
                            expert_parallel=expert and ep > 1)
                for name, n, expert in _layer_numels(a, tp, ep)]
    if last:
        out.append(ParamTensor("decoder.final_layernorm.weight", a.hidden_size, norm=True))
        if not a.tie_embeddings or not first:
            out.append(ParamTensor("output_layer.weight", vocab, shared_embedding=tied_copy))
    return out


def vllm_weight_bytes(shape: ModelShape, vllm_tp: int, dtype_bytes: int = 2) -> int:
    """vLLM's weights on one of its TP ranks."""
    a = shape.arch
    h, d = a.hidden_size, a.head_dim
    vocab = -(-a.vocab_size // VLLM_VOCAB_PADDING) * VLLM_VOCAB_PADDING
    vocab_rank = -(-vocab // vllm_tp) * h
    kv_heads = kv_heads_per_rank(shape, vllm_tp)
    qkv_rows = (a.num_heads // vllm_tp + 2 * kv_heads) * d
    layer = (2 * h + qkv_rows * h + (qkv_rows if a.qkv_bias else 0) + (2 * d if a.qk_norm else 0)
             + h * a.num_heads // vllm_tp * d)
    if a.is_moe:  # FusedMoE's w13 [E, 2I/tp, h] and w2 [E, h, I/tp]; the gate [E, h] replicated
        layer += a.num_experts * (3 * a.moe_ffn_hidden_size // vllm_tp * h + h)
    else:
        layer += 3 * a.ffn_hidden_size // vllm_tp * h
    total = a.num_layers * layer + h + vocab_rank * (1 if a.tie_embeddings else 2)
    return total * dtype_bytes


def kv_heads_per_rank(shape: ModelShape, vllm_tp: int) -> int:
    """KV heads of one vLLM TP rank: split, or replicated when vLLM's TP exceeds them."""
    return max(1, shape.arch.num_kv_heads // vllm_tp)


def kv_bytes_per_token(shape: ModelShape, vllm_tp: int, dtype_bytes: int = 2) -> int:
    """K and V of one token, all layers, on one vLLM TP rank."""
    a = shape.arch
    return 2 * a.num_layers * kv_heads_per_rank(shape, vllm_tp) * a.head_dim * dtype_bytes


def check_split(shape: ModelShape, tp: int, pp: int) -> str | None:
    """Why Megatron cannot split this model tp x pp ways, or None (arch.check_parallel_sizes' rules,
    which the model builder applies, as one line; EP is planner.expert_parallel_sizes')."""
    a = shape.arch
    checks = [("TP", tp, a.num_heads, "attention heads"), ("TP", tp, a.num_kv_heads, "key-value heads"),
              ("TP", tp, a.ffn_hidden_size, "intermediate_size"), ("PP", pp, a.num_layers, "layers")]
    if a.is_moe:
        checks.append(("TP", tp, a.moe_ffn_hidden_size, "moe_intermediate_size"))
    for key, size, count, what in checks:
        if count % size:
            return f"{key}={size} does not divide the model's {count} {what}"
    return None


def check_vllm_split(shape: ModelShape, vllm_tp: int) -> str | None:
    """Why vLLM cannot shard this model over vllm_tp ranks, or None (KV heads may replicate)."""
    a = shape.arch
    if a.num_heads % vllm_tp:
        return f"vLLM TP={vllm_tp} does not divide the model's {a.num_heads} attention heads"
    if a.num_kv_heads >= vllm_tp and a.num_kv_heads % vllm_tp:
        return f"vLLM TP={vllm_tp} does not divide the model's {a.num_kv_heads} key-value heads"
    if vllm_tp > a.num_kv_heads and vllm_tp % a.num_kv_heads:
        return f"vLLM TP={vllm_tp} is not a multiple of the model's {a.num_kv_heads} key-value heads"
    if a.is_moe and a.moe_ffn_hidden_size % vllm_tp:
        return f"vLLM TP={vllm_tp} does not divide moe_intermediate_size={a.moe_ffn_hidden_size}"
    if not a.is_moe and a.ffn_hidden_size % vllm_tp:
        return f"vLLM TP={vllm_tp} does not divide intermediate_size={a.ffn_hidden_size}"
    return None
