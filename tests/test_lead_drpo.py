"""The DRPO-style preset (lead.method=drpo) against hand-computed values, its sign guarantee,
and the same numbers on 2 data-parallel ranks as on one."""

import math
import random

import pytest
import torch

from lead_shards import shard_of
from megatron_lead.launch import run_local
from megatron_lead.lead import AdvantageComputer, LeadConfig, RolloutShard

EPS = 1e-6  # group_std_eps


def test_drpo_by_hand():
    # One prompt: lengths 10, 20, 30 correct, 40 wrong. Target = shortest correct = 10 (l_min 1),
    # r_eff = 1 - |L - 10| / 10 floored at -1: 1, 0, -1, -1.
    cfg = LeadConfig.for_method("drpo", l_min=1.0, l_max=100.0, drpo_tau=1.0)
    res = AdvantageComputer(cfg)(shard_of([([10, 20, 30, 40], [1, 1, 1, 0])]))
    assert res.targets.tolist() == [10.0]
    assert res.eff_reward.tolist() == pytest.approx([1.0, 0.0, -1.0, -1.0], abs=1e-12)
    # Correctness as GRPO: mean 0.75, unbiased std 0.5 -> (c - 0.75) / (0.5 + 1e-6).
    a_corr = [(c - 0.75) / (0.5 + EPS) for c in (1, 1, 1, 0)]
    # Length bonus over the 3 correct rollouts: 3 * softmax(1, 0, -1).
    s = math.e + 1.0 + 1.0 / math.e
    bonus = [3 * math.e / s, 3 * 1.0 / s, 3 * math.exp(-1) / s, 0.0]
    assert bonus[:3] == pytest.approx([1.995723, 0.734185, 0.270092], abs=1e-6)
    want = [0.5 * a + 0.5 * b for a, b in zip(a_corr, bonus)]
    assert res.advantages.tolist() == pytest.approx(want, abs=1e-12)
    assert res.advantages.tolist() == pytest.approx([1.247861, 0.617092, 0.385045, -0.749999], abs=1e-5)
    assert (res.w_corr, res.w_eff) == (0.5, 0.5)
    # Not whitened: the preset keeps the sign rule.
    assert torch.equal(res.advantages, res.unwhitened)


def test_drpo_all_correct_group_still_prefers_the_short_rollout():
    # All correct: GRPO's correctness advantage is 0, the bonus alone remains, mean 1 * w_eff.
    cfg = LeadConfig.for_method("drpo", l_min=1.0, l_max=100.0, drpo_tau=0.5)
    res = AdvantageComputer(cfg)(shard_of([([20, 30], [1, 1])]))
    # target 20: r_eff 1, 0.5 -> weights 2 * softmax(2, 1)
    e2, e1 = math.exp(2.0), math.exp(1.0)
    assert res.advantages.tolist() == pytest.approx([0.5 * 2 * e2 / (e2 + e1), 0.5 * 2 * e1 / (e2 + e1)],
                                                    abs=1e-12)
    # No correct rollout: the bonus is 0 and the correctness group is constant, so A = 0.
    res = AdvantageComputer(cfg)(shard_of([([20, 30], [0, 0])]))
    assert res.advantages.tolist() == [0.0, 0.0]


def test_correct_rollouts_never_negative_wrong_ones_get_no_length_signal():
    rng = random.Random(11)
    cfg = LeadConfig.for_method("drpo", l_min=5.0, l_max=400.0)
    comp = AdvantageComputer(cfg)
    for _ in range(20):
        prompts = []
        for _ in range(6):
            lengths = [rng.randint(5, 400) for _ in range(8)]
            prompts.append((lengths, [int(rng.random() < 0.5) for _ in range(8)]))
        shard = shard_of(prompts)
        res = comp(shard)
        correct = shard.score > 0.5
        assert (res.advantages[correct] >= 0).all()
        # A wrong rollout's advantage depends on its group's correctness only, not on its length.
        for q in range(6):
            wrong = (~correct) & (shard.prompt_index == q)
            if wrong.any():
                assert torch.allclose(res.advantages[wrong], res.advantages[wrong][0].expand(int(wrong.sum())))


def test_config_rejects_whitening_and_tiny_tau():
    with pytest.raises(ValueError, match="whiten"):
        LeadConfig.for_method("drpo", whiten=True)
    with pytest.raises(ValueError, match="drpo_tau"):
        LeadConfig.for_method("drpo", drpo_tau=0.0)


def _on_rank(rank, world, prompts, order):
    """Rank r holds the rollouts at positions order[r::world] of the batch."""
    import torch.distributed as dist

    full = shard_of(prompts)
    mine = order[rank::world]
    shard = RolloutShard(prompt_index=full.prompt_index[mine], length=full.length[mine],
                         score=full.score[mine], num_prompts=full.num_prompts)
    res = AdvantageComputer(LeadConfig.for_method("drpo", l_min=5.0, l_max=400.0),
                            group=dist.group.WORLD)(shard)
    return mine, res.advantages.tolist(), res.metrics


def test_two_ranks_equal_one():
    rng = random.Random(5)
    prompts = [([rng.randint(5, 400) for _ in range(6)], [int(rng.random() < 0.6) for _ in range(6)])
               for _ in range(5)]
    order = list(range(30))
    rng.shuffle(order)  # a prompt's rollouts end up on both ranks
    want = AdvantageComputer(LeadConfig.for_method("drpo", l_min=5.0, l_max=400.0))(shard_of(prompts))
    for mine, adv, metrics in run_local(_on_rank, 2, prompts, order, timeout=120):
        assert adv == pytest.approx(want.advantages[mine].tolist(), abs=1e-12)
        for k, v in want.metrics.items():
            if k != "lead/collectives":
                assert metrics[k] == pytest.approx(v, rel=1e-9, abs=1e-12), k
        assert metrics["lead/collectives"] == 2.0  # min for the target, one sum for the rest
