"""Bad configuration and environment, through `megatron-lead train` as a user runs it.

Each case runs the command in its own session (the tiny random Qwen2 of the e2e tests, CPU) and
checks: a non-zero exit, one error line naming what is wrong, and no process of its session
left 3 s after it exits. Cases: impossible parallel sizes, a missing model, an unwritable
run_dir, an empty dataset (all refused before any model or engine starts); vLLM unable to start;
a damaged newest checkpoint on --resume; a rank SIGKILLed mid-step (the other exits within a
bounded time, naming the rank); and a run on a file with bad rows, whose summary lists them.
"""

import json
import math
import os
import signal
import subprocess
import sys
import time

import psutil
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tools"))
import fault_inject as fi  # noqa: E402  the model folder, data and overrides of the crash tests

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("cli_faults"))
    fi.prepare(path)
    return path


def _session(sid: int) -> list[str]:
    out = []
    for p in psutil.process_iter(["pid"]):
        try:
            if os.getsid(p.info["pid"]) == sid and p.status() != psutil.STATUS_ZOMBIE:
                out.append(" ".join(p.cmdline())[:120])
        except (ProcessLookupError, PermissionError, psutil.Error):
            continue
    return out


def train(work, run_dir, *extra, steps=1, resume=False, timeout=600):
    """(exit code, megatron-lead error lines, seconds, processes of its session left after 3 s).
    extra: overrides first, then options (argparse takes no override after an option)."""
    cmd = fi.command(work, run_dir, steps, resume) + list(extra)
    start = time.monotonic()
    p = subprocess.Popen(cmd, env=fi.env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         start_new_session=True)
    _, err = p.communicate(timeout=timeout)
    seconds = time.monotonic() - start
    time.sleep(3.0)
    errors = [line for line in err.splitlines() if line.startswith("megatron-lead train: error:")]
    return p.returncode, errors, seconds, _session(p.pid)


def _refused(result, *words):
    rc, errors, _, left = result
    assert rc == 2 and len(errors) == 1, (rc, errors)
    for w in words:
        assert w in errors[0], (w, errors[0])
    assert left == [], left
    return errors[0]


@pytest.mark.parametrize("extra,words", [
    (["parallel.tensor_model_parallel_size=3", "--nproc", "2"], ["world size 2 is not a multiple", "3 x 1"]),
    (["parallel.tensor_model_parallel_size=4", "--nproc", "4"],
     ["parallel.tensor_model_parallel_size=4 does not divide the model's 2 key-value heads"]),
    (["parallel.pipeline_model_parallel_size=4", "--nproc", "4"],
     ["parallel.pipeline_model_parallel_size=4 does not divide the model's 2 layers"]),
    (["rollout.tensor_parallel_size=2"], ["rollout.tensor_parallel_size=2 does not divide the world size 1"]),
    (["model.path=/nonexistent/model"], ["model.path=/nonexistent/model: no HF model there"]),
])
def test_bad_settings_are_refused_before_anything_starts(work, tmp_path, extra, words):
    result = train(work, str(tmp_path / "run"), *extra)
    _refused(result, *words)
    assert result[2] < 60


def test_an_unwritable_run_dir_is_refused(work, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    _refused(train(work, str(blocker / "run")), f"run_dir={blocker}/run", "is a file, not a folder")


def test_an_empty_dataset_is_refused(work, tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    _refused(train(work, str(tmp_path / "run"), f"data.train_path={empty}"), str(empty), "no usable prompt")


def test_vllm_unable_to_start(work, tmp_path):
    _refused(train(work, str(tmp_path / "run"), "rollout.kv_cache_memory_bytes=1024"), "vLLM could not start")


def test_a_damaged_newest_checkpoint_is_refused_on_resume(work, tmp_path):
    run = tmp_path / "run"
    ckpt = run / "checkpoints" / "step_00000001"
    ckpt.mkdir(parents=True)
    for name, obj in (("complete.json", {"format": 2, "step": 1}), ("trainer_state.json", {"step": 1}),
                      ("scheduler.json", None), ("metadata.json", {"sharded_backend": "torch_dist"})):
        (ckpt / name).write_text(json.dumps(obj))
    (ckpt / ".metadata").write_bytes(b"not what was saved")
    message = _refused(train(work, str(run), resume=True), str(ckpt), "is corrupt or was modified", "manifest.json")
    assert "Traceback" not in message


def test_a_rank_killed_mid_step_stops_the_run_naming_it(work, tmp_path):
    run = tmp_path / "run"
    cmd = fi.command(work, str(run), 3, False) + ["--nproc", "2"]
    p = subprocess.Popen(cmd, env=fi.env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         start_new_session=True)
    metrics = run / "metrics.jsonl"
    deadline = time.monotonic() + 600
    while not (metrics.exists() and metrics.read_text().count("\n") >= 1):  # step 1 is running now
        assert p.poll() is None and time.monotonic() < deadline, p.communicate()[1][-3000:]
        time.sleep(0.05)
    ranks = sorted((c for c in psutil.Process(p.pid).children() if "spawn_main" in " ".join(c.cmdline())),
                   key=lambda c: (c.create_time(), c.pid))
    assert len(ranks) == 2
    killed = time.monotonic()
    os.kill(ranks[1].pid, signal.SIGKILL)
    _, err = p.communicate(timeout=120)
    seconds = time.monotonic() - killed
    time.sleep(3.0)
    errors = [line for line in err.splitlines() if line.startswith("megatron-lead train: error:")]
    assert p.returncode == 2 and errors == ["megatron-lead train: error: rank 1 died with exit code -9 "
                                            "without reporting"], (p.returncode, err[-2000:])
    assert seconds < 30, seconds
    assert _session(p.pid) == []


def test_bad_rows_are_counted_in_the_run_summary(work, tmp_path):
    rows = [json.dumps({"problem": f"{i} + 1 = ?", "answer": str(i + 1)}) for i in range(6)]
    rows += [json.dumps({"problem": "no answer"}), json.dumps({"problem": "", "answer": "1"}),
             json.dumps({"id": "1", "problem": "duplicate of line 1's id", "answer": "2"}),
             json.dumps({"problem": "x" * 500, "answer": "1"}), '{"problem": "truncated', ""]
    data = tmp_path / "bad.jsonl"
    data.write_text("\n".join(rows))
    run = tmp_path / "run"
    rc, errors, _, left = train(work, str(run), f"data.train_path={data}")
    assert rc == 0 and errors == [] and left == []
    summary = json.loads((run / "summary.json").read_text())
    assert summary["data"] == dict(loaded=7, skipped_bad_json=1, skipped_missing_answer=1, skipped_empty_answer=0,
                                   skipped_bad_answer=0, skipped_bad_prompt=1, skipped_duplicate_id=1,
                                   dropped_too_long=1)
    assert summary["skips"] == {"skipped_updates": 0, "steps_with_skipped_updates": 0}


def test_a_diverged_run_stops_after_consecutive_skipped_steps(work, tmp_path):
    # lr 1e30: the first real update sends the weights to ~1e30, every later loss is NaN
    run = tmp_path / "run"
    message = _refused(train(work, str(run), "optim.lr=1e30", "ppo.max_consecutive_skipped_steps=2", steps=8),
                       "2 consecutive steps skipped optimizer updates", "ppo.max_consecutive_skipped_steps=2")
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["train/skipped_updates"] > 0 for m in metrics[-2:]] == [True, True]
    assert len(metrics) < 8 and f"stopping at step {metrics[-1]['step']}:" in message
    assert all(math.isfinite(m["train/loss"]) for m in metrics[:-2])  # skipped, not trained on: logged as NaN
