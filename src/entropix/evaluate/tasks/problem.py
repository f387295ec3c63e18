"""The problem record every task produces, and the errors task loading raises."""

from __future__ import annotations

from dataclasses import dataclass, field

from entropix import EntropixError


class TaskError(EntropixError, ValueError):
    """Bad task name, arguments or data file (one-line message)."""


class HubUnavailable(EntropixError, RuntimeError):
    """The Hugging Face Hub cannot be used (library missing or offline)."""


@dataclass(frozen=True)
class Problem:
    """One evaluation item; expected is already normalised for its kind."""

    id: str
    prompt: str
    expected: str
    kind: str = "number"
    # Excluded from hashing so that problems stay usable as dict keys.
    extra: dict = field(default_factory=dict, hash=False)


def check_limit(limit: int | None) -> None:
    if limit is not None and (not isinstance(limit, int) or limit < 0):
        raise TaskError(f"limit must be a non-negative integer, got {limit!r}")
