"""Counting skipped optimizer updates, and stopping a run that only skips.

A non-finite loss or gradient skips its update (policy.optim.optimizer_step: weights, optimizer
state and lr schedule untouched), so one bad batch costs one update, not the run. But a run
whose updates keep failing (diverged weights, a broken reward, bad data) would otherwise go on
generating and grading for nothing: after `ppo.max_consecutive_skipped_steps` steps in a row
each with a skipped update, the trainer stops with a one-line message. The counters are part
of the checkpointed trainer state, so a resumed run keeps counting, and the summary lists them.
"""

from __future__ import annotations


class TooManySkips(RuntimeError):
    """The run has skipped updates in too many consecutive steps."""


class SkipGuard:
    def __init__(self, max_consecutive: int):
        if max_consecutive < 0:
            raise ValueError(f"ppo.max_consecutive_skipped_steps={max_consecutive} must be >= 0")
        self.max_consecutive = max_consecutive
        self.total_updates = 0      # skipped optimizer updates over the run
        self.total_steps = 0        # steps with at least one skipped update
        self.consecutive = 0        # such steps in a row, up to the last one

    def update(self, step: int, metrics: dict) -> None:
        """Count this step's `train/skipped_updates`; raise TooManySkips past the limit."""
        skipped = int(metrics.get("train/skipped_updates", 0))
        self.total_updates += skipped
        if skipped:
            self.total_steps += 1
            self.consecutive += 1
        else:
            self.consecutive = 0
        if self.max_consecutive and self.consecutive >= self.max_consecutive:
            updates = int(metrics.get("train/updates", 0))
            raise TooManySkips(
                f"stopping at step {step}: {self.consecutive} consecutive steps skipped optimizer "
                f"updates for a non-finite loss or gradient ({skipped} of {updates} this step; "
                f"ppo.max_consecutive_skipped_steps={self.max_consecutive}); the weights are those of "
                f"the last good update: check the data and rewards or lower optim.lr, then --resume")

    def state_dict(self) -> dict:
        return {"total_updates": self.total_updates, "total_steps": self.total_steps,
                "consecutive": self.consecutive}

    def load_state_dict(self, state: dict) -> None:
        self.total_updates = int(state.get("total_updates", 0))
        self.total_steps = int(state.get("total_steps", 0))
        self.consecutive = int(state.get("consecutive", 0))

    def summary(self) -> dict:
        return {"skipped_updates": self.total_updates, "steps_with_skipped_updates": self.total_steps}
