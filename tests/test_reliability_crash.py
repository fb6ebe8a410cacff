"""Crash safety in the suite: one trial of tools/fault_inject.py (about 2 minutes on 2 cores).

The trainer (tiny random Qwen2, CPU, a checkpoint after every step) is SIGKILLed inside step
2's checkpoint write, resumed with --resume, and must log exactly the metrics of an
uninterrupted run, leaving no process behind. docs/RELIABILITY.md has the 50-trial numbers.
"""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.long
def test_killed_inside_a_checkpoint_write_resumes_exactly(tmp_path):
    out = tmp_path / "fi"
    r = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "fault_inject.py"), "--trials", "1",
                        "--mode", "during_save", "--kill-save", "2", "--out", str(out)],
                       capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, (r.stdout[-2000:], r.stderr[-3000:])
    (trial,) = [json.loads(line) for line in (out / "trials.jsonl").read_text().splitlines()]
    assert trial["outcome"] == "exact" and trial["resume_exit"] == 0
    # it died inside step 2's save, so the resume loaded step 1's checkpoint
    assert not trial["finished_before_kill"] and trial["hit"] == trial["temp"][0] == ".tmp_step_00000002"
    assert trial["complete"] == ["step_00000001"]
    assert trial["orphans"] == 0, trial["orphan_cmdlines"]
    report = json.loads((out / "report.json").read_text())
    assert report["exact"] == report["trials"] == 1
