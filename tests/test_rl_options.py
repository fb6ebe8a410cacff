"""Issue 20's step-level options without Megatron: group filtering (LEAD-aware) and DAPO's refill,
the rows each DP rank trains after filtering, DAPO's overlong shaping, and their config keys.
All values below are worked out by hand in the comments."""

from __future__ import annotations

import pytest
import torch

from megatron_lead.lead import AdvantageComputer, LeadConfig, RolloutShard
from megatron_lead.lead.config import METHODS
from megatron_lead.rollout.engine import Rollout
from megatron_lead.rollout.step import RolloutBatch, pack_rollouts
from megatron_lead.trainer import filtering
from megatron_lead.trainer.config import build_config, load_config

G = 4
# Six groups of four rollouts: (scores, response lengths), l_min 1, l_max 20.
GROUPS = [
    ([1, 1, 1, 1], [10, 10, 10, 10]),  # 0 all correct, same length: no signal at all
    ([1, 1, 1, 1], [8, 10, 12, 10]),   # 1 all correct, target 10: r_eff 0.8 1 0.8 1 varies
    ([1, 1, 1, 1], [8, 12, 8, 12]),    # 2 all correct, target 10: r_eff 0.8 everywhere, constant
    ([0, 0, 0, 0], [5, 7, 5, 5]),      # 3 all wrong: target l_max 20, r_eff = L / 20 varies
    ([1, 0, 1, 0], [6, 9, 8, 9]),      # 4 mixed: a correctness signal
    ([0, 0, 0, 0], [20, 20, 20, 20]),  # 5 all wrong and all truncated: no signal
]
SCORES = [float(s) for g in GROUPS for s in g[0]]
LENGTHS = [n for g in GROUPS for n in g[1]]


def _lead(**kw) -> LeadConfig:
    return LeadConfig(**{"l_min": 1.0, "l_max": 20.0, **kw})


def test_group_signals_by_hand():
    corr, eff, all_correct = filtering.group_signals(LENGTHS, SCORES, G, _lead())
    assert corr.tolist() == [False, False, False, False, True, False]
    assert eff.tolist() == [False, True, False, True, True, False]
    assert all_correct.tolist() == [True, True, True, False, False, False]
    keep = filtering.keep_groups(LENGTHS, SCORES, G, _lead(), keep_eff_varying=True)
    assert keep.tolist() == [False, True, False, True, True, False]
    dapo = filtering.keep_groups(LENGTHS, SCORES, G, _lead(), keep_eff_varying=False)
    assert dapo.tolist() == [False, False, False, False, True, False]
    # GRPO has no efficiency reward: the switch then changes nothing (DAPO's rule).
    grpo = LeadConfig(method="grpo", **{**METHODS["grpo"], "l_min": 1.0, "l_max": 20.0})
    assert filtering.keep_groups(LENGTHS, SCORES, G, grpo, keep_eff_varying=True).tolist() == dapo.tolist()


def test_dropped_groups_are_exactly_those_without_a_lead_signal():
    """Independent check against LEAD itself: the unwhitened advantage w_corr A_corr + w_eff A_eff
    is exactly 0 on every rollout of a dropped group and not on the kept ones."""
    lead = AdvantageComputer(_lead(whiten=False))
    result = lead(RolloutShard(prompt_index=[i // G for i in range(len(SCORES))], length=LENGTHS, score=SCORES,
                               num_prompts=len(GROUPS)))
    per_group = result.unwhitened.view(len(GROUPS), G)
    keep = filtering.keep_groups(LENGTHS, SCORES, G, _lead(), keep_eff_varying=True)
    for g, kept in enumerate(keep.tolist()):
        assert bool((per_group[g] != 0).any()) == kept, g


def test_select_groups_by_hand():
    keep = torch.tensor([True, False, True, True, False, True, True, True, True])  # kept: 0 2 3 5 6 7 8
    assert filtering.select_groups(keep, limit=4, mini_batch_prompts=2) == [0, 2, 3, 5]
    assert filtering.select_groups(keep, limit=9, mini_batch_prompts=3) == [0, 2, 3, 5, 6, 7]  # 7 -> 6
    assert filtering.select_groups(keep, limit=9, mini_batch_prompts=8) == []  # not one mini-batch


def _rollouts(scores=SCORES, lengths=LENGTHS, max_len=20):
    return [Rollout(prompt_index=i // G, prompt_ids=[1, 2, 3], response_ids=list(range(4, 4 + n)),
                    logprobs=[-1.0] * n, finish_reason="length" if n == max_len else "stop")
            for i, n in enumerate(lengths)]


def _batch(rollouts, rows=None, metrics=None) -> RolloutBatch:
    rows = list(range(len(rollouts))) if rows is None else rows
    mine = [rollouts[i] for i in rows]
    return RolloutBatch(rollouts=mine, rows=rows, all_rollouts=rollouts, metrics=metrics or {},
                        **pack_rollouts(mine, pad_id=0))


def _cfg(**kw):
    values = {"rollout.n": G, "rollout.max_response_len": 20, "lead.l_min": 1, "data.prompts_per_step": 4,
              "ppo.mini_batch_prompts": 1, **kw}
    return build_config(values)


@pytest.mark.parametrize("keep_eff", [True, False])
def test_training_rows_are_the_same_at_every_dp_size(keep_eff):
    """Kept groups 1, 3, 4 (LEAD-aware) or 4 alone (DAPO), limit 4 prompts, 1 group per update:
    every rank runs len(kept) updates, and update k trains the same rollouts with the same
    advantages whether 1, 2 or 4 ranks share it."""
    cfg = _cfg(**{"rollout.filter_groups": True, "rollout.filter_keep_eff_varying": keep_eff})
    union = _batch(_rollouts())  # LEAD's shard: everything (one process)
    lead_adv = torch.arange(len(SCORES), dtype=torch.float64) / 10
    want_groups = [1, 3, 4] if keep_eff else [4]
    per_dp = {}
    for dp in (1, 2, 4):
        ranks = [filtering.training_set(cfg, union, SCORES, lead_adv, 4, 0, None, dp, r) for r in range(dp)]
        assert {out[2] for out in ranks} == {len(want_groups)}  # the same number of updates everywhere
        updates = []
        for k in range(len(want_groups)):
            rows, adv = [], []
            for batch, a, n, _, _ in ranks:
                part = len(batch.rows) // n
                rows += batch.rows[k * part:(k + 1) * part]
                adv += a[k * part:(k + 1) * part].tolist()
            updates.append((sorted(rows), sorted(adv)))
        per_dp[dp] = updates
        m = ranks[0][4]
        assert (m["filter/groups"], m["filter/kept"], m["filter/trained"], m["filter/unused"]) == (
            6.0, float(len(want_groups)), float(len(want_groups)), 0.0)
        assert (m["filter/dropped_all_correct"], m["filter/dropped_all_wrong"]) == (
            (2.0, 1.0) if keep_eff else (3.0, 2.0))
        assert m["filter/kept_for_efficiency"] == (2.0 if keep_eff else 0.0)
    assert per_dp[1] == per_dp[2] == per_dp[4]
    for (rows, adv), g in zip(per_dp[1], want_groups):  # update k: group g's rollouts, LEAD's values
        assert rows == list(range(g * G, g * G + G))
        assert adv == pytest.approx([(g * G + j) / 10 for j in range(G)])


def test_too_few_kept_groups_run_no_update():
    cfg = _cfg(**{"rollout.filter_groups": True, "rollout.filter_keep_eff_varying": False,
                  "ppo.mini_batch_prompts": 2, "data.prompts_per_step": 2})
    batch, adv, updates, _, m = filtering.training_set(cfg, _batch(_rollouts()), SCORES,
                                                       torch.zeros(len(SCORES), dtype=torch.float64), 1, 0)
    assert updates == 0 and batch.tokens.size(0) == 0 and adv.numel() == 0
    assert (m["filter/kept"], m["filter/unused"], m["filter/trained"]) == (1.0, 1.0, 0.0)


def test_overlong_penalty_by_hand():
    # DAPO: 0 up to L_max - buffer = 15, then (15 - L) / 5, so -0.2 at 16, -0.6 at 18, -1 at 20.
    got = filtering.overlong_penalty(torch.tensor([3, 15, 16, 18, 20]), max_len=20, buffer=5, penalty=1.0)
    assert got.tolist() == pytest.approx([0.0, 0.0, -0.2, -0.6, -1.0])
    half = filtering.overlong_penalty(torch.tensor([16, 20]), max_len=20, buffer=5, penalty=0.5)
    assert half.tolist() == pytest.approx([-0.1, -0.5])


def test_overlong_shaping_and_truncation_mask_in_the_training_set():
    """No filtering: this rank's rows are 8..15 (groups 2 and 3); their advantages get the
    punishment of their lengths (buffer 4 before 20: 12 -> 0, 8 -> 0; none above 16 here),
    group 5's truncated rows would get -1. The truncation mask marks rows 20..23 (group 5)."""
    cfg = _cfg(**{"loss.overlong_buffer": 4, "loss.overlong_penalty": 1.0, "loss.mask_truncated": True})
    rollouts = _rollouts()
    rows = list(range(8, 16)) + list(range(20, 24))
    adv = torch.ones(len(rows), dtype=torch.float64)
    batch, out, updates, loss_rows, m = filtering.training_set(cfg, _batch(rollouts, rows), SCORES, adv, 2, 0)
    assert updates == 2 and batch.rows == rows
    assert out.tolist() == pytest.approx([1.0] * 8 + [0.0] * 4)  # 1 + (-1) on the truncated rows
    assert loss_rows.tolist() == [True] * 8 + [False] * 4
    # Over all 24 rollouts: 4 truncated (penalty -1 each), none in (16, 20).
    assert m["overlong/penalty_mean"] == pytest.approx(-4 / 24)
    assert m["overlong/penalized_frac"] == pytest.approx(4 / 24)
    assert m["overlong/masked_frac"] == pytest.approx(4 / 24)


def test_options_off_hand_the_step_through_untouched():
    batch = _batch(_rollouts(), rows=[0, 1, 2, 3])
    adv = torch.tensor([0.5, -0.5, 1.0, -1.0], dtype=torch.float64)
    out = filtering.training_set(_cfg(), batch, SCORES, adv, 4, 0)
    assert out[0] is batch and out[1] is adv and out[2:] == (4, None, {})


def test_merge_rounds_offsets_prompts_and_sums_counts():
    first, second = _rollouts()[:8], _rollouts()[8:16]  # two rounds of 2 prompts x 4
    for r in second:
        r.prompt_index -= 2  # as generated: positions within the round
    rounds = [(_batch(first, [0, 1, 4, 5], {"rollout/generated_sequences": 8.0, "rollout/sync_seconds": 1.0}),
               SCORES[:8], ["ok"] * 8),
              (_batch(second, [0, 1, 4, 5], {"rollout/generated_sequences": 8.0, "rollout/sync_seconds": 2.0}),
               SCORES[8:16], ["wrong"] * 8)]
    batch, scores, reasons = filtering.merge_rounds(rounds, G, pad_id=0)
    assert [r.prompt_index for r in batch.all_rollouts] == [i // G for i in range(16)]
    assert batch.rows == [0, 1, 4, 5, 8, 9, 12, 13]
    assert [r.prompt_index for r in batch.rollouts] == [0, 0, 1, 1, 2, 2, 3, 3]
    assert scores == SCORES[:16] and reasons == ["ok"] * 8 + ["wrong"] * 8
    assert batch.metrics["rollout/generated_sequences"] == 16.0 and batch.metrics["rollout/sync_seconds"] == 3.0
    assert batch.response_lens.tolist() == [LENGTHS[i] for i in batch.rows]


def test_refill_asks_for_rounds_until_full_or_the_limit():
    cfg = _cfg(**{"rollout.filter_groups": True, "rollout.filter_keep_eff_varying": False,
                  "rollout.refill_max_rounds": 2, "data.prompts_per_step": 2, "ppo.mini_batch_prompts": 1})
    mixed = ([1.0, 0.0, 1.0, 0.0] * 2, [5] * 8)  # two groups with a signal
    flat = ([1.0] * 8, [5] * 8)                  # two without
    one = lambda s, n: (_batch(_rollouts(s, n)), s, [])  # noqa: E731
    assert filtering.wants_refill(cfg, [one(*flat)])
    assert not filtering.wants_refill(cfg, [one(*mixed)])  # 2 kept: full
    assert filtering.wants_refill(cfg, [one(*flat), one(*flat)])
    assert not filtering.wants_refill(cfg, [one(*flat)] * 3)  # 1 + 2 rounds: the limit
    assert not filtering.wants_refill(_cfg(), [one(*flat)])  # filtering off


def test_rl_option_keys_validate_with_one_line_naming_the_key(tmp_path):
    for overrides, key in ((["rollout.refill_max_rounds=2"], "rollout.refill_max_rounds"),
                           (["rollout.filter_groups=true", "rollout.refill_max_rounds=-1"], "rollout.refill_max_rounds"),
                           (["loss.overlong_buffer=8000"], "loss.overlong_buffer"),
                           (["loss.agg_mode=sum"], "loss.agg_mode"),
                           (["loss.rollout_tis_cap=0.9"], "loss.rollout_tis_cap"),
                           (["loss.rollout_seq_ratio=mean"], "loss.rollout_seq_ratio")):
        with pytest.raises(ValueError, match=key.replace(".", r"\.")) as err:
            load_config(None, overrides).validate(check_paths=False)
        assert "\n" not in str(err.value)


def test_defaults_leave_leads_runs_unchanged():
    cfg = load_config(None, ["rollout.max_response_len=400"])
    assert (cfg.rollout.filter_groups, cfg.rollout.refill_max_rounds) == (False, 0)
    assert (cfg.loss.agg_mode, cfg.loss.rollout_tis_cap, cfg.loss.rollout_seq_mask, cfg.loss.mask_truncated,
            cfg.loss.overlong_buffer, cfg.loss.entropy_coef) == ("token_mean", 0.0, 0.0, False, 0, 0.0)
    assert cfg.loss.agg_norm_len == 400  # Dr. GRPO's constant: the generation budget unless set
    assert load_config(None, ["loss.agg_norm_len=1000"]).loss.agg_norm_len == 1000
