"""Qwen2 / Qwen2.5 / DeepSeek-R1-Distill-Qwen: HF names <-> Megatron GPTModel (local spec) names.

Qwen2 has q/k/v biases and no other bias; tie_word_embeddings drops lm_head (mapping.table_for).
"""

from megatron_lead.policy.convert.mapping import Rule

L = "model.layers.{i}."   # HF layer prefix ({i}: global layer index)
M = "decoder.layers.{i}."  # Megatron layer prefix ({i}: index within the pipeline stage)

TABLE = [
    Rule(("model.embed_tokens.weight",), "embedding.word_embeddings.weight", "vocab", "first"),
    Rule((L + "input_layernorm.weight",), M + "input_layernorm.weight", "replicated"),
    Rule((L + "self_attn.q_proj.weight", L + "self_attn.k_proj.weight", L + "self_attn.v_proj.weight"),
         M + "self_attention.linear_qkv.weight", "qkv"),
    Rule((L + "self_attn.q_proj.bias", L + "self_attn.k_proj.bias", L + "self_attn.v_proj.bias"),
         M + "self_attention.linear_qkv.bias", "qkv"),
    Rule((L + "self_attn.o_proj.weight",), M + "self_attention.linear_proj.weight", "row",
         dim="attention"),
    Rule((L + "post_attention_layernorm.weight",), M + "pre_mlp_layernorm.weight", "replicated"),
    Rule((L + "mlp.gate_proj.weight", L + "mlp.up_proj.weight"), M + "mlp.linear_fc1.weight", "gate_up",
         dim="ffn"),
    Rule((L + "mlp.down_proj.weight",), M + "mlp.linear_fc2.weight", "row", dim="ffn"),
    Rule(("model.norm.weight",), "decoder.final_layernorm.weight", "replicated", "last"),
    Rule(("lm_head.weight",), "output_layer.weight", "vocab", "last"),
]
