"""`megatron-lead prepare-data` on small hand-written files: MATH as JSONL and Parquet, GSM8K, and
generic rows with --answer-field; every malformed row is dropped with one line and counted, and
the output is what the trainer's loader reads."""

import contextlib
import io
import json

import pytest

from megatron_lead.cli import main
from megatron_lead.data import DataStats, load_prompts
from megatron_lead.data.prepare import level_number, prepare

MATH_ROWS = [
    # (row, expected answer or the reason it is dropped with --levels 3,4,5)
    ({"problem": "Half of one?", "solution": "It is $\\boxed{\\frac{1}{2}}$.", "level": "Level 3",
      "type": "Algebra"}, "\\frac{1}{2}"),
    ({"problem": "Two boxes", "solution": "First \\boxed{3}, finally \\boxed{4}.", "level": "Level 5"}, "4"),
    ({"problem": "Nested", "solution": "$\\boxed{\\sqrt{\\frac{a^{2}}{b}}}$", "level": "Level 4"},
     "\\sqrt{\\frac{a^{2}}{b}}"),
    ({"problem": "Set", "solution": "So \\boxed{\\{1,2\\}} is it.", "level": "Level 4"}, "\\{1,2\\}"),
    ({"problem": "Spaced box", "solution": "\\boxed {5}", "level": "Level 3"}, "5"),
    ({"problem": "Framed", "solution": "\\fbox{7}", "level": "Level 3"}, "7"),
    ({"problem": "Easy one", "solution": "\\boxed{1}", "level": "Level 2"}, "level_not_selected"),
    ({"problem": "No box", "solution": "The answer is 3.", "level": "Level 3"}, "no_boxed_answer"),
    # The last box is cut off: refused, not the earlier box (an intermediate result).
    ({"problem": "Cut", "solution": "\\boxed{2} then \\boxed{3", "level": "Level 4"}, "no_boxed_answer"),
    ({"problem": "Unknown level", "solution": "\\boxed{9}", "level": "Level ?"}, "no_level"),
    ({"problem": "  Half of   one? ", "solution": "\\boxed{0.5}", "level": "Level 3"}, "duplicate_problem"),
    ({"solution": "\\boxed{1}", "level": "Level 3"}, "no_problem"),
    ({"problem": "No solution", "level": "Level 3"}, "no_solution"),
]
KEPT = [(row, want) for row, want in MATH_ROWS if "_" not in want or want.startswith("\\")]


def _run(argv):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main(argv)
    return rc, out.getvalue(), err.getvalue()


def _write_jsonl(path, rows, extra_lines=()):
    with open(path, "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
        for line in extra_lines:
            f.write(line + "\n")


def _read(path):
    return [json.loads(line) for line in open(path)]


def _expected_drops(extra: int = 0):
    drops = {}
    for _, want in MATH_ROWS:
        if not want.startswith("\\") and "_" in want:
            drops[want] = drops.get(want, 0) + 1
    return drops


def test_math_jsonl_with_levels_and_malformed_rows(tmp_path):
    src = tmp_path / "math_train.jsonl"
    _write_jsonl(src, [row for row, _ in MATH_ROWS], extra_lines=["{not json", "[1, 2]", ""])
    out = tmp_path / "out" / "train.jsonl"
    rc, stdout, stderr = _run(["prepare-data", str(src), "--out", str(out), "--levels", "3,4,5"])
    assert rc == 0
    rows = _read(out)
    assert [r["answer"] for r in rows] == [want for _, want in KEPT]
    assert [r["level"] for r in rows] == [level_number(row["level"]) for row, _ in KEPT]
    assert set(rows[0]) == {"problem", "answer", "level", "id"} and rows[0]["id"] == "math_train-1"
    # One line per dropped row, naming the file's line and the reason.
    drops = _expected_drops()
    drops.update(bad_json=1, not_an_object=1)
    lines = stderr.strip().splitlines()
    assert len(lines) == sum(drops.values())
    assert f"{src}:{len(MATH_ROWS) + 1}: dropped (bad_json" in stderr
    assert f"{src}:{len(MATH_ROWS) + 2}: dropped (not_an_object: list)" in stderr
    assert f"{src}:7: dropped (level_not_selected: level 2)" in stderr
    for reason, count in drops.items():
        assert f"{reason}={count}" in stdout
    read = len(MATH_ROWS) + 2
    assert stdout.startswith(f"read {read} rows: wrote {len(KEPT)}, dropped {read - len(KEPT)} (")
    # The trainer reads every line back, nothing skipped.
    stats = DataStats()
    records = load_prompts(str(out), stats)
    assert stats.skipped == 0 and len(records) == len(KEPT) and records[0].level == "3"


def test_math_parquet_gives_the_same_rows(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    rows = [row for row, _ in MATH_ROWS if "problem" in row and "solution" in row]
    table = pa.table({k: [r.get(k) for r in rows] for k in ("problem", "solution", "level", "type")})
    src_pq, src_json = tmp_path / "train.parquet", tmp_path / "train.jsonl"
    pq.write_table(table, src_pq)
    _write_jsonl(src_json, rows)
    report_pq = prepare([str(src_pq)], str(tmp_path / "a.jsonl"), levels={3, 4, 5})
    report_js = prepare([str(src_json)], str(tmp_path / "b.jsonl"), levels={3, 4, 5})
    strip = [{k: v for k, v in r.items() if k != "id"} for r in _read(tmp_path / "a.jsonl")]
    assert strip == [{k: v for k, v in r.items() if k != "id"} for r in _read(tmp_path / "b.jsonl")]
    assert report_pq.dropped == report_js.dropped and report_pq.read == len(rows)
    assert any("train.parquet:row 7: dropped (level_not_selected" in m for m in report_pq.messages)
    # Two inputs of the same name (MATH's per-subject train files) keep distinct ids.
    (tmp_path / "algebra").mkdir()
    (tmp_path / "geometry").mkdir()
    _write_jsonl(tmp_path / "algebra" / "train.jsonl", [{"problem": "a", "solution": "\\boxed{1}"}])
    _write_jsonl(tmp_path / "geometry" / "train.jsonl", [{"problem": "b", "solution": "\\boxed{2}"}])
    prepare([str(tmp_path / "algebra" / "train.jsonl"), str(tmp_path / "geometry" / "train.jsonl")],
            str(tmp_path / "c.jsonl"))
    assert [r["id"] for r in _read(tmp_path / "c.jsonl")] == ["algebra/train-1", "geometry/train-1"]


def test_gsm8k_answers_after_the_hashes(tmp_path):
    src = tmp_path / "gsm8k.jsonl"
    _write_jsonl(src, [
        {"question": "How many?", "answer": "3 + 4 = <<3+4=7>>7\n#### 7"},
        {"question": "How much?", "answer": "Total 1,200.\n#### 1,200"},
        {"question": "Negative?", "answer": "#### -3.5"},
        {"question": "No final answer", "answer": "It is 5."},
        {"question": "Empty final", "answer": "#### "},
    ])
    report = prepare([str(src)], str(tmp_path / "out.jsonl"), fmt="gsm8k")
    rows = _read(tmp_path / "out.jsonl")
    assert [(r["problem"], r["answer"]) for r in rows] == [("How many?", "7"), ("How much?", "1200"),
                                                           ("Negative?", "-3.5")]
    assert report.dropped == {"no_final_answer": 2} and report.read == 5
    assert "level" not in rows[0]


def test_generic_rows_with_an_answer_field(tmp_path):
    src = tmp_path / "mine.jsonl"
    _write_jsonl(src, [
        {"id": "q1", "question": "Seven?", "final": 7},
        {"id": "q2", "prompt": "Two and a half?", "final": 2.5, "difficulty": 4},
        {"id": "q3", "question": "Text", "final": " x^2 "},
        {"id": "q4", "question": "Missing"},
        {"id": "q5", "question": "A list", "final": [1]},
        {"id": "q6", "question": "Bool", "final": True},
        {"id": "q1", "question": "Same id, other problem", "final": 1},
    ])
    rc, stdout, stderr = _run(["prepare-data", str(src), "--out", str(tmp_path / "out.jsonl"),
                               "--answer-field", "final"])
    assert rc == 0
    rows = _read(tmp_path / "out.jsonl")
    assert [(r["id"], r["answer"]) for r in rows] == [("q1", "7"), ("q2", "2.5"), ("q3", "x^2")]
    assert rows[1]["level"] == 4
    assert "no_answer=1" in stdout and "bad_answer=2" in stdout and "duplicate_id=1" in stdout
    assert len(stderr.strip().splitlines()) == 4


def test_unusable_inputs_fail_in_one_line_and_write_nothing(tmp_path):
    out = tmp_path / "out.jsonl"
    rc, _, err = _run(["prepare-data", str(tmp_path / "missing.jsonl"), "--out", str(out)])
    assert rc == 2 and err.count("\n") == 1 and "does not exist" in err
    src = tmp_path / "bad.jsonl"
    _write_jsonl(src, [{"problem": "p", "solution": "no box"}])
    rc, _, err = _run(["prepare-data", str(src), "--out", str(out), "--quiet"])
    assert rc == 2 and "no usable row" in err and "no_boxed_answer=1" in err and not out.exists()
    rc, _, err = _run(["prepare-data", str(src), "--out", str(out), "--levels", "three"])
    assert rc == 2 and "--levels 'three'" in err
