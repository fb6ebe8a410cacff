"""LEAD core against hand-computed values and the naive reference (tests/lead_reference.py)."""

import json
import math
import random

import pytest
import torch

import lead_reference as ref
from lead_shards import shard_of
from megatron_lead.lead import AdvantageComputer, LeadConfig, PSIController, RolloutShard, efficiency_reward
from megatron_lead.lead.config import METHODS


def per_prompt(result, prompts):
    out, k = [], 0
    for lengths, _ in prompts:
        out.append(result.advantages[k:k + len(lengths)].tolist())
        k += len(lengths)
    return out


# ------------------------------------------------------------------ hand-computed formulas

def test_target_mean_of_correct_and_symmetric_reward():
    prompts = [([1200, 2000, 3000, 500], [1, 1, 0, 0])]
    res = AdvantageComputer(LeadConfig())(shard_of(prompts))
    assert res.targets.tolist() == [1600.0]
    # 1 - |L - 1600| / 1600, for every rollout (correct or not)
    assert res.eff_reward.tolist() == pytest.approx([0.75, 0.75, 0.125, 0.3125], abs=1e-12)


def test_target_clamp_sentinel_and_floor():
    t = torch.tensor
    prompts = [([100, 300, 50], [1, 1, 0]),        # mean 200 -> clamped to l_min 1000
               ([4000, 6000], [0, 0]),             # unsolved -> l_max 8000
               ([9000, 9000, 20000], [1, 1, 0])]   # mean 9000 -> clamped to 8000
    res = AdvantageComputer(LeadConfig())(shard_of(prompts))
    assert res.targets.tolist() == [1000.0, 8000.0, 8000.0]
    assert res.eff_reward.tolist() == pytest.approx(
        [0.1, 0.3, 0.05, 0.5, 0.75, 0.875, 0.875, -0.5], abs=1e-12)
    # floor at -1: 1 - (30000 - 1000) / 1000 = -28
    assert efficiency_reward(t([30000.0]), t([1000.0]), "symmetric").item() == -1.0
    # unsolved prompt: reward is L / L_max for L <= L_max
    assert efficiency_reward(t([2000.0]), t([8000.0]), "symmetric").item() == 0.25


@pytest.mark.parametrize("how,expected", [("min_correct", 1500.0), ("median_correct", 2500.0),
                                          ("mean_all", 3250.0), ("global", 4000.0)])
def test_target_aggregators(how, expected):
    prompts = [([1500, 2000, 3000, 7000, 2750], [1, 1, 1, 1, 0])]  # correct median (2000+3000)/2
    cfg = LeadConfig.for_method("lead", target=how)
    assert AdvantageComputer(cfg)(shard_of(prompts)).targets.tolist() == [expected]


def test_budget_reward():
    t = torch.tensor
    r = efficiency_reward(t([1000.0, 4000.0, 6000.0, 20000.0]), t([4000.0] * 4), "budget")
    assert r.tolist() == [0.0, 0.0, -0.5, -1.0]


def test_decoupled_group_normalisation_by_hand():
    # one prompt, static weights 1/0, no whitening: A = (r - 0.5) / (sqrt(1/3) + 1e-6)
    cfg = LeadConfig.for_method("grpo", whiten=False)
    res = AdvantageComputer(cfg)(shard_of([([1000, 1000, 1000, 1000], [1, 1, 0, 0])]))
    a = 0.5 / (math.sqrt(1 / 3) + 1e-6)
    assert res.advantages.tolist() == pytest.approx([a, a, -a, -a], abs=1e-12)


GRPO_BATCH = [([1000, 3000, 2000], [1, 0, 1]), ([500, 700], [0, 1])]
# Group-normalised correctness by hand: (c - mean) / (unbiased std + 1e-6).
# Prompt 1: mean 2/3, std sqrt(((1/3)^2 + (2/3)^2 + (1/3)^2) / 2) = sqrt(1/3);
# prompt 2: mean 1/2, std sqrt(1/2).
GRPO_BY_HAND = [(1 / 3) / (math.sqrt(1 / 3) + 1e-6), (-2 / 3) / (math.sqrt(1 / 3) + 1e-6),
                (1 / 3) / (math.sqrt(1 / 3) + 1e-6),
                -0.5 / (math.sqrt(0.5) + 1e-6), 0.5 / (math.sqrt(0.5) + 1e-6)]


def grpo_whitened_by_hand():
    """GRPO_BY_HAND whitened over the batch's 7200 response tokens (each rollout weighted by its
    length), unbiased token variance, rsqrt(var + 1e-8)."""
    lengths = [n for ls, _ in GRPO_BATCH for n in ls]
    N = sum(lengths)
    mean = sum(n * a for n, a in zip(lengths, GRPO_BY_HAND)) / N
    var = sum(n * (a - mean) ** 2 for n, a in zip(lengths, GRPO_BY_HAND)) / (N - 1)
    return [(a - mean) / math.sqrt(var + 1e-8) for a in GRPO_BY_HAND]


def test_grpo_is_group_normalised_correctness_unwhitened_as_the_release():
    cfg = LeadConfig.for_method("grpo")
    assert cfg.whiten is False and cfg.static_w_corr == 1.0
    res = AdvantageComputer(cfg)(shard_of(GRPO_BATCH))
    assert res.advantages.tolist() == pytest.approx(GRPO_BY_HAND, abs=1e-12)
    assert (res.w_corr, res.w_eff) == (1.0, 0.0)
    # Whitening stays a switch: on, the same advantages are whitened over the batch's tokens.
    res = AdvantageComputer(LeadConfig.for_method("grpo", whiten=True))(shard_of(GRPO_BATCH))
    assert res.advantages.tolist() == pytest.approx(grpo_whitened_by_hand(), abs=1e-9)
    assert res.unwhitened.tolist() == pytest.approx(GRPO_BY_HAND, abs=1e-12)
    # LEAD and its ablations keep whitening on; the published baselines are GRPO-normalised only.
    published = ("grpo", "shorterbetter", "kimi", "l1_exact", "l1_max", "drpo_style")
    assert all(LeadConfig.for_method(m).whiten for m in METHODS if m not in published)
    assert not any(LeadConfig.for_method(m).whiten for m in published)


def test_group_of_one_uses_mean0_std1():
    cfg = LeadConfig.for_method("static", whiten=False)
    res = AdvantageComputer(cfg)(shard_of([([1600], [1])]))
    # target 1600, r_eff 1; A = 0.5 * 1/(1+1e-6) + 0.5 * 1/(1+1e-6)
    assert res.advantages.item() == pytest.approx(1.0 / (1 + 1e-6), abs=1e-12)


def test_psi_step_by_hand():
    prompts = [([1200, 2000, 3000, 500], [1, 1, 0, 0]),   # mean corr .5, var .25; eff of correct: .75, .75
               ([1000, 1000, 1000, 1000], [1, 1, 1, 1])]  # mean corr 1, var 0; eff of correct: 1 x4
    res = AdvantageComputer(LeadConfig())(shard_of(prompts))
    mu_c, s_c = 0.75, math.sqrt((0.25 + 0) / 2 + ((0.5 - 0.75) ** 2 + (1 - 0.75) ** 2) / 2 + 1e-8)
    mu_e, s_e = 0.875, math.sqrt(0 + ((0.75 - 0.875) ** 2 + (1 - 0.875) ** 2) / 2 + 1e-8)
    m = res.metrics
    assert (m["lead/mu_corr"], m["lead/sigma_corr"]) == pytest.approx((mu_c, s_c), abs=1e-12)
    assert (m["lead/mu_eff"], m["lead/sigma_eff"]) == pytest.approx((mu_e, s_e), abs=1e-12)
    cv_c, cv_e = s_c / (mu_c + 1e-8), s_e / (mu_e + 1e-8)
    d_c = cv_c / (cv_c + cv_e + 1e-8) * (1 - 0.75)
    d_e = cv_e / (cv_c + cv_e + 1e-8) * (1 - (0.875 + 1) / 2)
    w_c = 0.95 * 0.5 + 0.05 * d_c / (d_c + d_e + 1e-8)
    assert res.w_corr == pytest.approx(w_c, abs=1e-12)
    assert res.w_eff == pytest.approx(1 - w_c, abs=1e-12)


def test_psi_floor_applies_to_used_weight_not_to_state():
    ctl = PSIController()
    for _ in range(100):  # correctness saturated (mu=1): its target weight is 0
        out = ctl.update(mu_corr=1.0, sigma_corr=1e-4, mu_eff=0.0, sigma_eff=0.5)
    # Target (0, 1) every step (Phi_corr = 0; D_eff = 0.5 up to eps): the EMA from (0.5, 0.5)
    # decays geometrically, far below the floor; only the weights used are floored.
    ema = 0.5 * 0.95 ** 100  # 0.00296
    assert out["w_corr_ema"] == pytest.approx(ema, rel=1e-12)
    assert out["w_eff_ema"] == pytest.approx(1 - ema, abs=1e-7)
    assert ctl.state_dict() == pytest.approx({"w_corr_ema": ema, "w_eff_ema": 1 - ema, "steps": 100},
                                             rel=1e-7)
    assert out["w_corr"] == 0.3 and out["w_eff"] == pytest.approx(0.7)


def test_no_correct_rollout_anywhere():
    prompts = [([100, 500, 800], [0, 0, 0]), ([2000, 3000], [0, 0])]
    res = AdvantageComputer(LeadConfig())(shard_of(prompts))
    assert res.metrics["lead/mu_eff"] == 0.0 and res.metrics["lead/sigma_eff"] == 0.0
    assert res.targets.tolist() == [8000.0, 8000.0]
    # D_eff = 0 -> target weight (1, 0): w_corr_ema = .95*.5 + .05
    assert res.w_corr == pytest.approx(0.525, abs=1e-9)
    assert torch.isfinite(res.advantages).all()


EDGE_CASES = {
    "all_correct": [([1200, 1500, 900, 3000], [1, 1, 1, 1]), ([2000, 2100], [1, 1])],
    "all_wrong": [([1200, 1500, 900, 3000], [0, 0, 0, 0]), ([2000, 2100], [0, 0])],
    "group_size_one": [([1200], [1]), ([700], [0]), ([3000], [1])],
    "zero_length": [([0, 0, 0], [1, 0, 1]), ([0, 10], [0, 1])],
    "all_zero_tokens": [([0, 0], [1, 1])],
    "one_prompt": [([1200, 1500, 900], [1, 0, 1])],
    "identical_rollouts": [([1000, 1000, 1000], [1, 1, 1])],
}


@pytest.mark.parametrize("method", ["lead", "grpo", "grpo_combined", "static", "lead_min_target", "budget",
                                    "lead_mean_all", "lead_median", "lead_global_target"])
@pytest.mark.parametrize("case", list(EDGE_CASES))
def test_edge_cases_are_finite_and_match_reference(case, method):
    prompts = EDGE_CASES[case]
    cfg = LeadConfig.for_method(method)
    comp = AdvantageComputer(cfg)
    psi = ref.NaivePSI() if cfg.weighting == "psi" else None
    for _ in range(3):  # a few steps, so the EMA moves
        res = comp(shard_of(prompts))
        w_c, w_e, targets, advs = ref.lead_step(
            prompts, psi, how=cfg.target, reward=cfg.reward, normalisation=cfg.normalisation,
            static_w_corr=cfg.static_w_corr, whiten=cfg.whiten)
        for tensor in (res.advantages, res.unwhitened, res.eff_reward, res.targets):
            assert torch.isfinite(tensor).all()
        assert all(math.isfinite(v) for v in res.metrics.values())
        assert (res.w_corr, res.w_eff) == pytest.approx((w_c, w_e), abs=1e-12)
        assert res.targets.tolist() == pytest.approx(targets, abs=1e-9)
        for got, want in zip(per_prompt(res, prompts), advs):
            assert got == pytest.approx(want, rel=1e-7, abs=1e-6)


def random_batch(rng, P=12, G=6):
    prompts = []
    for _ in range(P):
        p_ok = rng.random()
        base = rng.randint(300, 2500)
        lengths = [max(0, int(rng.gauss(base, base / 3))) for _ in range(G)]
        prompts.append((lengths, [int(rng.random() < p_ok) for _ in range(G)]))
    return prompts


@pytest.mark.parametrize("method", ["lead", "grpo_combined", "lead_min_target", "lead_median", "budget"])
def test_random_batches_match_reference(method):
    rng = random.Random(7)
    cfg = LeadConfig.for_method(method, l_min=200.0, l_max=4000.0, global_target=1500.0)
    comp = AdvantageComputer(cfg)
    psi = ref.NaivePSI() if cfg.weighting == "psi" else None
    for _ in range(8):
        prompts = random_batch(rng)
        res = comp(shard_of(prompts))
        w_c, w_e, targets, advs = ref.lead_step(
            prompts, psi, how=cfg.target, reward=cfg.reward, normalisation=cfg.normalisation,
            whiten=cfg.whiten, l_min=200.0, l_max=4000.0, global_target=1500.0)
        assert (res.w_corr, res.w_eff) == pytest.approx((w_c, w_e), abs=1e-12)
        assert res.targets.tolist() == pytest.approx(targets, abs=1e-9)
        for got, want in zip(per_prompt(res, prompts), advs):
            assert got == pytest.approx(want, abs=1e-8)


def test_whitened_advantages_have_token_mean_0_and_var_1():
    prompts = random_batch(random.Random(3))
    res = AdvantageComputer(LeadConfig())(shard_of(prompts))
    L = shard_of(prompts).length
    N = L.sum()
    mean = (res.advantages * L).sum() / N
    var = (((res.advantages - mean) ** 2) * L).sum() / (N - 1)
    assert abs(mean.item()) < 1e-9 and var.item() == pytest.approx(1.0, abs=1e-6)


def test_state_save_restore_reproduces_uninterrupted_run():
    rng = random.Random(11)
    batches = [random_batch(rng) for _ in range(10)]
    full = AdvantageComputer(LeadConfig())
    uninterrupted = [full(shard_of(b)) for b in batches]

    first = AdvantageComputer(LeadConfig())
    for b in batches[:4]:
        first(shard_of(b))
    saved = json.loads(json.dumps(first.state_dict()))  # as a checkpoint would store it
    resumed = AdvantageComputer(LeadConfig())
    resumed.load_state_dict(saved)
    for b, want in zip(batches[4:], uninterrupted[4:]):
        got = resumed(shard_of(b))
        assert (got.w_corr, got.w_eff) == (want.w_corr, want.w_eff)
        assert torch.equal(got.advantages, want.advantages)
    assert resumed.state_dict() == full.state_dict()


def test_config_rejects_bad_settings():
    with pytest.raises(ValueError, match="is not one of"):
        LeadConfig.for_method("nope")
    with pytest.raises(ValueError, match="l_min"):
        LeadConfig.for_method("lead", l_min=9000.0)
    with pytest.raises(ValueError, match="lead.target"):
        LeadConfig.for_method("lead", target="max_correct")
    with pytest.raises(ValueError, match="negative"):
        RolloutShard(prompt_index=[0], length=[-1], score=[1.0], num_prompts=1)
