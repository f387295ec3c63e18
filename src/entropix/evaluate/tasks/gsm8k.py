"""GSM8K: problems from a local JSONL file or the Hugging Face Hub (graded as numbers)."""

from __future__ import annotations

from pathlib import Path

from entropix.answers import normalise_number
from entropix.evaluate.jsonl import json_objects

from .problem import HubUnavailable, Problem, TaskError, check_limit


def _gsm8k_problem(row: dict, index: int, where: str) -> Problem:
    for key in ("question", "answer"):
        if key not in row:
            raise TaskError(f"{where}: missing field {key!r}")
        if not isinstance(row[key], str):
            raise TaskError(f"{where}: field {key!r} must be a string")
    solution, sep, final = row["answer"].rpartition("####")
    if not sep:
        raise TaskError(f"{where}: answer has no '#### N' final line")
    expected = normalise_number(final.strip())
    if expected is None:
        raise TaskError(f"{where}: final answer {final.strip()!r} is not a number")
    extra = {k: v for k, v in row.items() if k not in ("id", "question", "answer")}
    extra["solution"] = solution.strip()  # the worked rationale, useful for few-shot prompts
    pid = str(row["id"]) if row.get("id") is not None else f"gsm8k-{index}"
    return Problem(id=pid, prompt=row["question"].strip(), expected=expected, kind="number", extra=extra)


def load_gsm8k(path: str | Path, limit: int | None = None) -> list[Problem]:
    """Read GSM8K-style JSONL ({"question", "answer" ending in "#### N"}) into problems."""
    check_limit(limit)
    path = Path(path)
    if not path.is_file():
        raise TaskError(f"GSM8K file not found: {path}")
    problems: list[Problem] = []
    for where, index, row in json_objects(path, TaskError):
        if limit is not None and len(problems) >= limit:
            break
        problems.append(_gsm8k_problem(row, index, where))
    return problems


def _hub_unavailable(e: Exception) -> HubUnavailable:
    return HubUnavailable(f"could not load GSM8K from the Hub ({type(e).__name__}: {e}); pass a local JSONL file")


def _rows_from_parquet(split: str) -> list[dict]:
    """The split's rows through huggingface_hub + pyarrow (when `datasets` is missing)."""
    try:
        from huggingface_hub import hf_hub_download
    except ImportError:
        raise HubUnavailable(
            "loading GSM8K from the Hub needs the `datasets` or `huggingface_hub` package; pass a local JSONL file"
        ) from None
    try:
        import pyarrow.parquet as pq  # type: ignore
    except ImportError:
        raise HubUnavailable("reading the Hub's GSM8K parquet files needs `pyarrow` (or install `datasets`); pass a local JSONL file") from None
    try:
        local = hf_hub_download("openai/gsm8k", f"main/{split}-00000-of-00001.parquet", repo_type="dataset")
        return pq.read_table(local).to_pylist()
    except Exception as e:
        raise _hub_unavailable(e) from None


def load_gsm8k_hub(split: str = "test", limit: int | None = None) -> list[Problem]:
    """Load GSM8K ("main" config) from the Hugging Face Hub; HubUnavailable when it cannot."""
    check_limit(limit)
    try:
        import datasets  # type: ignore
    except ImportError:
        datasets = None
    if datasets is not None:
        try:
            rows = datasets.load_dataset("openai/gsm8k", "main", split=split)
        except Exception as e:  # offline, unknown split, ... all mean "cannot use the Hub"
            raise _hub_unavailable(e) from None
    else:
        rows = _rows_from_parquet(split)
    problems = []
    for i, row in enumerate(rows):
        if limit is not None and i >= limit:
            break
        problems.append(_gsm8k_problem(dict(row), i, f"gsm8k {split} row {i}"))
    return problems
