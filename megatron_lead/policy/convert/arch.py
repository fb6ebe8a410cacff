"""The architecture facts both the model builder and the converter need, read from an HF config.

Which families exist, and what each refuses, is `families.FAMILIES`; this module reads a config
into a `ModelArch` and raises the refusals as one-line ValueErrors.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass
from typing import Any

from megatron_lead.policy.convert.families import ARCHITECTURES, FAMILIES

# model_type -> family (one mapping table per family in convert/<family>.py).
MODEL_TYPES = {name: name for name in FAMILIES}

# Megatron-LM's default --make-vocab-size-divisible-by: the padded vocab is a multiple of this x TP.
VOCAB_DIVISOR = 128


@dataclass(frozen=True)
class ModelArch:
    family: str
    vocab_size: int
    hidden_size: int
    ffn_hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    qkv_bias: bool
    rms_norm_eps: float
    rope_theta: float
    rope_scaling_factor: float | None  # Llama-3.1 style scaling, None for plain RoPE
    tie_embeddings: bool
    max_position_embeddings: int
    # Defaults keep the checkpoints written before these fields readable (ModelArch(**meta)).
    qk_norm: bool = False               # Qwen3: RMSNorm over each head's query and key, before RoPE
    sliding_window: int | None = None   # Mistral: a token attends to the last sliding_window only
    num_experts: int = 0                # MoE: routed experts per layer; 0 is a dense MLP
    moe_ffn_hidden_size: int = 0        # MoE: one expert's intermediate size
    moe_topk: int = 0                   # MoE: experts per token
    moe_norm_topk: bool = False         # MoE: top-k probabilities renormalised to sum to 1

    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0

    def to_dict(self) -> dict:
        return asdict(self)


def load_hf_config(path_or_config: Any) -> dict:
    """A plain dict from an HF model folder, a config.json path, a dict or a PretrainedConfig."""
    if isinstance(path_or_config, dict):
        return dict(path_or_config)
    if isinstance(path_or_config, (str, os.PathLike)):
        path = os.fspath(path_or_config)
        if os.path.isdir(path):
            path = os.path.join(path, "config.json")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"no HF config.json at {path}")
        with open(path) as f:
            return json.load(f)
    if hasattr(path_or_config, "to_dict"):
        return path_or_config.to_dict()
    raise ValueError(f"cannot read an HF config from {type(path_or_config).__name__}")


def _family(cfg: dict) -> str:
    archs = cfg.get("architectures") or []
    for name in archs:
        if name in ARCHITECTURES:
            return ARCHITECTURES[name]
    if archs:
        raise ValueError(f"unsupported architecture {archs[0]!r}; supported: "
                         f"{', '.join(sorted(ARCHITECTURES))}")
    model_type = cfg.get("model_type")
    if model_type in MODEL_TYPES:
        return MODEL_TYPES[model_type]
    raise ValueError(f"unsupported model_type {model_type!r}; supported: "
                     f"{', '.join(sorted(MODEL_TYPES))}")


def _rope(cfg: dict) -> tuple[float, float | None]:
    # transformers 5 keeps RoPE settings in rope_parameters; 4.x in rope_theta / rope_scaling.
    params = dict(cfg.get("rope_parameters") or cfg.get("rope_scaling") or {})
    theta = float(params.get("rope_theta", cfg.get("rope_theta", 10000.0)))
    kind = params.get("rope_type", params.get("type", "default"))
    if kind == "default":
        return theta, None
    if kind == "llama3":
        # Megatron's RotaryEmbedding hard-codes the other llama3 constants; accept only those.
        expected = {"low_freq_factor": 1.0, "high_freq_factor": 4.0,
                    "original_max_position_embeddings": 8192}
        for key, value in expected.items():
            if float(params.get(key, value)) != value:
                raise ValueError(f"llama3 RoPE scaling with {key}={params[key]} is not supported "
                                 f"(Megatron-Core fixes it to {value})")
        return theta, float(params.get("factor", 8.0))
    raise ValueError(f"unsupported RoPE scaling type {kind!r}")


def _sliding_window(cfg: dict, family: str) -> int | None:
    """Mistral keeps its window (refused later for longer sequences); elsewhere a window is refused."""
    sliding = "sliding_attention" in (cfg.get("layer_types") or [])
    if family == "mistral":
        return int(cfg["sliding_window"]) if cfg.get("sliding_window") else None
    if cfg.get("use_sliding_window") or sliding:
        raise ValueError(f"{family}: sliding-window attention (use_sliding_window=True or "
                         "sliding_attention layers) is not supported")
    return None


def _moe(cfg: dict, family: str) -> dict:
    """The MoE fields of ModelArch (all zero for a dense family)."""
    if family != "qwen3_moe":
        return {}
    experts = cfg.get("num_experts") or cfg.get("num_local_experts")
    for key, value in (("num_experts", experts), ("moe_intermediate_size", cfg.get("moe_intermediate_size")),
                       ("num_experts_per_tok", cfg.get("num_experts_per_tok"))):
        if not value:
            raise ValueError(f"qwen3_moe HF config has no {key!r}")
    if cfg.get("mlp_only_layers") or int(cfg.get("decoder_sparse_step", 1)) != 1:
        raise ValueError("qwen3_moe with dense layers between MoE ones (mlp_only_layers="
                         f"{cfg.get('mlp_only_layers')}, decoder_sparse_step={cfg.get('decoder_sparse_step')}) "
                         "is not supported: every layer must be MoE")
    if int(cfg["num_experts_per_tok"]) > int(experts):
        raise ValueError(f"num_experts_per_tok={cfg['num_experts_per_tok']} exceeds num_experts={experts}")
    return dict(num_experts=int(experts), moe_ffn_hidden_size=int(cfg["moe_intermediate_size"]),
                moe_topk=int(cfg["num_experts_per_tok"]), moe_norm_topk=bool(cfg.get("norm_topk_prob", False)))


def arch_from_hf(hf_config: Any) -> ModelArch:
    """Validate an HF config of a supported family and return its ModelArch."""
    cfg = load_hf_config(hf_config)
    family = _family(cfg)
    # Llama / Qwen3 attention_bias also puts a bias on o_proj, which the tables do not map.
    if family in ("llama", "qwen3", "qwen3_moe") and cfg.get("attention_bias"):
        raise ValueError(f"attention_bias=True is not supported for {family} (o_proj bias)")
    if cfg.get("mlp_bias"):
        raise ValueError("mlp_bias=True is not supported")
    if cfg.get("hidden_act", "silu") != "silu":
        raise ValueError(f"unsupported hidden_act {cfg.get('hidden_act')!r} (only silu)")
    window = _sliding_window(cfg, family)
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                "num_attention_heads"):
        if cfg.get(key) is None:
            raise ValueError(f"HF config has no {key!r}")
    heads = int(cfg["num_attention_heads"])
    hidden = int(cfg["hidden_size"])
    theta, scaling = _rope(cfg)
    return ModelArch(
        family=family,
        vocab_size=int(cfg["vocab_size"]),
        hidden_size=hidden,
        ffn_hidden_size=int(cfg["intermediate_size"]),
        num_layers=int(cfg["num_hidden_layers"]),
        num_heads=heads,
        num_kv_heads=int(cfg.get("num_key_value_heads") or heads),
        head_dim=int(cfg.get("head_dim") or hidden // heads),
        qkv_bias=family == "qwen2",  # Qwen2 always has q/k/v biases, the others none
        rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
        rope_theta=theta,
        rope_scaling_factor=scaling,
        tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        max_position_embeddings=int(cfg.get("max_position_embeddings", 4096)),
        qk_norm=family in ("qwen3", "qwen3_moe"),
        sliding_window=window,
        **_moe(cfg, family),
    )


def check_sequence_length(arch: ModelArch, length: int, what: str = "a sequence") -> None:
    """One-line ValueError if `length` tokens would need the model's sliding window.

    Megatron's attention here (SDPA, the packed path, Transformer Engine as configured) attends
    to every earlier token; with a window shorter than the sequence that is another model than
    the HF one (and than vLLM's, which applies the window).
    """
    if arch.sliding_window is not None and length > arch.sliding_window:
        raise ValueError(f"{what} of {length} tokens is longer than this {arch.family} model's "
                         f"sliding_window={arch.sliding_window}, which Megatron's attention here does "
                         "not implement; keep prompt + response within the window")


def check_parallel_sizes(arch: ModelArch, tp: int, pp: int, ep: int = 1) -> None:
    """One-line ValueError if this model cannot be split tp x pp (x ep for the experts) ways."""
    if tp < 1 or pp < 1 or ep < 1:
        raise ValueError(f"tp, pp and ep must be >= 1, got tp={tp} pp={pp} ep={ep}")
    if arch.num_heads % tp:
        raise ValueError(f"tp={tp} does not divide num_attention_heads={arch.num_heads}")
    if arch.num_kv_heads % tp:
        raise ValueError(f"tp={tp} does not divide num_key_value_heads={arch.num_kv_heads}")
    if arch.ffn_hidden_size % tp:
        raise ValueError(f"tp={tp} does not divide intermediate_size={arch.ffn_hidden_size}")
    if arch.num_layers % pp:
        raise ValueError(f"pp={pp} does not divide num_hidden_layers={arch.num_layers}")
    if ep > 1 and not arch.is_moe:
        raise ValueError(f"ep={ep} needs a mixture-of-experts model; {arch.family} is dense")
    if arch.is_moe and arch.num_experts % ep:
        raise ValueError(f"ep={ep} does not divide num_experts={arch.num_experts}")
    if arch.is_moe and arch.moe_ffn_hidden_size % tp:
        raise ValueError(f"tp={tp} does not divide moe_intermediate_size={arch.moe_ffn_hidden_size}")


def padded_vocab_size(vocab_size: int, tp: int, divisor: int = VOCAB_DIVISOR) -> int:
    """Vocab rounded up to a multiple of divisor x tp, as Megatron-LM pads it."""
    multiple = divisor * tp
    return int(math.ceil(vocab_size / multiple) * multiple)


def layers_of_stage(arch: ModelArch, pp: int, stage: int) -> range:
    """Global layer indices held by pipeline stage `stage` (even split, as Megatron's default)."""
    per_stage = arch.num_layers // pp
    return range(stage * per_stage, (stage + 1) * per_stage)
