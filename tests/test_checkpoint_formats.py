"""The distributed optimizer's checkpoint (Megatron's dp_reshardable format, plus
trainer/optimizer_reshard.py) resumed at other layouts and into the plain optimizer.

Two spawns on the tiny Qwen2 of test_trainer_checkpoint:
  1. two processes, TP=1 x DP=2 with the distributed optimizer (fp32): step 1, save, step 2 (the
     uninterrupted run); then the same processes resume that save at the same layout (Megatron's
     own loader), at TP=2 with the distributed optimizer and at PP=2 with the plain one (both
     through optimizer_reshard); then the GPU's configuration (bf16 params, fp32 main params):
     a DP=2 save resumed at TP=2.
  2. one process: the DP=2 save resumed at DP=1 with the distributed optimizer (Megatron's
     loader, DP changed) and with the plain optimizer; a plain optimizer's checkpoint offered to
     the distributed optimizer (refused with one line).

The independent expectation: after a load, the optimizer's fp32 main params and Adam moments,
gathered into full HF-named tensors (each DP rank's slice summed into zeros over DP, then TP and PP
gathered as the weights are), equal the saved run's bit for bit, at every layout; then a step
gives the uninterrupted run's metrics (bit for bit at the same layout; at another layout to the
last bits, the reductions being summed in another order). About 60 s on 2 cores.
"""

import os

import pytest
import torch
import torch.distributed as dist

import test_trainer_checkpoint as tc
from megatron_lead.launch import run_local

pytestmark = pytest.mark.slow
STATES = ("param", "exp_avg", "exp_avg_sq")


def _cfg(distributed=True, bf16=False):
    from megatron_lead.policy.optim import OptimConfig

    return OptimConfig(lr=1e-3, lr_schedule="cosine", total_steps=4, clip_grad=1.0,
                       distributed_optimizer=distributed, bf16=bf16)


def _build(tp, ckpt_dir, hf_dir, pp=1, cfg=None):
    """test_trainer_checkpoint._build, with bf16 params when the config asks for bf16."""
    from megatron_lead.policy.convert.checkpoint import load_megatron_checkpoint
    from megatron_lead.policy.model import build_model
    from megatron_lead.policy.optim import build_optimizer, wrap_ddp
    from megatron_lead.policy.parallel import init_parallel

    init_parallel(tp, pp)
    model = build_model(hf_dir, dtype=torch.bfloat16 if cfg.use_bf16 else torch.float32, init_weights=False)
    if ckpt_dir is not None:
        load_megatron_checkpoint(model, ckpt_dir)
    model = wrap_ddp(model, cfg)
    optimizer, scheduler = build_optimizer(model, cfg)
    return model, optimizer, scheduler


def _state_hf(model, optimizer) -> dict:
    """{state: {hf name: full fp32 tensor}} of the fp32 main params and Adam moments, plus the
    set of Adam's per-parameter steps on this rank."""
    from megatron.core import parallel_state

    from megatron_lead.policy.convert.gather import iter_hf_weights
    from megatron_lead.policy.model import unwrap

    inner = optimizer.chained_optimizers[0]
    params = list(unwrap(model[0]).parameters())
    distributed = hasattr(inner, "gbuf_ranges")
    if distributed:  # the slice of each parameter this DP rank holds
        held = {p: r["param"] for maps in inner.gbuf_ranges for per_dtype in maps.values()
                for m in per_dtype for p, r in m["param_map"].items()}
    else:
        main_of = {p: p for g in inner.optimizer.param_groups for p in g["params"]}
        for g16, g32 in zip(getattr(inner, "float16_groups", []), getattr(inner, "fp32_from_float16_groups", [])):
            main_of.update(zip(g16, g32))
    originals = [p.data for p in params]
    out = {}
    try:
        for key in STATES:
            for p in params:
                full = torch.zeros(p.numel(), dtype=torch.float32)
                if distributed:
                    if p in held:
                        t = inner._get_main_param_and_optimizer_states(p)[key]
                        full[held[p].start:held[p].end] = t.detach().view(-1)
                    dist.all_reduce(full, group=parallel_state.get_data_parallel_group())
                else:
                    main = main_of[p]
                    full.copy_((main if key == "param" else inner.optimizer.state[main][key]).detach().view(-1))
                p.data = full.view(p.shape)
            out[key] = {name: t.clone() for name, t in iter_hf_weights(model)}
    finally:
        for p, data in zip(params, originals):
            p.data = data
    out["steps"] = {float(s["step"]) for s in inner.optimizer.state.values() if "step" in s}
    return out


def _resume(paths, tp, pp, cfg, root="root_dp2"):
    from megatron_lead.policy.parallel import destroy_parallel
    from megatron_lead.trainer import checkpoint as ckpt

    model, optimizer, scheduler = _build(tp, None, paths["hf"], pp=pp, cfg=cfg)
    state = ckpt.load_checkpoint(ckpt.latest_checkpoint(paths[root]), model, optimizer, scheduler)
    out = dict(state=state, loaded=tc._weights(model), optimizer=_state_hf(model, optimizer))
    out["m2"] = tc._step(model, optimizer, scheduler, seed=2)
    out["weights"] = tc._weights(model)
    out["steps_after"] = _state_hf(model, optimizer)["steps"]
    destroy_parallel()
    return out


def _two_ranks(rank, world_size, paths):
    from megatron_lead.policy.parallel import destroy_parallel
    from megatron_lead.trainer import checkpoint as ckpt

    out = {}
    for name, bf16 in (("fp32", False), ("bf16", True)):
        model, optimizer, scheduler = _build(1, paths["tp1"], paths["hf"], cfg=_cfg(bf16=bf16))
        tc._step(model, optimizer, scheduler, seed=1)
        ckpt.save_checkpoint(paths[f"root_dp2{'_bf16' * bf16}"], 1, model, optimizer, scheduler, tc.STATE)
        ref = dict(saved=tc._weights(model), optimizer=_state_hf(model, optimizer))
        ref["m2"] = tc._step(model, optimizer, scheduler, seed=2)
        ref["weights"] = tc._weights(model)
        out[name] = ref
        destroy_parallel()
    out["same"] = _resume(paths, 1, 1, _cfg())
    out["tp2"] = _resume(paths, 2, 1, _cfg())
    out["pp2_plain"] = _resume(paths, 1, 2, _cfg(distributed=False))
    out["bf16_tp2"] = _resume(paths, 2, 1, _cfg(bf16=True), root="root_dp2_bf16")
    return out


def _one_rank(rank, world_size, paths):
    from megatron_lead.policy.parallel import destroy_parallel
    from megatron_lead.trainer import checkpoint as ckpt

    out = {"dp1": _resume(paths, 1, 1, _cfg()), "dp1_plain": _resume(paths, 1, 1, _cfg(distributed=False))}
    model, optimizer, scheduler = _build(1, paths["tp1"], paths["hf"], cfg=_cfg(distributed=False))
    tc._step(model, optimizer, scheduler, seed=1)
    saved = ckpt.save_checkpoint(paths["root_plain"], 1, model, optimizer, scheduler, {})
    destroy_parallel()
    model, optimizer, scheduler = _build(1, None, paths["hf"], cfg=_cfg())
    try:
        ckpt.load_checkpoint(saved, model, optimizer, scheduler)
        out["plain_into_distributed"] = None
    except ValueError as e:
        out["plain_into_distributed"] = (str(e), saved)
    destroy_parallel()
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    import transformers

    from megatron_lead.policy.convert.checkpoint import hf_to_megatron

    root = tmp_path_factory.mktemp("ckpt_formats")
    paths = {k: str(root / k) for k in ("hf", "tp1", "root_dp2", "root_dp2_bf16", "root_plain")}
    torch.manual_seed(0)
    transformers.Qwen2ForCausalLM(tc._hf_config()).save_pretrained(paths["hf"])
    hf_to_megatron(paths["hf"], paths["tp1"], tp=1)
    two = run_local(_two_ranks, 2, paths)
    one = run_local(_one_rank, 1, paths)[0]
    return dict(two=two, one=one, paths=paths)


def _assert_state_equal(loaded: dict, saved: dict):
    for key in STATES:
        assert loaded[key].keys() == saved[key].keys()
        for name in saved[key]:
            assert torch.equal(loaded[key][name], saved[key][name]), (key, name)


def test_saved_as_dp_reshardable_with_an_index(runs):
    import json

    folder = os.path.join(runs["paths"]["root_dp2"], "step_00000001")
    marker = json.load(open(os.path.join(folder, "complete.json")))
    assert marker["sharding_metadata"]["distrib_optim_sharding_type"] == "dp_reshardable"
    index = json.load(open(os.path.join(folder, "optimizer_index.json")))
    assert index["steps"] == [1.0] and sorted(index["dtypes"]) == sorted(STATES)
    # Each DP rank wrote its own half of the optimizer state (__{rank}_{n}.distcp): no gather onto
    # one rank. Rank 0 also writes the weights (4 of the 16 bytes per parameter): 10 / 6 expected;
    # a fully_reshardable save writes everything from rank 0.
    written = [sum(os.path.getsize(os.path.join(folder, n)) for n in os.listdir(folder)
                   if n.startswith(f"__{r}_") and n.endswith(".distcp")) for r in (0, 1)]
    assert min(written) > 0.3 * sum(written), written


def test_resume_at_the_same_layout_is_bit_exact(runs):
    for r in runs["two"]:
        ref, same = r["fp32"], r["same"]
        assert same["state"] == tc.STATE
        _assert_state_equal(same["optimizer"], ref["optimizer"])
        assert same["m2"] == ref["m2"]  # every metric, bit for bit
        tc._assert_equal_dicts(same["weights"], ref["weights"])
        assert same["steps_after"] == {2.0}  # Adam's step went on from 1 (one per parameter)


@pytest.mark.parametrize("layout", ["tp2", "pp2_plain", "dp1", "dp1_plain"])
def test_resume_at_another_layout_restores_the_state_exactly(runs, layout):
    """TP=2 and PP=2 (plain optimizer) through optimizer_reshard; DP=1 through Megatron's loader
    (distributed optimizer) and optimizer_reshard (plain)."""
    ref = runs["two"][0]["fp32"]
    resumed = runs["one"][layout] if layout.startswith("dp1") else runs["two"][0][layout]
    assert resumed["state"] == tc.STATE
    tc._assert_equal_dicts(resumed["loaded"], ref["saved"])
    _assert_state_equal(resumed["optimizer"], ref["optimizer"])
    assert resumed["m2"]["schedule_steps"] == 2 and resumed["m2"]["lr"] == ref["m2"]["lr"]
    for name, value in ref["m2"].items():
        assert resumed["m2"][name] == pytest.approx(value, rel=1e-5, abs=1e-6), name
    for name, w in ref["weights"].items():  # a step with Adam's step 0 or 9 moves them by ~3e-4
        torch.testing.assert_close(resumed["weights"][name], w, atol=1e-5, rtol=1e-5, msg=name)
    assert resumed["steps_after"] == {2.0}


def test_bf16_resume_at_tp2_restores_the_fp32_state_exactly(runs):
    ref, resumed = runs["two"][0]["bf16"], runs["two"][0]["bf16_tp2"]
    tc._assert_equal_dicts(resumed["loaded"], ref["saved"])
    _assert_state_equal(resumed["optimizer"], ref["optimizer"])
    assert resumed["m2"]["loss"] == pytest.approx(ref["m2"]["loss"], rel=1e-2)


def test_a_plain_checkpoint_is_refused_by_the_distributed_optimizer_in_one_line(runs):
    message, saved = runs["one"]["plain_into_distributed"]
    assert "\n" not in message and saved in message
    assert "optim.distributed_optimizer=false" in message
