"""Correctness reward: the last `\\boxed{...}` of a response against the gold answer (math-verify).

    with Grader(num_workers=2, timeout=5.0) as g:
        results = g.grade(responses, answers)     # [GradeResult(correct, reason), ...]

Extraction and the cheap verdicts (`no_boxed`, `empty_answer`, over-long content) happen in the
calling process; the math-verify check runs in a pool of worker processes (pool.py) with a
per-answer deadline, so a pathological answer costs at most `timeout` seconds and one worker
restart, never the trainer. A timeout or a worker error scores 0 with its own reason, counted in
`Grader.counts`. Importing this package loads neither sympy nor math-verify: only workers do.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass

from .math import MAX_DIGITS, REASONS, extract_last_boxed, precheck
from .pool import WorkerPool

__all__ = ["Grader", "GradeResult", "extract_last_boxed", "REASONS"]

_TARGET = "megatron_lead.rewards.math:grade_one"
_WARMUP = ["\\frac{1}{2}", "0.5"]  # loads sympy's lazy parts before a worker reports ready
log = logging.getLogger(__name__)
_POOL_REASON = {"timeout": "timeout", "died": "grader_error", "error": "grader_error"}


@dataclass(frozen=True)
class GradeResult:
    correct: bool
    reason: str  # one of REASONS


class Grader:
    """Grades (response, gold answer) pairs in parallel; order preserved.

    Workers start at construction (they import math-verify while the caller does other work);
    `grade` waits for them if needed. Identical (boxed content, answer) pairs in one call are
    checked once. `max_digits=None` turns off the size check on numbers (the timeout remains).
    """

    def __init__(self, num_workers: int = 2, timeout: float = 5.0, *, max_digits: float | None = MAX_DIGITS):
        self.timeout = float(timeout)
        self.max_digits = max_digits
        self.counts: Counter = Counter()
        self._pool = WorkerPool(_TARGET, num_workers=num_workers, timeout=timeout, warmup=_WARMUP)

    @property
    def pids(self) -> list[int]:
        """Process ids of the current workers (they change when a worker is replaced)."""
        return self._pool.pids

    def wait_ready(self) -> None:
        """Block until every worker has imported math-verify (grade does not need this)."""
        self._pool.wait_ready()

    def grade(self, responses: list[str], answers: list[str]) -> list[GradeResult]:
        if len(responses) != len(answers):
            raise ValueError(f"{len(responses)} responses but {len(answers)} answers")
        results: list = [None] * len(responses)
        tasks: dict[tuple[str, str], list[int]] = {}
        for i, (response, answer) in enumerate(zip(responses, answers)):
            content, reason = precheck(response, answer)
            if reason is not None:
                results[i] = GradeResult(False, reason)
            else:
                tasks.setdefault((content, answer), []).append(i)
        keys = list(tasks)
        outcomes = self._pool.map([[c, a, self.max_digits] for c, a in keys])
        for key, (status, value) in zip(keys, outcomes):
            if status == "ok":
                result = GradeResult(bool(value[0]), str(value[1]))
            else:
                result = GradeResult(False, _POOL_REASON[status])
                if status == "error":
                    log.warning("grader worker raised on %r: %s", key[0][:200], value)
            for i in tasks[key]:
                results[i] = result
        self.counts.update(r.reason for r in results)
        return results

    def close(self) -> None:
        """Kill and reap every worker; safe to call twice (also runs at interpreter exit)."""
        self._pool.close()

    def __enter__(self) -> "Grader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
