"""Reading JSON-lines files strictly: every line an object, or a one-line error naming file and line."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator


def fail(path, line_no: int, what: str) -> None:
    raise ValueError(f"{path} line {line_no}: {what}")


def iter_objects(path: str | Path) -> Iterator[tuple[int, dict]]:
    """(line number, object) of every non-blank line; a line that is not a JSON object raises."""
    with open(path) as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                fail(path, line_no, f"not valid JSON ({e.msg} at column {e.colno})")
            if not isinstance(obj, dict):
                fail(path, line_no, "expected a JSON object")
            yield line_no, obj
