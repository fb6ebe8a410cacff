"""`megatron-lead grade`: the trainer's correctness grader as a command, on a JSONL file.

  megatron-lead grade IN.jsonl --out OUT.jsonl [--timeout S] [--workers N]

Input, one JSON object per line: {"response": str, "answer": str, ...any other keys}.
Output, one line per input line, in order: the input object plus "correct" (bool) and "reason"
(`ok`, `wrong`, `no_boxed`, `empty_answer`, `timeout`, `parse_error`, ...; see
megatron_lead.rewards.REASONS). The whole file is validated before any grading, so a bad line
costs nothing, and OUT appears only when complete (temp file + rename). Users re-grade logged
rollouts with it, or check the grader on their own answer formats before a run.
"""

from __future__ import annotations

import argparse
import json
import time
from collections import Counter
from pathlib import Path

from megatron_lead.jsonl import fail, iter_objects

HELP = "grade responses against gold answers (last \\boxed{} with math-verify), JSONL in and out"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("input", type=Path, help='JSONL file, one {"response": ..., "answer": ...} per line')
    p.add_argument("--out", type=Path, required=True, help="JSONL file to write: input + correct, reason")
    p.add_argument("--timeout", type=float, default=5.0, help="seconds per answer before it scores 0 (default 5)")
    p.add_argument("--workers", type=int, default=2, help="grader worker processes (default 2)")


def read_records(path: Path) -> list[dict]:
    """Parse and validate the whole file up front; blank lines are skipped."""
    records = []
    for line_no, obj in iter_objects(path):
        for key in ("response", "answer"):
            if not isinstance(obj.get(key), str):
                fail(path, line_no, f"field '{key}' is missing or not a string")
        records.append(obj)
    if not records:
        raise ValueError(f"{path}: no records found")
    return records


def run(args: argparse.Namespace) -> int:
    from megatron_lead.rewards import Grader

    if args.workers < 1 or not args.timeout > 0:
        raise ValueError(f"need --workers >= 1 and --timeout > 0, got {args.workers} and {args.timeout}")
    records = read_records(args.input)
    start = time.perf_counter()
    with Grader(num_workers=args.workers, timeout=args.timeout) as grader:
        results = grader.grade([r["response"] for r in records], [r["answer"] for r in records])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_name(args.out.name + ".tmp")
    with open(tmp, "w") as f:
        for rec, res in zip(records, results):
            f.write(json.dumps({**rec, "correct": res.correct, "reason": res.reason}) + "\n")
    tmp.replace(args.out)
    counts = Counter(r.reason for r in results)
    n_ok = sum(r.correct for r in results)
    by_reason = " ".join(f"{k}={v}" for k, v in counts.most_common())
    print(f"graded {len(results)} -> {args.out}: accuracy {n_ok / len(results):.4f} ({n_ok}/{len(results)}); "
          f"{by_reason}; {time.perf_counter() - start:.1f}s")
    return 0
