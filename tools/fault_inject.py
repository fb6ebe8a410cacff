"""Crash safety, measured: SIGKILL `megatron-lead train` at random moments, resume, compare.

    python tools/fault_inject.py --trials 50 --out runs/fault_inject            # the report's run
    python tools/fault_inject.py --trials 1 --mode during_save --out /tmp/fi   # the test's

Why: the trainer claims that a run killed at any moment, a checkpoint write included, resumes
from the newest complete checkpoint and logs exactly the metrics of an uninterrupted run (CPU,
fp32). This script checks the claim by brute force on the tiny random Qwen2 of the tests (the
same model folder, tokenizer and data as tests/test_trainer_e2e.py), with a checkpoint after
every step so that kills often land inside a save:

  1. a reference run, uninterrupted (its wall time sets the kill window);
  2. per trial, a fresh run folder: start the trainer in its own session, SIGKILL its main
     process -- `random`: at a uniform moment of the reference's wall time (--window: a part of
     it; a run spends its first ~40% starting up); `during_save`: as
     soon as the temp folder of a random step's checkpoint (.tmp_step_N) appears, plus 0-50 ms;
     `mid_run`: once step 0 is logged, at a uniform moment of the remaining steps (from the
     reference's step time x 1.1, so some runs end first) --, count the
     processes of its session still alive 5 s later (orphans; then killed), resume with
     --resume to the end, and compare metrics.jsonl with the reference's (timings excluded).

A trial is `exact` (every line equal), `differs`, or `resume_failed` (non-zero exit). The
output folder gets trials.jsonl (one line per trial: mode, kill time, what the kill hit) and
report.json (counts per mode). Every trainer runs under `nice -n 19` with one OMP thread.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests"))  # the tiny model and tokenizer builders

# Wall times and throughputs: they differ between any two runs.
NOISY = ("time/", "perf/", "rollout/sync_seconds", "rollout/sync_gb_per_s", "rollout/generate_seconds",
         "lead/compute_fraction")
MODES = ("random", "during_save", "mid_run")


def prepare(work: str) -> None:
    """The model folder (tiny random Qwen2 + character tokenizer) and 10 prompts, once."""
    from rollout_tiny import save_tiny_qwen2
    from tiny_tokenizer import save_tiny_tokenizer

    if os.path.isfile(os.path.join(work, "train.jsonl")):
        return
    save_tiny_qwen2(os.path.join(work, "model"), seed=0)
    save_tiny_tokenizer(os.path.join(work, "model"))
    with open(os.path.join(work, "train.jsonl"), "w") as f:
        for i in range(10):
            f.write(json.dumps({"problem": f"{i} + {i + 1} = ?", "answer": str(2 * i + 1)}) + "\n")


def overrides(work: str, run_dir: str, steps: int) -> list[str]:
    values = {
        "run_dir": run_dir, "model.path": os.path.join(work, "model"),
        "data.train_path": os.path.join(work, "train.jsonl"), "data.instruction": " Box it.",
        "data.max_prompt_len": 64, "data.prompts_per_step": 4, "rollout.n": 2,
        "rollout.max_response_len": 12, "rollout.dtype": "float32", "rollout.enforce_eager": True,
        "rollout.kv_cache_memory_bytes": 16 << 20, "rollout.temperature": 0.9,
        "ppo.steps": steps, "ppo.mini_batch_prompts": 2, "ppo.micro_batch_size": 2,
        "lead.l_min": 2, "optim.lr": 1e-3, "optim.weight_decay": 0.0, "grading.workers": 1,
        "checkpoint.every": 1, "checkpoint.keep_last": 2, "validation.every": 0,
        "logging.progress": False, "logging.tensorboard": False,
    }
    return [f"{k}={v}" for k, v in values.items()]


def command(work: str, run_dir: str, steps: int, resume: bool) -> list[str]:
    cmd = ["nice", "-n", "19", sys.executable, "-m", "megatron_lead.cli", "train"]
    return cmd + overrides(work, run_dir, steps) + (["--resume"] if resume else [])


def env() -> dict:
    out = {**os.environ, "OMP_NUM_THREADS": "1", "VLLM_LOGGING_LEVEL": "ERROR"}
    out["PYTHONPATH"] = os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH")) if p)
    out.pop("WORLD_SIZE", None)
    return out


def run_to_end(cmd: list[str], log: str, timeout: float) -> int:
    with open(log, "ab") as f:
        try:
            return subprocess.run(cmd, env=env(), stdout=f, stderr=subprocess.STDOUT, timeout=timeout,
                                  start_new_session=True).returncode
        except subprocess.TimeoutExpired:
            return -999


def step_seconds(run_dir: str) -> float:
    """Mean wall time of a step of the run (its time/step_seconds)."""
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        times = [json.loads(line)["time/step_seconds"] for line in f if line.strip()]
    return sum(times) / len(times)


def metrics(run_dir: str) -> list[dict]:
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.isfile(path):
        return []
    with open(path) as f:
        return [{k: v for k, v in json.loads(line).items() if not k.startswith(NOISY)} for line in f if line.strip()]


def _session_pids(sid: int) -> list[int]:
    import psutil

    out = []
    for p in psutil.process_iter(["pid"]):
        try:
            if os.getsid(p.info["pid"]) == sid:
                out.append(p.info["pid"])
        except (ProcessLookupError, PermissionError, psutil.Error):
            continue
    return out


def _checkpoint_state(run_dir: str) -> dict:
    ckpts = os.path.join(run_dir, "checkpoints")
    names = sorted(os.listdir(ckpts)) if os.path.isdir(ckpts) else []
    return {"complete": [n for n in names if n.startswith("step_")],
            "temp": [n for n in names if n.startswith(".tmp_step_")],
            "metrics_lines": len(metrics(run_dir))}


def kill_once(cmd: list[str], run_dir: str, log: str, mode: str, window: float, rng: random.Random,
              steps: int, save: int = 0, lo: float = 0.02, hi: float = 1.0, step_seconds: float = 0.0) -> dict:
    """Start the trainer, SIGKILL its main process per `mode`; what the kill hit, orphans."""
    with open(log, "ab") as f:
        proc = subprocess.Popen(cmd, env=env(), stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
    started = time.monotonic()
    deadline = started + (rng.uniform(lo, hi) * window if mode == "random" else window * 3)
    if mode == "mid_run":  # after step 0 is logged: a uniform moment of the remaining steps' time
        metrics_file = os.path.join(run_dir, "metrics.jsonl")
        while proc.poll() is None and time.monotonic() < deadline and not os.path.isfile(metrics_file):
            time.sleep(0.01)
        deadline = time.monotonic() + rng.uniform(0.0, 1.1) * step_seconds * (steps - 1)
    ckpts = os.path.join(run_dir, "checkpoints")
    target = f".tmp_step_{save or rng.randint(1, steps):08d}"  # during_save: the save to kill
    hit = None
    while time.monotonic() < deadline and proc.poll() is None:
        if mode == "during_save" and os.path.isdir(os.path.join(ckpts, target)):
            time.sleep(rng.uniform(0.0, 0.05))
            hit = target
            break
        time.sleep(0.01 if mode == "during_save" else 0.05)
    at = time.monotonic() - started
    finished_first = proc.poll() is not None
    if not finished_first:
        os.kill(proc.pid, signal.SIGKILL)  # the main process only, as the OOM killer would
    proc.wait()
    state = _checkpoint_state(run_dir)
    time.sleep(5.0)
    orphans = [p for p in _session_pids(proc.pid) if p != proc.pid]
    what = []
    for pid in orphans:  # only processes of the session this trial started
        try:
            what.append(" ".join(open(f"/proc/{pid}/cmdline").read().split("\0"))[:100])
            os.kill(pid, signal.SIGKILL)
        except (OSError, ProcessLookupError):
            pass
    return {"kill_s": round(at, 3), "finished_before_kill": finished_first, "hit": hit,
            "orphans": len(orphans), "orphan_cmdlines": what, **state}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--trials", type=int, default=50)
    p.add_argument("--mode", choices=MODES + ("mixed", "mid_mixed"), default="mixed",
                   help="mixed: alternate random and during_save; mid_mixed: mid_run and during_save")
    p.add_argument("--steps", type=int, default=3, help="RL steps of each run (checkpoint after each)")
    p.add_argument("--out", required=True, help="output folder (work files, trials.jsonl, report.json)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--window", type=float, nargs=2, default=(0.02, 1.0), metavar=("LO", "HI"),
                   help="random: kill at a uniform moment in [LO, HI] x the reference's wall time")
    p.add_argument("--kill-save", type=int, default=0,
                   help="during_save: kill inside this step's checkpoint write (0: a random step's)")
    p.add_argument("--timeout", type=float, default=900.0, help="seconds per trainer run")
    args = p.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    prepare(args.out)
    rng = random.Random(args.seed)
    ref_dir, log = os.path.join(args.out, "reference"), os.path.join(args.out, "trainer.log")
    ref = metrics(ref_dir)
    window = None
    if len(ref) == args.steps and os.path.isfile(os.path.join(args.out, "reference_seconds")):
        window = float(open(os.path.join(args.out, "reference_seconds")).read())
    else:
        shutil.rmtree(ref_dir, ignore_errors=True)
        t0 = time.monotonic()
        rc = run_to_end(command(args.out, ref_dir, args.steps, False), log, args.timeout)
        window = time.monotonic() - t0
        ref = metrics(ref_dir)
        if rc != 0 or len(ref) != args.steps:
            print(f"fault_inject: the reference run failed (exit {rc}); see {log}", file=sys.stderr)
            return 2
        open(os.path.join(args.out, "reference_seconds"), "w").write(f"{window:.3f}")
    print(f"reference: {args.steps} steps in {window:.1f} s", flush=True)

    trials_path = os.path.join(args.out, "trials.jsonl")
    done = sum(1 for _ in open(trials_path)) if os.path.isfile(trials_path) else 0
    for n in range(done, done + args.trials):
        cycle = {"mixed": MODES[:2], "mid_mixed": MODES[:0:-1]}.get(args.mode, (args.mode,))
        mode = cycle[n % len(cycle)]
        run_dir = os.path.join(args.out, f"trial_{n:03d}")
        shutil.rmtree(run_dir, ignore_errors=True)
        t0 = time.monotonic()
        kill = kill_once(command(args.out, run_dir, args.steps, False), run_dir, log, mode, window, rng, args.steps,
                         args.kill_save, *args.window, step_seconds=step_seconds(ref_dir))
        rc = run_to_end(command(args.out, run_dir, args.steps, True), log, args.timeout)
        got = metrics(run_dir)
        outcome = "resume_failed" if rc != 0 else ("exact" if got == ref else "differs")
        record = {"trial": n, "mode": mode, **kill, "resume_exit": rc, "outcome": outcome,
                  "seconds": round(time.monotonic() - t0, 1)}
        with open(trials_path, "a") as f:
            f.write(json.dumps(record) + "\n")
        print(json.dumps(record), flush=True)
        if outcome == "exact":
            shutil.rmtree(run_dir, ignore_errors=True)  # keep the evidence of failures only
    report = summarize(trials_path)
    with open(os.path.join(args.out, "report.json"), "w") as f:
        json.dump(report, f, indent=2)
    print(json.dumps(report), flush=True)
    return 0 if all(r["exact"] == r["trials"] for r in report["modes"].values()) else 1


def summarize(trials_path: str) -> dict:
    rows = [json.loads(line) for line in open(trials_path) if line.strip()]
    modes: dict = {}
    for r in rows:
        m = modes.setdefault(r["mode"], {"trials": 0, "exact": 0, "differs": 0, "resume_failed": 0,
                                         "killed_with_temp_folder": 0, "killed_before_first_checkpoint": 0,
                                         "finished_before_kill": 0, "orphans": 0})
        m["trials"] += 1
        m[r["outcome"]] += 1
        m["killed_with_temp_folder"] += bool(r["temp"])
        m["killed_before_first_checkpoint"] += not r["complete"]
        m["finished_before_kill"] += bool(r["finished_before_kill"])
        m["orphans"] += r["orphans"]
    return {"trials": len(rows), "exact": sum(r["outcome"] == "exact" for r in rows), "modes": modes}


if __name__ == "__main__":
    sys.exit(main())
