"""The PPO + KL policy loss against hand-computed values and a plain per-token reference; issue 20's
options (rollout correction, loss aggregation) by hand, split over shards, and under a known
engine/trainer mismatch where every answer is enumerated (exact expected gradients)."""

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


# ---------------------------------------------------------------- rollout correction (issue 20)

def test_truncated_importance_weights_by_hand():
    """w_t = min(pi_old / pi_rollout, C): ratios 0.5, 1.5, 3 with C = 2 give 0.5, 1.5, 2; the
    first update (ratio pi / pi_old = 1) then has loss -A w_t per token and gradient -A w_t."""
    old = torch.log(torch.tensor([[0.2, 0.3, 0.6, 0.1]]))
    rollout = torch.log(torch.tensor([[0.4, 0.2, 0.2, 0.9]]))
    mask = torch.tensor([[True, True, True, False]])  # the last column is padding
    old[0, 3] = float("nan")
    x = old.clone().requires_grad_(True)
    cfg = LossConfig(kl_type="none", rollout_tis_cap=2.0)
    loss_sum, n, stats = policy_loss(x, old, torch.tensor([1.0]), mask, cfg, rollout_logp=rollout)
    assert n.item() == 3
    assert loss_sum.item() == pytest.approx(-(0.5 + 1.5 + 2.0))
    loss_sum.backward()
    assert x.grad[0].tolist() == pytest.approx([-0.5, -1.5, -2.0, 0.0])
    assert stats["pg_loss"].item() == pytest.approx(-4.0)
    with pytest.raises(ValueError, match="loss.rollout_tis_cap"):
        policy_loss(x.detach(), old, torch.tensor([1.0]), mask, cfg)


def test_sequence_ratio_geometric_and_product_by_hand():
    """Token ratios (2, 2, 1) and (0.25): product 4 and 0.25, geometric 4^(1/3) = 1.587 and 0.25;
    with C = 2 the product masks both rollouts, the geometric mean only the second. A packed
    micro-batch ([1, T], cu_seqlens) gives the same as its padded twin."""
    from megatron_lead.policy.loss import segment_ids, sequence_keep, sequence_log_ratio

    ln2 = math.log(2.0)
    old = torch.tensor([[ln2, ln2, 0.0], [math.log(0.25), 7.0, 7.0]])  # 7.0: padding garbage
    rollout = torch.zeros(2, 3)
    mask = torch.tensor([[True, True, True], [True, False, False]])
    seg, n = segment_ids(mask.shape)
    packed = dict(old=torch.tensor([[ln2, ln2, 0.0, math.log(0.25)]]), rollout=torch.zeros(1, 4),
                  mask=torch.ones(1, 4, dtype=torch.bool))
    pseg, pn = segment_ids((1, 4), torch.tensor([0, 3, 4]))
    assert pseg.tolist() == [[0, 0, 0, 1]] and pn == 2
    for kind, want, keep in (("product", [4.0, 0.25], [False, False]),
                             ("geometric", [4.0 ** (1 / 3), 0.25], [True, False])):
        log_seq, count = sequence_log_ratio(old, rollout, mask, seg, n, kind)
        assert torch.exp(log_seq).tolist() == pytest.approx(want)
        assert count.tolist() == [3.0, 1.0]
        assert sequence_keep(log_seq, 2.0).tolist() == keep
        p_log, _ = sequence_log_ratio(packed["old"], packed["rollout"], packed["mask"], pseg, pn, kind)
        torch.testing.assert_close(p_log, log_seq)
    # [1/C, C] includes its ends: ratio exactly 2 and exactly 1/2 stay.
    assert sequence_keep(torch.log(torch.tensor([2.0, 0.5], dtype=torch.float64)), 2.0).tolist() == [True, True]


# ------------------------------------------------------------------- loss aggregation (issue 20)

# Two rollouts at the first update (ratio 1, so a token's PPO term is -A): A = (2, -1) on 1 and
# 3 loss tokens. N = 4 tokens, B = 2 rollouts, L_norm = 4.
AGG_BY_HAND = {
    "token_mean": ((-2 * 1 + 1 * 3) / 4, [-2 / 4] + [1 / 4] * 3),
    "seq_mean_token_mean": ((-2 / 1 + 3 / 3) / 2, [-2 / 2] + [1 / 6] * 3),
    "seq_mean_token_sum": ((-2 + 3) / 2, [-2 / 2] + [1 / 2] * 3),
    "seq_mean_token_sum_norm": ((-2 + 3) / (2 * 4), [-2 / 8] + [1 / 8] * 3),
}


@pytest.mark.parametrize("mode", list(AGG_BY_HAND))
def test_aggregation_modes_by_hand(mode):
    old = torch.tensor([[-1.0, -1.0, -1.0, -1.0], [-2.0, -1.5, -0.5, -3.0]])
    mask = torch.tensor([[False, True, False, False], [False, True, True, True]])
    x = old.clone().requires_grad_(True)
    cfg = LossConfig(kl_type="none", agg_mode=mode, agg_norm_len=4)
    loss_sum, count, stats = policy_loss(x, old, torch.tensor([2.0, -1.0]), mask, cfg)
    want_loss, want_grad = AGG_BY_HAND[mode]
    (loss_sum / count).backward()
    assert (loss_sum / count).item() == pytest.approx(want_loss)
    assert x.grad[mask].tolist() == pytest.approx(want_grad)
    assert count.item() == (4 if mode == "token_mean" else 2)
    assert stats["num_tokens"].item() == 4 and stats["loss_count"].item() == count.item()


def _packed(t: torch.Tensor, mask: torch.Tensor):
    """Rows up to their last masked column, back to back ([1, T]) with their cu_seqlens."""
    lens = [int(m.nonzero().max()) + 1 for m in mask]
    cu = torch.tensor([0] + lens).cumsum(0)
    return torch.cat([r[:n] for r, n in zip(t, lens)]).unsqueeze(0), cu


@pytest.mark.parametrize("mode", list(AGG_BY_HAND))
def test_every_aggregation_is_global_whatever_the_split(mode):
    """Sums / summed counts over uneven shards (DP ranks or micro-batches), padded or packed,
    equal the whole mini-batch's loss and gradient; the naive mean of shard means does not."""
    cfg = LossConfig(kl_coef=0.01, agg_mode=mode, agg_norm_len=5, entropy_coef=0.01)
    logp, old, ref, ent, adv, mask = _batch()
    x = logp.clone().requires_grad_(True)
    whole, count, _ = policy_loss(x, old, adv, mask, cfg, ref, ent)
    (whole / count).backward()
    whole_grad = x.grad.clone()
    for packed in (False, True):
        x.grad = None
        sums, counts = [], []
        for s in (slice(0, 1), slice(1, 3), slice(3, 4)):
            if packed:
                adv_tok = adv[s].unsqueeze(1).expand(-1, mask.size(1))
                (lp, cu), (o, _), (r, _), (e, _), (a, _), (m, _) = [
                    _packed(t, mask[s]) for t in (x[s], old[s], ref[s], ent[s], adv_tok, mask[s])]
                out = policy_loss(lp, o, a, m, cfg, r, e, cu_seqlens=cu)
            else:
                out = policy_loss(x[s], old[s], adv[s], mask[s], cfg, ref[s], ent[s])
            sums.append(out[0])
            counts.append(out[1])
        (sum(sums) / sum(counts)).backward()
        torch.testing.assert_close((sum(sums) / sum(counts)).detach(), (whole / count).detach())
        torch.testing.assert_close(x.grad, whole_grad)
    naive = sum(s / c for s, c in zip(sums, counts)) / len(sums)
    assert abs(naive.item() - (whole / count).item()) > 1e-4


@pytest.mark.parametrize("bad, key", [
    (dict(agg_mode="sum"), "loss.agg_mode"),
    (dict(agg_mode="seq_mean_token_sum_norm"), "loss.agg_norm_len"),
    (dict(rollout_tis_cap=0.5), "loss.rollout_tis_cap"),
    (dict(rollout_seq_mask=1.0), "loss.rollout_seq_mask"),
    (dict(rollout_seq_ratio="arithmetic"), "loss.rollout_seq_ratio"),
    (dict(overlong_buffer=-1), "loss.overlong_buffer"),
    (dict(overlong_penalty=-0.5), "loss.overlong_penalty"),
])
def test_bad_rl_options_raise_one_line_naming_the_key(bad, key):
    with pytest.raises(ValueError, match=key.replace(".", r"\.")) as err:
        LossConfig(**bad).validate()
    assert "\n" not in str(err.value)


def test_options_are_off_by_default():
    cfg = LossConfig()
    assert (cfg.agg_mode, cfg.rollout_tis_cap, cfg.rollout_seq_mask, cfg.mask_truncated, cfg.overlong_buffer,
            cfg.entropy_coef) == ("token_mean", 0.0, 0.0, False, 0, 0.0)
    assert not cfg.corrects_rollouts and not cfg.masks_rollouts


# ------------------------------------------- the correction under a known mismatch (issue 20)

V, T_TOY = 3, 3


def _toy_expected_gradients(seed: int, engine: str, cap: float, length: int = T_TOY):
    """A tabular autoregressive policy over `length`-token answers from V tokens (one row of
    logits per prefix); the engine samples from other logits ("bf16": the trainer's rounded to
    bf16; "perturbed": plus N(0, 0.3^2) noise). Every answer is enumerated, so each gradient is
    the exact expectation of the first update's token-mean loss: on-policy (answers from the
    trainer: the trainer-consistent gradient), from the engine uncorrected, and from the engine
    with token-level truncated importance sampling. Returns the three gradients and the ratios."""
    import itertools

    g = torch.Generator().manual_seed(seed)
    prefixes = [p for n in range(length) for p in itertools.product(range(V), repeat=n)]
    theta = torch.randn(len(prefixes), V, generator=g, dtype=torch.float64) * (8.0 if engine == "bf16" else 1.0)
    if engine == "bf16":
        eng = theta.to(torch.bfloat16).to(torch.float64)
    else:
        eng = theta + 0.3 * torch.randn(len(prefixes), V, generator=g, dtype=torch.float64)
    answers = list(itertools.product(range(V), repeat=length))
    where = {p: i for i, p in enumerate(prefixes)}
    rows = torch.tensor([[where[y[:t]] for t in range(length)] for y in answers])
    toks = torch.tensor(answers)

    def token_logp(table):
        return table.log_softmax(-1)[rows, toks]

    reward = torch.tensor([sum(t == 0 for t in y) + float(y[-1] == 2) for y in answers], dtype=torch.float64)
    adv = reward - reward.mean()
    rollout = token_logp(eng)
    p_trainer, p_engine = token_logp(theta).sum(1).exp().detach(), rollout.sum(1).exp()
    mask = torch.ones(len(answers), length, dtype=torch.bool)

    def gradient(p_sample, cfg):
        th = theta.clone().requires_grad_(True)
        lp = token_logp(th)
        # Each answer weighted by its sampling probability: the loss is the expectation.
        loss, n, _ = policy_loss(lp, lp.detach(), adv * p_sample * len(answers), mask, cfg, rollout_logp=rollout)
        (loss / n).backward()
        return th.grad

    plain = LossConfig(kl_type="none")
    return (gradient(p_trainer, plain), gradient(p_engine, plain),
            gradient(p_engine, LossConfig(kl_type="none", rollout_tis_cap=cap)),
            (token_logp(theta) - rollout).exp().detach())


def test_correction_is_exact_for_one_token_answers():
    """One-token answers: importance sampling is exact, so with the cap above every ratio the
    engine's corrected gradient IS the trainer's (the weights' expectation under the engine is 1)."""
    true, naive, corrected, ratio = _toy_expected_gradients(0, "perturbed", 1e9, length=1)
    assert (naive - true).norm() > 0.01
    torch.testing.assert_close(corrected, true, atol=1e-12, rtol=0)


@pytest.mark.parametrize("engine, wins, mean_ratio", [("bf16", 20, 0.3), ("perturbed", 18, 0.7)])
def test_correction_moves_the_update_toward_the_trainer_gradient(engine, wins, mean_ratio):
    """Three-token answers, 20 random policies, the engine in bf16 (trainer in fp64) or with
    perturbed weights: the corrected expected gradient is closer to the trainer-consistent one
    than the uncorrected one. Token-level weights fix each token's own sampling distribution,
    not the engine-sampled prefix and suffix around it, so not always (18 of 20 perturbed ones)."""
    errors, clipped = [], 0
    for seed in range(20):
        true, naive, corrected, ratio = _toy_expected_gradients(seed, engine, 2.0)
        errors.append(float((corrected - true).norm() / (naive - true).norm()))
        clipped += int((ratio > 2.0).sum())
        if engine == "bf16":
            assert float((ratio - 1).abs().max()) < 0.1  # a small gap, nothing clipped
    print(engine, clipped, [round(e, 3) for e in errors])
    assert (clipped > 0) == (engine == "perturbed")  # the cap is at work in the perturbed case
    assert sum(e < 1 for e in errors) >= wins
    assert sum(errors) / len(errors) < mean_ratio
