"""One API request in flight: its decoder, its strategy and the choices it streams.

The sampler is resolved in the catalogue, and the request decodes through the same
strategy generator the CLI runs (`decode.strategies`): each phase's engine requests go
to the scheduler, their records come back phase by phase, and the strategy's result
becomes the choices' scores. Rows of shown phases are the answer's choices; follow-up
phases (CoT's "So the answer is") only count in usage. A row that the engine forked
becomes a new choice that starts with its parent's text.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections import defaultdict
from typing import Any, AsyncIterator

from .. import EntropixError
from ..decode import strategies
from ..decode.records import TokenRecord
from ..sampler import catalog
from ..sampler.catalog import FILTERS, Decoder
from .errors import APIError, bad_request, server_error
from .protocol import Params, answer_format
from .scheduler import SchedulerBusy

log = logging.getLogger("entropix.server")

BUDGETED = ("deepconf", "sc-early")  # strategies that take a per-request token budget
ROW_OPTIONS = ("branches", "samples")  # request fields that set a multi-row strategy's rows per prompt
EXTRA_OPTIONS = ROW_OPTIONS + ("aggregate", "sampler_config")  # fields only some samplers take


def rounded(x: float | None, digits: int = 5) -> float | None:
    return round(float(x), digits) if x is not None and math.isfinite(x) else None


def multi_row(strategy: str) -> bool:
    """Whether a catalogue strategy decodes several rows per prompt and scores them (CoT,
    self-consistency, branching), rather than one row per requested choice."""
    return strategy != "single"


# -- the decoder ----------------------------------------------------------------------------

def _samplers_taking(test) -> str:
    return " or ".join(n for n in catalog.names(listed_only=True) if test(catalog.spec(n))) or "no"


def _spec(p: Params) -> catalog.SamplerSpec:
    filters = any(getattr(p, k) is not None for k in FILTERS if k != "temperature")
    name = p.sampler.strip() if p.sampler else catalog.default_name(p.temperature, filters, openai=True)
    try:
        return catalog.spec(name)
    except EntropixError as e:
        raise bad_request(str(e), "sampler", "invalid_sampler") from None


def _check_options(p: Params, spec: catalog.SamplerSpec, max_n: int) -> None:
    """Extras the sampler does not take, and rows past this server's limit."""
    for key in EXTRA_OPTIONS:
        if getattr(p, key) is not None and key not in spec.options:
            raise bad_request(f"'{key}' applies to the {_samplers_taking(lambda s: key in s.options)} sampler only",
                              key, "invalid_value")
    if p.token_budget is not None and spec.strategy not in BUDGETED:
        raise bad_request(f"'token_budget' applies to the {_samplers_taking(lambda s: s.strategy in BUDGETED)} "
                          "sampler only", "token_budget", "invalid_value")
    for key in ("answer_format", "answer_kind"):
        if getattr(p, key) is not None and not multi_row(spec.strategy):  # only strategies that find answers use it
            raise bad_request(f"'{key}' applies to the {_samplers_taking(lambda s: multi_row(s.strategy))} "
                              "sampler only", key, "invalid_value")
    n = p.n if p.n is not None else 1
    if n > max_n:
        raise bad_request(f"n must be at most {max_n} on this server, got {n}", "n", "invalid_value")
    if n != 1 and multi_row(spec.strategy):
        use = [k for k in ROW_OPTIONS if k in spec.options]
        raise bad_request(f"n must be 1 with the {spec.name} sampler" + (f" (use '{use[0]}')" if use else ""),
                          "n", "invalid_value")
    for key in ROW_OPTIONS:
        if (getattr(p, key) or 0) > max_n:
            raise bad_request(f"{key} must be at most {max_n} on this server, got {getattr(p, key)}", key,
                              "invalid_value")


def resolve_decoder(p: Params, lm: Any, max_n: int) -> Decoder:
    """The catalogue's Decoder for a request's sampler fields (APIError for bad combinations)."""
    spec = _spec(p)
    _check_options(p, spec, max_n)
    allowed = getattr(lm, "samplers", None)  # a model that runs only some (an upstream: adapters/upstream.py)
    if allowed is not None and spec.name not in allowed:
        raise bad_request(f"the {spec.name} sampler needs the whole next-token distribution; this server decodes "
                          f"through an upstream: use one of {', '.join(allowed)}", "sampler", "invalid_sampler")
    given = {k: getattr(p, k) for k in FILTERS + EXTRA_OPTIONS}
    try:
        dec = catalog.build(spec.name, catalog.parameters(spec.name, **given), lm)
    except EntropixError as e:
        raise bad_request(str(e), "sampler", "invalid_sampler") from None
    except (TypeError, ValueError, KeyError) as e:
        raise bad_request(f"invalid parameters for the {spec.name} sampler: {e}", "sampler", "invalid_value") from None
    if dec.rows_per_prompt > max_n:  # the catalogue's default (branches, samples) is past our limit
        key = next((k for k in ROW_OPTIONS if k in spec.options), "sampler")
        raise bad_request(f"{key} must be at most {max_n} on this server, got {dec.rows_per_prompt}", key,
                          "invalid_value")
    return dec


def _check_layers(dec: Decoder, ctx: Any) -> None:
    """One engine serves every request, capturing one set of attention layers."""
    if not dec.spec.needs_attention:
        return
    n = ctx.lm.config.num_hidden_layers
    have, want = ({i % n for i in layers} for layers in (ctx.scheduler.capture_layers, dec.capture_layers))
    if want != have:
        raise bad_request(f"this server captures attention layers {sorted(have)}; sampler_config.attention_layers "
                          f"asks for {sorted(want)}", "sampler_config", "invalid_value")


def open_request(ctx: Any, p: Params, prompts: list[list[int]], max_tokens: list[int], stop: tuple[str, ...],
                 top_logprobs: int | None) -> "InFlight":
    """Resolve the decoder, build the strategy's Task and submit its first phase."""
    dec = resolve_decoder(p, ctx.lm, ctx.max_n)
    _check_layers(dec, ctx)
    n = p.n if p.n is not None else 1
    if len(prompts) * n * dec.rows_per_prompt > 4 * ctx.max_n:
        raise bad_request("too many prompts times n for one request", "n", "invalid_value")
    metrics = p.metrics if p.metrics is not None else (dec.spec.needs_attention or multi_row(dec.strategy))
    tok = ctx.lm.tokenizer
    # The reader `entropix generate` and `entropix eval` use: the request's format, else the prompt's wording.
    kind, pattern = answer_format(p, tok) if multi_row(dec.strategy) else ("number", None)
    task = strategies.Task(
        prompts=prompts, max_tokens=max_tokens,
        seeds=[p.seed] * len(prompts),  # the request's seed for every prompt: equal prompts, equal samples
        stop_ids=frozenset() if p.ignore_eos else tok.stop_ids, stop_strings=stop,
        top_logprobs=max(top_logprobs or 0, 5 if metrics else 0, 1),  # the metrics show 5 alternatives
        n=n, kind=kind, pattern=pattern, token_budget=p.token_budget,
        follow_up=not p.ignore_eos)  # ignore_eos asks for raw rows (benchmarks), not for answers
    return InFlight(ctx, dec, task, top_logprobs=top_logprobs, metrics=metrics)


# -- choices ----------------------------------------------------------------------------------

class Choice:
    """One choice of the answer: its records, released text and scores."""

    def __init__(self, index: int, prompt_index: int, stop_ids: frozenset[int]) -> None:
        self.index, self.prompt_index, self._stop_ids = index, prompt_index, stop_ids
        self.records: list[TokenRecord] = []
        self.text = ""
        self.finish_reason: str | None = None
        self.extra: dict[str, Any] = {}  # confidence, answer, follow_up (multi-row strategies)

    def is_stop_token(self, rec: TokenRecord) -> bool:
        """The stop token itself: counted in usage, but neither a logprob nor a metrics entry."""
        return rec.finish_reason == "stop" and rec.token in self._stop_ids

    def add(self, rec: TokenRecord) -> str:
        self.records.append(rec)
        self.text += rec.text  # the engine holds back text that could still become a stop string
        if rec.finish_reason:
            self.finish_reason = rec.finish_reason
        return rec.text

    @property
    def shown_records(self) -> list[TokenRecord]:
        return [r for r in self.records if not self.is_stop_token(r)]


# -- the request in flight ---------------------------------------------------------------------

class InFlight:
    """The strategy of one API request, driven phase by phase through the scheduler."""

    def __init__(self, ctx: Any, decoder: Decoder, task: strategies.Task, *, top_logprobs: int | None,
                 metrics: bool) -> None:
        self.ctx, self.decoder, self.task = ctx, decoder, task
        self.tok = ctx.lm.tokenizer
        self.top_logprobs = top_logprobs  # None: no logprobs
        self.tokens_as_ids = False  # completions' return_tokens_as_token_ids
        self.metrics = metrics
        self.thresholds = (decoder.thresholds() or ctx.thresholds()) if metrics else None
        self.choices: dict[int, Choice] = {}
        self.extras: dict[str, Any] = {}  # top-level scores, once the strategy has finished
        self.generated = 0  # records of every phase, shown or not
        self.jobs: list[Any] = []
        self._choice_of: dict[tuple[str, int], int] = {}  # (request id, engine row) -> choice index
        self._choice_at: dict[tuple[int, int], int] = {}  # (prompt, engine row) -> choice index, over its phases
        self._prompt_request: list[str] = []  # per prompt, the request whose rows are its choices
        self._queue: asyncio.Queue = asyncio.Queue()
        self._closed = False
        self._strategy = strategies.decode(decoder, task, self.tok, ctx.max_context)
        self._phase = self._advance(None)

    @property
    def deferred(self) -> bool:
        """Whether finish reasons wait for the end: they carry the strategy's scores."""
        return multi_row(self.decoder.strategy)

    @property
    def prompt_tokens(self) -> int:
        return sum(len(p) for p in self.task.prompts)

    def usage(self) -> dict[str, int]:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.generated,
                "total_tokens": self.prompt_tokens + self.generated}

    def cancel(self) -> None:
        """Stop every job of the run (client went away, or a failure). Safe to repeat."""
        self._closed = True
        for job in self.jobs:
            self.ctx.scheduler.cancel(job)

    # -- phases -------------------------------------------------------------------------
    def _advance(self, got: strategies.Records | None) -> strategies.Phase | None:
        """Hand the strategy a phase's records; submit the next phase, or keep its results."""
        try:
            phase = next(self._strategy) if got is None else self._strategy.send(got)
        except StopIteration as stop:
            self.extras = self._scores(stop.value)
            return None
        except Exception as e:
            log.exception("the %s strategy failed", self.decoder.name)
            raise server_error(f"the {self.decoder.name} decoder failed: {type(e).__name__}: {e}",
                               "strategy_failed") from None
        self._submit(phase)
        return phase

    def _submit(self, phase: strategies.Phase) -> None:
        loop = asyncio.get_running_loop()
        try:
            for j, req in enumerate(phase.requests):
                self.jobs.append(self.ctx.scheduler.submit(req, loop=loop, queue=self._queue))
                if phase.shown:
                    self._show(req, j)
        except SchedulerBusy as e:
            self.cancel()
            wait = {"Retry-After": str(max(1, math.ceil(e.retry_after)))}
            if e.stopping:
                raise APIError(503, str(e), "server_error", None, "shutting_down", wait) from None
            raise APIError(429, str(e), "rate_limit_error", None, "server_busy", wait) from None
        except EntropixError as e:
            self.cancel()
            raise bad_request(str(e), None, "context_length_exceeded" if "context" in str(e) else None) from None
        except BaseException:
            self.cancel()
            raise

    def _show(self, req, prompt_index: int) -> None:
        """Choices for a shown request's rows (the strategies send one request per prompt, in order)."""
        if len(self._prompt_request) <= prompt_index:
            self._prompt_request.append(req.id)
        for row in range(req.first_choice, req.first_choice + req.n):  # a later phase numbers on (deepconf)
            self._new_choice(req.id, row, prompt_index)

    def _new_choice(self, request_id: str, row: int, prompt_index: int) -> Choice:
        ch = Choice(len(self.choices), prompt_index, self.task.stop_ids)
        self.choices[ch.index] = ch
        self._choice_of[(request_id, row)] = ch.index
        self._choice_at[(prompt_index, row)] = ch.index
        return ch

    # -- records --------------------------------------------------------------------------
    async def events(self) -> AsyncIterator[tuple[Choice, list[TokenRecord], str]]:
        """(choice, records, text they released) for every token of the shown rows, until the strategy
        ends. The records are one token's, except a fork's first: its parent's prefix, then its own."""
        while self._phase is not None and not self._closed:
            phase = self._phase
            got: strategies.Records = {r.id: defaultdict(list) for r in phase.requests}
            async for recs in self._records(len(phase.requests)):
                for rec in recs:
                    got[rec.request_id][rec.choice].append(rec)
                    if phase.shown and (ev := self._feed(rec)) is not None:
                        yield ev
            self._phase = self._advance(got)

    unavailable_poll_s = 0.5  # how often a request waiting for records looks whether the model became unavailable

    async def _records(self, jobs: int) -> AsyncIterator[list[TokenRecord]]:
        """Each step's records of a phase's jobs, until all of them ended."""
        left = jobs
        while left:
            job, kind, payload = await self._next()
            if kind == "records":
                self.generated += len(payload)
                yield payload
                continue
            left -= 1
            if kind == "error":
                self.cancel()
                self._check_available()
                raise APIError(500, f"generation failed: {payload}", "server_error", None, "generation_failed")
            if kind == "cancelled":
                self.cancel()
                raise APIError(503, "the request was cancelled (server shutting down)", "server_error", None,
                               "cancelled")

    async def _next(self) -> tuple[Any, str, Any]:
        """The queue's next item. A stalled tensor-parallel rank delivers nothing at all, so the wait
        also looks, every unavailable_poll_s, whether the model became unavailable (503 then)."""
        if not self._queue.empty():
            return self._queue.get_nowait()
        self._check_available()
        get = asyncio.ensure_future(self._queue.get())
        try:
            while not (await asyncio.wait({get}, timeout=self.unavailable_poll_s))[0]:
                self._check_available()  # asyncio.wait leaves `get` running: no item is lost to a timeout
            return get.result()
        finally:
            get.cancel()  # a no-op once done; otherwise the item it did not take stays queued

    def _check_available(self) -> None:
        """503 once the model can compute no more (a tensor-parallel rank died or stalled: backends/torch/ranks.py)."""
        gone = getattr(self.ctx.lm, "unavailable", None)
        if gone:
            self.cancel()
            raise APIError(503, f"the model is unavailable: {gone}; the server is stopping", "server_error", None,
                           "backend_unavailable")

    def _feed(self, rec: TokenRecord) -> tuple[Choice, list[TokenRecord], str] | None:
        idx = self._choice_of.get((rec.request_id, rec.choice))
        if idx is not None:
            ch = self.choices[idx]
            return ch, [rec], ch.add(rec)
        if self.decoder.strategy == "branching":  # forks are paths of the tree, not choices: n stays n
            return None
        ch = self._fork(rec)
        return ch, list(ch.records), ch.text

    def _fork(self, rec: TokenRecord) -> Choice:
        """A row the engine forked: a new choice holding its parent's records before the fork."""
        parent, prefix = None, []
        if rec.parent is not None:
            parent = self.choices.get(self._choice_of.get((rec.request_id, rec.parent[0]), -1))
        if parent is not None:  # the parent's records hold its own fork prefix: one level suffices
            prefix = [r for r in parent.records if r.index < rec.parent[1]]
        ch = self._new_choice(rec.request_id, rec.choice, parent.prompt_index if parent else 0)
        for r in prefix + [rec]:
            ch.add(r)
        return ch

    # -- scores ----------------------------------------------------------------------------
    def _tree(self, rid: str, res: dict[str, Any]) -> dict[str, Any]:
        """Entropy-triggered branching: the prompt's one choice is its root row; every path of the
        tree (the root and its forks, each with its full text, answer and confidence) goes in the
        choice's `entropix_branches`; `branch_choice` is the index of the best path there."""
        ch = self.choices[self._choice_of[(rid, 0)]]
        paths = [{k: v for k, v in b.items() if k != "tokens"} for b in res["branches"]]
        root = next((b for b in paths if b["choice"] == 0), None)
        ch.extra = {"confidence": rounded(root["confidence"]) if root else None,
                    "answer": root["answer"] if root else None, "entropix_branches": paths}
        return {"branch_choice": res["choice"], "answer": res["answer"], "forks": res.get("forks", 0)}

    def _scores(self, results: list[dict[str, Any]]) -> dict[str, Any]:
        """The strategy's results as choice extras; the top-level fields (lists for several prompts)."""
        tops = []
        for j, (rid, res) in enumerate(zip(self._prompt_request, results)):
            if "branches" not in res:
                continue
            if self.decoder.strategy == "branching":
                tops.append(self._tree(rid, res))
                continue
            for b in res["branches"]:
                ch = self.choices[self._choice_at[(j, b["choice"])]]
                ch.extra = {"confidence": rounded(b["confidence"]), "answer": b["answer"]}
                if "follow_up" in b:
                    ch.extra["follow_up"] = b["follow_up"]
            top = {"cot_choice": self._choice_at[(j, res["choice"])], "answer": res["answer"]}
            # what the voting strategies spent: pruned or skipped samples, tokens over every phase
            spent = ("pruned", "stopped_early", "tokens_generated") if self.decoder.strategy in BUDGETED else ()
            top.update({k: res[k] for k in ("votes", *spent) if k in res})
            tops.append(top)
        if len(tops) <= 1:
            return tops[0] if tops else {}
        return {k: [t[k] for t in tops] for k in tops[0]}
