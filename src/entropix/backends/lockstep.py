"""The Backend protocol on the process that leads a group running one model in lockstep.

Torch's tensor-parallel ranks (torch/ranks.py) and a JAX job's processes (jax/multihost.py)
both have one leader that runs the host engine: each backend call that runs the model goes
to every process first (the session's `run`), then is made on the leader's own backend.
"""

from __future__ import annotations

import itertools
import weakref
from collections import deque
from typing import Any, Sequence


class TwinIds:
    """Ids of the leader's backends, and of those collected since the last call: the other
    processes keep a twin per id and drop it when told. Thread-safe without a lock (a finalizer
    may run in any thread): itertools.count and deque's append / popleft are atomic."""

    def __init__(self) -> None:
        self._next = itertools.count(1)
        self._freed: deque[int] = deque()

    def new(self, backend: Any) -> int:
        bid = next(self._next)
        weakref.finalize(backend, self._freed.append, bid)
        return bid

    @property
    def pending(self) -> list[int]:
        """Ids collected and not yet taken (what the next call will tell the others)."""
        return list(self._freed)

    def take_freed(self) -> list[int]:
        out = []
        while self._freed:
            out.append(self._freed.popleft())
        return out


class LockstepBackend:
    """The leader's side: `local` is this process's backend, `session` sends calls to the others.
    The session's TwinIds (`session.ids`) give each backend an id, so the others keep a twin per id."""

    name = ""

    def __init__(self, session: Any, local: Any, capture_layers: tuple[int, ...]) -> None:
        self.session, self.local, self.capture_layers = session, local, tuple(capture_layers)
        self.vocab_size = local.vocab_size
        self.id = session.ids.new(self)

    @property
    def rows(self) -> int:
        return self.local.rows

    def _all(self, op: str, *args) -> Any:
        return self.session.run(self.id, self.capture_layers, op, args, lambda: getattr(self.local, op)(*args))

    def prefill(self, prompts: Sequence[Sequence[int]], copies: Sequence[int], capture: bool) -> None:
        self._all("prefill", [list(p) for p in prompts], list(copies), bool(capture))

    def select(self, rows: Sequence[int]) -> None:
        self._all("select", list(rows))

    def advance(self, tokens: Sequence[int], capture: bool) -> None:
        self._all("advance", [int(t) for t in tokens], bool(capture))
