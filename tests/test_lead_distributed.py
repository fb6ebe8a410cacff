"""LEAD statistics over a gloo data-parallel group equal the single-process numbers."""

import json
from dataclasses import asdict
from pathlib import Path

import pytest

from megatron_lead import replay
from megatron_lead.launch import run_local
from megatron_lead.lead import LeadConfig

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "replay" / "rollouts.jsonl"
# One method per kind of target reduction: sum (mean), min (SOL), gather (median), plus the
# combined normalisation and a static-weight baseline.
METHODS = ["lead", "lead_min_target", "lead_median", "grpo_combined", "budget"]


def _all_methods_on_rank(rank, world_size, steps, cfg_dicts, seed):
    return [replay.replay_rank(rank, world_size, steps, c, seed) for c in cfg_dicts]


@pytest.fixture(scope="module")
def steps():
    return replay.read_steps(EXAMPLE)[:6]


@pytest.mark.parametrize("world_size", [2, 4])
def test_ranks_match_single_process(steps, world_size):
    cfgs = [LeadConfig.for_method(m) for m in METHODS]
    per_rank = run_local(_all_methods_on_rank, world_size, steps, [asdict(c) for c in cfgs], 5)

    # The split really spreads a prompt's rollouts over ranks.
    owners = {}
    for r in range(world_size):
        for q, _ in per_rank[r][0][0]["positions"]:
            owners.setdefault(q, set()).add(r)
    assert sum(len(o) > 1 for o in owners.values()) > len(owners) // 2

    for m, cfg in enumerate(cfgs):
        got = replay.merge_ranks(steps, [per_rank[r][m] for r in range(world_size)])
        want = replay.replay(steps, cfg, ranks=1)
        for g, w in zip(got, want):
            assert g["w_corr"] == pytest.approx(w["w_corr"], abs=1e-6)
            assert g["w_eff"] == pytest.approx(w["w_eff"], abs=1e-6)
            for pid in w["targets"]:
                assert g["targets"][pid] == pytest.approx(w["targets"][pid], abs=1e-6)
                assert g["advantages"][pid] == pytest.approx(w["advantages"][pid], abs=1e-6)
            for k, v in w["metrics"].items():
                assert g["metrics"][k] == pytest.approx(v, rel=1e-9, abs=1e-9), k
        # one collective for the targets (none for a global one), one for everything else
        want_calls = 1 if cfg.target == "global" else 2
        assert per_rank[0][m][0]["metrics"]["lead/collectives"] == want_calls


def test_replay_cli_ranks_flag(tmp_path, steps):
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps(s) + "\n" for s in steps[:3]))
    outs = {}
    for n in (1, 2):
        out = tmp_path / f"out{n}.jsonl"
        assert replay_main(["replay", str(src), "--out", str(out), "--ranks", str(n), "--split-seed", "3"]) == 0
        outs[n] = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(outs[1]) == 3 and set(outs[1][0]) >= {"step", "w_corr", "w_eff", "w_corr_ema", "targets", "advantages"}
    for a, b in zip(outs[1], outs[2]):
        assert a["w_corr"] == pytest.approx(b["w_corr"], abs=1e-6)
        for pid, adv in a["advantages"].items():
            assert b["advantages"][pid] == pytest.approx(adv, abs=1e-6)


def replay_main(argv):
    from megatron_lead.cli import main

    return main(argv)
