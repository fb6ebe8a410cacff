"""The policy on one GPU against transformers: logits, LM loss and log-probs (one JSON line each).

The test suite checks the same on CPU, where Megatron's fused kernels are off; this is the check
for the GPU path (fused SwiGLU, fused vocab-parallel cross entropy, SDPA flash kernels, bf16).

    python tools/check_policy_gpu.py          # a GPU machine with torch, transformers, megatron-core
Exits non-zero if a comparison is outside its bound.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402


def main() -> int:
    import transformers

    from megatron_lead.policy.convert.checkpoint import hf_to_megatron, load_megatron_checkpoint
    from megatron_lead.policy.logprobs import sequence_logprobs
    from megatron_lead.policy.model import build_model
    from megatron_lead.policy.parallel import init_parallel

    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    torch.manual_seed(0)
    cfg = transformers.Qwen2Config(vocab_size=1000, hidden_size=256, intermediate_size=512, num_hidden_layers=4,
                                   num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=512,
                                   rope_theta=1e6, rms_norm_eps=1e-6, tie_word_embeddings=False,
                                   initializer_range=0.1)
    tmp = tempfile.mkdtemp()
    hf = transformers.Qwen2ForCausalLM._from_config(cfg, attn_implementation="sdpa").eval()
    with torch.no_grad():  # norms and biases away from their 1 / 0 init, so the mapping shows
        for name, p in hf.named_parameters():
            if name.endswith("norm.weight") or name.endswith(".bias"):
                p.add_(0.3 * torch.randn_like(p))
    hf.save_pretrained(f"{tmp}/hf")
    hf_to_megatron(f"{tmp}/hf", f"{tmp}/meg", tp=1, pp=1)
    init_parallel(1, 1)
    tokens = torch.randint(0, cfg.vocab_size, (2, 256), device=device)

    with torch.no_grad():
        want = hf.to(device)(input_ids=tokens).logits.float()  # fp32 reference
    lp_ref = torch.log_softmax(want, -1)[:, :-1].gather(-1, tokens[:, 1:, None])[..., 0]

    failed = False
    for dtype in (torch.float32, torch.bfloat16):
        model = build_model(f"{tmp}/hf", dtype=dtype, init_weights=False)
        load_megatron_checkpoint(model, f"{tmp}/meg")
        m = model[0].eval()
        with torch.no_grad():
            full = m(input_ids=tokens, position_ids=None, attention_mask=None).float()  # padded vocab
            got = full[..., :cfg.vocab_size]
            hf_same_dtype = hf.to(dtype=dtype)(input_ids=tokens).logits.float()
            # Megatron's own LM loss (the fused cross entropy on GPU) against plain cross entropy
            # over the same (vocab-padded) logits.
            loss = m(input_ids=tokens, position_ids=None, attention_mask=None, labels=tokens).float()
            plain = torch.nn.functional.cross_entropy(full.flatten(0, 1), tokens.flatten(), reduction="none")
            lp = sequence_logprobs(got, tokens)[0][:, 1:]
        hf.float()
        res = dict(device=torch.cuda.get_device_name() if cuda else "cpu", dtype=str(dtype),
                   logits_scale=float(want.abs().max()),
                   megatron_vs_fp32_max=float((got - want).abs().max()),
                   megatron_vs_fp32_mean=float((got - want).abs().mean()),
                   hf_same_dtype_vs_fp32_mean=float((hf_same_dtype - want).abs().mean()),
                   fused_loss_vs_plain_max=float((loss.flatten() - plain).abs().max()),
                   logprob_vs_fp32_max=float((lp - lp_ref).abs().max()))
        if dtype == torch.float32:
            res["ok"] = (res["megatron_vs_fp32_max"] < 2e-4 and res["fused_loss_vs_plain_max"] < 1e-4
                         and res["logprob_vs_fp32_max"] < 2e-4)
        else:  # bf16: no worse than transformers' own bf16 forward
            res["ok"] = (res["megatron_vs_fp32_mean"] < 1.5 * res["hf_same_dtype_vs_fp32_mean"] + 1e-3
                         and res["fused_loss_vs_plain_max"] < 1e-3)
        failed |= not res["ok"]
        print(json.dumps(res), flush=True)
        del model, m
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
