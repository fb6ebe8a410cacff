"""Prompt records read from JSONL or Parquet, with every bad row skipped and counted.

A training run should not die at step 3,000 on one malformed row, nor silently train on half a
file: so a bad row is skipped and counted in `DataStats` (the end-of-run report prints the
counts), and only what makes the whole file unusable (missing, not Parquet, nothing usable in
it) is refused, with a one-line error naming the file.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterator

PROMPT_KEYS = ("prompt", "problem")
"""Columns that may hold the problem text, in order of preference (first one present wins)."""
LEVEL_KEYS = ("level", "difficulty")
"""Optional columns kept as `PromptRecord.level` (for per-difficulty metrics)."""
JSON_SUFFIXES = (".jsonl", ".json")
PARQUET_SUFFIXES = (".parquet", ".pq")


@dataclass
class PromptRecord:
    """One training prompt: the raw problem (instruction and chat template come later) and its
    reference answer for the grader."""

    id: str
    """Stable identifier: the row's `id` column, else its 1-based line (JSONL) or row (Parquet)
    number, so the same file gives the same ids on every rank and every restart."""
    problem: str
    """The problem text, without instruction suffix or chat template."""
    answer: str
    """The reference answer, as text (numbers in the file are converted with str())."""
    level: str | None = None
    """The row's `level` or `difficulty` column as text, when there is one."""


@dataclass
class DataStats:
    """What the data phase kept and why it left out the rest; counts add up over calls so one
    object can follow a run from the file to the tokenised prompts."""

    loaded: int = 0
    """Rows kept by `load_prompts` (before the prompt-length filter)."""
    skipped_bad_json: int = 0
    """JSONL lines that are not a JSON object: syntax errors, a truncated last line, bad UTF-8."""
    skipped_missing_answer: int = 0
    """Rows without an `answer` (absent, null or NaN)."""
    skipped_empty_answer: int = 0
    """Rows whose answer is an empty or whitespace-only string."""
    skipped_bad_answer: int = 0
    """Rows whose answer is neither text nor a number (a list, a dict, a bool), or is text that
    is not valid Unicode (a lone surrogate, as a JSON `\\ud800` escape gives)."""
    skipped_bad_prompt: int = 0
    """Rows without a non-empty string in `prompt`/`problem`, with a prompt that is not valid
    Unicode (lone surrogates: the tokenizer would raise on them and stop the run), or with an id
    that is not text/int."""
    skipped_duplicate_id: int = 0
    """Rows whose id was already kept earlier in the file (the first one wins)."""
    dropped_too_long: int = 0
    """Prompts longer than the maximum prompt length once templated (counted by PromptEncoder)."""

    def as_dict(self) -> dict[str, int]:
        return asdict(self)

    @property
    def skipped(self) -> int:
        """Rows left out by `load_prompts`, all reasons together."""
        return sum(v for k, v in asdict(self).items() if k.startswith("skipped_"))

    def summary(self) -> str:
        """The non-zero counts on one line, for logs and error messages."""
        return ", ".join(f"{k}={v}" for k, v in asdict(self).items() if v) or "no rows"


def load_prompts(path: str, stats: DataStats | None = None) -> list[PromptRecord]:
    """Read `path` (.jsonl/.json: one JSON object a line, or a JSON array; .parquet) into records.

    Each row needs `prompt` or `problem` (a non-empty string) and `answer` (text or a number);
    `id` and `level`/`difficulty` are optional. Bad rows are skipped and counted in `stats`.
    Raises FileNotFoundError if the file is missing, ValueError if it cannot be read as its
    suffix says or has no usable row.
    """
    stats = stats if stats is not None else DataStats()
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"prompt file {path} does not exist (or is not a file)")
    local = DataStats()  # this file's counts, for the error message; added to `stats` at the end
    suffix = p.suffix.lower()
    if suffix in JSON_SUFFIXES:
        rows = _json_rows(p, local)
    elif suffix in PARQUET_SUFFIXES:
        rows = _parquet_rows(p)
    else:
        raise ValueError(f"prompt file {path}: unknown suffix {p.suffix!r}; use "
                         f"{', '.join(JSON_SUFFIXES + PARQUET_SUFFIXES)}")
    records: list[PromptRecord] = []
    seen: set[str] = set()
    for number, row in rows:
        record = _record(number, row, local)
        if record is None:
            continue
        if record.id in seen:  # checked on kept rows only: a bad row does not claim its id
            local.skipped_duplicate_id += 1
            continue
        seen.add(record.id)
        records.append(record)
    local.loaded = len(records)
    for key, value in local.as_dict().items():
        setattr(stats, key, getattr(stats, key) + value)
    if not records:
        raise ValueError(f"prompt file {path} has no usable prompt ({local.summary()}; a row "
                         "needs a `prompt` or `problem` string and an `answer`)")
    return records


def _json_rows(p: Path, stats: DataStats) -> Iterator[tuple[int, Any]]:
    """(1-based line number, parsed object) for JSON lines; a whole-file array when the file
    starts with '['. Lines that do not parse are counted here, as they never become rows."""
    data = p.read_bytes()
    if data.lstrip()[:1] == b"[":
        try:
            items = json.loads(data)
        except (ValueError, UnicodeDecodeError) as e:
            raise ValueError(f"prompt file {p} is not a valid JSON array: {e}") from None
        yield from enumerate(items, start=1)
        return
    for number, line in enumerate(data.split(b"\n"), start=1):
        if not line.strip():
            continue  # blank lines (and the empty string after the final newline) are not rows
        try:
            yield number, json.loads(line)
        except (ValueError, UnicodeDecodeError):  # JSONDecodeError is a ValueError
            stats.skipped_bad_json += 1


def _parquet_rows(p: Path) -> Iterator[tuple[int, Any]]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise ImportError("reading Parquet prompts needs pyarrow: pip install pyarrow") from None
    try:
        rows = pq.read_table(p).to_pylist()
    except Exception as e:  # ArrowInvalid, OSError, ...: whatever the damage, one line
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ValueError(f"prompt file {p} is not a readable Parquet file: {reason}") from None
    return enumerate(rows, start=1)


def _record(number: int, row: Any, stats: DataStats) -> PromptRecord | None:
    """The row as a PromptRecord, or None after counting why it is unusable."""
    if not isinstance(row, dict):  # a JSON line that is valid but not an object: `3`, `[..]`
        stats.skipped_bad_json += 1
        return None
    problem = next((row[k] for k in PROMPT_KEYS if row.get(k) is not None), None)
    if not isinstance(problem, str) or not problem.strip() or not _valid_text(problem):
        stats.skipped_bad_prompt += 1
        return None
    raw_id = row.get("id")
    if raw_id is None:
        rid = str(number)
    elif isinstance(raw_id, (str, int)) and not isinstance(raw_id, bool) and _valid_text(str(raw_id)):
        rid = str(raw_id)
    else:
        stats.skipped_bad_prompt += 1
        return None
    answer = row.get("answer")
    if answer is None or (isinstance(answer, float) and math.isnan(answer)):
        stats.skipped_missing_answer += 1
        return None
    if isinstance(answer, (int, float)) and not isinstance(answer, bool):
        answer = str(answer)
    if not isinstance(answer, str) or not _valid_text(answer):
        stats.skipped_bad_answer += 1
        return None
    if not answer.strip():
        stats.skipped_empty_answer += 1
        return None
    level = next((row[k] for k in LEVEL_KEYS if row.get(k) is not None), None)
    if isinstance(level, bool) or not isinstance(level, (str, int, float)):
        level = None
    return PromptRecord(id=rid, problem=problem, answer=answer,
                        level=None if level is None else str(level))


def _valid_text(text: str) -> bool:
    """Encodable as UTF-8: no lone surrogates (valid JSON can carry them, tokenizers refuse them)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True
