"""`megatron-lead replay`: output format, paper defaults, and one-line errors on bad input."""

import json
import subprocess
import sys

import pytest

import lead_reference as ref
from megatron_lead.cli import main

GOOD = {"step": 0, "prompts": [{"id": "a", "lengths": [1200, 2000, 3000, 500], "correct": [1, 1, 0, 0]},
                               {"id": "b", "lengths": [900, 4000], "correct": [0, 0]}]}


def write(tmp_path, lines):
    p = tmp_path / "in.jsonl"
    p.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    return p


def test_output_matches_reference(tmp_path):
    second = {"step": 1, "prompts": [{"id": "a", "lengths": [1000, 1100], "correct": [1, 1]}]}
    src, out = write(tmp_path, [GOOD, second]), tmp_path / "out.jsonl"
    assert main(["replay", str(src), "--out", str(out)]) == 0
    recs = [json.loads(line) for line in out.read_text().splitlines()]
    psi = ref.NaivePSI()
    for rec, step in zip(recs, [GOOD, second]):
        prompts = [(p["lengths"], p["correct"]) for p in step["prompts"]]
        w_c, w_e, targets, advs = ref.lead_step(prompts, psi)
        assert rec["step"] == step["step"]
        assert (rec["w_corr"], rec["w_eff"]) == pytest.approx((w_c, w_e), abs=1e-12)
        assert rec["w_corr_ema"] == pytest.approx(psi.w[0], abs=1e-12)
        assert list(rec["targets"].values()) == pytest.approx(targets)
        for p, want in zip(step["prompts"], advs):
            assert rec["advantages"][p["id"]] == pytest.approx(want, abs=1e-6)
    assert recs[0]["targets"] == {"a": 1600.0, "b": 8000.0}


def test_flags_reach_the_computation(tmp_path):
    src, out = write(tmp_path, [GOOD]), tmp_path / "o.jsonl"
    assert main(["replay", str(src), "--out", str(out), "--l-max", "4000", "--method", "static",
                 "--static-w-corr", "0.7"]) == 0
    rec = json.loads(out.read_text())
    assert rec["targets"]["b"] == 4000.0 and rec["w_corr"] == 0.7 and rec["w_corr_ema"] is None


def test_grpo_is_unwhitened_and_whiten_is_a_switch(tmp_path):
    """--method grpo writes the group-normalised correctness (the release's baseline, no
    whitening); --whiten turns whitening on for it, --no-whiten off for LEAD."""
    from test_lead_core import GRPO_BATCH, GRPO_BY_HAND, grpo_whitened_by_hand

    step = {"step": 0, "prompts": [{"id": f"q{i}", "lengths": ls, "correct": cs}
                                   for i, (ls, cs) in enumerate(GRPO_BATCH)]}
    src = write(tmp_path, [step])

    def advantages(*flags):
        out = tmp_path / "o.jsonl"
        assert main(["replay", str(src), "--out", str(out), *flags]) == 0
        rec = json.loads(out.read_text())
        return [a for p in step["prompts"] for a in rec["advantages"][p["id"]]]

    assert advantages("--method", "grpo") == pytest.approx(GRPO_BY_HAND, abs=1e-12)
    assert advantages("--method", "grpo", "--no-whiten") == pytest.approx(GRPO_BY_HAND, abs=1e-12)
    assert advantages("--method", "grpo", "--whiten") == pytest.approx(grpo_whitened_by_hand(), abs=1e-9)
    prompts = [(p["lengths"], p["correct"]) for p in step["prompts"]]
    lead_raw = ref.lead_step(prompts, ref.NaivePSI(), whiten=False)[3]
    assert advantages("--no-whiten") == pytest.approx([a for ap in lead_raw for a in ap], abs=1e-9)


BAD = [
    ("{not json", "line 1: not valid JSON"),
    ({"prompts": GOOD["prompts"]}, "line 1: field 'step'"),
    ({"step": 0, "prompts": []}, "line 1: field 'prompts' is missing or empty"),
    ({"step": 0, "prompts": [{"id": "a", "lengths": [1, 2], "correct": [1]}]},
     "line 1: prompts[0]: lengths has 2 entries but correct has 1"),
    ({"step": 0, "prompts": [{"id": "a", "lengths": [1, -2], "correct": [1, 0]}]},
     "line 1: prompts[0].lengths[1] = -2 is not a non-negative integer"),
    ({"step": 0, "prompts": [{"id": "a", "correct": [1]}]}, "line 1: prompts[0].lengths is missing"),
    ({"step": 0, "prompts": [{"lengths": [1], "correct": [1]}]}, "line 1: prompts[0].id"),
    ({"step": 0, "prompts": [{"id": "a", "lengths": [1], "correct": [2]}]}, "line 1: prompts[0].correct[0] = 2"),
]


@pytest.mark.parametrize("line,message", BAD)
def test_bad_input_is_one_line_naming_line_and_field(tmp_path, capsys, line, message):
    src, out = write(tmp_path, [line]), tmp_path / "o.jsonl"
    assert main(["replay", str(src), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and message in err, err
    assert not out.exists()


def test_bad_line_number_points_at_the_bad_line(tmp_path, capsys):
    src = write(tmp_path, [GOOD, {"step": 1, "prompts": "x"}])
    assert main(["replay", str(src), "--out", str(tmp_path / "o")]) == 2
    assert "line 2: field 'prompts'" in capsys.readouterr().err


def test_missing_file_and_console_script(tmp_path):
    # through the installed console command, as a user runs it
    exe = [sys.executable, "-m", "megatron_lead.cli"]
    r = subprocess.run(exe + ["replay", str(tmp_path / "nope.jsonl"), "--out", str(tmp_path / "o")],
                       capture_output=True, text=True)
    assert r.returncode == 2
    assert r.stderr.count("\n") == 1 and "nope.jsonl" in r.stderr
