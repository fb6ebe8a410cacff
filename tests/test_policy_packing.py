"""Sequence packing: a packed micro-batch gives the padded path's log-probs, loss and update.

Pure pieces (grouping, pack / unpack, the packed attention backends) run in this process; the
model checks run in one spawn of two gloo processes: TP=1 (each rank on its own), then TP=2,
then PP=2, each comparing packed against padded micro-batches on the same random tiny Qwen2.
"""

import pytest
import torch
import torch.nn.functional as F

from megatron_lead.launch import run_local
from megatron_lead.policy.attention import packed_attention
from megatron_lead.policy.packing import group_rows, pack_micro_batches, row_lengths, unpack

VOCAB, TEMPERATURE, WIDTH = 200, 0.8, 14
# (prompt length, response length): uneven; one row fills the width, one is a single response token.
ROWS = [(3, 9), (5, 2), (2, 12), (4, 7), (6, 1)]


def _batch():
    g = torch.Generator().manual_seed(0)
    n = len(ROWS)
    tokens = torch.randint(0, VOCAB, (n, WIDTH), generator=g)  # junk after each row's end too
    mask = torch.zeros(n, WIDTH, dtype=torch.bool)
    for i, (p, r) in enumerate(ROWS):
        mask[i, p:p + r] = True
    advantages = torch.tensor([1.0, -0.5, 0.8, -1.2, 0.3])
    old_offset = 0.3 * torch.randn(n, WIDTH, generator=g)
    return tokens, mask, advantages, old_offset


def test_grouping_and_round_trip():
    assert group_rows([5, 3, 9, 2, 2], max_tokens=8) == [[0, 1], [2], [3, 4]]  # 9 > 8: alone
    assert group_rows([5, 3, 9], micro_batch_size=2) == [[0, 1], [2]]
    tokens, mask, adv, old = _batch()
    lengths = row_lengths(mask)
    assert lengths.tolist() == [p + r for p, r in ROWS]
    mbs = pack_micro_batches(max_tokens=21, tokens=tokens, response_mask=mask, advantages=adv,
                             old_logprobs=old)
    assert [mb.rows for mb in mbs] == [[0, 1], [2], [3, 4]]  # lengths 12 7 | 14 | 11 7
    assert sum(mb.tokens.size(1) for mb in mbs) == int(lengths.sum())  # no padding at all
    for mb in mbs:
        assert mb.positions[0, mb.cu_seqlens[1:-1].long()].eq(0).all()  # positions restart
        back = unpack(mb.old_logprobs, mb.cu_seqlens, mb.width)
        for i, r in enumerate(mb.rows):
            n = int(lengths[r])
            assert torch.equal(back[i, :n], old[r, :n]) and torch.all(back[i, n:] == 0)
            assert torch.equal(unpack(mb.advantages, mb.cu_seqlens, WIDTH)[i, :n], adv[r].expand(n))


@pytest.mark.parametrize("backend", ["mask", "loop"])
def test_packed_attention_backends_match_per_sequence_sdpa(backend, monkeypatch):
    monkeypatch.setenv("MEGATRON_LEAD_PACKED_ATTENTION", backend)
    g = torch.Generator().manual_seed(0)
    lengths = [5, 1, 9, 3]
    total = sum(lengths)
    q = torch.randn(total, 4, 8, generator=g)
    k, v = torch.randn(total, 2, 8, generator=g), torch.randn(total, 2, 8, generator=g)  # GQA 4/2
    cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32)
    got = packed_attention(q, k, v, cu, max(lengths))
    start = 0
    for n in lengths:
        qs, ks, vs = (t[start:start + n].transpose(0, 1) for t in (q, k, v))
        ks, vs = ks.repeat_interleave(2, 0), vs.repeat_interleave(2, 0)
        want = F.scaled_dot_product_attention(qs, ks, vs, is_causal=True).transpose(0, 1)
        torch.testing.assert_close(got[start:start + n], want, atol=1e-6, rtol=1e-5)
        start += n


# ----------------------------------------------------------------------------- on the model

def _hf_config():
    import transformers

    return transformers.Qwen2Config(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        tie_word_embeddings=True, rms_norm_eps=1e-6, rope_theta=10000.0, initializer_range=0.2)


def _compare(rank, tp, pp):
    """Padded vs packed on this layout: log-probs, then one SGD step (loss, grad norm, update)."""
    from megatron.core import parallel_state

    from megatron_lead.policy.loss import LossConfig
    from megatron_lead.policy.model import build_model
    from megatron_lead.policy.optim import OptimConfig, build_optimizer, wrap_ddp
    from megatron_lead.policy.parallel import destroy_parallel, init_parallel
    from megatron_lead.policy.train_step import forward_logprobs, split_micro_batches, train_step

    init_parallel(tp, pp, seed=7)
    cfg = OptimConfig(optimizer="sgd", sgd_momentum=0.0, lr=1.0, weight_decay=0.0, clip_grad=0.0)
    model = wrap_ddp(build_model(_hf_config().to_dict()), cfg)
    optimizer, scheduler = build_optimizer(model, cfg)
    last = parallel_state.is_pipeline_last_stage()
    tokens, mask, adv, old_offset = _batch()
    fields = dict(tokens=tokens, response_mask=mask, advantages=adv)
    variants = {"padded": lambda: split_micro_batches(len(ROWS), **fields),
                "packed": lambda: pack_micro_batches(max_tokens=21, **fields)}
    params = [p for chunk in model for p in chunk.parameters()]
    start = [p.detach().clone() for p in params]
    out = {}
    rotated = _record_first_rotary_query(len(model[0].module.decoder.layers))
    for name, make in variants.items():
        mbs = make()
        rotated.clear()
        logp = forward_logprobs(model, mbs, TEMPERATURE)
        logp = torch.cat(logp) if last else None
        # The first layer's query after RoPE, per row (it depends on the token and its position
        # only): attention scores are blind to a shift of all positions, this is not.
        if name == "padded":
            first_q = rotated[0].transpose(0, 1) if parallel_state.is_pipeline_first_stage() else None
        else:
            first_q = ([q[a:b] for q, mb in zip(rotated, mbs)
                        for a, b in zip(mb.cu_seqlens[:-1].tolist(), mb.cu_seqlens[1:].tolist())]
                       if parallel_state.is_pipeline_first_stage() else None)
        for mb in mbs:  # old = current + offset: ratios away from 1, some clipped
            if last:
                rows = mb.rows if name == "packed" else list(range(len(ROWS)))
                mb.old_logprobs = (logp[rows] + old_offset[rows])
                if name == "packed":
                    mb.old_logprobs = torch.cat([mb.old_logprobs[i, :n] for i, n in enumerate(mb.lengths)])[None]
        metrics = train_step(model, optimizer, scheduler, mbs, LossConfig(temperature=TEMPERATURE, kl_type="none"))
        update = [(s - p.detach()).clone() for p, s in zip(params, start)]
        with torch.no_grad():
            for p, s in zip(params, start):
                p.copy_(s)
        out[name] = dict(logp=logp, loss=metrics["loss"], grad_norm=metrics["grad_norm"],
                         tokens=metrics["num_tokens"], update=update, mbs=len(mbs), first_q=first_q)
    rotated.restore()
    destroy_parallel()
    return out


def _record_first_rotary_query(layers: int):
    """Wrap Megatron's RoPE application: keep the query of this stage's first layer in every
    forward (each forward applies it 2 x layers times: query and key)."""
    import megatron.core.transformer.attention as attention

    original = attention.apply_rotary_pos_emb

    class Recorder(list):
        calls = 0

        def restore(self):
            attention.apply_rotary_pos_emb = original

    seen = Recorder()

    def wrapper(t, *args, **kwargs):
        out = original(t, *args, **kwargs)
        if Recorder.calls % (2 * layers) == 0:
            seen.append(out.detach().clone())
        Recorder.calls += 1
        return out

    attention.apply_rotary_pos_emb = wrapper
    return seen


def _rows(batches, key: str, width: int) -> torch.Tensor:
    """A micro-batch field of every row, in row order, as [rows, width] (packs unpacked)."""
    out = []
    for mbs in batches:
        part = {}
        for mb in mbs:
            values = getattr(mb, key)
            if hasattr(mb, "cu_seqlens"):
                part.update(zip(mb.rows, unpack(values, mb.cu_seqlens, mb.width)))
            else:
                base = len(part)
                part.update({base + i: v for i, v in enumerate(values)})
        out += [torch.nn.functional.pad(part[i], (0, width - part[i].numel())) for i in range(len(part))]
    return torch.stack(out)


def _trainer_path(rank):
    """trainer.ppo's phases with ppo.pack_sequences / max_tokens_per_micro_batch on and off."""
    from types import SimpleNamespace

    from megatron_lead.policy.loss import LossConfig
    from megatron_lead.policy.model import build_model
    from megatron_lead.policy.optim import OptimConfig, build_optimizer, wrap_ddp
    from megatron_lead.policy.parallel import destroy_parallel, init_parallel
    from megatron_lead.policy.reference import ReferenceWeights
    from megatron_lead.trainer.ppo import mini_batches, old_logprob_pass, ppo_update, reference_pass

    init_parallel(1, 1, seed=7)
    cfg = OptimConfig(optimizer="sgd", sgd_momentum=0.0, lr=0.5, weight_decay=0.0, clip_grad=0.0)
    model = wrap_ddp(build_model(_hf_config().to_dict()), cfg)
    reference = ReferenceWeights(model)
    tokens, mask, adv, old_offset = _batch()
    tokens, mask, adv, old_offset = (t[:4] for t in (tokens, mask, adv, old_offset))  # 2 mini-batches
    params = [p for chunk in model for p in chunk.parameters()]
    start = [p.detach().clone() for p in params]
    out = {}
    import megatron_lead.policy.packing as packing_module

    original, calls = packing_module.pack_micro_batches, []

    def counted(*args, **kwargs):  # proof that the phases really packed
        calls.append(1)
        return original(*args, **kwargs)

    packing_module.pack_micro_batches = counted
    for name, packing in (("padded", {}), ("packed", dict(pack=True, max_tokens=21))):
        calls.clear()
        optimizer, scheduler = build_optimizer(model, cfg)
        batch = SimpleNamespace(tokens=tokens, response_mask=mask, rollout_logprobs=torch.zeros(tokens.shape))
        batches = mini_batches(batch, adv, 2, 2, **packing)
        old_logprob_pass(model, batches, TEMPERATURE)
        reference_pass(model, reference, batches, TEMPERATURE)
        for mb in (mb for mbs in batches for mb in mbs):
            mb.ref_logprobs = mb.ref_logprobs + 0.2  # a KL term with a gradient
        rows = {key: _rows(batches, key, tokens.size(1)) for key in ("old_logprobs", "ref_logprobs")}
        metrics = ppo_update(model, optimizer, scheduler, batches, LossConfig(temperature=TEMPERATURE), 1)
        out[name] = dict(old=rows["old_logprobs"], ref=rows["ref_logprobs"] - 0.2, metrics=metrics,
                         pack_calls=len(calls))
        with torch.no_grad():
            for p, s in zip(params, start):
                p.copy_(s)
    packing_module.pack_micro_batches = original
    destroy_parallel()
    return out


def _layouts(rank, world_size):
    import numpy as np

    def host(obj):  # numpy: torch tensors would travel through file descriptors that die with us
        if isinstance(obj, torch.Tensor):
            return obj.numpy()
        if isinstance(obj, dict):
            return {k: host(v) for k, v in obj.items()}
        if isinstance(obj, list):
            return [host(v) for v in obj]
        return obj

    np.random.seed(0)
    return host({"tp1": _compare(rank, 1, 1), "tp2": _compare(rank, 2, 1), "pp2": _compare(rank, 1, 2),
                 "trainer": _trainer_path(rank)})


@pytest.fixture(scope="module")
def layouts():
    return run_local(_layouts, 2)


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["tp1", "tp2", "pp2"])
def test_packed_equals_padded(layouts, layout):
    lengths = [p + r for p, r in ROWS]
    for rank in range(2):
        got = layouts[rank][layout]
        pad, pack = got["padded"], got["packed"]
        assert pack["mbs"] == 3 and pad["mbs"] == 1
        if pad["logp"] is not None:  # the last pipeline stage
            for i, n in enumerate(lengths):  # column 0 has no prediction: 0 in both
                torch.testing.assert_close(torch.from_numpy(pack["logp"][i, :n]),
                                           torch.from_numpy(pad["logp"][i, :n]), atol=1e-5, rtol=1e-5)
            assert (pack["logp"][:, 0] == 0).all()
        assert pack["tokens"] == pad["tokens"] == sum(r for _, r in ROWS) * (2 if layout == "tp1" else 1)
        assert abs(pack["loss"] - pad["loss"]) < 1e-5
        assert abs(pack["grad_norm"] - pad["grad_norm"]) < 1e-5 * max(1.0, pad["grad_norm"])
        assert pad["grad_norm"] > 0
        if pad["first_q"] is not None:  # the first pipeline stage: RoPE restarts per sequence
            assert len(pack["first_q"]) == len(ROWS)
            for i, n in enumerate(lengths):
                torch.testing.assert_close(torch.from_numpy(pack["first_q"][i]),
                                           torch.from_numpy(pad["first_q"][i, :n]), atol=1e-6, rtol=1e-5)
        for a, b in zip(pack["update"], pad["update"]):
            torch.testing.assert_close(torch.from_numpy(a), torch.from_numpy(b), atol=1e-6, rtol=1e-4)


@pytest.mark.slow
def test_trainer_ppo_phases_packed_equal_padded(layouts):
    got = layouts[0]["trainer"]
    pad, pack = got["padded"], got["packed"]
    # One packing per mini-batch, shared by the old-log-prob, reference and update passes.
    assert (pad["pack_calls"], pack["pack_calls"]) == (0, 2)
    lengths = [p + r for p, r in ROWS[:4]]
    for key in ("old", "ref"):
        for i, n in enumerate(lengths):
            torch.testing.assert_close(torch.from_numpy(pack[key][i, :n]), torch.from_numpy(pad[key][i, :n]),
                                       atol=1e-5, rtol=1e-5)
    for name in ("train/loss", "train/kl_ref", "train/clip_frac", "train/grad_norm", "train/tokens",
                 "train/updates"):
        assert abs(pack["metrics"][name] - pad["metrics"][name]) < 1e-5 * max(1.0, abs(pad["metrics"][name])), name
    assert pad["metrics"]["train/updates"] == 2 and pad["metrics"]["train/kl_ref"] > 0


def test_config_keys():
    from megatron_lead.trainer.config import load_config

    cfg = load_config(None, ["ppo.pack_sequences=true", "ppo.max_tokens_per_micro_batch=16384",
                             "model.compile_layers=true"])
    cfg.validate(check_paths=False)
    assert cfg.ppo.pack_sequences and cfg.ppo.max_tokens_per_micro_batch == 16384 and cfg.model.compile_layers
    defaults = load_config(None, [])
    assert not defaults.ppo.pack_sequences and defaults.ppo.max_tokens_per_micro_batch == 0
    assert not defaults.model.compile_layers
    with pytest.raises(ValueError, match="ppo.max_tokens_per_micro_batch needs ppo.pack_sequences"):
        load_config(None, ["ppo.max_tokens_per_micro_batch=4096"]).validate(check_paths=False)
    with pytest.raises(ValueError, match="ppo.max_tokens_per_micro_batch=-1"):
        load_config(None, ["ppo.pack_sequences=true", "ppo.max_tokens_per_micro_batch=-1"]).validate(
            check_paths=False)
