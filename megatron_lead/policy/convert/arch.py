"""The architecture facts both the model builder and the converter need, read from an HF config."""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass
from typing import Any

# HF architecture name -> family (one mapping table per family in convert/<family>.py).
ARCHITECTURES = {
    "Qwen2ForCausalLM": "qwen2",   # Qwen2, Qwen2.5, DeepSeek-R1-Distill-Qwen
    "LlamaForCausalLM": "llama",   # Llama 3.x (and DeepSeek-R1-Distill-Llama)
}
MODEL_TYPES = {"qwen2": "qwen2", "llama": "llama"}

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


def arch_from_hf(hf_config: Any) -> ModelArch:
    """Validate an HF config of a supported family and return its ModelArch."""
    cfg = load_hf_config(hf_config)
    family = _family(cfg)
    if family == "llama" and cfg.get("attention_bias"):
        raise ValueError("attention_bias=True is not supported for llama (o_proj bias)")
    if cfg.get("mlp_bias"):
        raise ValueError("mlp_bias=True is not supported")
    if cfg.get("hidden_act", "silu") != "silu":
        raise ValueError(f"unsupported hidden_act {cfg.get('hidden_act')!r} (only silu)")
    if cfg.get("use_sliding_window"):
        raise ValueError("use_sliding_window=True is not supported")
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
        qkv_bias=family == "qwen2",  # Qwen2 always has q/k/v biases, Llama none
        rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
        rope_theta=theta,
        rope_scaling_factor=scaling,
        tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        max_position_embeddings=int(cfg.get("max_position_embeddings", 4096)),
    )


def check_parallel_sizes(arch: ModelArch, tp: int, pp: int) -> None:
    """One-line ValueError if this model cannot be split tp x pp ways."""
    if tp < 1 or pp < 1:
        raise ValueError(f"tp and pp must be >= 1, got tp={tp} pp={pp}")
    if arch.num_heads % tp:
        raise ValueError(f"tp={tp} does not divide num_attention_heads={arch.num_heads}")
    if arch.num_kv_heads % tp:
        raise ValueError(f"tp={tp} does not divide num_key_value_heads={arch.num_kv_heads}")
    if arch.ffn_hidden_size % tp:
        raise ValueError(f"tp={tp} does not divide intermediate_size={arch.ffn_hidden_size}")
    if arch.num_layers % pp:
        raise ValueError(f"pp={pp} does not divide num_hidden_layers={arch.num_layers}")


def padded_vocab_size(vocab_size: int, tp: int, divisor: int = VOCAB_DIVISOR) -> int:
    """Vocab rounded up to a multiple of divisor x tp, as Megatron-LM pads it."""
    multiple = divisor * tp
    return int(math.ceil(vocab_size / multiple) * multiple)


def layers_of_stage(arch: ModelArch, pp: int, stage: int) -> range:
    """Global layer indices held by pipeline stage `stage` (even split, as Megatron's default)."""
    per_stage = arch.num_layers // pp
    return range(stage * per_stage, (stage + 1) * per_stage)
