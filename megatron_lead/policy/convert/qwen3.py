"""Qwen3 dense (0.6B-32B): HF names <-> Megatron GPTModel names.

Llama's layout plus a per-head RMSNorm of the queries and keys (HF `q_norm` / `k_norm`, applied
to each head's head_dim vector before RoPE), which is Megatron's `q_layernorm` / `k_layernorm`
(`qk_layernorm=True`; same tensor, replicated over TP since every head uses it). No q/k/v bias
(arch.py refuses attention_bias=True); head_dim is read from the config (128 in Qwen3-0.6B,
whose hidden / heads is 64). The small models tie the embeddings.
"""

from megatron_lead.policy.convert.mapping import Rule

L = "model.layers.{i}."   # HF layer prefix ({i}: global layer index)
M = "decoder.layers.{i}."  # Megatron layer prefix ({i}: index within the pipeline stage)

EMBEDDING = Rule(("model.embed_tokens.weight",), "embedding.word_embeddings.weight", "vocab", "first")
ATTENTION = [
    Rule((L + "input_layernorm.weight",), M + "input_layernorm.weight", "replicated"),
    Rule((L + "self_attn.q_proj.weight", L + "self_attn.k_proj.weight", L + "self_attn.v_proj.weight"),
         M + "self_attention.linear_qkv.weight", "qkv"),
    Rule((L + "self_attn.q_norm.weight",), M + "self_attention.q_layernorm.weight", "replicated",
         dim="head_dim"),
    Rule((L + "self_attn.k_norm.weight",), M + "self_attention.k_layernorm.weight", "replicated",
         dim="head_dim"),
    Rule((L + "self_attn.o_proj.weight",), M + "self_attention.linear_proj.weight", "row",
         dim="attention"),
    Rule((L + "post_attention_layernorm.weight",), M + "pre_mlp_layernorm.weight", "replicated"),
]
HEAD = [
    Rule(("model.norm.weight",), "decoder.final_layernorm.weight", "replicated", "last"),
    Rule(("lm_head.weight",), "output_layer.weight", "vocab", "last"),
]

TABLE = [
    EMBEDDING,
    *ATTENTION,
    Rule((L + "mlp.gate_proj.weight", L + "mlp.up_proj.weight"), M + "mlp.linear_fc1.weight", "gate_up",
         dim="ffn"),
    Rule((L + "mlp.down_proj.weight",), M + "mlp.linear_fc2.weight", "row", dim="ffn"),
    *HEAD,
]
