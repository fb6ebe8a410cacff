"""`megatron-lead prepare-data`: what a user downloads -> the trainer's prompt JSONL.

    megatron-lead prepare-data MATH/train/*.parquet --out data/math_l3to5_train.jsonl --levels 3,4,5
    megatron-lead prepare-data gsm8k/train.jsonl --out data/gsm8k_train.jsonl
    megatron-lead prepare-data mine.jsonl --out data/mine.jsonl --answer-field final --problem-field question

Every output line is {"problem", "answer", "level", "id"} (level only when the source has one),
the fields `data/datasets.load_prompts` reads. Three source formats, detected per file from its
first row unless --format says:

  math     MATH's rows (`problem`, `solution`, `level`, `type`): the answer is the content of the
           LAST `\\boxed{...}` of the solution, found by the grader's own extraction
           (rewards.math.extract_last_boxed), so gold answers and the policy's answers are read the
           same way: braces nested to any depth, escaped braces skipped, `\\boxed {x}` and `\\fbox{x}`
           accepted (as the grader accepts them), an unbalanced last box refused rather than an
           earlier box taken. `level` "Level 3" becomes 3.
  gsm8k    `question` and `answer` ending in "#### 42": the answer is what follows the last ####
           (thousands separators dropped: "1,200" -> "1200").
  generic  the problem in --problem-field (default: prompt, problem or question) and the answer in
           --answer-field (default: answer), text or a number.

Nothing is lost silently: every row read is written or dropped, a dropped row prints one line
(file, line or row number, reason) to stderr, the counts per reason end the run, and written +
dropped = read is checked. --levels keeps those levels only (the paper's split: 3,4,5);
duplicates (the same problem text after whitespace is collapsed) keep the first. The output
appears only when complete (a temporary file, then a rename).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from megatron_lead.data.datasets import JSON_SUFFIXES, LEVEL_KEYS, PARQUET_SUFFIXES, _parquet_rows, _valid_text

HELP = "convert MATH / GSM8K / generic JSONL or Parquet into the trainer's prompt JSONL"
FORMATS = ("auto", "math", "gsm8k", "generic")
GENERIC_PROBLEM_KEYS = ("prompt", "problem", "question")
_LEVEL = re.compile(r"^\s*(?:level\s*)?(\d+)\s*$", re.IGNORECASE)
_THOUSANDS = re.compile(r"^[+-]?\d{1,3}(,\d{3})+(\.\d+)?$")


@dataclass
class Report:
    """What one conversion read, wrote and dropped (reason -> count), and one line per drop."""

    read: int = 0
    written: int = 0
    dropped: Counter = field(default_factory=Counter)
    messages: list[str] = field(default_factory=list)

    def drop(self, where: str, reason: str, detail: str = "") -> None:
        self.dropped[reason] += 1
        self.messages.append(f"{where}: dropped ({reason}{': ' + detail if detail else ''})")

    def summary(self) -> str:
        reasons = ", ".join(f"{k}={v}" for k, v in sorted(self.dropped.items()))
        return (f"read {self.read} rows: wrote {self.written}, dropped {sum(self.dropped.values())}"
                + (f" ({reasons})" if reasons else ""))


def parse_levels(text: str | None) -> set[int] | None:
    """"3,4,5" -> {3, 4, 5}; None or "" -> None (all levels)."""
    if not text:
        return None
    try:
        levels = {int(part) for part in text.split(",") if part.strip()}
    except ValueError:
        raise ValueError(f"--levels {text!r}: expected comma-separated integers such as 3,4,5") from None
    if not levels:
        raise ValueError(f"--levels {text!r}: no level given")
    return levels


def level_number(value: Any) -> int | None:
    """MATH's "Level 3" (or 3, "3") -> 3; None when it has no number ("Level ?")."""
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        return int(value) if value.is_integer() else None
    m = _LEVEL.match(str(value))
    return int(m.group(1)) if m else None


def _rows(path: Path, report: Report) -> Iterator[tuple[str, int, Any]]:
    """(location, number, row) for every row of a JSONL/JSON or Parquet file; a JSON line that
    does not parse is dropped here (it never becomes a row)."""
    suffix = path.suffix.lower()
    if suffix in PARQUET_SUFFIXES:
        for number, row in _parquet_rows(path):
            report.read += 1
            yield f"{path}:row {number}", number, row
        return
    if suffix not in JSON_SUFFIXES:
        raise ValueError(f"{path}: unknown suffix {path.suffix!r}; use {', '.join(JSON_SUFFIXES + PARQUET_SUFFIXES)}")
    data = path.read_bytes()
    if data.lstrip()[:1] == b"[":
        try:
            items = json.loads(data)
        except (ValueError, UnicodeDecodeError) as e:
            raise ValueError(f"{path} is not a valid JSON array: {e}") from None
        for number, row in enumerate(items, start=1):
            report.read += 1
            yield f"{path}:item {number}", number, row
        return
    for number, line in enumerate(data.split(b"\n"), start=1):
        if not line.strip():
            continue
        report.read += 1
        try:
            row = json.loads(line)
        except (ValueError, UnicodeDecodeError) as e:
            report.drop(f"{path}:{number}", "bad_json", " ".join(str(e).split())[:80])
            continue
        yield f"{path}:{number}", number, row


def _text(value: Any) -> str | None:
    """A usable text field: a non-empty valid string, or a finite number as text; else None."""
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, (int, float)):
        return None if isinstance(value, float) and not math.isfinite(value) else (
            str(int(value)) if isinstance(value, float) and value.is_integer() else str(value))
    if isinstance(value, str) and value.strip() and _valid_text(value):
        return value.strip()
    return None


def _detect(row: dict) -> str:
    if "solution" in row:
        return "math"
    answer = row.get("answer")
    if isinstance(answer, str) and "####" in answer:
        return "gsm8k"
    return "generic"


def _gsm8k_answer(text: str) -> str | None:
    tail = text.rsplit("####", 1)
    if len(tail) != 2:
        return None
    answer = tail[1].strip()
    if _THOUSANDS.match(answer):
        answer = answer.replace(",", "")
    return answer or None


def convert_row(row: Any, fmt: str, answer_field: str, problem_field: str | None
                ) -> tuple[dict | None, str, str]:
    """(output row without id, "", "") or (None, reason, detail) for one source row."""
    from megatron_lead.rewards.math import extract_last_boxed  # the grader's parser, for gold answers too

    if not isinstance(row, dict):
        return None, "not_an_object", type(row).__name__
    kind = _detect(row) if fmt == "auto" else fmt  # callers pass the file's detected format
    keys = (problem_field,) if problem_field else (("problem",) if kind == "math" else
                                                    ("question",) if kind == "gsm8k" else GENERIC_PROBLEM_KEYS)
    raw_problem = next((row[k] for k in keys if row.get(k) is not None), None)
    problem = _text(raw_problem) if isinstance(raw_problem, str) else None
    if problem is None:
        return None, "no_problem", f"no text in {'/'.join(keys)}"
    if kind == "math":
        solution = row.get("solution")
        if not isinstance(solution, str):
            return None, "no_solution", "no `solution` text"
        answer = extract_last_boxed(solution)
        if answer is None or not answer.strip():
            return None, "no_boxed_answer", "the solution has no complete \\boxed{...}"
        answer = answer.strip()
    elif kind == "gsm8k":
        raw = row.get("answer")
        answer = _gsm8k_answer(raw) if isinstance(raw, str) else None
        if answer is None:
            return None, "no_final_answer", "the answer has no '#### <answer>'"
    else:
        if answer_field not in row:
            return None, "no_answer", f"no `{answer_field}` field"
        answer = _text(row[answer_field])
        if answer is None:
            return None, "bad_answer", f"`{answer_field}` is empty or not text / a number"
    if not _valid_text(answer):
        return None, "bad_answer", "not valid Unicode"
    out = {"problem": problem, "answer": answer}
    level = next((row[k] for k in LEVEL_KEYS if row.get(k) is not None), None)
    if level is not None:
        number = level_number(level)
        out["level"] = number if number is not None else str(level)
    raw_id = row.get("id", row.get("unique_id"))
    if isinstance(raw_id, (str, int)) and not isinstance(raw_id, bool) and str(raw_id).strip() \
            and _valid_text(str(raw_id)):
        out["id"] = str(raw_id)
    return out, "", ""


def prepare(inputs: list[str], out: str, fmt: str = "auto", answer_field: str = "answer",
            problem_field: str | None = None, levels: set[int] | None = None, dedup: bool = True) -> Report:
    """Convert `inputs` into `out` (see the module docstring); returns the report."""
    if fmt not in FORMATS:
        raise ValueError(f"--format {fmt!r} is not one of {', '.join(FORMATS)}")
    report = Report()
    seen_problems: set[str] = set()
    seen_ids: set[str] = set()
    rows: list[dict] = []
    paths = [Path(name) for name in inputs]
    for path in paths:
        if not path.is_file():
            raise FileNotFoundError(f"input {path} does not exist (or is not a file)")
    # Rows without an id get "<file>-<line or row>"; files of the same name (MATH's per-subject
    # train.parquet) are told apart by their folder.
    stems = Counter(p.stem for p in paths)
    for path in paths:
        prefix = path.stem if stems[path.stem] == 1 else "/".join(path.with_suffix("").parts[-2:])
        kind = fmt
        for where, number, row in _rows(path, report):
            if kind == "auto" and isinstance(row, dict):
                kind = _detect(row)  # the file's first row decides its format
            record, reason, detail = convert_row(row, kind, answer_field, problem_field)
            if record is None:
                report.drop(where, reason, detail)
                continue
            if levels is not None:
                level = level_number(record.get("level"))
                if level is None:
                    report.drop(where, "no_level", f"level {record.get('level')!r} with --levels")
                    continue
                if level not in levels:
                    report.drop(where, "level_not_selected", f"level {level}")
                    continue
            key = " ".join(record["problem"].split())
            if dedup and key in seen_problems:
                report.drop(where, "duplicate_problem")
                continue
            seen_problems.add(key)
            rid = record.pop("id", None) or f"{prefix}-{number}"
            if rid in seen_ids:
                report.drop(where, "duplicate_id", rid)
                continue
            seen_ids.add(rid)
            rows.append({**record, "id": rid})
    if report.read != len(rows) + sum(report.dropped.values()):  # nothing lost silently
        raise RuntimeError(f"prepare-data lost rows: read {report.read}, wrote {len(rows)}, "
                           f"dropped {sum(report.dropped.values())}")
    if not rows:
        raise ValueError(f"no usable row in {', '.join(inputs)} ({report.summary()})")
    target = Path(out)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
        os.replace(tmp, target)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    report.written = len(rows)
    return report


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("inputs", nargs="+", help="JSONL / JSON / Parquet files (MATH, GSM8K or generic rows)")
    p.add_argument("--out", required=True, help="JSONL to write: {problem, answer, level, id} per line")
    p.add_argument("--format", default="auto", choices=FORMATS,
                   help="row format (auto, per file from its first row: math if it has `solution`, gsm8k if "
                        "its answer has ####, else generic)")
    p.add_argument("--answer-field", default="answer", help="generic rows: the answer's field (default answer)")
    p.add_argument("--problem-field", default=None,
                   help="the problem's field (default: problem for math, question for gsm8k, "
                        "else prompt / problem / question)")
    p.add_argument("--levels", default=None, help="keep these levels only, e.g. 3,4,5 (MATH's 'Level 3' counts as 3)")
    p.add_argument("--keep-duplicates", action="store_true", help="do not drop repeated problems")
    p.add_argument("--quiet", action="store_true", help="no line per dropped row (the counts still print)")


def run(args: argparse.Namespace) -> int:
    report = prepare(args.inputs, args.out, fmt=args.format, answer_field=args.answer_field,
                     problem_field=args.problem_field, levels=parse_levels(args.levels),
                     dedup=not args.keep_duplicates)
    if not args.quiet:
        for line in report.messages:
            print(line, file=sys.stderr)
    print(f"{report.summary()}; wrote {args.out}")
    return 0
