"""torch.compile of the policy's transformer layers: eager's outputs and gradients, and no
recompilation storm when RL batches change length (dynamo's own counters)."""

import pytest
import torch

from megatron_lead.launch import run_local
from megatron_lead.policy import model as policy_model

VOCAB = 128
PADDED_SHAPES = [(2, 11), (3, 19), (2, 26)]  # (rows, width): every one a new length
PACKS = [[9, 4], [13, 2, 7]]  # several sequences per pack, new total lengths


def _hf_config():
    import transformers

    return transformers.Qwen2Config(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        tie_word_embeddings=True, initializer_range=0.2).to_dict()


def _batches():
    from megatron_lead.policy.packing import pack_micro_batches
    from megatron_lead.policy.train_step import split_micro_batches

    g = torch.Generator().manual_seed(0)
    out = []
    for b, s in PADDED_SHAPES:
        tokens = torch.randint(0, VOCAB, (b, s), generator=g)
        mask = torch.ones(b, s, dtype=torch.bool)
        out.append(split_micro_batches(b, tokens=tokens, response_mask=mask, advantages=torch.zeros(b)))
    for lengths in PACKS:
        width = max(lengths)
        tokens = torch.randint(0, VOCAB, (len(lengths), width), generator=g)
        mask = torch.arange(width)[None, :] < torch.tensor(lengths)[:, None]
        out.append(pack_micro_batches(max_tokens=10_000, tokens=tokens, response_mask=mask,
                                      advantages=torch.zeros(len(lengths))))
    return out


def _compiled_vs_eager(rank, world_size):
    from torch._dynamo.utils import counters

    from megatron_lead.policy.model import build_model, compile_transformer_layers, forward_backward
    from megatron_lead.policy.parallel import init_parallel
    from megatron_lead.policy.train_step import _token_logprobs, forward_logprobs

    init_parallel(1, 1)
    model = build_model(_hf_config())
    batches = _batches()

    def grads(mbs):  # d(sum of log-probs)/d(first layer's QKV weight)
        model[0].zero_grad(set_to_none=True)
        forward_backward(model, [mb.as_dict() for mb in mbs],
                         lambda logits, batch: (_token_logprobs(logits, batch, 1.0)[0].sum(),
                                                torch.tensor(1), {}), forward_only=False)
        return model[0].decoder.layers[0].self_attention.linear_qkv.weight.grad.clone()

    eager = [forward_logprobs(model, mbs) for mbs in batches]
    eager_grad = [grads(batches[-1])]  # a pack: the custom RoPE and the block-diagonal mask
    torch._dynamo.reset()
    counters.clear()
    assert compile_transformer_layers(model) == 2
    compiled, graphs = [], []
    for mbs in batches:
        compiled.append(forward_logprobs(model, mbs))
        graphs.append(counters["stats"]["unique_graphs"])
    compiled_grad = [grads(batches[-1])]
    breaks = sum(counters["graph_break"].values())
    return [[t.numpy() for t in e] for e in eager], [[t.numpy() for t in c] for c in compiled], \
        [g.numpy() for g in eager_grad], [g.numpy() for g in compiled_grad], graphs, breaks


@pytest.mark.long
def test_compiled_layers_match_eager_without_recompiling():
    problem = policy_model.compile_problem()
    if problem:
        pytest.skip(problem)
    eager, compiled, eager_grad, compiled_grad, graphs, breaks = run_local(_compiled_vs_eager, 1)[0]
    for e, c in zip(eager, compiled):
        for a, b in zip(e, c):
            torch.testing.assert_close(torch.from_numpy(b), torch.from_numpy(a), atol=1e-5, rtol=1e-5)
    for a, b in zip(eager_grad, compiled_grad):
        torch.testing.assert_close(torch.from_numpy(b), torch.from_numpy(a), atol=1e-5, rtol=1e-5)
    # One compilation for the first padded length and one for the first pack; every later
    # length of the same kind reuses them (dynamic shapes), and no graph breaks inside a layer.
    first_pack = len(PADDED_SHAPES)
    assert graphs[0] >= 1 and graphs[first_pack] > graphs[0]
    assert graphs[first_pack - 1] == graphs[0], graphs
    assert graphs[-1] == graphs[first_pack], graphs
    assert breaks == 0


def test_missing_compiler_is_explained(monkeypatch):
    import shutil

    monkeypatch.setattr(shutil, "which", lambda name: None)
    problem = policy_model.compile_problem()
    assert problem and "compiler" in problem
    with pytest.raises(RuntimeError, match="compiler"):
        policy_model.compile_transformer_layers([])
