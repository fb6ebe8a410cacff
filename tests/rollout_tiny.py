"""A tiny random Qwen2 in HF format for the rollout tests, and HF log-probs as the reference."""

from __future__ import annotations

import torch

# head_dim 32: vLLM's CPU attention kernels do not take head_dim 16.
TINY_QWEN2 = dict(vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                  rms_norm_eps=1e-6, rope_theta=10000.0, tie_word_embeddings=False,
                  eos_token_id=255, bos_token_id=254)

ENGINE_ARGS = dict(dtype="float32", max_model_len=128, kv_cache_memory_bytes=16 << 20,
                   enforce_eager=True, seed=0)


def save_tiny_qwen2(path, seed: int = 0, **overrides) -> str:
    import transformers

    config = transformers.Qwen2Config(**{**TINY_QWEN2, **overrides})
    torch.manual_seed(seed)
    model = transformers.Qwen2ForCausalLM(config).float()
    with torch.no_grad():  # HF inits with std 0.02: logits nearly flat; sharpen them a bit
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(5.0)
    model.save_pretrained(path)
    return str(path)


def prompts(count: int = 8, seed: int = 1, vocab: int = 250) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (int(torch.randint(3, 9, (1,), generator=g)),), generator=g).tolist()
            for _ in range(count)]


@torch.no_grad()
def hf_logprobs(model, prompt: list[int], response: list[int], temperature: float = 1.0) -> list[float]:
    """log p(response[t] | prompt + response[:t]) of logits / temperature under an HF model."""
    ids = torch.tensor([prompt + response])
    logits = model(ids).logits[0, len(prompt) - 1:-1].double() / temperature
    return logits.log_softmax(-1).gather(-1, torch.tensor(response).unsqueeze(-1)).squeeze(-1).tolist()


@torch.no_grad()
def hf_greedy(model, prompt: list[int], max_new: int) -> list[int]:
    ids = torch.tensor([prompt])
    out = model.generate(ids, max_new_tokens=max_new, do_sample=False, eos_token_id=None, pad_token_id=0)
    return out[0, len(prompt):].tolist()


# The issue-19 families at the smallest shape every path takes: vLLM's CPU attention needs
# head_dim >= 32 and its CPU MoE kernel a hidden size divisible by 32. head_dim 32 with hidden 64
# and 4 heads is the Qwen3 / Mistral case head_dim != hidden / heads.
TINY_FAMILY = dict(vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                   num_attention_heads=4, num_key_value_heads=2, head_dim=32, max_position_embeddings=256,
                   rms_norm_eps=1e-6, rope_theta=10000.0, tie_word_embeddings=False,
                   eos_token_id=255, bos_token_id=254)
TINY_MOE = dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, norm_topk_prob=True)
FAMILY_CLASSES = {"qwen3": ("Qwen3Config", "Qwen3ForCausalLM"),
                  "mistral": ("MistralConfig", "MistralForCausalLM"),
                  "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM")}


def save_tiny_family(family: str, path, seed: int = 0, **overrides):
    """A tiny random HF model of `family` saved to `path`; returns the transformers model (fp32,
    eager attention, eval mode) as the reference.

    Matrices are scaled x5 (HF's std-0.02 init gives near-flat logits) and the norm weights moved
    away from their all-ones init, so a q/k norm mapped to the wrong tensor shows.
    """
    import transformers

    config_cls, model_cls = (getattr(transformers, n) for n in FAMILY_CLASSES[family])
    settings = {**TINY_FAMILY, **(TINY_MOE if family == "qwen3_moe" else {}), **overrides}
    if family == "mistral":
        settings.setdefault("sliding_window", None)  # v0.2+: no window (tests set one to refuse it)
    torch.manual_seed(seed)
    model = model_cls._from_config(config_cls(**settings), attn_implementation="eager").float()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2:
                p.mul_(5.0)
            elif name.endswith("norm.weight"):
                p.add_(0.3 * torch.randn_like(p))
    model.save_pretrained(path)
    return model.eval()
