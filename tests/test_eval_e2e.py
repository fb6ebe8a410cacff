"""`megatron-lead eval` end to end on the hand-made fixtures, with tiny models that box `7`.

One module fixture runs the command (in subprocesses, as a user would) twice:
    A  --nproc 1, models box, box2 and mg (box converted to a Megatron checkpoint)
    B  --nproc 2, models box2 then box (the other order: the second model is swapped into the
       running engine, so a stale weight swap would show as a difference from A)
and the tests read the output folders.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys

import pytest

from eval_tiny import save_boxing_model

pytestmark = pytest.mark.slow
FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures", "eval")
METRICS = ("accuracy", "mean_length", "median_length", "truncated_frac", "tokens_per_correct", "samples", "problems")


def _cli(*args, timeout=600) -> str:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MEGATRON_LEAD_DEBUG": "1"}
    proc = subprocess.run([sys.executable, "-m", "megatron_lead.cli", *args], env=env, capture_output=True,
                          text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc.stdout


def _rows(out) -> dict:
    with open(os.path.join(out, "results.json")) as f:
        return {(r["model"], r["benchmark"]): r for r in json.load(f)}


def _samples(out, model, bench) -> list[dict]:
    with open(os.path.join(out, "samples", f"{model}__{bench}.jsonl")) as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def evals(tmp_path_factory):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from megatron_lead.policy.convert.checkpoint import hf_to_megatron

    root = tmp_path_factory.mktemp("eval")
    box = save_boxing_model(root / "box", margin=6.0, seed=0)
    box2 = save_boxing_model(root / "box2", margin=4.0, seed=1)  # less sure: more rambling
    hf_to_megatron(box, str(root / "mg"), tp=1, pp=1)
    rows = [json.loads(line) for line in open(os.path.join(FIXTURES, "amc23.jsonl"))]
    pq.write_table(pa.Table.from_pylist(rows), str(root / "amc23.parquet"))  # Parquet input too
    benches = ["--benchmark", f"math500={FIXTURES}/math500.jsonl", "--benchmark", f"aime24={FIXTURES}/aime24.jsonl",
               "--benchmark", f"amc23={root}/amc23.parquet"]
    common = ["--max-len", "24", "--dtype", "float32", "--kv-cache-bytes", str(16 << 20), "--base", "box"] + benches
    out = {"root": root, "A": str(root / "A"), "B": str(root / "B")}
    out["stdout_A"] = _cli("eval", "--model", f"box={box}", "--model", f"box2={box2}", "--model", f"mg={root}/mg",
                           "--out", out["A"], "--nproc", "1", *common)
    _cli("eval", "--model", f"box2={box2}", "--model", f"box={box}", "--out", out["B"], "--nproc", "2", *common)
    out["common"], out["box"], out["box2"] = common, box, box2
    return out


def test_one_and_two_ranks_give_the_same_numbers(evals):
    a, b = _rows(evals["A"]), _rows(evals["B"])
    assert set(b) == {(m, bench) for m in ("box", "box2") for bench in ("math500", "aime24", "amc23")}
    for key, rb in b.items():
        ra = a[key]
        assert (ra["world_size"], rb["world_size"]) == (1, 2)
        for k in METRICS:
            assert ra[k] == rb[k], (key, k)
        assert ra["levels"] == rb["levels"]
        pairs = [(s["id"], s["sample"], s["response"], s["correct"]) for s in _samples(evals["A"], *key)]
        assert pairs == [(s["id"], s["sample"], s["response"], s["correct"]) for s in _samples(evals["B"], *key)]
    # The numbers are not trivial: some answers right, some wrong, some truncated; models differ.
    assert 0 < a[("box", "math500")]["accuracy"] < 1 and 0 < a[("box", "math500")]["truncated_frac"] < 1
    assert a[("box", "aime24")]["accuracy"] != a[("box2", "aime24")]["accuracy"]


def test_presets_sampling_and_a_megatron_checkpoint(evals):
    a = _rows(evals["A"])
    # The paper's n: 3 samples per MATH-500 problem, 10 per AIME / AMC problem.
    assert (a[("box", "math500")]["samples"], a[("box", "math500")]["problems"]) == (15, 5)
    assert (a[("box", "aime24")]["samples"], a[("box", "amc23")]["samples"]) == (20, 30)
    assert a[("box", "math500")]["settings"]["temperature"] == 0.8
    assert a[("box", "math500")]["settings"]["top_p"] == 0.9
    assert all(s["length"] <= 24 for s in _samples(evals["A"], "box", "math500"))
    # The Megatron checkpoint was exported to HF and holds box's weights: the same samples.
    for bench in ("math500", "aime24", "amc23"):
        for k in METRICS:
            assert a[("mg", bench)][k] == a[("box", bench)][k]
    assert os.path.isfile(os.path.join(evals["A"], "hf", "mg", "config.json"))
    # MATH-500's levels give the per-level breakdown.
    assert list(a[("box", "math500")]["levels"]) == ["1", "2", "3", "4"]


def test_aggregates_match_the_per_sample_file(evals):
    for (model, bench), row in _rows(evals["A"]).items():
        samples = _samples(evals["A"], model, bench)
        n, correct = len(samples), sum(s["correct"] for s in samples)
        tokens = sum(s["length"] for s in samples)
        assert row["accuracy"] == pytest.approx(correct / n)
        assert row["mean_length"] == pytest.approx(tokens / n)
        assert row["truncated_frac"] == pytest.approx(sum(s["truncated"] for s in samples) / n)
        assert row["tokens_per_correct"] == (pytest.approx(tokens / correct) if correct else None)


def test_regrading_the_per_sample_file_gives_the_same_accuracy(evals, tmp_path):
    for bench in ("math500", "aime24"):
        src = os.path.join(evals["A"], "samples", f"box__{bench}.jsonl")
        dst = tmp_path / f"{bench}.jsonl"
        _cli("grade", src, "--out", str(dst))
        before = _samples(evals["A"], "box", bench)
        after = [json.loads(line) for line in open(dst)]
        assert [s["correct"] for s in after] == [s["correct"] for s in before]
        assert sum(s["correct"] for s in after) / len(after) == _rows(evals["A"])[("box", bench)]["accuracy"]


def test_table_csv_plot_and_aes(evals):
    out, rows = evals["A"], _rows(evals["A"])
    md = open(os.path.join(out, "results.md")).read()
    assert "| box2 | math500 |" in md and "## Per level" in md
    with open(os.path.join(out, "results.csv")) as f:
        lines = list(csv.DictReader(f))
    assert len([r for r in lines if r["level"] == "all"]) == 9
    r, base = rows[("box2", "aime24")], rows[("box", "aime24")]
    d_len = (base["mean_length"] - r["mean_length"]) / base["mean_length"]
    d_acc = (r["accuracy"] - base["accuracy"]) / base["accuracy"]
    want = d_len + (3 * d_acc if d_acc >= 0 else -5 * abs(d_acc))
    got = next(x for x in lines if x["model"] == "box2" and x["benchmark"] == "aime24" and x["level"] == "all")
    assert float(got["aes"]) == pytest.approx(want)
    assert float(next(x for x in lines if x["model"] == "box" and x["level"] == "all")["aes"]) == 0.0
    assert os.path.getsize(os.path.join(out, "accuracy_vs_length.png")) > 10_000


def test_a_second_call_skips_what_is_done_and_redraws(evals):
    path = os.path.join(evals["A"], "samples", "box__math500.jsonl")
    mtime = os.path.getmtime(path)
    _cli("eval", "--model", f"box={evals['box']}", "--out", evals["A"], "--nproc", "1", *evals["common"],
         "--aes", "1,1,1")
    assert os.path.getmtime(path) == mtime  # not evaluated again
    assert len(_rows(evals["A"])) == 9  # earlier models kept
    assert "(1, 1, 1)" in open(os.path.join(evals["A"], "results.md")).read()
