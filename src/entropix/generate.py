"""The generation loop: prefill, decode steps, and one record per token per row.

`Engine` holds a running batch. Requests join between decode steps (`add`), rows
leave when they finish, and every step yields a `TokenRecord` per active row. The
CLI, the server, CoT decoding and the evaluation all consume this one stream.
Per step the host receives the chosen tokens and their record data in one transfer.
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator, Sequence

import torch

from . import EntropixError
from .metrics import ATTN_KEYS, LOGIT_KEYS, attention_metrics, logit_metrics
from .sampling import make_generator
from .weights import LoadedModel


_ids = itertools.count()


@dataclass
class TokenRecord:
    request_id: str
    choice: int  # row index within its request (n > 1, CoT branches)
    index: int  # position in the generated text
    token: int
    text: str  # text delta this token completes (may be "" mid-character)
    logprob: float  # under the model's own distribution (temperature 1, unfiltered)
    top: list[tuple[int, str, float]]  # most likely alternatives: (id, text, logprob)
    entropy: float
    varentropy: float
    margin: float
    attn: dict[str, float] | None
    state: str  # the strategy that chose this token
    finish_reason: str | None = None  # "stop" or "length" on the row's last token

    def to_dict(self) -> dict[str, Any]:
        d = {
            "token": self.token, "text": self.text, "logprob": self.logprob,
            "top": [{"token": t, "text": s, "logprob": lp} for t, s, lp in self.top],
            "entropy": self.entropy, "varentropy": self.varentropy, "margin": self.margin,
            "state": self.state,
        }
        if self.attn is not None:
            d.update(self.attn)
        if self.finish_reason:
            d["finish_reason"] = self.finish_reason
        return d


@dataclass
class Request:
    prompt: list[int]
    sampler: Any  # a sampler from sampling.make_sampler or a registered factory
    max_tokens: int = 256
    n: int = 1
    seed: int | None = None
    stop_ids: frozenset[int] = frozenset()
    stop_strings: tuple[str, ...] = ()
    top_logprobs: int = 5
    id: str = field(default_factory=lambda: f"req-{next(_ids)}")


@dataclass
class Row:
    """One sequence in the running batch, with its own RNG and sampler memory."""

    request: Request
    choice: int
    generator: torch.Generator
    detok: Any
    tokens: list[int] = field(default_factory=list)
    text: str = ""
    memory: dict[str, Any] = field(default_factory=dict)
    finish_reason: str | None = None
    started: float = field(default_factory=time.perf_counter)


def row_seed(seed: int | None, choice: int) -> int | None:
    """Distinct, reproducible seed per row of a request (no two rows share a stream)."""
    if seed is None:
        return None
    return (int(seed) * 1_000_003 + choice * 7_919 + 1) & 0x7FFF_FFFF_FFFF_FFFF


class Engine:
    def __init__(self, lm: LoadedModel, capture_layers: tuple[int, ...] = (-1,)) -> None:
        self.lm = lm
        self.model = lm.model
        self.tok = lm.tokenizer
        self.capture_layers = capture_layers
        self.rows: list[Row] = []
        self.cache = None
        self.logits: torch.Tensor | None = None  # [B, V] pending next-token logits
        self.attn: dict[str, torch.Tensor] = {}  # [B] attention metrics for the pending step
        self.max_context = lm.config.max_position_embeddings
        self._next_choice: dict[str, int] = {}  # per request: choices only ever grow (forks too)

    # -- admission ----------------------------------------------------------------------
    def _needs_attention(self, reqs: Iterable[Request]) -> bool:
        return any(getattr(r.sampler, "needs_attention", False) for r in reqs)

    def validate(self, req: Request) -> None:
        if not req.prompt:
            raise EntropixError("the prompt is empty")
        if len(req.prompt) >= self.max_context:
            raise EntropixError(f"the prompt has {len(req.prompt)} tokens; the model's context is {self.max_context}")
        if req.max_tokens < 1:
            raise EntropixError(f"max_tokens must be at least 1, got {req.max_tokens}")
        if req.n < 1:
            raise EntropixError(f"n must be at least 1, got {req.n}")
        bad = [t for t in req.prompt if not 0 <= t < self.lm.config.vocab_size]
        if bad:
            raise EntropixError(f"token id {bad[0]} is outside the vocabulary (0..{self.lm.config.vocab_size - 1})")

    @torch.inference_mode()
    def add(self, requests: Sequence[Request]) -> None:
        """Prefill new requests together (left-padded) and put their rows in the batch."""
        for r in requests:
            self.validate(r)
            if not r.id:
                r.id = f"req-{next(_ids)}"
        if not requests:
            return
        dev = self.model.device
        P = max(len(r.prompt) for r in requests)
        toks = torch.zeros(len(requests), P, dtype=torch.long)
        cache = self.model.new_cache(len(requests), P + 1)
        for b, r in enumerate(requests):
            toks[b, P - len(r.prompt):] = torch.tensor(r.prompt)
            cache.starts[b] = P - len(r.prompt)
        capture = self.capture_layers if self._needs_attention(list(requests) + [w.request for w in self.rows]) else ()
        logits, caps = self.model(toks.to(dev), cache, capture_layers=capture)
        attn = self._attn_metrics(caps)
        # each request's n rows share its prefill: repeat its cache row n times
        picks = [b for b, r in enumerate(requests) for _ in range(r.n)]
        cache.select(picks)
        pick_t = torch.tensor(picks, device=dev)
        logits = logits.index_select(0, pick_t)
        attn = {k: v.index_select(0, pick_t) for k, v in attn.items()}
        new_rows = [
            Row(r, c, make_generator(row_seed(r.seed, c), dev), self.tok.detokenizer())
            for r in requests for c in range(r.n)
        ]
        for r in requests:
            self._next_choice[r.id] = r.n
        self._append(new_rows, cache, logits, attn)

    def _append(self, rows: list[Row], cache, logits: torch.Tensor, attn: dict[str, torch.Tensor]) -> None:
        if self.cache is None or not self.rows:
            self.cache, self.logits, self.attn, self.rows = cache, logits, attn, list(rows)
            return
        self.cache.append_rows_from(cache, list(range(cache.batch)))
        self.logits = torch.cat([self.logits, logits])
        if set(self.attn) == set(attn):
            self.attn = {k: torch.cat([self.attn[k], attn[k]]) for k in attn}
        else:
            self.attn = {}  # attention appears from the next step, once every row has it
        self.rows.extend(rows)

    def fork(self, row_index: int, n: int) -> list[int]:
        """Copy a row (cache, pending logits, sampler memory) n times; new indices."""
        src = self.rows[row_index]
        new = self.cache.fork(row_index, n)
        idx = torch.tensor([row_index] * n, device=self.logits.device)
        self.logits = torch.cat([self.logits, self.logits.index_select(0, idx)])
        self.attn = {k: torch.cat([v, v.index_select(0, idx)]) for k, v in self.attn.items()}
        for i in range(n):
            # never reuse the number (and so the seed) of a row that already finished
            choice = self._next_choice.get(src.request.id, src.choice + 1)
            self._next_choice[src.request.id] = choice + 1
            g = make_generator(row_seed(src.request.seed, choice), self.logits.device)
            detok = self.tok.detokenizer()
            for t in src.tokens:
                detok.add(t)
            self.rows.append(Row(src.request, choice, g, detok, list(src.tokens), src.text, dict(src.memory)))
        return new

    def cancel(self, request_id: str) -> None:
        self._next_choice.pop(request_id, None)
        keep = [i for i, r in enumerate(self.rows) if r.request.id != request_id]
        self._keep(keep)

    def _keep(self, keep: list[int]) -> None:
        if len(keep) == len(self.rows):
            return
        self.rows = [self.rows[i] for i in keep]
        if not keep:
            self.cache, self.logits, self.attn = None, None, {}
            return
        self.cache.select(keep)
        idx = torch.tensor(keep, device=self.logits.device)
        self.logits = self.logits.index_select(0, idx)
        self.attn = {k: v.index_select(0, idx) for k, v in self.attn.items()}

    # -- decoding -------------------------------------------------------------------------
    def _attn_metrics(self, caps) -> dict[str, torch.Tensor]:
        if not caps:
            return {}
        per_layer = [attention_metrics(c.probs, c.scores, c.valid) for c in caps.values()]
        return {k: torch.stack([m[k] for m in per_layer]).mean(0) for k in ATTN_KEYS}

    @property
    def active(self) -> bool:
        return bool(self.rows)

    @torch.inference_mode()
    def step(self) -> list[TokenRecord]:
        """Choose one token for every active row, then run the model on them."""
        if not self.rows:
            return []
        logits = self.logits
        B, dev = logits.shape[0], logits.device
        metrics = logit_metrics(logits)
        metrics.update(self.attn)
        # rows go to their sampler, one call per sampler object (requests may share one:
        # samplers keep per-row state in the rows, never in themselves)
        tokens = torch.empty(B, dtype=torch.long, device=dev)
        codes = torch.zeros(B, dtype=torch.long, device=dev)
        groups: dict[int, list[int]] = {}
        for i, r in enumerate(self.rows):
            groups.setdefault(id(r.request.sampler), []).append(i)
        for idx in groups.values():
            sampler = self.rows[idx[0]].request.sampler
            it = torch.tensor(idx, device=dev)
            sub = {k: v.index_select(0, it) for k, v in metrics.items()}
            tok, code = sampler(logits.index_select(0, it), sub, [self.rows[i] for i in idx])
            tokens[it] = tok
            if code is not None:
                codes[it] = code
        K = max(r.request.top_logprobs for r in self.rows)
        K = max(min(K, logits.shape[-1]), 1)
        logp = torch.log_softmax(logits.float(), -1)
        top_lp, top_id = logp.topk(K, dim=-1)
        chosen = logp.gather(1, tokens[:, None])[:, 0]
        cols = [tokens.double(), codes.double(), chosen.double()]
        cols += [metrics[k].double() for k in LOGIT_KEYS]
        attn_keys = [k for k in ATTN_KEYS if k in metrics]
        cols += [metrics[k].double() for k in attn_keys]
        host = torch.cat([torch.stack(cols, 1), top_id.double(), top_lp.double()], 1).cpu().tolist()  # the one sync
        n_fixed = 3 + len(LOGIT_KEYS) + len(attn_keys)
        decisions = []  # per row: (token, code, logprob, [(id, logprob)] alternatives)
        for row, vals in zip(self.rows, host):
            alts = list(zip((int(t) for t in vals[n_fixed:n_fixed + K]), vals[n_fixed + K:n_fixed + 2 * K]))
            decisions.append((int(vals[0]), int(vals[1]), vals[2], alts))
        tokens = self._plan_forks(groups, decisions, tokens)

        records: list[TokenRecord] = []
        finished: list[int] = []
        for i, row in enumerate(self.rows):
            vals = host[i] if i < B else host[row.memory["forked_from"]]
            tok, code, lp, alts = decisions[i]
            ent, vent, margin = vals[3:6]
            attn = {k: vals[6 + j] for j, k in enumerate(attn_keys)} if attn_keys else None
            top = [(t, self.tok.token_text(t), l) for t, l in alts[:row.request.top_logprobs]]
            sampler = row.request.sampler
            state = sampler.state_of(code) if hasattr(sampler, "state_of") else "sample"
            row.tokens.append(tok)
            req = row.request
            if tok in req.stop_ids:
                delta, row.finish_reason = row.detok.flush(), "stop"
            else:
                delta = row.detok.add(tok)
                row.text += delta
                if req.stop_strings:
                    delta = self._apply_stop_strings(row, delta)
                if row.finish_reason is None and (len(row.tokens) >= req.max_tokens
                                                  or self.cache.lengths[i] - self.cache.starts[i] + 1
                                                  >= self.max_context):
                    tail = row.detok.flush()
                    row.text += tail
                    delta += tail
                    row.finish_reason = "length"
            records.append(TokenRecord(req.id, row.choice, len(row.tokens) - 1, tok, delta, lp, top,
                                       ent, vent, margin, attn, state, row.finish_reason))
            if row.finish_reason:
                finished.append(i)
        B = len(self.rows)
        if finished:
            done = set(finished)
            live = {r.request.id for j, r in enumerate(self.rows) if j not in done}
            for j in done:
                if self.rows[j].request.id not in live:
                    self._next_choice.pop(self.rows[j].request.id, None)
            alive = [i for i in range(B) if i not in done]
            self._keep(alive)
            tokens = tokens.index_select(0, torch.tensor(alive, device=dev, dtype=torch.long))
        if self.rows:
            capture = self.capture_layers if self._needs_attention(r.request for r in self.rows) else ()
            self.logits, caps = self.model(tokens[:, None], self.cache, capture_layers=capture)
            self.attn = self._attn_metrics(caps)
        return records

    def _plan_forks(self, groups: dict[int, list[int]], decisions: list, tokens: torch.Tensor) -> torch.Tensor:
        """Let samplers that branch (`plan_forks`) copy rows before this step's token.

        A forked row gets the cache and pending logits of its source as they were
        before the step, and takes an alternative token instead of the chosen one.
        """
        plans = []
        for idx in groups.values():
            sampler = self.rows[idx[0]].request.sampler
            if hasattr(sampler, "plan_forks"):
                for local, alts in sampler.plan_forks([self.rows[i] for i in idx], [decisions[i] for i in idx]):
                    plans.append((idx[local], alts))
        if not plans:
            return tokens
        extra = []
        for src, alts in plans:
            tok0, code, _, top = decisions[src]
            lp_of = dict(top)
            for new_index, alt in zip(self.fork(src, len(alts)), alts):
                self.rows[new_index].memory["forked_from"] = src
                self.rows[new_index].memory["parent"] = (self.rows[src].choice, len(self.rows[src].tokens))
                on_fork = getattr(self.rows[src].request.sampler, "on_fork", None)
                if on_fork is not None:
                    on_fork(self.rows[src], self.rows[new_index])
                decisions.append((alt, code, lp_of.get(alt, float("-inf")), top))
                extra.append(alt)
        return torch.cat([tokens, torch.tensor(extra, device=tokens.device, dtype=tokens.dtype)])

    def _apply_stop_strings(self, row: Row, delta: str) -> str:
        for s in row.request.stop_strings:
            pos = row.text.find(s)
            if pos >= 0:
                cut = len(row.text) - pos  # characters to drop from the end
                row.text = row.text[:pos]
                row.finish_reason = "stop"
                return delta[:max(0, len(delta) - cut)]
        return delta


def generate(engine: Engine, requests: Sequence[Request]) -> Iterator[TokenRecord]:
    """Add the requests and yield records until all of them finish."""
    engine.add(requests)
    ids = {r.id for r in requests}
    while any(r.request.id in ids for r in engine.rows):
        yield from engine.step()
