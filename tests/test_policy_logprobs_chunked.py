"""Log-probs and entropy chunked over tokens: the same values and gradients as the unchunked path,
and no [tokens, vocab] fp32 tensor is ever allocated (the reason the chunked path exists)."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from megatron_lead.launch import run_local
from megatron_lead.policy.logprobs import sequence_logprobs, vocab_parallel_logprobs

TEMP = 0.7


def _inputs(n_rows=3, seq=37, vocab=96, padded=128, seed=0):
    """Logits with junk in Megatron's vocabulary padding, targets, and upstream gradients."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.cat([torch.randn(n_rows, seq, vocab, generator=g) * 3.0,
                        torch.full((n_rows, seq, padded - vocab), 30.0)], dim=-1)
    target = torch.randint(0, vocab, (n_rows, seq), generator=g)
    return logits, target, torch.randn(n_rows, seq, generator=g), torch.randn(n_rows, seq, generator=g)


def _run(logits, target, g_logp, g_ent, chunk, vocab=96, with_entropy=True, entropy_grad=True, group=None):
    x = logits.clone().requires_grad_(True)
    logp, ent = vocab_parallel_logprobs(x, target, TEMP, with_entropy, group, vocab, chunk_tokens=chunk)
    loss = (g_logp * logp).sum()
    if with_entropy and entropy_grad:
        loss = loss + (g_ent * ent).sum()
    loss.backward()
    return logp.detach(), None if ent is None else ent.detach(), x.grad


@pytest.mark.parametrize("chunk", [1, 7, 64, 10_000])
def test_chunked_equals_unchunked(chunk):
    inputs = _inputs()
    for with_entropy, entropy_grad in ((True, True), (True, False), (False, False)):
        ref = _run(*inputs, chunk=0, with_entropy=with_entropy, entropy_grad=entropy_grad)
        got = _run(*inputs, chunk=chunk, with_entropy=with_entropy, entropy_grad=entropy_grad)
        for r, o in zip(ref, got):
            if r is None:
                assert o is None
            else:
                torch.testing.assert_close(o, r, atol=2e-6, rtol=1e-5)
        assert torch.all(got[2][..., 96:] == 0)  # padding ids get no gradient


def test_callers_fp32_logits_untouched():
    """fp32 logits: .to(float32) would alias them, and dividing by T in place would corrupt them."""
    logits, target, _, _ = _inputs()
    x = logits.clone().requires_grad_(True)
    logp, ent = vocab_parallel_logprobs(x, target, TEMP, True, None, 96, chunk_tokens=8)
    (logp.sum() + ent.sum()).backward()
    assert torch.equal(x.detach(), logits)


def test_sequence_logprobs_chunked_equals_unchunked():
    logits, tokens, _, _ = _inputs(seed=3)
    ref = sequence_logprobs(logits, tokens, TEMP, True, vocab_size=96, chunk_tokens=0)
    got = sequence_logprobs(logits, tokens, TEMP, True, vocab_size=96, chunk_tokens=5)
    for r, o in zip(ref, got):
        torch.testing.assert_close(o, r, atol=2e-6, rtol=1e-5)


class _Allocations(TorchDispatchMode):
    """Every new storage an aten op creates: (dtype, numel). Views and in-place results are
    skipped (they share an input's storage), so this lists real allocations only."""

    def __init__(self):
        super().__init__()
        self.new = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        seen = set()
        for a in torch.utils._pytree.tree_leaves((args, kwargs)):
            if isinstance(a, torch.Tensor):
                seen.add(a.untyped_storage().data_ptr())
        out = func(*args, **kwargs)
        for o in torch.utils._pytree.tree_leaves(out):
            if isinstance(o, torch.Tensor) and o.untyped_storage().data_ptr() not in seen:
                self.new.append((o.dtype, o.untyped_storage().nbytes() // o.element_size()))
        return out


def _largest_fp32(fn) -> int:
    with _Allocations() as probe:
        fn()
    return max((n for dt, n in probe.new if dt == torch.float32), default=0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_no_tokens_by_vocab_fp32_tensor(dtype):
    """Forward: the largest fp32 allocation is one chunk of rows, and it scales with the chunk.
    Backward: the only [tokens, vocab] tensor is the gradient itself, in the logits' dtype."""
    n_rows, seq, vocab = 4, 128, 1024
    g = torch.Generator().manual_seed(0)
    full = n_rows * seq * vocab
    for chunk in (16, 64):
        logits = torch.randn(n_rows, seq, vocab, generator=g).to(dtype).requires_grad_(True)
        target = torch.randint(0, vocab, (n_rows, seq), generator=g)
        out = {}

        def fwd():
            out["lp"], out["ent"] = vocab_parallel_logprobs(logits, target, TEMP, True, None, None,
                                                            chunk_tokens=chunk)

        assert _largest_fp32(fwd) <= chunk * vocab
        loss = out["lp"].sum() + 0.1 * out["ent"].sum()
        with _Allocations() as probe:
            loss.backward()
        fp32 = [n for dt, n in probe.new if dt == torch.float32]
        big = [(dt, n) for dt, n in probe.new if n >= full]
        assert big == [(dtype, full)], big  # the gradient buffer, nothing else of that size
        assert max(n for n in fp32 if n < full) <= chunk * vocab
    # The probe does see a materialised softmax: the unchunked path allocates [tokens, vocab] fp32.
    logits = torch.randn(n_rows, seq, vocab).to(dtype)
    target = torch.randint(0, vocab, (n_rows, seq))
    assert _largest_fp32(lambda: vocab_parallel_logprobs(logits, target, TEMP, True, None, None,
                                                         chunk_tokens=0)) >= full


def _tp_worker(rank, world_size, vocabs, padded, chunk):
    from megatron.core import parallel_state

    parallel_state.initialize_model_parallel(tensor_model_parallel_size=world_size)
    try:
        out = []
        for vocab in vocabs:
            logits, target, g_logp, g_ent = _inputs(vocab=vocab, padded=padded)
            part = padded // world_size
            local = logits[..., rank * part:(rank + 1) * part].contiguous()
            out.append(_run(local, target, g_logp, g_ent, chunk=chunk, vocab=vocab))  # Megatron's TP group
        return out
    finally:
        parallel_state.destroy_model_parallel()


@pytest.mark.slow
def test_tp2_chunked_equals_tp1_unchunked():
    """Vocab 50 padded to 128: rank 1's slice is all padding (its local max is -inf)."""
    vocabs = (96, 50)
    per_rank = run_local(_tp_worker, 2, vocabs, 128, 5)
    for k, vocab in enumerate(vocabs):
        ref = _run(*_inputs(vocab=vocab), chunk=0, vocab=vocab)
        r0, r1 = per_rank[0][k], per_rank[1][k]
        for i in range(2):
            torch.testing.assert_close(r0[i], ref[i], atol=2e-6, rtol=1e-5)
            torch.testing.assert_close(r1[i], ref[i], atol=2e-6, rtol=1e-5)
        torch.testing.assert_close(torch.cat([r0[2], r1[2]], dim=-1), ref[2], atol=2e-6, rtol=1e-5)
