"""Qwen3-MoE (Qwen3-30B-A3B, Qwen3-235B-A22B): HF names <-> Megatron GPTModel (MoE layer) names.

Attention is Qwen3's (q/k RMSNorm per head, convert/qwen3.py). Every layer's MLP is a
Megatron-Core `MoELayer`: HF `mlp.gate` (the router, [num_experts, hidden], replicated over TP)
is `mlp.router.weight`; routed expert e's gate/up/down projections are
`mlp.experts.local_experts.{e'}.linear_fc1` (gate and up fused, as the dense MLP) and
`linear_fc2` of expert-parallel rank e // (num_experts / ep), e' = e mod (num_experts / ep)
(Megatron's SequentialMLP; Transformer Engine's spec without grouped GEMM keeps these names).
Qwen3-MoE has no shared expert.
"""

from megatron_lead.policy.convert.mapping import Rule
from megatron_lead.policy.convert.qwen3 import ATTENTION, EMBEDDING, HEAD, L, M

X = "mlp.experts.{e}."                  # HF expert prefix ({e}: global expert index)
LX = "mlp.experts.local_experts.{e}."   # Megatron: index among this EP rank's experts

TABLE = [
    EMBEDDING,
    *ATTENTION,
    Rule((L + "mlp.gate.weight",), M + "mlp.router.weight", "replicated", dim="experts"),
    Rule((L + X + "gate_proj.weight", L + X + "up_proj.weight"), M + LX + "linear_fc1.weight", "gate_up",
         dim="moe_ffn"),
    Rule((L + X + "down_proj.weight",), M + LX + "linear_fc2.weight", "row", dim="moe_ffn"),
    *HEAD,
]
