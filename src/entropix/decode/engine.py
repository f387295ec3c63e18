"""The host engine: rows, seeds, stops, forks and records over a backend.

`Engine` holds a running batch. Requests join between decode steps (`add`), rows leave
when they finish or are cancelled, and every step yields one `TokenRecord` per active
row. The CLI, the server, the strategies (CoT, self-consistency, branching) and the
evaluation all consume this one stream. The engine imports no array framework: the
backend computes and hands back one `StepHost` of named arrays per step.
"""

from __future__ import annotations

import math
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Iterator, Sequence

from .. import EntropixError
from ..backends.base import ATTN_KEYS, Backend, SampleGroup, StepHost, chunked
from .records import PruneRule, Request, TokenRecord
from .rng import row_seed, take_draws
from .scoring import token_confidence
from .stops import StopText

if TYPE_CHECKING:
    from ..io.tokenizer import Tokenizer


MAX_STOP_CHARS = 256


@dataclass
class Row:
    """One sequence in the running batch with its own random stream and text state."""

    request: Request
    choice: int
    seed: int  # the row's random stream (see rng.py); draws counts what it used
    detok: Any
    stops: StopText | None
    tokens: list[int] = field(default_factory=list)
    text: str = ""
    draws: int = 0
    pauses: int = 0  # pause tokens among `tokens` (the entropix budget)
    finish_reason: str | None = None
    parent: tuple[int, int] | None = None  # set on a fork until its first record
    recent: deque = field(default_factory=deque)  # token confidences of the prune rule's window

    @property
    def length(self) -> int:
        return len(self.request.prompt) + len(self.tokens)


@dataclass
class _Prefill:
    """A long prompt read chunk by chunk between decode steps."""

    request: Request
    done: int = 0  # prompt tokens fed so far


@dataclass
class _RequestState:
    next_choice: int  # choices only ever grow: a fork never reuses a finished row's number (or seed)
    forks: int = 0


class Engine:
    """`prefill_chunk`: prompts longer than this many tokens are read in chunks of it, one per
    step, so that running rows keep decoding meanwhile (needs a backend with `prefill_chunk`;
    None reads every prompt whole)."""

    def __init__(self, backend: Backend, tokenizer: Tokenizer, max_context: int, prefill_chunk: int | None = None) -> None:
        self.backend, self.tok, self.max_context = backend, tokenizer, int(max_context)
        self.rows: list[Row] = []
        self._requests: dict[str, _RequestState] = {}
        self.prefills: list[_Prefill] = []  # oldest first
        self.prefill_chunk = prefill_chunk

    @property
    def active(self) -> bool:
        return bool(self.rows or self.prefills)

    def live_ids(self) -> set[str]:
        """Requests with rows in the batch or a prefill in progress."""
        return {r.request.id for r in self.rows} | {p.request.id for p in self.prefills}

    @property
    def chunking(self) -> int | None:
        chunk = self.prefill_chunk
        return chunk if chunk and chunked(self.backend) else None

    # -- admission ----------------------------------------------------------------------
    def validate(self, req: Request) -> None:
        if not req.prompt:
            raise EntropixError("the prompt is empty")
        if len(req.prompt) >= self.max_context:
            raise EntropixError(f"the prompt has {len(req.prompt)} tokens; the model's context is {self.max_context}")
        if req.max_tokens < 1:
            raise EntropixError(f"max_tokens must be at least 1, got {req.max_tokens}")
        if req.n < 1:
            raise EntropixError(f"n must be at least 1, got {req.n}")
        supported = getattr(req.policy, "backends", None)
        if supported is not None and self.backend.name not in supported:
            raise EntropixError(f"the {req.policy.label} sampler runs on the {' or '.join(supported)} backend only, "
                                f"not {self.backend.name}")
        vocab = self.backend.vocab_size
        bad = [t for t in req.prompt if not 0 <= t < vocab]
        if bad:
            raise EntropixError(f"token id {bad[0]} is outside the vocabulary (0..{vocab - 1})")
        if req.prune is not None and not 1 <= req.prune.top_k <= req.top_logprobs or req.prune and req.prune.window < 1:
            raise EntropixError("a prune rule needs a window of at least 1 token and top_k within top_logprobs")
        if any(len(s) > MAX_STOP_CHARS for s in req.stop_strings):  # held-back text is checked per token
            raise EntropixError(f"stop strings may be at most {MAX_STOP_CHARS} characters long")

    def add(self, requests: Sequence[Request]) -> None:
        """Prefill new requests together and put their rows at the end of the batch."""
        for r in requests:
            self.validate(r)
        chunk = self.chunking
        if chunk:  # long prompts wait their turn in chunks; the short ones join at once
            self.prefills += [_Prefill(r) for r in requests if len(r.prompt) > chunk]
            requests = [r for r in requests if len(r.prompt) <= chunk]
        if not requests:
            return
        capture = any(r.policy.needs_attention for r in requests)
        self.backend.prefill([r.prompt for r in requests], [r.n for r in requests], capture)
        for r in requests:
            self._join(r)

    def _join(self, r: Request) -> None:
        self._requests[r.id] = _RequestState(next_choice=r.first_choice + r.n)
        self.rows.extend(self._new_row(r, c) for c in range(r.first_choice, r.first_choice + r.n))

    def _prefill_step(self) -> None:
        """One chunk of the oldest prompt in progress; its rows join once it is read."""
        p, backend = self.prefills[0], self.backend
        if not chunked(backend):  # add() queues prompts only for a backend that reads chunks
            raise EntropixError(f"the {backend.name} backend cannot read a prompt in chunks")
        r = p.request
        stop = min(p.done + (self.prefill_chunk or len(r.prompt)), len(r.prompt))  # chunking off since: the rest at once
        backend.prefill_chunk(r.id, r.prompt, p.done, stop, r.n, r.policy.needs_attention)
        p.done = stop
        if stop >= len(r.prompt):
            self.prefills.pop(0)
            self._join(r)

    def _new_row(self, req: Request, choice: int) -> Row:
        stops = StopText(req.stop_strings) if req.stop_strings else None
        return Row(req, choice, row_seed(req.seed, choice), self.tok.detokenizer(), stops)

    def cancel(self, request_id: str) -> None:
        self._requests.pop(request_id, None)
        if any(p.request.id == request_id for p in self.prefills):
            self.prefills = [p for p in self.prefills if p.request.id != request_id]
            backend = self.backend
            if chunked(backend):  # always, where prompts wait for chunks (see add)
                backend.drop_prefill(request_id)
        keep = [i for i, r in enumerate(self.rows) if r.request.id != request_id]
        if len(keep) != len(self.rows):
            self.rows = [self.rows[i] for i in keep]
            self.backend.select(keep)

    # -- one decode step ----------------------------------------------------------------
    def step(self) -> list[TokenRecord]:
        """Choose one token for every active row and run the model on them; then read one chunk
        of a long prompt, if one is waiting."""
        records = self._decode() if self.rows else []
        if self.prefills:
            self._prefill_step()
        return records

    def _decode(self) -> list[TokenRecord]:
        B = len(self.rows)
        host = self.backend.sample(self._groups(), self._top_k())
        sources, tokens = list(range(B)), host.token.tolist()
        for src, alts in self._plan_forks(host):
            for alt in alts:  # a fork starts from its source as it was before this step
                self.rows.append(self._fork(self.rows[src]))
                sources.append(src)
                tokens.append(alt)
        records = [self._emit(row, tok, host, src) for row, tok, src in zip(self.rows, tokens, sources)]
        keep = [i for i, r in enumerate(self.rows) if r.finish_reason is None]
        self.rows = [self.rows[i] for i in keep]
        live = {r.request.id for r in self.rows}
        for rid in [rid for rid in self._requests if rid not in live]:
            del self._requests[rid]
        if [sources[i] for i in keep] != list(range(B)):
            self.backend.select([sources[i] for i in keep])
        if self.rows:
            self.backend.advance([tokens[i] for i in keep], capture=self._capture())
        return records

    def _capture(self) -> bool:
        return any(r.request.policy.needs_attention for r in self.rows)

    def _top_k(self) -> int:
        k = max(max(r.request.top_logprobs for r in self.rows), 1)
        if any(r.request.branching is not None for r in self.rows):
            k = max(k, max(r.request.branching.width + 1 for r in self.rows if r.request.branching))
        return min(k, self.backend.vocab_size)

    def _groups(self) -> list[SampleGroup]:
        """Rows by policy (one sampler call per configuration), with their host inputs."""
        by_policy: dict[Any, list[int]] = {}
        for i, r in enumerate(self.rows):
            by_policy.setdefault(r.request.policy, []).append(i)
        groups = []
        for policy, idx in by_policy.items():
            rows = [self.rows[i] for i in idx]
            u = take_draws(rows, policy.draws)
            groups.append(SampleGroup(policy, tuple(idx), uniforms=u, **policy.host_inputs(rows)))
        return groups

    # -- forks --------------------------------------------------------------------------
    def _plan_forks(self, host: StepHost) -> list[tuple[int, list[int]]]:
        """Rows of branching requests whose regime is "branch" fork into their top
        alternatives, within the request's row and fork budgets."""
        plans: list[tuple[int, list[int]]] = []
        live = Counter(r.request.id for r in self.rows)
        for i, row in enumerate(list(self.rows)):
            req, cfg = row.request, row.request.branching
            if cfg is None or regime_name(req.policy, host.code[i]) != "branch":
                continue
            st = self._requests[req.id]
            room = cfg.max_rows - live[req.id]
            if st.forks >= cfg.max_forks or room <= 0:
                continue
            tok = int(host.token[i])
            alts = [int(t) for t, lp in zip(host.top_ids[i], host.top_logprobs[i])
                    if t != tok and t not in req.stop_ids and math.exp(lp) >= cfg.min_prob]  # a fork that stops at once wastes the budget
            alts = alts[:min(cfg.width, room)]
            if alts:
                plans.append((i, alts))
                live[req.id] += len(alts)
                st.forks += 1
        return plans

    def _fork(self, src: Row) -> Row:
        st = self._requests[src.request.id]
        choice, st.next_choice = st.next_choice, st.next_choice + 1
        row = self._new_row(src.request, choice)
        for t in src.tokens:  # replay the text state
            row.detok.add(t)
        if src.stops is not None and row.stops is not None:  # the same request: both or neither
            row.stops.held = src.stops.held
        row.tokens, row.text, row.pauses = list(src.tokens), src.text, src.pauses
        row.parent = (src.choice, len(src.tokens))
        return row

    # -- records ------------------------------------------------------------------------
    def _emit(self, row: Row, tok: int, host: StepHost, i: int) -> TokenRecord:
        req = row.request
        delta = self._take(row, tok)
        if tok == host.token[i]:
            lp = float(host.logprob[i])
        else:  # a fork's alternative: its log-probability is among the top ones
            lp = next((float(x) for t, x in zip(host.top_ids[i], host.top_logprobs[i]) if t == tok), -math.inf)
        k = req.top_logprobs
        top = [(int(t), self.tok.token_text(int(t)), float(x))
               for t, x in zip(host.top_ids[i][:k], host.top_logprobs[i][:k])]
        attn = dict(zip(ATTN_KEYS, host.attn[i].tolist())) if host.attn_valid[i] else None
        rec = TokenRecord(request_id=req.id, choice=row.choice, index=len(row.tokens) - 1, token=tok, text=delta,
                          logprob=lp, top=top, entropy=float(host.entropy[i]), varentropy=float(host.varentropy[i]),
                          margin=float(host.margin[i]), attn=attn, regime=regime_name(req.policy, host.code[i]),
                          finish_reason=row.finish_reason, parent=row.parent, extra=_extra(host, i))
        row.parent = None
        if req.prune is not None and row.finish_reason is None and _pruned(row, req.prune, rec):
            row.finish_reason = rec.finish_reason = "pruned"  # its slot is freed at the end of this step
        return rec

    def _take(self, row: Row, tok: int) -> str:
        """Append a token to a row; the text it releases. Sets finish_reason on the last one."""
        req = row.request
        row.tokens.append(tok)
        if req.policy.is_pause(tok):
            row.pauses += 1
        stop = tok in req.stop_ids
        ending = stop or len(row.tokens) >= req.max_tokens or row.length >= self.max_context
        if stop:
            delta = row.detok.flush()
        else:
            delta = row.detok.add(tok) + (row.detok.flush() if ending else "")
        if row.stops is not None:
            delta, hit = row.stops.feed(delta)
            if hit:
                row.finish_reason = "stop"
                row.text += delta
                return delta
            if ending:
                delta += row.stops.flush()
        if ending:
            row.finish_reason = "stop" if stop else "length"
        row.text += delta
        return delta


def _pruned(row: Row, rule: PruneRule, rec: TokenRecord) -> bool:
    """Whether a row's mean confidence over its last rule.window tokens fell below the threshold."""
    row.recent.append(token_confidence([lp for _, _, lp in rec.top[:rule.top_k]]))
    if len(row.recent) > rule.window:
        row.recent.popleft()
    return len(row.recent) == rule.window and sum(row.recent) / rule.window < rule.threshold


def _extra(host: StepHost, i: int) -> dict[str, float] | None:
    extra = getattr(host, "extra", None)  # optional: backends without it hand back none
    if not extra:
        return None
    out = {k: float(v[i]) for k, v in extra.items() if math.isfinite(v[i])}
    return out or None


def regime_name(policy: Any, code: int) -> str:
    """The name of a policy's regime code ("?" for a code it does not have)."""
    regimes = policy.regimes
    return regimes[int(code)] if 0 <= code < len(regimes) else "?"


def generate(engine: Engine, requests: Sequence[Request]) -> Iterator[TokenRecord]:
    """Add the requests and yield records until all of them finish."""
    engine.add(requests)
    ids = {r.id for r in requests}
    while ids & engine.live_ids():
        yield from engine.step()
