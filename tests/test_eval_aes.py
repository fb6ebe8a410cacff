"""AES and the accuracy/length aggregation against hand-computed values."""

import json

import pytest

from megatron_lead.eval.aes import AESConstants, aes, summarise, summarise_by_level


def test_aes_gain_and_loss_by_hand():
    # 20% shorter, accuracy 0.5 -> 0.55 (+10% relative): 1 * 0.2 + 3 * 0.1 = 0.5
    assert aes(0.55, 800, 0.5, 1000) == pytest.approx(0.5)
    # 20% shorter, accuracy 0.5 -> 0.45 (-10%): 0.2 - 5 * 0.1 = -0.3
    assert aes(0.45, 800, 0.5, 1000) == pytest.approx(-0.3)
    # 10% longer, same accuracy: -0.1 (dA = 0 counts as a gain branch: no penalty)
    assert aes(0.5, 1100, 0.5, 1000) == pytest.approx(-0.1)
    # Constants are parameters: (2, 1, 10) -> 2 * 0.2 - 10 * 0.1 = -0.6
    assert aes(0.45, 800, 0.5, 1000, AESConstants(2, 1, 10)) == pytest.approx(-0.6)
    assert aes(0.55, 800, 0.5, 1000, AESConstants.parse("2,1,10")) == pytest.approx(0.4 + 0.1)
    # The base against itself is 0; a base with no correct answer gives no AES.
    assert aes(0.5, 1000, 0.5, 1000) == 0.0
    assert aes(0.3, 800, 0.0, 1000) is None
    # The paper's headline as a plausibility check of the form: LEAD 53.36 / 3714 against a base
    # at 50% and 5000 tokens: 0.2572 + 3 * 0.0672.
    assert aes(0.5336, 3714, 0.5, 5000) == pytest.approx(0.2572 + 3 * 0.0672)
    with pytest.raises(ValueError, match="three numbers"):
        AESConstants.parse("1,3")


SAMPLES = [  # 2 problems x 3 samples
    {"id": "a", "level": 1, "correct": True, "length": 10, "truncated": False},
    {"id": "a", "level": 1, "correct": True, "length": 20, "truncated": False},
    {"id": "a", "level": 1, "correct": False, "length": 30, "truncated": True},
    {"id": "b", "level": 10, "correct": False, "length": 40, "truncated": False},
    {"id": "b", "level": 10, "correct": True, "length": 50, "truncated": False},
    {"id": "b", "level": 10, "correct": False, "length": 100, "truncated": True},
]


def test_summary_by_hand():
    s = summarise(SAMPLES)
    assert s["accuracy"] == pytest.approx(3 / 6)
    assert s["mean_length"] == pytest.approx(250 / 6)
    assert s["median_length"] == 35.0  # (30 + 40) / 2
    assert s["truncated_frac"] == pytest.approx(2 / 6)
    assert s["tokens_per_correct"] == pytest.approx(250 / 3)
    assert (s["samples"], s["problems"]) == (6, 2)


def test_summary_per_level_in_numeric_order():
    levels = summarise_by_level(SAMPLES)
    assert list(levels) == ["1", "10"]  # numeric, not text order
    assert levels["1"]["accuracy"] == pytest.approx(2 / 3)
    assert levels["1"]["tokens_per_correct"] == pytest.approx(60 / 2)
    assert levels["10"]["median_length"] == 50.0
    assert levels["10"]["tokens_per_correct"] == pytest.approx(190.0)
    assert summarise([])["tokens_per_correct"] is None
    assert summarise([SAMPLES[2]])["tokens_per_correct"] is None  # nothing correct


def test_compare_skips_a_finished_run_only_when_it_is_the_same_run(tmp_path):
    from megatron_lead.eval.compare import IDENTITY_FILE, inputs_digest, run_finished, run_identity

    def run_identity_of(config, overrides, model):
        return run_identity(inputs_digest(str(config), str(model)), overrides)

    config, model = tmp_path / "lead.yaml", tmp_path / "warm"
    config.write_text("seed: 0\n")
    model.mkdir()
    (model / "model.safetensors").write_bytes(b"weights v1")
    run = tmp_path / "runs" / "lead_s0"
    (run / "hf").mkdir(parents=True)
    (run / "hf" / "config.json").write_text("{}")
    (run / "summary.json").write_text(json.dumps({"steps_done": 8}))
    ident = run_identity_of(config, ["seed=0"], model)
    (run / IDENTITY_FILE).write_text(json.dumps({"identity": ident}))
    assert run_finished(str(run), 8, ident)
    assert not run_finished(str(run), 9, ident) and run.is_dir()  # unfinished: kept, to resume
    (model / "model.safetensors").write_bytes(b"weights v2")  # another warm start
    other = run_identity_of(config, ["seed=0"], model)
    assert other != ident and run_identity_of(config, ["seed=1"], model) != other
    assert not run_finished(str(run), 8, other) and not run.exists()  # deleted: neither skipped nor resumed
