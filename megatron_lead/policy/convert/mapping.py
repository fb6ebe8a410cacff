"""How one HF tensor (or a fused group of them) becomes Megatron TP shards, and back.

A family table (convert/<family>.py) is a list of `Rule`s. The split kinds:

  replicated  the same full tensor on every TP rank (norm weights, the MoE router)
  column      cut along dim 0 (output features)
  row         cut along dim 1 (input features)
  vocab       rows padded with zeros to the padded vocab, then cut along dim 0
  qkv         q, k, v fused as Megatron's linear_qkv: per KV group g the rows
              [q heads of g | k_g | v_g], groups in order; then cut along dim 0 (whole groups)
  gate_up     gate and up fused as linear_fc1: TP rank r holds [gate_r ; up_r]

A rule's `dim` names the size of the tensor's non-hidden dimension (see `dim_size`), so shapes
come from the architecture, not from the tensor names. Expert rules ("{e}" in the names) expand to
one placement per routed expert: HF counts experts globally, Megatron per expert-parallel rank
(`local_experts.{e}` of EP rank e // (num_experts / ep)); expert tensors are TP-split like the
dense MLP (Megatron's expert TP size defaults to the TP size, and this project keeps it).

Everything here is slicing and concatenation, so HF -> Megatron -> HF is bit-exact.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator

import torch

from megatron_lead.policy.convert.arch import ModelArch, layers_of_stage

SPLITS = ("replicated", "column", "row", "vocab", "qkv", "gate_up")
DIMS = ("hidden", "head_dim", "experts", "attention", "ffn", "moe_ffn")


@dataclass(frozen=True)
class Rule:
    hf: tuple[str, ...]  # HF names; "{i}" is the global layer index, "{e}" the global expert index
    megatron: str        # Megatron name; "{i}" the layer index within its stage, "{e}" within its EP rank
    split: str           # one of SPLITS
    where: str = "layer"  # "first" (pipeline stage 0), "last" stage, or "layer" (its layer's stage)
    dim: str = "hidden"  # the non-hidden dimension: one of DIMS (unused by vocab and qkv)

    def __post_init__(self):
        assert self.split in SPLITS and self.where in ("first", "layer", "last") and self.dim in DIMS, self

    @property
    def expert(self) -> bool:
        return "{e}" in self.megatron


# Transformer Engine layer specs fuse the norms into the following linear; same tensor, new name.
# (MoE layers keep pre_mlp_layernorm apart: no fused linear follows it.)
TE_ALIASES = {
    "input_layernorm.weight": "self_attention.linear_qkv.layer_norm_weight",
    "pre_mlp_layernorm.weight": "mlp.linear_fc1.layer_norm_weight",
}


@dataclass(frozen=True)
class Placement:
    """One rule applied to one layer (and expert): its names, pipeline stage and EP rank."""
    rule: Rule
    hf_names: tuple[str, ...]
    megatron_name: str  # with the stage-local layer index (and EP-local expert index)
    stage: int
    ep_rank: int | None = None  # the expert-parallel rank holding it; None: every EP rank


def table_for(arch: ModelArch) -> list[Rule]:
    from megatron_lead.policy.convert.families import table_module

    rules = []
    for rule in table_module(arch.family).TABLE:
        if rule.megatron == "output_layer.weight" and arch.tie_embeddings:
            continue  # tied: HF has no lm_head.weight (the last stage's copy is handled apart)
        rules.append(rule)
    return rules


def placements(arch: ModelArch, pp: int, ep: int = 1) -> Iterator[Placement]:
    """Every HF tensor group in a fixed order: first-stage rules, layers 0..L-1 (expert rules once
    per expert, in expert order), last-stage rules."""
    rules = table_for(arch)
    per_stage = arch.num_layers // pp
    per_ep = arch.num_experts // ep if arch.is_moe else 0
    for rule in rules:
        if rule.where == "first":
            yield Placement(rule, rule.hf, rule.megatron, 0)
    for layer in range(arch.num_layers):
        stage = layer // per_stage
        local = layer - layers_of_stage(arch, pp, stage).start
        for rule in rules:
            if rule.where != "layer":
                continue
            if not rule.expert:
                yield Placement(rule, tuple(n.format(i=layer) for n in rule.hf),
                                rule.megatron.format(i=local), stage)
                continue
            for e in range(arch.num_experts):
                yield Placement(rule, tuple(n.format(i=layer, e=e) for n in rule.hf),
                                rule.megatron.format(i=local, e=e % per_ep), stage, e // per_ep)
    for rule in rules:
        if rule.where == "last":
            yield Placement(rule, rule.hf, rule.megatron, pp - 1)


def dim_size(dim: str, arch: ModelArch) -> int:
    return {"hidden": arch.hidden_size, "head_dim": arch.head_dim, "experts": arch.num_experts,
            "attention": arch.num_heads * arch.head_dim, "ffn": arch.ffn_hidden_size,
            "moe_ffn": arch.moe_ffn_hidden_size}[dim]


def hf_shapes(p: Placement, arch: ModelArch) -> list[tuple[int, ...]]:
    """Full HF shapes of p.hf_names (used to receive broadcasts)."""
    h, hd = arch.hidden_size, arch.head_dim
    size = dim_size(p.rule.dim, arch)
    out = []
    for name in p.hf_names:
        bias = name.endswith(".bias")
        if p.rule.split == "vocab":
            shape = (arch.vocab_size, h)
        elif p.rule.split == "replicated":
            shape = (size,) if p.rule.dim in ("hidden", "head_dim") else (size, h)
        elif p.rule.split == "qkv":
            rows = (arch.num_heads if ".q_proj." in name else arch.num_kv_heads) * hd
            shape = (rows,) if bias else (rows, h)
        elif p.rule.split in ("gate_up", "column"):
            shape = (size, h)
        elif p.rule.split == "row":
            shape = (h, size)
        else:
            raise ValueError(f"no HF shape rule for {name} ({p.rule.split})")
        out.append(shape)
    return out


# A reader returns rows [start, stop) (dim 0) or, with cols=True, columns [start, stop) (dim 1)
# of a named HF tensor; None bounds mean the whole tensor.
Reader = Callable[..., torch.Tensor]


def shard_from_hf(p: Placement, read: Reader, arch: ModelArch, tp: int, tp_rank: int,
                  padded_vocab: int) -> torch.Tensor:
    """This TP rank's Megatron tensor for placement p, reading only the HF rows it needs."""
    split = p.rule.split
    if split == "replicated":
        return read(p.hf_names[0])
    if split == "column":
        rows = _dim_size(p, arch) // tp
        return read(p.hf_names[0], tp_rank * rows, (tp_rank + 1) * rows)
    if split == "row":
        cols = dim_size(p.rule.dim, arch) // tp
        return read(p.hf_names[0], tp_rank * cols, (tp_rank + 1) * cols, cols=True)
    if split == "vocab":
        rows = padded_vocab // tp
        start, stop = tp_rank * rows, (tp_rank + 1) * rows
        real = read(p.hf_names[0], min(start, arch.vocab_size), min(stop, arch.vocab_size))
        if real.shape[0] == rows:
            return real
        pad = real.new_zeros((rows - real.shape[0],) + tuple(real.shape[1:]))
        return torch.cat([real, pad])
    if split == "gate_up":
        rows = dim_size(p.rule.dim, arch) // tp
        gate, up = (read(n, tp_rank * rows, (tp_rank + 1) * rows) for n in p.hf_names)
        return torch.cat([gate, up])
    if split == "qkv":
        hd = arch.head_dim
        groups = arch.num_kv_heads // tp
        q_per_group = arch.num_heads // arch.num_kv_heads
        g0 = tp_rank * groups
        q = read(p.hf_names[0], g0 * q_per_group * hd, (g0 + groups) * q_per_group * hd)
        k = read(p.hf_names[1], g0 * hd, (g0 + groups) * hd)
        v = read(p.hf_names[2], g0 * hd, (g0 + groups) * hd)
        rest = tuple(q.shape[1:])
        fused = torch.cat([q.reshape((groups, q_per_group * hd) + rest),
                           k.reshape((groups, hd) + rest),
                           v.reshape((groups, hd) + rest)], dim=1)
        return fused.reshape((-1,) + rest)
    raise AssertionError(split)


def hf_from_shards(p: Placement, shards: list[torch.Tensor], arch: ModelArch) -> list[torch.Tensor]:
    """The full HF tensors of placement p from all TP ranks' Megatron tensors (in TP order)."""
    split = p.rule.split
    if split == "replicated":
        return [shards[0]]
    if split == "column":
        return [torch.cat(shards, dim=0)]
    if split == "row":
        return [torch.cat(shards, dim=1)]
    if split == "vocab":
        return [torch.cat(shards, dim=0)[:arch.vocab_size]]
    if split == "gate_up":
        halves = [s.chunk(2, dim=0) for s in shards]
        return [torch.cat([g for g, _ in halves]), torch.cat([u for _, u in halves])]
    if split == "qkv":
        hd = arch.head_dim
        q_per_group = arch.num_heads // arch.num_kv_heads
        qs, ks, vs = [], [], []
        for s in shards:
            rest = tuple(s.shape[1:])
            grouped = s.reshape((-1, (q_per_group + 2) * hd) + rest)
            q, k, v = grouped.split([q_per_group * hd, hd, hd], dim=1)
            qs.append(q.reshape((-1,) + rest))
            ks.append(k.reshape((-1,) + rest))
            vs.append(v.reshape((-1,) + rest))
        return [torch.cat(qs), torch.cat(ks), torch.cat(vs)]
    raise AssertionError(split)


def _dim_size(p: Placement, arch: ModelArch) -> int:
    return hf_shapes(p, arch)[0][0]
