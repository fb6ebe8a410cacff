"""Trainer checkpoints (trainer/checkpoint.py) on a tiny Megatron Qwen2, CPU fp32.

Three spawns, in order:
  1. TP=1, one process: two Adam steps, saved after the first (the uninterrupted run); keep_last.
  2. TP=2, two processes: one step, save, the next step (the reference for the other layouts);
     a save that fails on one rank; then the same processes resume the TP=2 save at TP=1 x DP=2,
     then at TP=1 x PP=2.
  3. TP=1, one process (fresh): resume spawn 1's saves and take step 2 (must equal spawn 1 bit
     for bit); resume spawn 2's TP=2 save at TP=1; the loading errors.
Plus a filesystem-only test of latest_checkpoint. About 30-60 s on 2 cores.
"""

import os
import random

import numpy as np
import pytest
import torch

from megatron_lead.launch import run_local

# Vocab 100 is padded to 128 rows at TP=1 and to 256 at TP=2 (policy.convert.arch): resuming the
# TP=2 checkpoint at TP=1 also exercises Megatron's padded-vocab resharding.
VOCAB, TEMPERATURE, SEQ = 100, 0.8, 12
ROWS = [(3, 9), (5, 2), (2, 6), (4, 7)]  # (prompt, response) lengths, right-padded to SEQ


def _hf_config():
    import transformers

    return transformers.Qwen2Config(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        tie_word_embeddings=True, rms_norm_eps=1e-6, rope_theta=10000.0)


def _batch(seed):
    """tokens, response mask, per-rollout advantages, old log-probs (made up: a fixed draw
    around the typical log-prob of a random model, so ratios vary and some clip)."""
    g = torch.Generator().manual_seed(seed)
    tokens = torch.zeros(len(ROWS), SEQ, dtype=torch.long)
    mask = torch.zeros(len(ROWS), SEQ, dtype=torch.bool)
    for i, (p, r) in enumerate(ROWS):
        tokens[i, :p + r] = torch.randint(0, VOCAB, (p + r,), generator=g)
        mask[i, p:p + r] = True
    advantages = torch.tensor([1.0, -0.5, 0.8, -1.2]) * (1 if seed % 2 else -1)
    old = -torch.log(torch.tensor(float(VOCAB))) + 0.3 * torch.randn(len(ROWS), SEQ, generator=g)
    return tokens, mask, advantages, old


def _optim_cfg():
    from megatron_lead.policy.optim import OptimConfig

    # Cosine from the first step: the lr differs between step 1 and step 2.
    return OptimConfig(lr=1e-3, lr_schedule="cosine", total_steps=4, clip_grad=1.0)


def _sgd_cfg():
    from megatron_lead.policy.optim import OptimConfig

    return OptimConfig(optimizer="sgd", lr=0.1, sgd_momentum=0.9, clip_grad=1.0)


def _build(tp, ckpt_dir, hf_dir, pp=1, cfg=None):
    """Model (+ DDP), optimizer, scheduler at TP=tp x PP=pp; weights from an HF-converted checkpoint, or
    left uninitialised (ckpt_dir=None) for a model that a trainer checkpoint will fill."""
    from megatron_lead.policy.convert.checkpoint import load_megatron_checkpoint
    from megatron_lead.policy.model import build_model
    from megatron_lead.policy.optim import build_optimizer, wrap_ddp
    from megatron_lead.policy.parallel import init_parallel

    init_parallel(tp, pp)
    model = build_model(hf_dir, init_weights=False)
    if ckpt_dir is not None:
        load_megatron_checkpoint(model, ckpt_dir)
    cfg = cfg or _optim_cfg()
    model = wrap_ddp(model, cfg)
    optimizer, scheduler = build_optimizer(model, cfg)
    return model, optimizer, scheduler


def _step(model, optimizer, scheduler, seed):
    """One train step on batch `seed`, this DP rank's rows, one micro-batch of 2 rows."""
    from megatron.core import parallel_state

    from megatron_lead.policy.loss import LossConfig
    from megatron_lead.policy.train_step import split_micro_batches, train_step

    tokens, mask, advantages, old = _batch(seed)
    dp, dp_rank = parallel_state.get_data_parallel_world_size(), parallel_state.get_data_parallel_rank()
    rows = slice(dp_rank * len(ROWS) // dp, (dp_rank + 1) * len(ROWS) // dp)
    mbs = split_micro_batches(2, tokens=tokens[rows], response_mask=mask[rows],
                              advantages=advantages[rows], old_logprobs=old[rows])
    metrics = train_step(model, optimizer, scheduler, mbs,
                         LossConfig(temperature=TEMPERATURE, kl_type="none"))
    # Where the schedule stands after the step: the next step's lr.
    return {**metrics, "next_lr": optimizer.param_groups[0]["lr"],
            "schedule_steps": scheduler.num_steps}


def _weights(model):
    from megatron_lead.policy.convert.gather import iter_hf_weights

    return {name: t.clone() for name, t in iter_hf_weights(model)}


def _adam_state(optimizer):
    """Adam's state after the step: per-parameter tensors, in parameter order."""
    sd = optimizer.chained_optimizers[0].optimizer.state_dict()["state"]
    return {i: {k: v.clone() for k, v in s.items()} for i, s in sd.items()}


def _scramble_rngs(seed):
    from megatron.core import tensor_parallel

    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed)
    tensor_parallel.model_parallel_cuda_manual_seed(seed)


def _rng_probe():
    """Draws from every RNG a checkpoint restores (the Megatron tracker through its fork)."""
    from megatron.core import tensor_parallel

    with tensor_parallel.get_cuda_rng_tracker().fork():
        tracker = torch.rand(3)
    return dict(torch=torch.rand(3), python=random.random(), numpy=float(np.random.rand()),
                tracker=tracker)


STATE = {"step": 1, "lead": {"w_corr_ema": 0.71, "history": [1.0, 2.5]},
         "sampler": {"epoch": 0, "position": 8, "seed": 3}}


def _uninterrupted(rank, world_size, paths):
    """Spawn 1: TP=1, step 1, save, step 2; then saves of steps 1, 2, 3, 3 (keep_last=2) into
    a root holding a killed save's temp folder."""
    import time

    from megatron_lead.policy.parallel import destroy_parallel
    from megatron_lead.trainer.checkpoint import save_checkpoint

    model, optimizer, scheduler = _build(1, paths["tp1"], paths["hf"])
    m1 = _step(model, optimizer, scheduler, seed=1)
    _scramble_rngs(77)
    t0 = time.perf_counter()
    saved = save_checkpoint(paths["root_a"], 1, model, optimizer, scheduler, STATE, keep_last=3)
    save_s = time.perf_counter() - t0
    probe = _rng_probe()
    m2 = _step(model, optimizer, scheduler, seed=2)
    out = dict(m1=m1, m2=m2, saved=saved, save_s=save_s, probe=probe, weights=_weights(model),
               adam=_adam_state(optimizer))
    os.makedirs(os.path.join(paths["root_k"], ".tmp_step_00000099", "rng"))  # a killed save's
    out["later_save_s"] = []
    for nth, step in enumerate((1, 2, 3, 3)):  # the last one replaces step 3's folder
        t0 = time.perf_counter()
        save_checkpoint(paths["root_k"], step, model, optimizer, scheduler,
                        {"step": step, "nth": nth}, keep_last=2)
        out["later_save_s"].append(time.perf_counter() - t0)
    out["kept"] = sorted(os.listdir(paths["root_k"]))
    destroy_parallel()

    # Two more optimizer cases, each resumed in spawn 3: SGD with momentum (Megatron gives SGD no
    # init_state_fn) and a save before the first step (Adam has no state yet).
    for case, cfg, steps_before in (("sgd", _sgd_cfg(), 1), ("step0", _optim_cfg(), 0)):
        model, optimizer, scheduler = _build(1, paths["tp1"], paths["hf"], cfg=cfg)
        for seed in range(1, steps_before + 1):
            _step(model, optimizer, scheduler, seed)
        save_checkpoint(paths["root_" + case], steps_before, model, optimizer, scheduler, {})
        m = _step(model, optimizer, scheduler, seed=2)
        out[case] = dict(m=m, weights=_weights(model))
        destroy_parallel()
    return out


def _tp2_then_dp2(rank, world_size, paths):
    """Spawn 2: TP=2 step 1, save, step 2; a failing save; then TP=1 x DP=2 and PP=2 resume the
    TP=2 save."""
    from megatron.core import parallel_state

    from megatron_lead.policy.parallel import destroy_parallel
    from megatron_lead.trainer import checkpoint as ckpt

    model, optimizer, scheduler = _build(2, paths["tp2"], paths["hf"])
    _step(model, optimizer, scheduler, seed=1)
    ckpt.save_checkpoint(paths["root_b"], 1, model, optimizer, scheduler, STATE)
    saved_weights = _weights(model)
    m2 = _step(model, optimizer, scheduler, seed=2)
    out = dict(tp2=dict(m2=m2, saved=saved_weights, weights=_weights(model)))

    # A save that fails on rank 1 only, after both ranks wrote their model and optimizer shards:
    # both ranks raise, nothing is left behind.
    real = ckpt._write_rng
    if rank == 1:
        ckpt._write_rng = lambda path, states: (_ for _ in ()).throw(OSError("disk full (simulated)"))
    try:
        ckpt.save_checkpoint(paths["root_f"], 5, model, optimizer, scheduler, STATE)
        out["failed_save"] = None
    except OSError as e:
        out["failed_save"] = str(e)
    finally:
        ckpt._write_rng = real
    out["root_f"] = sorted(os.listdir(paths["root_f"]))
    destroy_parallel()

    model, optimizer, scheduler = _build(1, None, paths["hf"])
    assert parallel_state.get_data_parallel_world_size() == 2
    state = ckpt.load_checkpoint(ckpt.latest_checkpoint(paths["root_b"]), model, optimizer, scheduler)
    loaded = _weights(model)
    m2 = _step(model, optimizer, scheduler, seed=2)
    out["dp2"] = dict(state=state, loaded=loaded, m2=m2, weights=_weights(model))
    destroy_parallel()

    model, optimizer, scheduler = _build(1, None, paths["hf"], pp=2)
    state = ckpt.load_checkpoint(ckpt.latest_checkpoint(paths["root_b"]), model, optimizer, scheduler)
    loaded = _weights(model)
    m2 = _step(model, optimizer, scheduler, seed=2)
    out["pp2"] = dict(state=state, loaded=loaded, m2=m2, weights=_weights(model))
    destroy_parallel()
    return out


def _resume(rank, world_size, paths):
    """Spawn 3 (fresh process): resume spawn 1's saves at TP=1 (with and without the optimizer;
    the SGD and step-0 ones); spawn 2's TP=2 save at TP=1; the loading errors."""
    import time

    from megatron_lead.policy.parallel import destroy_parallel
    from megatron_lead.trainer.checkpoint import latest_checkpoint, load_checkpoint

    out = {}
    model, optimizer, scheduler = _build(1, None, paths["hf"])
    _scramble_rngs(5)  # not the saved states: the load must restore them
    t0 = time.perf_counter()
    state = load_checkpoint(latest_checkpoint(paths["root_a"]), model, optimizer, scheduler)
    load_s = time.perf_counter() - t0
    probe = _rng_probe()
    m2 = _step(model, optimizer, scheduler, seed=2)
    out["exact"] = dict(state=state, load_s=load_s, probe=probe, m2=m2, weights=_weights(model),
                        adam=_adam_state(optimizer))

    # The same resume without the optimizer state and schedule: a different step 2.
    model, optimizer, scheduler = _build(1, None, paths["hf"])
    load_checkpoint(latest_checkpoint(paths["root_a"]), model, optimizer, scheduler,
                    load_optimizer=False)
    m2 = _step(model, optimizer, scheduler, seed=2)
    out["no_optimizer"] = dict(m2=m2, weights=_weights(model))

    model, optimizer, scheduler = _build(1, None, paths["hf"])
    state = load_checkpoint(latest_checkpoint(paths["root_b"]), model, optimizer, scheduler)
    loaded = _weights(model)
    m2 = _step(model, optimizer, scheduler, seed=2)
    out["tp1"] = dict(state=state, loaded=loaded, m2=m2, weights=_weights(model))

    for case, cfg in (("sgd", _sgd_cfg()), ("step0", _optim_cfg())):
        model, optimizer, scheduler = _build(1, None, paths["hf"], cfg=cfg)
        load_checkpoint(latest_checkpoint(paths["root_" + case]), model, optimizer, scheduler)
        m = _step(model, optimizer, scheduler, seed=2)
        out[case] = dict(m=m, weights=_weights(model))
        destroy_parallel()

    model, optimizer, scheduler = _build(1, None, paths["hf"])
    errors = {}
    for name, path in paths["bad"].items():
        try:
            load_checkpoint(path, model, optimizer, scheduler)
            errors[name] = None
        except (FileNotFoundError, ValueError) as e:
            errors[name] = (type(e).__name__, str(e))
    out["errors"] = errors
    destroy_parallel()
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    import shutil

    import transformers

    from megatron_lead.policy.convert.checkpoint import hf_to_megatron

    root = tmp_path_factory.mktemp("trainer_ckpt")
    paths = {k: str(root / k) for k in ("hf", "tp1", "tp2", "root_a", "root_b", "root_k", "root_f",
                                        "root_sgd", "root_step0")}
    torch.manual_seed(0)
    transformers.Qwen2ForCausalLM(_hf_config()).save_pretrained(paths["hf"])
    hf_to_megatron(paths["hf"], paths["tp1"], tp=1)
    hf_to_megatron(paths["hf"], paths["tp2"], tp=2)

    first = run_local(_uninterrupted, 1, paths)[0]
    second = run_local(_tp2_then_dp2, 2, paths)

    # Broken copies of spawn 1's checkpoint for the loading errors.
    good = first["saved"]
    bad = {"missing": str(root / "nope" / "step_00000001")}
    bad["no_marker"] = str(root / "bad" / "step_00000001")
    shutil.copytree(good, bad["no_marker"])
    os.remove(os.path.join(bad["no_marker"], "complete.json"))
    bad["no_shards"] = str(root / "bad2" / "step_00000001")
    shutil.copytree(good, bad["no_shards"])
    for name in os.listdir(bad["no_shards"]):
        if name.endswith(".distcp"):
            os.remove(os.path.join(bad["no_shards"], name))
    paths["bad"] = bad

    third = run_local(_resume, 1, paths)[0]
    return dict(first=first, second=second, third=third, paths=paths)


def _assert_equal_dicts(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.mark.slow
def test_resume_reproduces_the_uninterrupted_run_exactly(runs):
    first, resumed = runs["first"], runs["third"]["exact"]
    assert resumed["state"] == STATE
    assert resumed["m2"] == first["m2"]  # every metric, bit for bit (loss, grad_norm, lr, ...)
    # The cosine schedule went on, not restarted: step 2's lr and the one after it.
    assert first["m1"]["lr"] > resumed["m2"]["lr"] > resumed["m2"]["next_lr"]
    assert resumed["m2"]["schedule_steps"] == 2
    _assert_equal_dicts(resumed["weights"], first["weights"])
    assert resumed["adam"].keys() == first["adam"].keys()
    for i in first["adam"]:
        _assert_equal_dicts(resumed["adam"][i], first["adam"][i])
    # Same layout: every RNG continues where the saved run's did.
    for name, value in first["probe"].items():
        assert (torch.equal(resumed["probe"][name], value) if torch.is_tensor(value)
                else resumed["probe"][name] == value), name


@pytest.mark.slow
@pytest.mark.parametrize("case", ["sgd", "step0"])
def test_resume_sgd_and_a_save_before_the_first_step(runs, case):
    first, resumed = runs["first"][case], runs["third"][case]
    assert resumed["m"] == first["m"]
    _assert_equal_dicts(resumed["weights"], first["weights"])


@pytest.mark.slow
def test_the_optimizer_state_matters(runs):
    """Without the optimizer state and schedule, step 2 differs: what the exact test compares is
    not something a fresh optimizer would reproduce anyway."""
    first, fresh = runs["first"], runs["third"]["no_optimizer"]
    assert fresh["m2"]["loss"] == first["m2"]["loss"]  # same weights before the step
    assert fresh["m2"]["lr"] == first["m1"]["lr"] != first["m2"]["lr"]
    assert fresh["m2"]["schedule_steps"] == 1
    diff = max((fresh["weights"][k] - first["weights"][k]).abs().max().item() for k in first["weights"])
    assert diff > 1e-4


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["tp1", "dp2", "pp2"])
def test_resume_at_another_layout(runs, layout):
    """The TP=2 save resumed at TP=1 (one process), TP=1 x DP=2 and TP=1 x PP=2 (two)."""
    tp2 = runs["second"][0]["tp2"]
    resumed = runs["third"]["tp1"] if layout == "tp1" else runs["second"][0][layout]
    assert resumed["state"] == STATE
    _assert_equal_dicts(resumed["loaded"], tp2["saved"])  # the saved weights, exactly
    for name, value in tp2["m2"].items():
        assert resumed["m2"][name] == pytest.approx(value, rel=1e-5, abs=1e-6), name
    for name, w in tp2["weights"].items():
        torch.testing.assert_close(resumed["weights"][name], w, atol=1e-5, rtol=1e-5, msg=name)
    if layout != "tp1":  # the other rank: the same model (DP) or the same gathered one (PP)
        _assert_equal_dicts(runs["second"][1][layout]["weights"], resumed["weights"])
        assert runs["second"][1][layout]["m2"] == resumed["m2"]


@pytest.mark.slow
def test_a_failed_save_raises_on_every_rank_and_leaves_nothing(runs):
    for r in runs["second"]:
        assert "disk full (simulated)" in r["failed_save"]
        assert r["root_f"] == []


@pytest.mark.slow
def test_keep_last_the_marker_and_timing(runs):
    import json

    first, paths = runs["first"], runs["paths"]
    assert first["kept"] == ["step_00000002", "step_00000003"]
    with open(os.path.join(paths["root_k"], "step_00000003", "trainer_state.json")) as f:
        assert json.load(f) == {"step": 3, "nth": 3}  # the second save of step 3
    for root, tp, dp in (("root_a", 1, 1), ("root_b", 2, 1)):
        with open(os.path.join(paths[root], "step_00000001", "complete.json")) as f:
            marker = json.load(f)
        assert (marker["step"], marker["world_size"], marker["tp"], marker["pp"], marker["dp"]) \
            == (1, tp * dp, tp, 1, dp)
        assert sorted(os.listdir(os.path.join(paths[root], "step_00000001", "rng"))) == \
            [f"rank{r}.pt" for r in range(tp * dp)]
    assert first["save_s"] < 30 and runs["third"]["exact"]["load_s"] < 30
    later = ", ".join(f"{t:.3f}" for t in first["later_save_s"])
    print(f"\ntiny model: first save {first['save_s']:.3f} s (later ones {later} s), "
          f"load {runs['third']['exact']['load_s']:.3f} s")


@pytest.mark.slow
def test_loading_errors_are_one_line_and_name_the_path(runs):
    errors = runs["third"]["errors"]
    bad = runs["paths"]["bad"]
    assert errors["missing"][0] == "FileNotFoundError"
    assert errors["no_marker"][0] == "ValueError" and "incomplete" in errors["no_marker"][1]
    assert errors["no_shards"][0] == "ValueError"
    for name, (_, message) in errors.items():
        assert "\n" not in message and os.path.abspath(bad[name]) in message, name


def test_latest_checkpoint_ignores_temp_and_incomplete_folders(tmp_path):
    import json

    from megatron_lead.trainer.checkpoint import CHECKPOINT_PREFIX, latest_checkpoint

    assert latest_checkpoint(str(tmp_path / "absent")) is None
    assert latest_checkpoint(str(tmp_path)) is None

    def folder(name, marker=True):
        path = tmp_path / name
        path.mkdir()
        if marker:
            (path / "complete.json").write_text(json.dumps({"format": 1}))
        return str(path)

    folder(f"{CHECKPOINT_PREFIX}00000002")
    newest = folder(f"{CHECKPOINT_PREFIX}00000010")
    folder(f".tmp_{CHECKPOINT_PREFIX}00000020")                # a save in progress (marker inside)
    folder(f"{CHECKPOINT_PREFIX}00000030", marker=False)       # killed before the marker
    (tmp_path / f"{CHECKPOINT_PREFIX}00000040").mkdir()
    (tmp_path / f"{CHECKPOINT_PREFIX}00000040" / "complete.json").write_text("{trunc")  # torn
    folder(f".del_{CHECKPOINT_PREFIX}00000050")                # being pruned
    (tmp_path / f"{CHECKPOINT_PREFIX}00000060").write_text("")  # a file, not a folder
    assert latest_checkpoint(str(tmp_path)) == newest
