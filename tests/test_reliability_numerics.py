"""Non-finite loss or gradient: the update is skipped, counted, and touches nothing; too many
skipped steps in a row stop the run (policy/optim.py optimizer_step, trainer/skips.py).

One spawn (tiny Megatron Qwen2, CPU fp32, Adam): a good step (Adam has state), then NaN and inf
injected into one gradient element after backward, and NaN advantages (a broken reward: the
loss is NaN), each compared bit for bit against the state before; then a good step again.
"""

import math

import pytest
import torch

from megatron_lead.launch import run_local


def _tc():
    import test_trainer_checkpoint as tc

    return tc


def _snapshot(model, optimizer, scheduler):
    tc = _tc()
    return dict(weights=tc._weights(model), adam=tc._adam_state(optimizer),
                lr=optimizer.param_groups[0]["lr"], sched=scheduler.num_steps)


def _poisoned_forward_backward(real, value):
    """forward_backward, then one element of one parameter's gradient set to `value`."""

    def fb(model, *args, **kwargs):
        out = real(model, *args, **kwargs)
        if not kwargs.get("forward_only") and (len(args) < 3 or not args[2]):
            param = next(p for p in model[0].parameters() if p.requires_grad)
            grad = param.main_grad if hasattr(param, "main_grad") else param.grad
            grad.view(-1)[3] = value
        return out

    return fb


def _nan_steps(rank, world, paths):
    from megatron_lead.policy import train_step as ts

    tc = _tc()
    model, optimizer, scheduler = tc._build(1, paths["tp1"], paths["hf"])
    out = {"first": tc._step(model, optimizer, scheduler, seed=1)}
    before = _snapshot(model, optimizer, scheduler)
    real_fb, real_batch = ts.forward_backward, tc._batch
    cases = {}
    for name in ("nan_grad", "inf_grad", "nan_loss"):
        if name == "nan_loss":
            def nan_batch(seed):
                tokens, mask, adv, old = real_batch(seed)
                return tokens, mask, adv * float("nan"), old
            tc._batch = nan_batch
        else:
            ts.forward_backward = _poisoned_forward_backward(real_fb, float("nan" if name == "nan_grad" else "inf"))
        try:
            metrics = tc._step(model, optimizer, scheduler, seed=2)
        finally:
            ts.forward_backward, tc._batch = real_fb, real_batch
        cases[name] = dict(metrics=metrics, after=_snapshot(model, optimizer, scheduler))
    out["cases"], out["before"] = cases, before
    out["good"] = tc._step(model, optimizer, scheduler, seed=2)
    out["good_after"] = _snapshot(model, optimizer, scheduler)
    return out


@pytest.fixture(scope="module")
def nan_run(tmp_path_factory):
    import transformers

    from megatron_lead.policy.convert.checkpoint import hf_to_megatron

    tc = _tc()
    root = tmp_path_factory.mktemp("reliability_nan")
    paths = {k: str(root / k) for k in ("hf", "tp1")}
    torch.manual_seed(0)
    transformers.Qwen2ForCausalLM(tc._hf_config()).save_pretrained(paths["hf"])
    hf_to_megatron(paths["hf"], paths["tp1"], tp=1)
    return run_local(_nan_steps, 1, paths)[0]


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1).view(torch.uint8) if t.is_floating_point() else t


def _same(a: dict, b: dict) -> bool:
    if a.keys() != b.keys():
        return False
    for k in a:
        x, y = a[k], b[k]
        if isinstance(x, dict):
            if not _same(x, y):
                return False
        elif isinstance(x, torch.Tensor):
            if x.dtype != y.dtype or not torch.equal(_bits(x), _bits(y)):  # NaN == NaN, -0 != 0
                return False
        elif x != y:
            return False
    return True


@pytest.mark.slow
def test_a_non_finite_update_is_skipped_and_touches_nothing(nan_run):
    before = nan_run["before"]
    assert nan_run["first"]["skipped"] == 0.0 and before["adam"]  # Adam has moments to protect
    for name, case in nan_run["cases"].items():
        m = case["metrics"]
        assert m["skipped"] == 1.0, name
        assert _same(case["after"], before), name  # weights, both Adam moments, step, lr, schedule
    assert not math.isfinite(nan_run["cases"]["nan_loss"]["metrics"]["loss"])
    assert not math.isfinite(nan_run["cases"]["nan_grad"]["metrics"]["grad_norm"])


@pytest.mark.slow
def test_training_goes_on_after_a_skip(nan_run):
    good, after = nan_run["good"], nan_run["good_after"]
    assert good["skipped"] == 0.0 and math.isfinite(good["grad_norm"])
    assert after["sched"] == nan_run["before"]["sched"] + 1
    assert all(torch.isfinite(w).all() for w in after["weights"].values())
    assert not _same(after["weights"], nan_run["before"]["weights"])


def test_consecutive_skipped_steps_stop_the_run():
    from megatron_lead.trainer.skips import SkipGuard, TooManySkips

    guard = SkipGuard(3)
    ok, bad = {"train/skipped_updates": 0.0, "train/updates": 2.0}, {"train/skipped_updates": 1.0, "train/updates": 2.0}
    for step, m in enumerate([bad, bad, ok, bad, bad]):  # a good step resets the streak
        guard.update(step, m)
    assert guard.state_dict() == {"total_updates": 4, "total_steps": 4, "consecutive": 2}
    resumed = SkipGuard(3)
    resumed.load_state_dict(guard.state_dict())  # the streak survives a resume
    with pytest.raises(TooManySkips) as e:
        resumed.update(5, bad)
    assert isinstance(e.value, RuntimeError)
    message = str(e.value)
    assert "\n" not in message and "step 5" in message and "3 consecutive steps" in message
    assert "ppo.max_consecutive_skipped_steps=3" in message
    assert resumed.summary() == {"skipped_updates": 5, "steps_with_skipped_updates": 5}
    never = SkipGuard(0)
    for step in range(100):
        never.update(step, bad)
    with pytest.raises(ValueError, match="must be >= 0"):
        SkipGuard(-1)


def test_the_limit_is_a_validated_config_key(tmp_path):
    from megatron_lead.trainer.config import load_config

    cfg = load_config(None, ["ppo.max_consecutive_skipped_steps=2"])
    assert cfg.ppo.max_consecutive_skipped_steps == 2
    cfg = load_config(None, ["ppo.max_consecutive_skipped_steps=-1"])
    with pytest.raises(ValueError, match=r"^ppo.max_consecutive_skipped_steps=-1 must be >= 0$"):
        cfg.validate(check_paths=False)
