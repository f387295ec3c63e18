"""JSON-lines files of objects, read with one clear error line per bad row."""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Iterator


def json_objects(path: Path, error: type[Exception], partial_last: bool = False) -> Iterator[tuple[str, int, dict]]:
    """(where, line index, object) for each non-blank line of path.

    partial_last: a last line that is not valid JSON is a run still writing (or killed
    mid-write): skipped with a warning instead of an error.
    """
    # split("\n") rather than splitlines(): the latter also breaks at U+2028 etc.,
    # which json.dumps(ensure_ascii=False) leaves raw inside strings.
    lines = path.read_text(encoding="utf-8").split("\n")
    last = max((i for i, line in enumerate(lines) if line.strip()), default=-1)
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        where = f"{path}:{i + 1}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            if partial_last and i == last:
                warnings.warn(f"{where}: skipping a partially written last line", stacklevel=3)
                continue
            raise error(f"{where}: invalid JSON ({e.msg})") from None
        if not isinstance(row, dict):
            raise error(f"{where}: expected a JSON object, got {type(row).__name__}")
        yield where, i, row
