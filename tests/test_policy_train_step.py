"""One PPO step on a tiny Megatron Qwen2: the same update in every parallel layout, clipping by
hand, the reference swap, and log-probs against the Hugging Face model.

Two spawns: the TP=1 baseline on one process; TP=2, DP=2 and PP=2 one after another on two
processes. Every layout loads the same HF weights and takes one step on the same global batch.
"""

import math

import pytest
import torch

from megatron_lead.launch import run_local
from megatron_lead.policy.optim import OptimConfig, build_scheduler

VOCAB, TEMPERATURE = 200, 0.8
# Rows: (prompt length, response length), right-padded to 12 tokens; uneven token counts.
ROWS = [(3, 9), (5, 2), (2, 6), (4, 7)]
SEQ = 12


def _hf_config():
    import transformers

    return transformers.Qwen2Config(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        tie_word_embeddings=True, rms_norm_eps=1e-6, rope_theta=10000.0)


def _batch():
    g = torch.Generator().manual_seed(0)
    tokens = torch.zeros(len(ROWS), SEQ, dtype=torch.long)
    mask = torch.zeros(len(ROWS), SEQ, dtype=torch.bool)
    for i, (p, r) in enumerate(ROWS):
        tokens[i, :p + r] = torch.randint(0, VOCAB, (p + r,), generator=g)
        mask[i, p:p + r] = True
    advantages = torch.tensor([1.0, -0.5, 0.8, -1.2])
    # Old log-probs = current ones + this offset: ratios away from 1, some clipped.
    old_offset = 0.3 * torch.randn(len(ROWS), SEQ, generator=g)
    return tokens, mask, advantages, old_offset


def _setup(tp, pp, ckpt_dir, hf_dir, optim_cfg):
    from megatron_lead.policy.convert.checkpoint import load_megatron_checkpoint
    from megatron_lead.policy.model import build_model
    from megatron_lead.policy.optim import build_optimizer, wrap_ddp
    from megatron_lead.policy.parallel import init_parallel

    init_parallel(tp, pp)
    # No random init, as before any checkpoint load: build_model must still tag the TP-split
    # weights, or the grad norm compared below would count them on TP rank 0 only.
    model = build_model(hf_dir, init_weights=False)
    load_megatron_checkpoint(model, ckpt_dir)
    model = wrap_ddp(model, optim_cfg)
    optimizer, scheduler = build_optimizer(model, optim_cfg)
    return model, optimizer, scheduler


def _hf_weights(model):
    from megatron_lead.policy.convert.gather import iter_hf_weights

    return {name: t.clone() for name, t in iter_hf_weights(model)}


def _one_step(rank, tp, pp, ckpt_dir, hf_dir, micro_batch_size):
    """Load, take one PPO step on this DP rank's rows; logp before/after, reference, weights."""
    from megatron.core import parallel_state

    from megatron_lead.policy.loss import LossConfig
    from megatron_lead.policy.optim import OptimConfig
    from megatron_lead.policy.reference import ReferenceWeights
    from megatron_lead.policy.train_step import (
        forward_logprobs, reference_logprobs, split_micro_batches, train_step)

    optim_cfg = OptimConfig(lr=1e-3, clip_grad=1.0)
    model, optimizer, scheduler = _setup(tp, pp, ckpt_dir, hf_dir, optim_cfg)
    reference = ReferenceWeights(model)
    tokens, mask, advantages, old_offset = _batch()
    dp, dp_rank = parallel_state.get_data_parallel_world_size(), parallel_state.get_data_parallel_rank()
    rows = slice(dp_rank * len(ROWS) // dp, (dp_rank + 1) * len(ROWS) // dp)
    mbs = split_micro_batches(micro_batch_size, tokens=tokens[rows], response_mask=mask[rows],
                              advantages=advantages[rows], old_logprobs=old_offset[rows])
    last = parallel_state.is_pipeline_last_stage()
    before = forward_logprobs(model, mbs, TEMPERATURE)
    refs = reference_logprobs(model, reference, mbs, TEMPERATURE)
    for i, mb in enumerate(mbs):  # other pipeline stages need neither (and get neither)
        mb.old_logprobs = before[i] + mb.old_logprobs if last else None
        mb.ref_logprobs = refs[i] + 0.2 if last else None  # + 0.2: a KL term with a gradient
    metrics = train_step(model, optimizer, scheduler, mbs, LossConfig(temperature=TEMPERATURE))
    weights = _hf_weights(model)
    after = forward_logprobs(model, mbs, TEMPERATURE)
    ref_after = reference_logprobs(model, reference, mbs, TEMPERATURE)
    weights_after_swap = _hf_weights(model)
    out = dict(metrics=metrics, rows=(rows.start, rows.stop), last=last,
               before=torch.cat(before) if last else None, after=torch.cat(after) if last else None,
               # The exact old / reference log-probs the loss saw, for the autograd reference.
               old=torch.cat([mb.old_logprobs for mb in mbs]) if last else None,
               ref=torch.cat([mb.ref_logprobs for mb in mbs]) if last else None,
               ref_after=torch.cat(ref_after) if last else None,
               weights=weights if rank == 0 else None,
               swap_restored=all(torch.equal(weights[k], weights_after_swap[k]) for k in weights),
               ref_host_on_cpu=all(t.device.type == "cpu" for t in reference.host))
    _teardown()
    return out


def _teardown():
    from megatron_lead.policy.parallel import destroy_parallel

    destroy_parallel()


def _clip_by_hand(rank, ckpt_dir, hf_dir):
    """TP=2, SGD lr=1: the update is -grad, so clipping can be checked on the gathered update."""
    from megatron_lead.policy.loss import LossConfig
    from megatron_lead.policy.optim import OptimConfig, build_optimizer
    from megatron_lead.policy.train_step import forward_logprobs, split_micro_batches, train_step

    cfg = OptimConfig(optimizer="sgd", sgd_momentum=0.0, lr=1.0, weight_decay=0.0, clip_grad=0.0)
    model, optimizer, scheduler = _setup(2, 1, ckpt_dir, hf_dir, cfg)
    tokens, mask, advantages, old_offset = _batch()
    mbs = split_micro_batches(4, tokens=tokens, response_mask=mask, advantages=advantages,
                              old_logprobs=old_offset)
    mbs[0].old_logprobs = forward_logprobs(model, mbs, TEMPERATURE)[0] + old_offset
    loss_cfg = LossConfig(temperature=TEMPERATURE, kl_type="none")
    params = [p for chunk in model for p in chunk.parameters()]
    start = [p.detach().clone() for p in params]
    w0 = _hf_weights(model)

    unclipped = train_step(model, optimizer, scheduler, mbs, loss_cfg)
    grad = {k: w0[k] - v for k, v in _hf_weights(model).items()}  # lr = 1: -update = grad
    with torch.no_grad():
        for p, s in zip(params, start):
            p.copy_(s)
    max_norm = 0.25 * unclipped["grad_norm"]
    cfg = OptimConfig(optimizer="sgd", sgd_momentum=0.0, lr=1.0, weight_decay=0.0, clip_grad=max_norm)
    optimizer, scheduler = build_optimizer(model, cfg)  # SGD without momentum: no state to carry
    clipped = train_step(model, optimizer, scheduler, mbs, loss_cfg)
    update = {k: w0[k] - v for k, v in _hf_weights(model).items()}
    _teardown()
    return dict(grad=grad, update=update, unclipped=unclipped, clipped=clipped, max_norm=max_norm)


def _by_value(obj):
    """Tensors as numpy arrays: torch's queue would share them through file descriptors that
    die with the worker process before the parent reads them."""
    if isinstance(obj, torch.Tensor):
        return obj.numpy()
    if isinstance(obj, dict):
        return {k: _by_value(v) for k, v in obj.items()}
    return obj


def _as_torch(obj):
    if isinstance(obj, dict):
        return {k: _as_torch(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_as_torch(v) for v in obj]
    return torch.from_numpy(obj) if type(obj).__module__ == "numpy" else obj


def _two_rank_layouts(rank, world_size, ckpts, hf_dir):
    return _by_value({
        "tp2": _one_step(rank, 2, 1, ckpts["tp2"], hf_dir, micro_batch_size=2),
        "dp2": _one_step(rank, 1, 1, ckpts["tp1"], hf_dir, micro_batch_size=2),
        "pp2": _one_step(rank, 1, 2, ckpts["pp2"], hf_dir, micro_batch_size=2),
        "clip": _clip_by_hand(rank, ckpts["tp2"], hf_dir),
    })


def _single_rank(rank, world_size, ckpts, hf_dir):
    return _by_value(_one_step(rank, 1, 1, ckpts["tp1"], hf_dir, micro_batch_size=4))


def _hf_autograd_reference(hf, old, ref):
    """The step's loss and its gradient norm, by hand in plain PyTorch on the HF model.

    Shares no code with megatron_lead: PPO clip 0.2/0.2 and 5e-4 * 0.5 (logp - ref)^2, token-mean
    over the global batch, d/d(every HF parameter) by autograd. old / ref are the exact tensors
    the Megatron step used (Megatron's own log-probs plus the test's offsets).
    """
    tokens, mask, advantages, _ = _batch()
    hf.zero_grad()
    logp = torch.log_softmax(hf(tokens).logits.float() / TEMPERATURE, -1)
    logp = logp[:, :-1].gather(-1, tokens[:, 1:, None])[..., 0]
    logp = torch.cat([torch.zeros(len(ROWS), 1), logp], 1)[mask]  # column t is about token t
    old, ref = old[mask], ref[mask]
    adv = advantages[:, None].expand(mask.shape)[mask]
    ratio = torch.exp(logp - old)
    surrogate = torch.minimum(adv * ratio, adv * ratio.clamp(0.8, 1.2))
    loss = (-surrogate + 5e-4 * 0.5 * (logp - ref) ** 2).sum() / mask.sum()
    loss.backward()
    grads = [p.grad for p in hf.parameters() if p.grad is not None]  # the tied weight once
    norm = math.sqrt(sum(g.double().square().sum().item() for g in grads))
    hf.zero_grad()
    return loss.item(), norm


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    import transformers

    from megatron_lead.policy.convert.checkpoint import hf_to_megatron

    root = tmp_path_factory.mktemp("train_step")
    hf_dir = str(root / "hf")
    torch.manual_seed(0)
    hf = transformers.Qwen2ForCausalLM(_hf_config()).eval()
    hf.save_pretrained(hf_dir)
    ckpts = {}
    for name, tp, pp in (("tp1", 1, 1), ("tp2", 2, 1), ("pp2", 1, 2)):
        ckpts[name] = str(root / name)
        hf_to_megatron(hf_dir, ckpts[name], tp=tp, pp=pp)
    tokens = _batch()[0]
    with torch.no_grad():
        hf_logp = torch.log_softmax(hf(tokens).logits.float() / TEMPERATURE, -1)
    hf_logp = hf_logp[:, :-1].gather(-1, tokens[:, 1:, None])[..., 0]  # position t predicts token t+1
    hf_logp = torch.cat([torch.zeros(len(ROWS), 1), hf_logp], 1)
    base = _as_torch(run_local(_single_rank, 1, ckpts, hf_dir)[0])
    two = _as_torch(run_local(_two_rank_layouts, 2, ckpts, hf_dir))
    hf_loss, hf_grad_norm = _hf_autograd_reference(hf, base["old"], base["ref"])
    return dict(base=base, two=two, hf_logp=hf_logp, mask=_batch()[1],
                hf_loss=hf_loss, hf_grad_norm=hf_grad_norm)


def _assembled(results, key):
    """Rows from the last-stage ranks, in row order (each DP rank holds its own rows)."""
    parts = {r["rows"]: r[key] for r in results if r["last"]}
    return torch.cat([parts[k] for k in sorted(parts)])


@pytest.mark.slow
def test_logprobs_match_hf_model(runs):
    mask = runs["mask"]
    torch.testing.assert_close(runs["base"]["before"][mask], runs["hf_logp"][mask], atol=1e-4, rtol=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["tp2", "dp2", "pp2"])
def test_layout_matches_tp1(runs, layout):
    base, results = runs["base"], [r[layout] for r in runs["two"]]
    mask = runs["mask"]
    for key in ("before", "after"):
        torch.testing.assert_close(_assembled(results, key)[mask], base[key][mask], atol=1e-5, rtol=1e-5)
    for r in results:  # metrics are global (every rank reports the same) and layout-free
        for name, value in base["metrics"].items():
            assert r["metrics"][name] == pytest.approx(value, rel=1e-5, abs=1e-6), name
    weights = results[0]["weights"]
    assert weights.keys() == base["weights"].keys()
    for name, w in base["weights"].items():
        torch.testing.assert_close(weights[name], w, atol=1e-5, rtol=1e-5, msg=name)
    # The step did something: it clipped and changed the log-probs.
    assert base["metrics"]["grad_norm"] > 1.0 and 0 < base["metrics"]["clip_frac"] < 1
    assert not torch.allclose(base["after"][mask], base["before"][mask], atol=1e-3)


@pytest.mark.slow
def test_grad_norm_matches_hf_autograd_reference(runs):
    """The gradient's scale, which Adam's first step hides from the weight comparisons: the
    grad norm Megatron reports (before clipping, TP=1) equals autograd's on the HF model."""
    m = runs["base"]["metrics"]
    assert m["grad_norm"] == pytest.approx(runs["hf_grad_norm"], rel=1e-4)
    assert m["loss"] == pytest.approx(runs["hf_loss"], rel=1e-4, abs=1e-6)


@pytest.mark.slow
def test_metrics_are_global_token_means(runs):
    m = runs["base"]["metrics"]
    assert m["num_tokens"] == sum(r for _, r in ROWS)
    assert m["kl_ref"] == pytest.approx(0.5 * 0.2 ** 2, rel=1e-5)  # ref = logp + 0.2 before the step
    assert m["loss"] == pytest.approx(m["pg_loss"] + 5e-4 * m["kl_ref"], rel=1e-6)
    assert m["lr"] == 1e-3 and m["skipped"] == 0.0


@pytest.mark.slow
def test_reference_swap(runs):
    for r in [runs["base"]] + [x[k] for x in runs["two"] for k in ("tp2", "dp2", "pp2")]:
        assert r["swap_restored"] and r["ref_host_on_cpu"]
        if r["last"]:
            # The reference forward after the step gives exactly the pre-step log-probs.
            assert torch.equal(r["ref_after"], r["before"])


@pytest.mark.slow
def test_clipping_by_hand_at_tp2(runs):
    clip = runs["two"][0]["clip"]
    grad, update = clip["grad"], clip["update"]
    norm = math.sqrt(sum(g.double().square().sum().item() for g in grad.values()))
    assert clip["unclipped"]["grad_norm"] == pytest.approx(norm, rel=1e-5)
    assert clip["clipped"]["grad_norm"] == pytest.approx(norm, rel=1e-5)  # reported before clipping
    coeff = clip["max_norm"] / (norm + 1e-6)
    for name, g in grad.items():
        torch.testing.assert_close(update[name], g * coeff, atol=1e-6, rtol=1e-5, msg=name)
    clipped_norm = math.sqrt(sum(u.double().square().sum().item() for u in update.values()))
    assert clipped_norm == pytest.approx(clip["max_norm"], rel=1e-5)


def test_lr_schedule_warmup_then_cosine():
    """Megatron's scheduler through build_scheduler, on a plain torch optimizer's param groups."""
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=123.0)
    cfg = OptimConfig(lr=1.0, min_lr=0.1, lr_schedule="cosine", warmup_steps=2, total_steps=6)
    sched = build_scheduler(opt, cfg)
    lrs = [opt.param_groups[0]["lr"]]
    for _ in range(7):
        sched.step(increment=1)
        lrs.append(opt.param_groups[0]["lr"])
    cos = [0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * k / 4)) for k in range(5)]  # 4 decay steps
    assert lrs == pytest.approx([0.0, 0.5, 1.0] + cos[1:] + [0.1])
    const = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=123.0)
    build_scheduler(const, OptimConfig(lr=2e-6)).step(increment=5)
    assert const.param_groups[0]["lr"] == 2e-6


@pytest.mark.parametrize("bad, message", [
    (dict(lr_schedule="linear"), "lr_schedule"),
    (dict(optimizer="lion"), "optimizer"),
    (dict(warmup_steps=10, total_steps=10), "warmup_steps"),
    (dict(lr=1e-6, min_lr=1e-5), "min_lr"),
    (dict(clip_grad=-1.0), "clip_grad"),
])
def test_bad_optim_settings_raise_value_error(bad, message):
    with pytest.raises(ValueError, match=message) as err:
        OptimConfig(**bad).validate()
    assert "\n" not in str(err.value)
