"""`megatron-lead compare` at toy size: two methods, one seed, two steps, from a 2-step warm start.

Run as a user would (subprocesses). Checks the table and plot, that a second call skips the
finished runs and evaluations, and that a trainer checkpoint of one of the runs evaluates to the
same numbers as that run's final HF export (the Megatron -> HF export path of `eval`).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _cli(*args, timeout=900) -> str:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MEGATRON_LEAD_DEBUG": "1"}
    proc = subprocess.run([sys.executable, "-m", "megatron_lead.cli", *args], env=env, capture_output=True,
                          text=True, timeout=timeout, cwd=REPO)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc.stdout


@pytest.fixture(scope="module")
def compared(tmp_path_factory):
    root = tmp_path_factory.mktemp("compare")
    args = ["compare", "--out", str(root / "out"), "--warmstart", str(root / "warm"), "--sft-steps", "2",
            "--methods", "grpo,lead", "--seeds", "1", "--steps", "2", "--prompts-per-step", "4",
            "--rollouts", "4", "--max-len", "48", "--heldout-per-level", "2", "logging.tensorboard=false"]
    first = _cli(*args)
    second = _cli(*args)
    return {"root": root, "out": str(root / "out"), "first": first, "second": second}


def test_table_and_plot(compared):
    out = compared["out"]
    md = open(os.path.join(out, "compare.md")).read()
    for method in ("warm_start", "grpo", "lead"):
        assert f"| {method} | 1 |" in md
    assert "acc. level 1" in md and "acc. level 6" in md and "AES vs warm start" in md
    table = json.load(open(os.path.join(out, "compare.json")))["table"]
    assert [r["method"] for r in table] == ["warm_start", "grpo", "lead"]
    assert (table[0]["easy_level"], table[0]["hard_level"]) == ("1", "6")
    # The warm start against itself: AES 0, or none when a 2-step warm start solves nothing.
    assert table[0]["aes"] == (0.0 if table[0]["accuracy"] > 0 else None)
    rows = {r["model"]: r for r in json.load(open(os.path.join(out, "eval", "results.json")))}
    assert set(rows) == {"warm_start", "grpo_s0", "lead_s0"}
    assert all(r["samples"] == 12 for r in rows.values())  # 2 per level x 6 levels, greedy
    for r in table:
        name = "warm_start" if r["method"] == "warm_start" else f"{r['method']}_s0"
        assert r["accuracy"] == rows[name]["accuracy"] and r["mean_length"] == rows[name]["mean_length"]
        assert r["hard_length"] == rows[name]["levels"]["6"]["mean_length"]
    assert os.path.getsize(os.path.join(out, "compare.png")) > 10_000
    assert os.path.isfile(os.path.join(out, "compare.csv"))
    # Same seed, same warm start, same steps: the runs differ only by their advantages.
    for name in ("grpo_s0", "lead_s0"):
        s = json.load(open(os.path.join(out, "runs", name, "summary.json")))
        assert s["steps_done"] == 2
    cfg = {n: open(os.path.join(out, "runs", n, "config.yaml")).read() for n in ("grpo_s0", "lead_s0")}
    assert "method: grpo" in cfg["grpo_s0"] and "method: lead" in cfg["lead_s0"]


def test_second_call_skips_finished_work(compared):
    assert compared["second"].count("done before") == 2
    assert "SFT" not in compared["second"] and "cached" in compared["second"]


def test_trainer_checkpoint_evaluates_like_the_final_export(compared, tmp_path):
    run = os.path.join(compared["out"], "runs", "lead_s0")
    step = os.path.join(run, "checkpoints", "step_00000002")
    assert os.path.isfile(os.path.join(step, "complete.json"))
    subset = os.path.join(compared["out"], "heldout_2_per_level.jsonl")
    _cli("eval", "--model", f"ckpt={step}", "--model", f"final={run}", "--benchmark", f"arith={subset}",
         "--max-len", "48", "--out", str(tmp_path / "e"))
    rows = {r["model"]: r for r in json.load(open(tmp_path / "e" / "results.json"))}
    for key in ("accuracy", "mean_length", "median_length", "truncated_frac", "levels"):
        assert rows["ckpt"][key] == rows["final"][key], key
    assert os.path.isfile(tmp_path / "e" / "hf" / "ckpt" / "model.safetensors") or \
        any(f.endswith(".safetensors") for f in os.listdir(tmp_path / "e" / "hf" / "ckpt"))
