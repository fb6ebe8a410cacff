"""The issue-11 paths on a GPU against the padded eager path: packed log-probs with each packed
attention backend (flash varlen, per-sequence SDPA, block-diagonal mask), chunked log-probs, and
torch.compile'd layers. One JSON line per check; exits non-zero if one is outside its bound.

The test suite checks the same on CPU in fp32 (tests/test_policy_packing.py, _logprobs_chunked.py,
_compile.py), where the varlen kernel does not exist; this is the check for the GPU kernels.

    python tools/check_packing_gpu.py           # GPU machine (tools/gpu_session.sh runs it); runs on CPU too
Writes the lines also to $OUT/check_packing_gpu.jsonl when OUT is set.
"""

from __future__ import annotations

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

LENGTHS = [200, 37, 256, 90, 1, 150]  # one single-token row, uneven rest
VOCAB = 1000


def _emit(record: dict, failures: list) -> None:
    bound = record.get("bound")
    record["ok"] = bound is None or record["value"] <= bound
    if not record["ok"]:
        failures.append(record["check"])
    line = json.dumps(record)
    print(line, flush=True)
    if os.environ.get("OUT"):
        with open(os.path.join(os.environ["OUT"], "check_packing_gpu.jsonl"), "a") as f:
            f.write(line + "\n")


def main() -> int:
    from megatron_lead.policy.attention import packed_backend
    from megatron_lead.policy.logprobs import vocab_parallel_logprobs
    from megatron_lead.policy.model import build_model, compile_problem, compile_transformer_layers
    from megatron_lead.policy.parallel import init_parallel
    from megatron_lead.policy.train_step import forward_logprobs, make_micro_batches

    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    init_parallel(1, 1)
    hf = dict(vocab_size=VOCAB, hidden_size=256, intermediate_size=512, num_hidden_layers=4,
              num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=512, rope_theta=1e6,
              rms_norm_eps=1e-6, tie_word_embeddings=False, initializer_range=0.1,
              architectures=["Qwen2ForCausalLM"], model_type="qwen2")
    g = torch.Generator().manual_seed(0)
    width = max(LENGTHS)
    tokens = torch.randint(0, VOCAB, (len(LENGTHS), width), generator=g)
    mask = torch.arange(width)[None, :] < torch.tensor(LENGTHS)[:, None]
    mask[:, 0] = False
    fields = dict(tokens=tokens, response_mask=mask, advantages=torch.zeros(len(LENGTHS)))
    valid = mask.clone()
    failures: list = []
    common = {"device": torch.cuda.get_device_name() if cuda else "cpu", "torch": torch.__version__}

    def diff(a, b):
        return float((a - b).abs()[valid].max())

    torch.manual_seed(0)
    ref = None
    for dtype in (torch.float32, torch.bfloat16):
        model = build_model(hf, dtype=dtype, attention="sdpa")
        if dtype == torch.float32:
            state = {k: v.clone() for k, v in model[0].state_dict().items() if torch.is_tensor(v)}
        else:  # the same weights, rounded
            model[0].load_state_dict({k: v.to(dtype) if v.is_floating_point() else v
                                      for k, v in state.items()}, strict=False)
        padded = torch.cat(forward_logprobs(model, make_micro_batches(len(LENGTHS), **fields)))
        if dtype == torch.float32:
            ref = padded  # the fp32 padded eager path: the reference for everything below
        name = str(dtype).removeprefix("torch.")
        padded_err = diff(padded, ref)
        _emit({"check": f"padded_{name}_vs_fp32", "value": padded_err, **common}, failures)
        backends = ["loop", "mask"] + (["varlen"] if cuda and dtype != torch.float32 else [])
        for backend in backends:
            os.environ["MEGATRON_LEAD_PACKED_ATTENTION"] = backend
            try:
                packed = torch.cat(forward_logprobs(model, make_micro_batches(1, True, 400, **fields)))
                # fp32: the same math; bf16: no worse than twice the padded bf16 path's own error
                bound = 1e-4 if dtype == torch.float32 else max(2 * padded_err, 0.05)
                _emit({"check": f"packed_{backend}_{name}_vs_fp32_padded", "value": diff(packed, ref),
                       "bound": bound, **common}, failures)
            except Exception as e:  # noqa: BLE001
                _emit({"check": f"packed_{backend}_{name}", "value": float("inf"), "bound": 0.0,
                       "error": f"{type(e).__name__}: {e}"[:400], **common}, failures)
        os.environ.pop("MEGATRON_LEAD_PACKED_ATTENTION", None)
        # Compiled layers on the default backend of the training dtype: varlen (bf16) on GPU,
        # the mask on CPU (fp32).
        if dtype == (torch.bfloat16 if cuda else torch.float32):
            problem = compile_problem()
            if problem:
                _emit({"check": "compiled_skipped", "value": 0.0, "reason": problem, **common}, failures)
            else:
                from torch._dynamo.utils import counters

                compile_transformer_layers(model)
                got = []
                for max_tokens in (400, 300, 500):  # three different pack layouts and lengths
                    got.append(torch.cat(forward_logprobs(model, make_micro_batches(1, True, max_tokens,
                                                                                    **fields))))
                backend = packed_backend(torch.empty(0, device=device, dtype=dtype))
                _emit({"check": f"compiled_packed_{backend}_{name}_vs_fp32_padded",
                       "value": max(diff(x, ref) for x in got),
                       "bound": 1e-4 if dtype == torch.float32 else max(2 * padded_err, 0.05),
                       "graphs": counters["stats"]["unique_graphs"],
                       "graph_breaks": sum(counters["graph_break"].values()), **common}, failures)
        del model

    # Chunked log-probs on bf16 logits of the real vocabulary size: the same values and gradients.
    n = 3000 if cuda else 200
    logits = (torch.randn(n, 151936, device=device) * 3).to(torch.bfloat16)
    target = torch.randint(0, 151936, (n,), device=device)
    outs = []
    for chunk in (0, 1024):
        x = logits.clone().requires_grad_(True)
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        lp, ent = vocab_parallel_logprobs(x, target, 0.9, True, None, 151665, chunk_tokens=chunk)
        (lp.sum() + 0.1 * ent.sum()).backward()
        peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else None
        outs.append((lp.detach(), ent.detach(), x.grad.float(), peak))
    for i, what in enumerate(("logp", "entropy", "grad")):
        _emit({"check": f"chunked_{what}_vs_unchunked", "value": float((outs[1][i] - outs[0][i]).abs().max()),
               "bound": 1e-3 if what != "grad" else 2e-2, **common}, failures)  # grad: bf16, 1 ulp at 1
    _emit({"check": "chunked_peak_gb_vs_unchunked", "value": outs[1][3] or 0.0, "unchunked": outs[0][3],
           **common}, failures)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
