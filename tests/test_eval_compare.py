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

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _cli(*args, timeout=900) -> str:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MEGATRON_LEAD_DEBUG": "1"}
    proc = subprocess.run([sys.executable, "-m", "megatron_lead.cli", *args], env=env, capture_output=True,
                          text=True, timeout=timeout, cwd=REPO)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc.stdout


def test_standard_errors_and_verdicts_by_hand():
    from megatron_lead.eval.compare_table import difference, mean_se, summarise, verdict

    m, se = mean_se([0.5, 0.7, 0.9])  # std 0.2, / sqrt(3)
    assert m == pytest.approx(0.7) and se == pytest.approx(0.2 / 3 ** 0.5)
    d = difference((0.7, 0.05), (0.6, 0.03))  # 0.1 against 2 x 0.0583
    assert d["delta"] == pytest.approx(0.1) and not d["measurable"]
    assert verdict(d, scale=100).startswith("no measurable difference (+10.0 ± 5.8")
    assert verdict(difference((0.9, 0.01), (0.6, 0.01)), scale=100) == "+30.0 ± 1.4"

    def model(acc, length, levels):
        return {"accuracy": acc, "mean_length": length, "steps_share": 1.0, "greedy_accuracy": acc,
                "greedy_length": length, "binomial_se": 0.01,
                "levels": {lv: {"accuracy": a, "mean_length": n, "steps_share": 1.0} for lv, (a, n) in levels.items()}}

    models = {"warm_start": model(0.8, 200, {"1": (0.9, 100)}), "grpo_s0": model(0.8, 180, {"1": (0.9, 90)}),
              "grpo_s1": model(0.82, 170, {"1": (0.92, 85)}), "lead_s0": model(0.81, 120, {"1": (0.9, 60)}),
              "lead_s1": model(0.79, 130, {"1": (0.88, 62)})}
    table = summarise(models, {"warm_start": ["warm_start"], "grpo": ["grpo_s0", "grpo_s1"],
                               "lead": ["lead_s0", "lead_s1"]})
    lead = table[2]
    assert lead["mean_length"] == 125 and lead["mean_length_se"] == pytest.approx(5.0)
    assert lead["length_change_pct"] == pytest.approx(-37.5)
    assert lead["vs_grpo_mean_length"]["delta"] == pytest.approx(-50.0)  # 125 - 175, se hypot(5, 5)
    assert lead["vs_grpo_mean_length"]["measurable"]
    assert not lead["vs_grpo_accuracy"]["measurable"]  # 0.80 vs 0.81 with se 0.01 each
    assert lead["levels"]["1"]["mean_length"] == 61


def test_protocol_defaults_and_per_task_warm_start_steps():
    import argparse

    from megatron_lead.eval import compare
    from megatron_lead.trainer.warmstart import SFT_SETTINGS, default_steps

    p = argparse.ArgumentParser()
    compare.add_arguments(p)
    args = compare.resolve_protocol(p.parse_args([]))
    assert (args.task, args.seeds, args.steps, args.heldout_per_level) == ("both", 3, 30, 50)
    assert compare._methods(args.methods) == list(compare.DEFAULT_METHODS)
    assert {"lead", "grpo", "static", "shorterbetter", "drpo_style"} <= set(compare.DEFAULT_METHODS)
    assert set(compare.DEFAULT_METHODS) < set(compare._methods("all")) == set(compare.METHODS)
    quick = compare.resolve_protocol(p.parse_args(["--quick", "--seeds", "2"]))
    assert (quick.seeds, quick.steps, compare._methods(quick.methods)) == (2, 12, ["lead", "grpo", "shorterbetter",
                                                                                    "drpo_style"])
    # --quick is the demo's task alone (its warm start cached by the demo: 30 minutes from a fresh clone).
    assert quick.task == "arith"
    assert compare.resolve_protocol(p.parse_args(["--quick", "--task", "both"])).task == "both"
    with pytest.raises(ValueError, match="unknown"):
        compare._methods("lead,sol")
    # The demo's warm start for arith; the second task's is trained longer (its gate, docs/RESULTS.md).
    assert default_steps("arith") == SFT_SETTINGS["steps"] == 1200 and default_steps("arith_shortcuts") > 1200
    with pytest.raises(ValueError, match="not one of"):
        default_steps("gsm8k")


@pytest.mark.parametrize("task", ["arith", "arith_shortcuts"])
def test_evaluation_prompts_the_task_as_it_was_trained(task):
    from megatron_lead.eval.benchmarks import PRESETS
    from megatron_lead.eval.compare import benchmarks

    heldout = os.path.join(REPO, "examples", task, "heldout.jsonl")
    sampled, greedy = benchmarks(task, heldout, 400, 4)
    for bench in (sampled, greedy):  # the preset's plain "Q: ...\nA: " prompt, not the generic one
        assert (bench.instruction, bench.use_chat_template, bench.max_prompt_len) == ("", False, 64)
        assert bench.instruction == PRESETS[task].instruction and bench.path == heldout and bench.max_len == 400
    assert (sampled.name, sampled.n, sampled.temperature, sampled.top_p) == (f"{task}_t1", 4, 1.0, 1.0)
    assert (greedy.name, greedy.n, greedy.temperature) == (f"{task}_greedy", 1, 0.0)


@pytest.fixture(scope="module")
def compared(tmp_path_factory):
    root = tmp_path_factory.mktemp("compare")
    args = ["compare", "--task", "arith", "--out", str(root / "out"), "--warmstart", str(root / "warm"),
            "--sft-steps", "2", "--methods", "grpo,lead", "--seeds", "1", "--steps", "2",
            "--prompts-per-step", "6", "--rollouts", "4", "--max-len", "48", "--heldout-per-level", "2", "--eval-n", "2",
            "logging.tensorboard=false"]
    first = _cli(*args)
    second = _cli(*args)
    return {"root": root, "out": str(root / "out" / "arith"), "top": str(root / "out"), "first": first,
            "second": second}


@pytest.mark.slow
def test_settings_tables_and_plots(compared):
    out = compared["out"]
    settings = open(os.path.join(compared["top"], "settings.md")).read()
    assert "written before the runs" in settings and "2 RL steps of 6 prompts x 4 rollouts" in settings
    md = open(os.path.join(out, "compare.md")).read()
    for method in ("warm_start", "grpo", "lead"):
        assert f"| {method} | 1 |" in md
    assert "accuracy % (T=1)" in md and "greedy accuracy %" in md and "level 6" in md
    data = json.load(open(os.path.join(out, "compare.json")))
    table = data["table"]
    assert [r["method"] for r in table] == ["warm_start", "grpo", "lead"]
    rows = {(r["model"], r["benchmark"]): r for r in json.load(open(os.path.join(out, "eval", "results.json")))}
    assert {m for m, _ in rows} == {"warm_start", "grpo_s0", "lead_s0"}
    for (model, bench), r in rows.items():  # 2 problems per level x 6 levels; 2 samples each at T=1
        assert r["samples"] == (24 if bench == "arith_t1" else 12), (model, bench)
    for r in table:
        name = "warm_start" if r["method"] == "warm_start" else f"{r['method']}_s0"
        assert r["accuracy"] == rows[(name, "arith_t1")]["accuracy"]
        assert r["greedy_accuracy"] == rows[(name, "arith_greedy")]["accuracy"]
        assert r["levels"]["6"]["mean_length"] == rows[(name, "arith_t1")]["levels"]["6"]["mean_length"]
        assert r["steps_share"] is not None
    # One seed: no spread, so any difference from GRPO is a measurable one only if it is not zero.
    lead = table[2]
    assert lead["vs_grpo_accuracy"]["se"] == 0.0
    assert os.path.getsize(os.path.join(out, "compare.png")) > 10_000
    assert os.path.getsize(os.path.join(out, "w_eff.png")) > 5_000
    for name in ("grpo_s0", "lead_s0"):
        s = json.load(open(os.path.join(out, "runs", name, "summary.json")))
        assert s["steps_done"] == 2
    cfg = {n: open(os.path.join(out, "runs", n, "config.yaml")).read() for n in ("grpo_s0", "lead_s0")}
    assert "method: grpo" in cfg["grpo_s0"] and "method: lead" in cfg["lead_s0"]
    assert "stratify_levels: true" in cfg["lead_s0"]


@pytest.mark.slow
def test_second_call_skips_finished_work(compared):
    assert compared["second"].count("done before") == 2
    assert "SFT" not in compared["second"] and "cached" in compared["second"]


@pytest.mark.slow
def test_trainer_checkpoint_evaluates_like_the_final_export(compared, tmp_path):
    run = os.path.join(compared["out"], "runs", "lead_s0")
    step = os.path.join(run, "checkpoints", "step_00000002")
    assert os.path.isfile(os.path.join(step, "complete.json"))
    subset = os.path.join(compared["out"], "heldout_2_per_level.jsonl")  # compare wrote it
    _cli("eval", "--model", f"ckpt={step}", "--model", f"final={run}", "--benchmark", f"arith={subset}",
         "--max-len", "48", "--out", str(tmp_path / "e"))
    rows = {r["model"]: r for r in json.load(open(tmp_path / "e" / "results.json"))}
    for key in ("accuracy", "mean_length", "median_length", "truncated_frac", "levels"):
        assert rows["ckpt"][key] == rows["final"][key], key
    assert os.path.isfile(tmp_path / "e" / "hf" / "ckpt" / "model.safetensors") or \
        any(f.endswith(".safetensors") for f in os.listdir(tmp_path / "e" / "hf" / "ckpt"))
