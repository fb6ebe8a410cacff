"""The PPO + KL policy loss against hand-computed values and a plain per-token reference."""

import math

import pytest
import torch

from megatron_lead.policy.loss import LossConfig, kl_to_reference, policy_loss


def _batch(seed=0, b=4, s=7):
    g = torch.Generator().manual_seed(seed)
    old = -torch.rand(b, s, generator=g) * 3
    logp = old + 0.4 * torch.randn(b, s, generator=g)  # ratios spread over both clip edges
    ref = old + 0.3 * torch.randn(b, s, generator=g)
    ent = torch.rand(b, s, generator=g) * 2
    adv = torch.randn(b, generator=g)
    mask = torch.zeros(b, s, dtype=torch.bool)
    for i, (start, end) in enumerate([(2, 7), (3, 5), (1, 7), (4, 6)][:b]):
        mask[i, start:end] = True
    old[~mask] = float("nan")  # padding garbage must not leak into the loss or the gradient
    return logp, old, ref, ent, adv, mask


def _plain_reference(logp, old, ref, ent, adv, mask, cfg):
    """Token by token, as the spec words it; returns (token-mean loss, d loss / d logp)."""
    x = logp.clone().requires_grad_(True)
    terms = []
    for i in range(x.size(0)):
        for t in range(x.size(1)):
            if not mask[i, t]:
                continue
            ratio = torch.exp(x[i, t] - old[i, t])
            a = adv[i]
            surrogate = torch.min(ratio * a, torch.clamp(ratio, 1 - cfg.eps_low, 1 + cfg.eps_high) * a)
            d = x[i, t] - ref[i, t]
            kl = 0.5 * d * d if cfg.kl_type == "mse" else torch.exp(-d) + d - 1
            terms.append(-surrogate + cfg.kl_coef * kl - cfg.entropy_coef * ent[i, t])
    loss = torch.stack(terms).mean()
    loss.backward()
    return loss.detach(), x.grad


def _ours(logp, old, ref, ent, adv, mask, cfg):
    x = logp.clone().requires_grad_(True)
    loss_sum, n, stats = policy_loss(x, old, adv, mask, cfg, ref_logp=ref, entropy=ent)
    (loss_sum / n).backward()
    return (loss_sum / n).detach(), x.grad, n, stats


def test_hand_computed_tokens():
    # Two tokens, advantage +1: ratio 1.5 is clipped to 1.2 (no gradient), ratio 0.5 is not.
    old = torch.zeros(1, 2)
    x = torch.tensor([[math.log(1.5), math.log(0.5)]], requires_grad=True)
    cfg = LossConfig(kl_type="none")
    loss_sum, n, stats = policy_loss(x, old, torch.tensor([1.0]), torch.ones(1, 2), cfg)
    assert n.item() == 2
    assert loss_sum.item() == pytest.approx(-1.2 - 0.5)
    loss_sum.backward()
    # d(-A * ratio)/d logp = -A * ratio for the unclipped token, 0 for the clipped one.
    assert x.grad[0].tolist() == pytest.approx([0.0, -0.5])
    assert stats["clip_frac"].item() == 1.0
    assert stats["ppo_kl"].item() == pytest.approx(-(math.log(1.5) + math.log(0.5)))
    # Negative advantage: the lower edge (ratio 0.5 -> 0.8) clips, the upper one does not.
    loss_sum, _, stats = policy_loss(x.detach(), old, torch.tensor([-1.0]), torch.ones(1, 2), cfg)
    assert loss_sum.item() == pytest.approx(1.5 + 0.8)
    assert stats["clip_frac"].item() == 1.0


def test_kl_types_by_hand():
    logp, ref = torch.tensor([-1.0, -2.0]), torch.tensor([-1.5, -1.0])
    # mse: 0.5 (logp - ref)^2 = 0.5 * 0.25, 0.5 * 1
    assert kl_to_reference(logp, ref, "mse").tolist() == pytest.approx([0.125, 0.5], rel=1e-6)
    # k3 with d = ref - logp = (-0.5, 1): exp(d) - d - 1 = e^-0.5 - 0.5 = 0.1065307, e - 2 = 0.7182818
    assert kl_to_reference(logp, ref, "k3").tolist() == pytest.approx([0.10653066, 0.71828183], rel=1e-6)


@pytest.mark.parametrize("cfg", [
    LossConfig(),                                                   # paper: 0.2/0.2, mse, 5e-4
    LossConfig(eps_high=0.28, kl_type="k3", kl_coef=0.1, entropy_coef=0.01),
])
def test_matches_plain_reference(cfg):
    batch = _batch()
    want_loss, want_grad = _plain_reference(*batch, cfg)
    loss, grad, n, stats = _ours(*batch, cfg)
    assert n.item() == int(batch[-1].sum())
    torch.testing.assert_close(loss, want_loss, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(grad, want_grad, atol=1e-7, rtol=1e-6)
    assert torch.isfinite(grad).all()
    assert 0 < stats["clip_frac"].item() < n.item()  # the batch exercises both branches
    assert stats["loss"].item() / n.item() == pytest.approx(loss.item(), rel=1e-6)


def test_token_mean_over_global_batch_does_not_depend_on_the_split():
    """Sums / global count over uneven shards (DP ranks or micro-batches) == the whole batch."""
    cfg = LossConfig(kl_coef=0.01)
    logp, old, ref, ent, adv, mask = _batch()
    whole_loss, whole_grad, n, _ = _ours(logp, old, ref, ent, adv, mask, cfg)
    x = logp.clone().requires_grad_(True)
    shards = [slice(0, 1), slice(1, 4)]  # 5 tokens vs 11 tokens
    sums, counts = zip(*[policy_loss(x[s], old[s], adv[s], mask[s], cfg, ref[s], ent[s])[:2] for s in shards])
    global_n = sum(counts)
    (sum(sums) / global_n).backward()
    torch.testing.assert_close(sum(sums).detach() / global_n, whole_loss)
    torch.testing.assert_close(x.grad, whole_grad)
    # The per-shard mean (what a naive DP average gives) is different here: the test can fail.
    per_shard_mean = sum(s / c for s, c in zip(sums, counts)) / len(shards)
    assert abs(per_shard_mean.item() - whole_loss.item()) > 1e-4


def test_bad_settings_raise_value_error():
    with pytest.raises(ValueError, match="kl_type"):
        LossConfig(kl_type="k2").validate()
    with pytest.raises(ValueError, match="reference log-probs"):
        policy_loss(torch.zeros(1, 2), torch.zeros(1, 2), torch.ones(1), torch.ones(1, 2), LossConfig())
