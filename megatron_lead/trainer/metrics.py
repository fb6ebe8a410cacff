"""Step metrics: `metrics.jsonl` and TensorBoard under the same names, a progress bar, phase timers.

Only rank 0 writes. Every value handed to `MetricsLogger.log` is already global (reduced over the
data-parallel group by the phase that computed it), so rank 0's view is the run's.
"""

from __future__ import annotations

import json
import os
import time
from contextlib import contextmanager

import torch

PROGRESS_KEYS = (("reward", "reward/correct_mean", ".3f"), ("len", "response/length_mean", ".0f"),
                 ("w_eff", "lead/w_eff", ".3f"))


class PhaseTimer:
    """Wall time of each named phase of a step: `with timer("rollout"): ...` -> time/rollout_seconds."""

    def __init__(self):
        self.seconds: dict[str, float] = {}
        self._start = time.perf_counter()

    @contextmanager
    def __call__(self, name: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start

    def metrics(self) -> dict[str, float]:
        out = {f"time/{k}_seconds": v for k, v in self.seconds.items()}
        out["time/step_seconds"] = time.perf_counter() - self._start
        return out


def length_stats(prefix: str, lengths: list[int]) -> dict[str, float]:
    """mean, p50, p90, max of response lengths (tokens); nothing for an empty list."""
    if not lengths:
        return {}
    t = torch.tensor(lengths, dtype=torch.float64)
    return {f"{prefix}_mean": float(t.mean()), f"{prefix}_p50": float(t.quantile(0.5)),
            f"{prefix}_p90": float(t.quantile(0.9)), f"{prefix}_max": float(t.max())}


def _scalar(value) -> float | None:
    try:
        v = float(value)
    except (TypeError, ValueError):
        return None
    return v  # non-finite values are logged as they are (JSON: NaN): a diverging run shows it


class MetricsLogger:
    """Appends one JSON line per step and writes the same scalars to TensorBoard (rank 0 only)."""

    def __init__(self, run_dir: str, total_steps: int, start_step: int = 0, enabled: bool = True,
                 tensorboard: bool = True, progress: bool = True, label: str = "LEAD"):
        """label: the progress bar's title, the method that runs (not "LEAD" for a baseline)."""
        self.enabled = enabled
        self.path = os.path.join(run_dir, "metrics.jsonl")
        self.writer = None
        self.bar = None
        if not enabled:
            return
        os.makedirs(run_dir, exist_ok=True)
        self._truncate_after(start_step)
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            # purge_step drops events of steps a resumed run repeats.
            self.writer = SummaryWriter(os.path.join(run_dir, "tensorboard"), purge_step=start_step)
        if progress:
            from tqdm import tqdm

            self.bar = tqdm(total=total_steps, initial=start_step, desc=label, unit="step",
                            dynamic_ncols=True)

    def _truncate_after(self, start_step: int) -> None:
        """On resume, drop lines of steps >= start_step (written after the checkpoint we resume)."""
        if not os.path.isfile(self.path):
            return
        with open(self.path) as f:
            lines = [ln for ln in f if ln.strip()]
        keep = []
        for ln in lines:
            try:
                if json.loads(ln)["step"] < start_step:
                    keep.append(ln)
            except (ValueError, KeyError, TypeError):
                continue  # a line torn by a crash
        tmp = self.path + ".tmp"
        with open(tmp, "w") as f:
            f.writelines(keep)
        os.replace(tmp, self.path)

    def log(self, step: int, metrics: dict[str, float]) -> None:
        if not self.enabled:
            return
        scalars = {k: v for k, v in ((k, _scalar(v)) for k, v in sorted(metrics.items())) if v is not None}
        with open(self.path, "a") as f:
            f.write(json.dumps({"step": step, **scalars}) + "\n")
        if self.writer is not None:
            for k, v in scalars.items():
                self.writer.add_scalar(k, v, step)
            self.writer.flush()
        if self.bar is not None:
            shown = {label: format(scalars[key], fmt) for label, key, fmt in PROGRESS_KEYS if key in scalars}
            self.bar.set_postfix(shown, refresh=False)
            self.bar.update(1)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        if self.bar is not None:
            self.bar.close()
