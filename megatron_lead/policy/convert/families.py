"""The model families the converter, the model builder and the weight sync know, in one registry.

Each family names its HF architecture and model_type, its mapping table module
(convert/<family>.py) and, for `megatron-lead convert --list-families`, what it supports and what
it refuses. `arch.arch_from_hf` enforces the refusals (one-line ValueErrors); this table is what
a user reads, so every refusal printed here is one the code raises.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Family:
    model_type: str
    architecture: str
    what: str                       # the checkpoints it covers and what their layers have
    moe: str = "no"
    expert_parallel: str = "-"
    refuses: tuple[str, ...] = ()


# What every family refuses (arch.arch_from_hf, before any family rule).
COMMON_REFUSALS = (
    "hidden_act other than silu",
    "mlp_bias=true",
    "RoPE scaling other than default and llama3 (llama3 only with Megatron's fixed "
    "low_freq_factor 1, high_freq_factor 4, original_max_position_embeddings 8192)",
)
TIED_HEAD = "tied/untied"
ROPE_TYPES = "default, llama3"

FAMILIES: dict[str, Family] = {f.model_type: f for f in (
    Family("qwen2", "Qwen2ForCausalLM",
           "Qwen2, Qwen2.5, DeepSeek-R1-Distill-Qwen: GQA, q/k/v bias",
           refuses=("use_sliding_window=true",)),
    Family("llama", "LlamaForCausalLM",
           "Llama 3.x, DeepSeek-R1-Distill-Llama: GQA, no bias",
           refuses=("attention_bias=true",)),
    Family("qwen3", "Qwen3ForCausalLM",
           "Qwen3 dense 0.6B-32B: GQA, RMSNorm of each head's query and key, head_dim from the "
           "config, no bias",
           refuses=("attention_bias=true", "use_sliding_window=true or sliding_attention layers")),
    Family("mistral", "MistralForCausalLM",
           "Mistral 7B v0.1-v0.3, Mistral-Nemo: GQA, head_dim from the config, no bias, "
           "sliding_window",
           refuses=("a Megatron forward over a sequence longer than sliding_window (Megatron's "
                    "attention and the packed path have no window; vLLM applies it)",)),
    Family("qwen3_moe", "Qwen3MoeForCausalLM",
           "Qwen3-30B-A3B, Qwen3-235B-A22B: Qwen3 attention, every layer a Megatron-Core MoELayer "
           "(softmax router, top-k, norm_topk_prob either way; SwiGLU experts; no shared expert; "
           "no load-balancing loss)",
           moe="yes", expert_parallel="--ep N (N divides num_experts); in memory",
           refuses=("attention_bias=true", "use_sliding_window=true",
                    "mlp_only_layers or decoder_sparse_step != 1 (dense layers between MoE ones)",
                    "training (not forward) at TP > 1: Megatron's MoE layer needs sequence "
                    "parallelism there, which this project does not turn on")),
)}
ARCHITECTURES = {f.architecture: f.model_type for f in FAMILIES.values()}


def table_module(family: str):
    """The mapping-table module of a family (imported late: mapping imports arch)."""
    import importlib

    return importlib.import_module(f"megatron_lead.policy.convert.{family}")


def describe() -> str:
    """The `convert --list-families` text: one row per family, what each is, what it refuses."""
    header = ("model_type", "HF architecture", "tied head", "RoPE scaling", "MoE", "expert parallel")
    rows = [header] + [(f.model_type, f.architecture, TIED_HEAD, ROPE_TYPES, f.moe, f.expert_parallel)
                       for f in FAMILIES.values()]
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    lines += [""] + [f"{f.model_type}: {f.what}" for f in FAMILIES.values()]
    lines += ["", "refused for every family:"] + [f"  - {r}" for r in COMMON_REFUSALS]
    for f in FAMILIES.values():
        if f.refuses:
            lines += [f"refused for {f.model_type}:"] + [f"  - {r}" for r in f.refuses]
    lines += ["any other architecture is refused with one line naming it"]
    return "\n".join(lines)
