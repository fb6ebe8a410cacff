"""Issue 20's loss options through Megatron: each aggregation mode, the rollout correction and the
masks give the same update at DP=1 (TP=2, two padded micro-batches) as at DP=2 (one row per
micro-batch, or packed micro-batches sized by tokens), with the loss and the correction's
metrics worked out by hand; and group filtering's rows and advantages at DP=2 equal one process's.

One spawn of two processes runs every layout and case: each case starts from the same weights
(SGD, lr 1, no momentum, no clipping: the update is minus the gradient) and takes one update
through the real PPO phase (trainer.ppo.mini_batches, old_logprob_pass, rollout_correction_pass,
ppo_update). The rollout engine is an HF copy of the policy with one perturbed weight matrix
(`_engine_logprobs`): its sampling log-probs differ from the trainer's by a known, uneven gap.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from megatron_lead.launch import run_local

pytestmark = pytest.mark.slow

VOCAB = 200
# (prompt length, response length) of the mini-batch's 8 rollouts: N = 52 response tokens.
ROWS = [(3, 9), (5, 2), (2, 6), (4, 7), (6, 4), (3, 11), (5, 5), (2, 8)]
ADV = [1.0, -0.5, 0.8, -1.2, 0.3, -0.7, 1.5, -0.2]
TRUNCATED = {1}
NORM = 16  # L_norm of seq_mean_token_sum_norm
TIS_CAP, SEQ_CAP = 1.3, 1.1
# layout: (TP, pack, micro_batch_size, max_tokens_per_micro_batch); DP = 2 / TP.
LAYOUTS = {"dp1_tp2": (2, False, 4, 0), "dp2": (1, False, 1, 0), "dp2_packed": (1, True, 1, 16)}
AGG = ("token_mean", "seq_mean_token_mean", "seq_mean_token_sum", "seq_mean_token_sum_norm")


def _hf_config():
    import transformers

    return transformers.Qwen2Config(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=True, rms_norm_eps=1e-6,
        rope_theta=10000.0)


def _sequences() -> list[list[int]]:
    g = torch.Generator().manual_seed(0)
    return [torch.randint(0, VOCAB, (p + r,), generator=g).tolist() for p, r in ROWS]


def _engine_logprobs(hf) -> list[list[float]]:
    """Sampling log-probs of every response token under the policy with its second MLP's
    down-projection perturbed (0.5 of its std, a fixed seed): the engine/trainer gap."""
    import copy

    engine = copy.deepcopy(hf)
    with torch.no_grad():
        w = engine.model.layers[1].mlp.down_proj.weight
        w.add_(0.5 * w.std() * torch.randn(w.shape, generator=torch.Generator().manual_seed(1)))
        out = []
        for (p, r), seq in zip(ROWS, _sequences()):
            logp = engine(torch.tensor([seq])).logits[0].float().log_softmax(-1)
            out.append(logp[p - 1:p + r - 1].gather(-1, torch.tensor(seq[p:])[:, None])[:, 0].tolist())
    return out


def _rollout_batch(engine: list[list[float]], rows: list[int]):
    from megatron_lead.rollout.engine import Rollout
    from megatron_lead.rollout.step import RolloutBatch, pack_rollouts

    seqs = _sequences()
    everything = [Rollout(prompt_index=i, prompt_ids=s[:p], response_ids=s[p:], logprobs=engine[i],
                          finish_reason="length" if i in TRUNCATED else "stop")
                  for i, ((p, _), s) in enumerate(zip(ROWS, seqs))]
    mine = [everything[i] for i in rows]
    return RolloutBatch(rollouts=mine, rows=rows, all_rollouts=everything, **pack_rollouts(mine, pad_id=0))


def _cases():
    """name -> (LossConfig kwargs, advantages, mask truncated rows, mask every row)."""
    from megatron_lead.policy.loss import LossConfig

    base = dict(kl_type="none", compute_entropy=False, agg_norm_len=NORM)
    n = sum(r for _, r in ROWS)
    cases = {m: (LossConfig(**base, agg_mode=m), ADV, False, False) for m in AGG}
    # token_mean with A'_i = A_i N / (B L_i) has seq_mean_token_mean's gradient (module test).
    cases["token_mean_rescaled"] = (LossConfig(**base), [a * n / (len(ROWS) * r) for a, (_, r) in zip(ADV, ROWS)],
                                    False, False)
    cases["tis"] = (LossConfig(**base, rollout_tis_cap=TIS_CAP), ADV, False, False)
    cases["masks"] = (LossConfig(**base, agg_mode="seq_mean_token_mean", rollout_seq_mask=SEQ_CAP,
                                 rollout_seq_ratio="geometric", mask_truncated=True), ADV, True, False)
    cases["empty"] = (LossConfig(**base, mask_truncated=True), ADV, True, True)
    return cases


def _layout(rank, tp, pack, mbs, max_tokens, ckpt, hf_dir, engine) -> dict:
    from megatron.core import parallel_state

    from megatron_lead.policy.convert.checkpoint import load_megatron_checkpoint
    from megatron_lead.policy.convert.gather import iter_hf_weights
    from megatron_lead.policy.model import build_model
    from megatron_lead.policy.optim import OptimConfig, build_optimizer, wrap_ddp
    from megatron_lead.policy.parallel import destroy_parallel, init_parallel
    from megatron_lead.rollout.step import data_parallel_rows
    from megatron_lead.trainer.ppo import mini_batches, old_logprob_pass, ppo_update, rollout_correction_pass

    init_parallel(tp, 1)
    model = build_model(hf_dir, init_weights=False)
    load_megatron_checkpoint(model, ckpt)
    cfg = OptimConfig(optimizer="sgd", sgd_momentum=0.0, lr=1.0, weight_decay=0.0, clip_grad=0.0)
    model = wrap_ddp(model, cfg)
    optimizer, scheduler = build_optimizer(model, cfg)
    params = [p for chunk in model for p in chunk.parameters()]
    start = [p.detach().clone() for p in params]

    def flat():
        return torch.cat([t.reshape(-1).double() for _, t in sorted(iter_hf_weights(model))])

    w0 = flat()
    dp, dp_rank = parallel_state.get_data_parallel_world_size(), parallel_state.get_data_parallel_rank()
    rows = data_parallel_rows(len(ROWS), 1, dp, dp_rank)
    batch = _rollout_batch(engine, rows)
    out = {}
    for name, (loss_cfg, adv, mask_truncated, mask_all) in _cases().items():
        loss_rows = None
        if mask_truncated:
            loss_rows = torch.zeros(len(rows), dtype=torch.bool) if mask_all else ~batch.truncated
        batches = mini_batches(batch, torch.tensor(adv)[rows], 1, mbs, pack=pack, max_tokens=max_tokens,
                               loss_rows=loss_rows)
        old_logprob_pass(model, batches, 1.0)
        corr = rollout_correction_pass(batches, loss_cfg)
        metrics = ppo_update(model, optimizer, scheduler, batches, loss_cfg, epochs=1)
        update = (w0 - flat()).numpy()
        out[name] = dict(metrics={**metrics, **corr}, update=update if rank == 0 else None,
                         micro_batches=len(batches[0]))
        if name == "token_mean" and not pack:  # Megatron's pi_old, for the hand computations
            out["old"] = [mb.old_logprobs.numpy() for mb in batches[0]]
            out["rows"] = rows
        with torch.no_grad():
            for p, s in zip(params, start):
                p.copy_(s)
    destroy_parallel()
    return out


def _filtering_at_dp2(rank) -> dict:
    """LEAD on its usual DP shards of test_rl_options' six groups (3 mini-batches of 2 groups:
    rank 0 holds groups 0, 2, 4 and rank 1 groups 1, 3, 5), then training_set at DP=2."""
    from megatron.core import parallel_state

    from megatron_lead.lead import AdvantageComputer, RolloutShard
    from megatron_lead.policy.parallel import destroy_parallel, init_parallel
    from megatron_lead.rollout.step import data_parallel_rows
    from megatron_lead.trainer.filtering import training_set
    from test_rl_options import GROUPS, SCORES, _batch, _cfg, _lead, _rollouts

    init_parallel(1, 1)
    group = parallel_state.get_data_parallel_group()
    rows = data_parallel_rows(len(SCORES), 3, 2, rank)
    batch = _batch(_rollouts(), rows)
    result = AdvantageComputer(_lead(), group=group)(RolloutShard(
        prompt_index=[r.prompt_index for r in batch.rollouts], length=batch.response_lens,
        score=[SCORES[i] for i in rows], num_prompts=len(GROUPS)))
    cfg = _cfg(**{"rollout.filter_groups": True, "data.prompts_per_step": 6, "ppo.mini_batch_prompts": 2})
    train, adv, updates, _, metrics = training_set(cfg, batch, SCORES, result.advantages, 3, 0, group, 2, rank)
    destroy_parallel()
    return dict(rows=train.rows, adv=adv.tolist(), updates=updates, metrics=metrics)


def _spawned(rank, world, ckpts, hf_dir, engine):
    out = {name: _layout(rank, tp, pack, mbs, max_tokens, ckpts[tp], hf_dir, engine)
           for name, (tp, pack, mbs, max_tokens) in LAYOUTS.items()}
    out["filtering"] = _filtering_at_dp2(rank)
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    import transformers

    from megatron_lead.policy.convert.checkpoint import hf_to_megatron

    root = tmp_path_factory.mktemp("rl_options")
    hf_dir = str(root / "hf")
    torch.manual_seed(0)
    hf = transformers.Qwen2ForCausalLM(_hf_config()).eval()
    with torch.no_grad():  # sharper than HF's init (std 0.02): uneven log-probs
        for p in hf.parameters():
            if p.dim() == 2:
                p.mul_(5.0)
    hf.save_pretrained(hf_dir)
    ckpts = {}
    for tp in (1, 2):
        ckpts[tp] = str(root / f"tp{tp}")
        hf_to_megatron(hf_dir, ckpts[tp], tp=tp)
    engine = _engine_logprobs(hf)
    results = run_local(_spawned, 2, ckpts, hf_dir, engine)
    return dict(ranks=results, rank0=results[0], engine=engine)


def _old(runs) -> list[list[float]]:
    """Megatron's pi_old log-probs of each rollout's response tokens (DP=1, padded)."""
    old = np.concatenate(runs["rank0"]["dp1_tp2"]["old"])
    return [old[i, p:p + r].tolist() for i, (p, r) in enumerate(ROWS)]


@pytest.mark.parametrize("case", list(_cases()))
def test_every_case_updates_the_same_at_dp1_and_dp2(runs, case):
    base = runs["rank0"]["dp1_tp2"][case]
    assert base["micro_batches"] == 2
    for layout in ("dp2", "dp2_packed"):
        other = runs["rank0"][layout][case]
        np.testing.assert_allclose(other["update"], base["update"], atol=2e-6, rtol=1e-5, err_msg=layout)
        for key, value in base["metrics"].items():
            assert other["metrics"][key] == pytest.approx(value, rel=1e-5, abs=1e-6), (layout, key)
    assert runs["rank0"]["dp2"][case]["micro_batches"] == 4  # one row per micro-batch on each rank
    # Packs of at most 16 tokens: 12 | 7 + 8 | 11 on rank 0, 10 | 14 | 10 | 10 on rank 1; rows out
    # of the loss shrink to one token each (one pack per rank when every row is out).
    want = [1, 1] if case == "empty" else [3, 4]
    assert [r["dp2_packed"][case]["micro_batches"] for r in runs["ranks"]] == want


def test_aggregation_losses_and_gradients_by_hand(runs):
    """At the first update the ratio is 1, so a token's loss is -A_i: the aggregated losses follow
    from A and the lengths L_i alone; and the gradients are related by hand-derived factors:
    seq_mean_token_sum = token_mean * N / B, the norm mode = that / L_norm, and seq_mean_token_mean
    = token_mean with A'_i = A_i N / (B L_i)."""
    r = runs["rank0"]["dp1_tp2"]
    lengths = [n for _, n in ROWS]
    n, b = sum(lengths), len(ROWS)
    want = {"token_mean": -sum(a * L for a, L in zip(ADV, lengths)) / n,
            "seq_mean_token_mean": -sum(ADV) / b,
            "seq_mean_token_sum": -sum(a * L for a, L in zip(ADV, lengths)) / b,
            "seq_mean_token_sum_norm": -sum(a * L for a, L in zip(ADV, lengths)) / (b * NORM)}
    for mode, loss in want.items():
        assert r[mode]["metrics"]["train/loss"] == pytest.approx(loss, rel=1e-5), mode
        assert r[mode]["metrics"]["train/tokens"] == n
    g = {k: r[k]["update"] for k in list(want) + ["token_mean_rescaled"]}
    assert np.abs(g["token_mean"]).max() > 1e-4
    np.testing.assert_allclose(g["seq_mean_token_sum"], g["token_mean"] * n / b, atol=1e-6, rtol=1e-4)
    np.testing.assert_allclose(g["seq_mean_token_sum_norm"], g["seq_mean_token_sum"] / NORM, atol=1e-7, rtol=1e-4)
    np.testing.assert_allclose(g["seq_mean_token_mean"], g["token_mean_rescaled"], atol=1e-6, rtol=1e-4)


def test_rollout_correction_weights_and_loss_by_hand(runs):
    """The perturbed engine against Megatron's pi_old: token ratios, their truncation at C = 1.3
    and the loss sum_i sum_t -A_i min(ratio, C) / N, computed here token by token."""
    old, engine = _old(runs), runs["engine"]
    ratios = [[math.exp(o - e) for o, e in zip(orow, erow)] for orow, erow in zip(old, engine)]
    flat = [x for row in ratios for x in row]
    m = runs["rank0"]["dp1_tp2"]["tis"]["metrics"]
    clipped = sum(x > TIS_CAP for x in flat)
    assert 0 < clipped < len(flat) // 4  # the cap is at work, on a few tokens
    assert m["rollout_corr/tis_clipped_frac"] == pytest.approx(clipped / len(flat), abs=1e-9)
    assert m["rollout_corr/token_ratio_mean"] == pytest.approx(sum(flat) / len(flat), rel=1e-5)
    assert m["rollout_corr/token_ratio_max"] == pytest.approx(max(flat), rel=1e-5)
    assert m["rollout_corr/tis_weight_mean"] == pytest.approx(sum(min(x, TIS_CAP) for x in flat) / len(flat), rel=1e-5)
    loss = -sum(a * min(x, TIS_CAP) for a, row in zip(ADV, ratios) for x in row) / len(flat)
    assert m["train/loss"] == pytest.approx(loss, rel=1e-5)


def test_sequence_mask_and_truncation_mask_by_hand(runs):
    """Geometric sequence ratios against [1/1.1, 1.1] and the truncated row 1 leave the loss
    (numerator and count): seq_mean_token_mean over the rest is -mean(A_i) of the kept rows."""
    old, engine = _old(runs), runs["engine"]
    geo = [math.exp(sum(o - e for o, e in zip(orow, erow)) / len(orow)) for orow, erow in zip(old, engine)]
    outside = {i for i, x in enumerate(geo) if not 1 / SEQ_CAP <= x <= SEQ_CAP}
    assert all(abs(abs(math.log(x)) - math.log(SEQ_CAP)) > 1e-3 for x in geo)  # no near-tie at the bounds
    masked = outside - TRUNCATED  # the truncated row is out before the correction looks
    kept = [i for i in range(len(ROWS)) if i not in outside | TRUNCATED]
    assert 0 < len(masked) and len(kept) >= 3
    m = runs["rank0"]["dp1_tp2"]["masks"]["metrics"]
    assert m["rollout_corr/seq_masked_frac"] == pytest.approx(len(masked) / (len(ROWS) - len(TRUNCATED)))
    present = [x for i, x in enumerate(geo) if i not in TRUNCATED]
    assert m["rollout_corr/seq_ratio_max"] == pytest.approx(max(present), rel=1e-5)
    assert m["rollout_corr/seq_ratio_min"] == pytest.approx(min(present), rel=1e-5)
    assert m["train/loss"] == pytest.approx(-sum(ADV[i] for i in kept) / len(kept), rel=1e-5)
    assert m["train/tokens"] == sum(ROWS[i][1] for i in kept)
    assert m["train/empty_updates"] == 0.0


def test_a_mini_batch_without_loss_tokens_takes_no_update(runs):
    m = runs["rank0"]["dp1_tp2"]["empty"]
    assert m["metrics"]["train/empty_updates"] == 1.0 and m["metrics"]["train/tokens"] == 0.0
    assert np.abs(m["update"]).max() == 0.0


def test_group_filtering_at_dp2_equals_one_process(runs):
    """Kept groups 1, 3, 4 (test_rl_options), 2 groups per update: one update of groups 1 and 3,
    group 4 unused. Rank 0 trains group 1, whose LEAD advantages rank 1 computed: they arrive by
    the all-reduce, and the update's rollouts and advantages are one process's."""
    from megatron_lead.lead import AdvantageComputer, RolloutShard
    from megatron_lead.trainer.filtering import training_set
    from test_rl_options import GROUPS, SCORES, _batch, _cfg, _lead, _rollouts

    batch = _batch(_rollouts())
    result = AdvantageComputer(_lead())(RolloutShard(prompt_index=[i // 4 for i in range(len(SCORES))],
                                                     length=batch.response_lens, score=SCORES,
                                                     num_prompts=len(GROUPS)))
    cfg = _cfg(**{"rollout.filter_groups": True, "data.prompts_per_step": 6, "ppo.mini_batch_prompts": 2})
    one, adv, updates, _, metrics = training_set(cfg, batch, SCORES, result.advantages, 3, 0)
    two = [r["filtering"] for r in runs["ranks"]]
    assert updates == 1 and one.rows == list(range(4, 8)) + list(range(12, 16))
    assert [t["updates"] for t in two] == [1, 1] and all(t["metrics"] == metrics for t in two)
    assert metrics["filter/unused"] == 1.0
    assert [t["rows"] for t in two] == [list(range(4, 8)), list(range(12, 16))]
    got = {row: a for t in two for row, a in zip(t["rows"], t["adv"])}
    assert any(abs(a) > 0.1 for a in got.values())
    for row, a in zip(one.rows, adv.tolist()):
        assert got[row] == pytest.approx(a, abs=1e-9)
