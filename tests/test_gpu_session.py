"""The lent-GPU session script stays inside its 7 minutes, and its trainer check runs (CPU dry run).

A GPU is lent rarely and its time is short: a check that crashes on a trivial bug there wastes
the whole loan, so the script's new step runs here first, on a tiny model over gloo.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "tools", "gpu_session.sh")


def test_step_limits_fit_the_budget_and_the_budget_fits_seven_minutes():
    text = open(SCRIPT).read()
    budget = int(re.search(r"^BUDGET=(\d+)$", text, re.M).group(1))
    limits = [int(n) for n in re.findall(r"^step \S+ (\d+) ", text, re.M)]
    assert len(limits) == 8
    assert sum(limits) <= budget <= 7 * 60 - 20  # 20 s for the wheel install and the start
    assert "tools/check_train_gpu.py" in text


@pytest.mark.slow
def test_check_train_gpu_dry_run_passes_every_check(tmp_path):
    env = {**os.environ, "OUT": str(tmp_path), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "check_train_gpu.py"), "--tiny"],
                          env=env, capture_output=True, text=True, timeout=600)
    lines = [json.loads(x) for x in open(tmp_path / "check_train_gpu.jsonl")]
    checks = {(x["check"], x.get("pack")): x for x in lines}
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert set(checks) == {("setup", None), ("ppo", False), ("ppo", True), ("offload", None), ("checkpoint", None)}
    assert all(x.get("ok", True) for x in lines)
    assert checks[("ppo", True)]["first_update_ppo_kl"] == 0.0
    assert checks[("offload", None)]["bit_exact"] and checks[("checkpoint", None)]["state_equal"]
