"""The published baselines as their papers define them, each against numbers worked by hand:
ShorterBetter, Kimi k1.5's length reward, L1-Exact and L1-Max with a global budget, and DRPO's
decoupled advantages (whose gradient, with a sequence-mean loss, is checked against DRPO's own
objective by autograd); the renamed presets; and the same numbers on two data-parallel ranks."""

import math
import random

import pytest
import torch

from lead_shards import shard_of
from megatron_lead.launch import run_local
from megatron_lead.lead import AdvantageComputer, LeadConfig, RolloutShard

EPS = 1e-6  # group_std_eps


def group_normalised(r):
    """GRPO's (r - mean) / (unbiased std + 1e-6) of one group, by the formula."""
    m = sum(r) / len(r)
    sd = math.sqrt(sum((x - m) ** 2 for x in r) / (len(r) - 1))
    return [(x - m) / (sd + EPS) for x in r]


def test_shorterbetter_by_hand():
    # Prompt 0: lengths 100, 150, 120, 300; correct 0, 1, 1, 0 -> SOL = 120 (shortest correct).
    # r = 2 * 1[correct] - 0.001 * |L - 120| = -0.02, 1.97, 2.0, -0.18.
    # Prompt 1: nothing correct -> SOL = the mean of all, 60; r = -0.01, -0.01: constant -> 0.
    cfg = LeadConfig.for_method("shorterbetter")
    assert (cfg.static_w_corr, cfg.static_w_eff, cfg.whiten) == (2.0, 0.001, False)
    res = AdvantageComputer(cfg)(shard_of([([100, 150, 120, 300], [0, 1, 1, 0]), ([50, 70], [0, 0])]))
    assert res.targets.tolist() == [120.0, 60.0]  # not clamped to l_min = 1000
    want = group_normalised([-0.02, 1.97, 2.0, -0.18]) + [0.0, 0.0]
    assert res.advantages.tolist() == pytest.approx(want, abs=1e-12)
    assert res.advantages[:4].tolist() == pytest.approx([-0.798351, 0.852266, 0.877150, -0.931064], abs=1e-6)


def test_kimi_by_hand():
    # lengths 100, 200, 300 (min 100, max 300): lambda = 0.5, 0, -0.5; correct 1, 0, 1 ->
    # length reward 0.5, min(0, 0) = 0, -0.5; r = correct + length reward = 1.5, 0, 0.5.
    # A second prompt of one length: lambda = 0 for all; r = 1, 0.
    res = AdvantageComputer(LeadConfig.for_method("kimi"))(
        shard_of([([100, 200, 300], [1, 0, 1]), ([50, 50], [1, 0])]))
    assert res.eff_reward.tolist() == pytest.approx([0.5, 0.0, -0.5, 0.0, 0.0], abs=1e-12)
    want = group_normalised([1.5, 0.0, 0.5]) + group_normalised([1.0, 0.0])
    assert res.advantages.tolist() == pytest.approx(want, abs=1e-12)
    # A wrong rollout shorter than the mid-point gets no bonus (min(0, lambda)), a long one a penalty.
    res = AdvantageComputer(LeadConfig.for_method("kimi"))(shard_of([([100, 120, 300], [0, 1, 0])]))
    assert res.eff_reward.tolist() == pytest.approx([0.0, 0.4, -0.5], abs=1e-12)


def test_l1_exact_and_max_by_hand():
    # Budget B = 100. L1-Exact: r = 1[correct] - 0.0003 |100 - L|; L1-Max: r = 1[correct] *
    # clip(0.0003 (100 - L) + 0.5, 0, 1).
    prompts = [([80, 130, 90], [1, 1, 0])]
    exact = AdvantageComputer(LeadConfig.for_method("l1_exact", global_target=100.0))(shard_of(prompts))
    assert exact.advantages.tolist() == pytest.approx(group_normalised([0.994, 0.991, -0.003]), abs=1e-12)
    most = AdvantageComputer(LeadConfig.for_method("l1_max", global_target=100.0))(shard_of(prompts))
    assert most.eff_reward.tolist() == pytest.approx([0.506, 0.491, 0.0], abs=1e-12)
    assert most.advantages.tolist() == pytest.approx(group_normalised([0.506, 0.491, 0.0]), abs=1e-12)
    # Past the budget by more than delta / alpha = 1667 tokens a correct answer earns nothing.
    far = AdvantageComputer(LeadConfig.for_method("l1_max", global_target=100.0))(shard_of([([2000, 50], [1, 1])]))
    assert far.eff_reward.tolist() == pytest.approx([0.0, 0.515], abs=1e-12)


def _drpo_prompts():
    # Prompt 0: lengths 10, 20 correct, 30, 40 wrong (mean log-probs -1, -2); prompt 1 all correct,
    # prompt 2 all wrong: both 0.
    prompts = [([10, 20, 30, 40], [1, 1, 0, 0]), ([15, 25, 12, 18], [1, 1, 1, 1]), ([35, 45, 50, 9], [0, 0, 0, 0])]
    shard = shard_of(prompts)
    shard.mean_logprob = torch.tensor([-0.5, -0.7, -1.0, -2.0, -0.3, -0.4, -0.2, -0.1, -1.5, -1.6, -1.2, -0.9],
                                      dtype=torch.float64)
    return shard


def test_drpo_style_by_hand():
    cfg = LeadConfig.for_method("drpo_style", l_min=1.0, l_max=100.0)
    assert (cfg.drpo_lambda, cfg.drpo_tau, cfg.whiten) == (0.1, 10.0, False)
    res = AdvantageComputer(cfg)(_drpo_prompts())
    # Correct: 4 * exp((1 - L/100) / 0.1) normalised over the correct ones: weights e^9, e^8.
    e = math.e
    pos = [4 * e / (e + 1), 4 / (e + 1)]
    # Wrong: -4 * softmax(s / 10) over the wrong ones: s = -1, -2.
    q = math.exp(-0.1)
    neg = [-4 / (1 + q), -4 * q / (1 + q)]
    assert res.advantages.tolist() == pytest.approx(pos + neg + [0.0] * 8, abs=1e-12)
    assert res.advantages[:4].tolist() == pytest.approx([2.924234, 1.075766, -2.099917, -1.900083], abs=1e-6)
    # Without scores the softmax over wrong rollouts is uniform.
    shard = _drpo_prompts()
    shard.mean_logprob = None
    assert AdvantageComputer(cfg)(shard).advantages[2:4].tolist() == pytest.approx([-2.0, -2.0], abs=1e-12)


def test_drpo_style_gradient_is_drpos_objective_at_ratio_one():
    """DRPO's objective (the release's compute_policy_loss_drpo, written out by the formula; like it,
    every prompt has the same number of rollouts): per
    prompt with both kinds, J = sum_correct w_i (s_i - tau log sum_wrong exp(s_j / tau)) / sum_correct w,
    loss = -sum J / Q, s = a sequence's mean token log-prob. Its gradient in the token log-probs
    must equal that of a sequence-mean PPO surrogate -(1/B) sum_i A_i s_i at ratio 1."""
    cfg = LeadConfig.for_method("drpo_style", l_min=1.0, l_max=100.0)
    shard = _drpo_prompts()
    lengths = [int(n) for n in shard.length]
    g = torch.Generator().manual_seed(0)
    logp = [(-torch.rand(n, generator=g, dtype=torch.float64)).requires_grad_() for n in lengths]
    s = torch.stack([t.mean() for t in logp])
    shard.mean_logprob = s.detach()
    adv = AdvantageComputer(cfg)(shard).advantages

    Q, B = shard.num_prompts, len(lengths)
    correct = shard.score > 0.5
    objective = 0.0
    for q in range(Q):
        rows = (shard.prompt_index == q).nonzero().flatten()
        pos, neg = rows[correct[rows]], rows[~correct[rows]]
        if len(pos) == 0 or len(neg) == 0:
            continue
        w = torch.exp((1 - shard.length[pos] / cfg.l_max) / cfg.drpo_lambda)
        lse = cfg.drpo_tau * torch.logsumexp(s[neg] / cfg.drpo_tau, 0)
        objective = objective + (w * (s[pos] - lse)).sum() / w.sum()
    drpo_grad = torch.autograd.grad(-objective / Q, logp)
    ours_grad = torch.autograd.grad(-(adv * s).sum() / B, logp)
    for a, b in zip(drpo_grad, ours_grad):
        assert torch.allclose(a, b, rtol=1e-12, atol=1e-15)
    assert any(a.abs().sum() > 0 for a in drpo_grad)


def test_drpo_style_signs_on_random_batches():
    rng = random.Random(11)
    comp = AdvantageComputer(LeadConfig.for_method("drpo_style", l_min=1.0, l_max=400.0))
    for _ in range(20):
        prompts = [([rng.randint(5, 400) for _ in range(8)], [int(rng.random() < 0.5) for _ in range(8)])
                   for _ in range(6)]
        shard = shard_of(prompts)
        shard.mean_logprob = -torch.rand(48, dtype=torch.float64) * 3
        res = comp(shard)
        correct = shard.score > 0.5
        assert (res.advantages[correct] >= 0).all() and (res.advantages[~correct] <= 0).all()
        # Within a mixed prompt the correct ones share +G, the wrong ones -G.
        for q in range(6):
            rows = shard.prompt_index == q
            k = int(correct[rows].sum())
            if 0 < k < 8:
                assert float(res.advantages[rows & correct].sum()) == pytest.approx(8.0)
                assert float(res.advantages[rows & ~correct].sum()) == pytest.approx(-8.0)


def test_renamed_presets_and_bad_weights_are_one_line_errors():
    with pytest.raises(ValueError, match="'sol' is now 'lead_min_target'"):
        LeadConfig.for_method("sol")
    with pytest.raises(ValueError, match="'drpo' is now 'drpo_style'"):
        LeadConfig.for_method("drpo")
    cfg = LeadConfig.for_method("lead_min_target")
    assert (cfg.target, cfg.reward, cfg.normalisation, cfg.weighting) == ("min_correct", "symmetric", "decoupled", "psi")
    with pytest.raises(ValueError, match="static_w_eff"):
        LeadConfig.for_method("static", static_w_eff=-1.0)
    with pytest.raises(ValueError, match="whiten"):
        LeadConfig.for_method("drpo_style", whiten=True)


METHODS_DP = {"shorterbetter": {}, "kimi": {}, "l1_max": dict(global_target=250.0),
              "drpo_style": dict(l_min=1.0, l_max=400.0)}


def _batch(seed=5):
    rng = random.Random(seed)
    prompts = [([rng.randint(5, 400) for _ in range(6)], [int(rng.random() < 0.6) for _ in range(6)])
               for _ in range(5)]
    full = shard_of(prompts)
    full.mean_logprob = torch.tensor([-rng.random() * 3 for _ in range(30)], dtype=torch.float64)
    order = list(range(30))
    rng.shuffle(order)  # a prompt's rollouts end up on both ranks
    return full, order


def _on_rank(rank, world):
    import torch.distributed as dist

    full, order = _batch()
    mine = order[rank::world]
    shard = RolloutShard(prompt_index=full.prompt_index[mine], length=full.length[mine], score=full.score[mine],
                         num_prompts=full.num_prompts, mean_logprob=full.mean_logprob[mine])
    out = {}
    for method, kw in METHODS_DP.items():
        res = AdvantageComputer(LeadConfig.for_method(method, **kw), group=dist.group.WORLD)(shard)
        out[method] = (mine, res.advantages.tolist(), res.metrics)
    return out


def test_two_ranks_equal_one():
    full, _ = _batch()
    for rank_out in run_local(_on_rank, 2, timeout=120):
        for method, kw in METHODS_DP.items():
            want = AdvantageComputer(LeadConfig.for_method(method, **kw))(full)
            mine, adv, metrics = rank_out[method]
            assert adv == pytest.approx(want.advantages[mine].tolist(), abs=1e-12), method
            for k, v in want.metrics.items():
                if k != "lead/collectives":
                    assert metrics[k] == pytest.approx(v, rel=1e-9, abs=1e-12), (method, k)
