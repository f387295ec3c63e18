"""The Backend protocol on the process that leads a group running one model in lockstep.

Torch's tensor-parallel ranks (torch/ranks.py) and a JAX job's processes (jax/multihost.py)
both have one leader that runs the host engine: each backend call that runs the model goes
to every process first (the session's `run`), then is made on the leader's own backend.
"""

from __future__ import annotations

from typing import Any, Sequence


class LockstepBackend:
    """The leader's side: `local` is this process's backend, `session` sends calls to the others.
    The session gives each backend an id (`new_id`), so the others keep a twin per id."""

    name = ""

    def __init__(self, session: Any, local: Any, capture_layers: tuple[int, ...]) -> None:
        self.session, self.local, self.capture_layers = session, local, tuple(capture_layers)
        self.vocab_size = local.vocab_size
        self.id = session.new_id(self)

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
