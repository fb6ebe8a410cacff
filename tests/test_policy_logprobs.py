"""Vocab-parallel log-probs and entropy against a plain log_softmax over the full vocabulary."""

import pytest
import torch

from megatron_lead.launch import run_local
from megatron_lead.policy.logprobs import sequence_logprobs, vocab_parallel_logprobs

VOCAB, PADDED, T = 96, 128, 0.7  # Megatron pads the vocabulary (to 64 per rank at TP=2)


def _inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(3, 5, VOCAB, generator=g) * 3.0
    target = torch.randint(0, VOCAB, (3, 5), generator=g)
    grad_logp = torch.randn(3, 5, generator=g)
    grad_ent = torch.randn(3, 5, generator=g)
    return logits, target, grad_logp, grad_ent


def _naive(logits, target, grad_logp, grad_ent):
    """Full-vocabulary reference: values and d(sum(g1*logp + g2*H))/d logits by autograd."""
    x = logits.clone().requires_grad_(True)
    logsm = torch.log_softmax(x / T, dim=-1)
    logp = logsm.gather(-1, target.unsqueeze(-1)).squeeze(-1)
    ent = -(logsm.exp() * logsm).sum(-1)
    (grad_logp * logp + grad_ent * ent).sum().backward()
    return logp.detach(), ent.detach(), x.grad


def _padded(logits):
    """Append the padding rows with large junk logits: they must get no probability."""
    junk = torch.full((*logits.shape[:-1], PADDED - VOCAB), 30.0)
    return torch.cat([logits, junk], dim=-1)


def _ours(logits, target, grad_logp, grad_ent, group=None):
    x = logits.clone().requires_grad_(True)
    logp, ent = vocab_parallel_logprobs(x, target, temperature=T, with_entropy=True, group=group,
                                        vocab_size=VOCAB)
    (grad_logp * logp + grad_ent * ent).sum().backward()
    return logp.detach(), ent.detach(), x.grad


def test_single_rank_matches_log_softmax():
    inputs = _inputs()
    ref = _naive(*inputs)
    got = _ours(*inputs)
    for r, o in zip(ref, got):
        torch.testing.assert_close(o, r, atol=1e-5, rtol=1e-5)
    padded = _ours(_padded(inputs[0]), *inputs[1:])
    for r, o in zip(ref[:2], padded[:2]):
        torch.testing.assert_close(o, r, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(padded[2][..., :VOCAB], ref[2], atol=1e-5, rtol=1e-5)
    assert torch.all(padded[2][..., VOCAB:] == 0)
    # The caller's logits are untouched and low precision comes back in its own dtype.
    logits = inputs[0].bfloat16().requires_grad_(True)
    before = logits.detach().clone()
    logp, ent = vocab_parallel_logprobs(logits, inputs[1], temperature=T)
    assert ent is None and logp.dtype == torch.float32
    logp.sum().backward()
    assert logits.grad.dtype == torch.bfloat16 and torch.equal(logits.detach(), before)


def test_sequence_logprobs_alignment():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 6, VOCAB, generator=g)
    tokens = torch.randint(0, VOCAB, (2, 6), generator=g)
    logp, _ = sequence_logprobs(logits, tokens, temperature=1.0)
    assert logp.shape == (2, 6) and torch.all(logp[:, 0] == 0)
    for b in range(2):
        for t in range(1, 6):
            want = torch.log_softmax(logits[b, t - 1], -1)[tokens[b, t]]
            assert abs(logp[b, t].item() - want.item()) < 1e-5


def test_bad_input_is_value_error():
    logits, target, _, _ = _inputs()
    with pytest.raises(ValueError, match="temperature"):
        vocab_parallel_logprobs(logits, target, temperature=0.0)
    with pytest.raises(ValueError, match="do not match"):
        vocab_parallel_logprobs(logits, target[:, :3])


def _tp_worker(rank, world_size):
    from megatron.core import parallel_state

    parallel_state.initialize_model_parallel(tensor_model_parallel_size=world_size)
    try:
        logits, target, grad_logp, grad_ent = _inputs()
        logits = _padded(logits)  # rank 1: 32 real ids, 32 padding
        part = PADDED // world_size
        local = logits[..., rank * part:(rank + 1) * part]
        return _ours(local, target, grad_logp, grad_ent)  # default group = Megatron's TP group
    finally:
        parallel_state.destroy_model_parallel()


@pytest.mark.slow
def test_tp2_matches_tp1_and_full_softmax():
    inputs = _inputs()
    ref = _naive(*inputs)
    tp1 = _ours(*inputs)
    r0, r1 = run_local(_tp_worker, 2)
    for i in range(2):  # log-probs and entropy: replicated on both ranks
        torch.testing.assert_close(r0[i], r1[i], atol=0, rtol=0)
        torch.testing.assert_close(r0[i], tp1[i], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(r0[i], ref[i], atol=1e-5, rtol=1e-5)
    grad = torch.cat([r0[2], r1[2]], dim=-1)  # each rank holds the gradient of its slice
    torch.testing.assert_close(grad[..., :VOCAB], ref[2], atol=1e-5, rtol=1e-5)
    assert torch.all(grad[..., VOCAB:] == 0)
    # The targets fall in both halves of the vocabulary, so both code paths ran.
    assert (inputs[1] < PADDED // 2).any() and (inputs[1] >= PADDED // 2).any()
