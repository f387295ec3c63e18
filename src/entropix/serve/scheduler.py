"""Continuous batching for the server: one host engine, many requests.

A background thread owns one `Engine`. Between decode steps it admits waiting requests
(their prefill joins the running batch), drops cancelled ones, and hands every step's
`TokenRecord`s to the asyncio side through each job's queue with
`loop.call_soon_threadsafe` (asyncio queues are not thread-safe). Requests that do not
fit under `max_rows` wait in FIFO order, so a large one is never starved.

Items a job's queue receives: ``(job, "records", [TokenRecord, ...])`` once per step the
job took part in, then exactly one ``(job, "done", None)``, ``(job, "error", message)`` or
``(job, "cancelled", None)``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import threading
import time
import traceback
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from .. import EntropixError
from ..backends.base import chunked
from ..decode.records import Request, TokenRecord

log = logging.getLogger("entropix.scheduler")


class SchedulerBusy(EntropixError):
    """The waiting queue is full or the scheduler is stopping: try again later."""

    def __init__(self, message: str, retry_after: float = 1.0, stopping: bool = False) -> None:
        super().__init__(message)
        self.retry_after, self.stopping = retry_after, stopping


def reserved_rows(request: Request) -> int:
    """Rows a request may come to hold: n, or its fork budget when it branches."""
    cfg = request.branching
    return request.n if cfg is None else max(request.n, cfg.max_rows)


@dataclass(eq=False)
class Job:
    """One engine request and where its records go."""

    request: Request
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue
    submitted: float = field(default_factory=time.perf_counter)
    started: float | None = None  # admission (prefill) time
    finished: float | None = None
    tokens: int = 0  # records produced so far (all rows)
    cancelled: bool = False
    done: bool = False
    status: str = "pending"  # pending, running, done, cancelled, error

    @property
    def id(self) -> str:
        return self.request.id


_COUNTER = {"done": "completed", "cancelled": "cancelled", "error": "errors"}


class Scheduler:
    """Runs one engine in a thread and multiplexes requests onto its batch.

    `lm` is anything with `engine(capture_layers)` returning a fresh host Engine (a LoadedModel).
    """

    def __init__(self, lm: Any, max_rows: int = 32, capture_layers: tuple[int, ...] = (-1,),
                 max_pending: int = 256, prefill_chunk: int | None = None) -> None:
        if max_rows < 1:
            raise EntropixError(f"max_rows must be at least 1, got {max_rows}")
        if prefill_chunk is not None and prefill_chunk < 1:
            raise EntropixError(f"prefill_chunk must be at least 1, got {prefill_chunk}")
        self.lm, self.max_rows, self.max_pending = lm, max_rows, max_pending
        self.capture_layers = tuple(capture_layers)
        self.prefill_chunk = prefill_chunk
        self.engine = self._new_engine()
        self._cond = threading.Condition()
        self._pending: deque[Job] = deque()
        self._running: dict[str, Job] = {}
        self._to_cancel: list[Job] = []
        self._stopping = False
        self.draining = False  # SIGTERM: no new requests; running ones have until the deadline
        self._thread: threading.Thread | None = None
        self._deadline: threading.Timer | None = None
        # counters for /health, tests and benchmarks
        self.steps = self.tokens = self.completed = self.cancelled = self.errors = self.max_batch_rows = 0
        self._mean_job_s = 1.0  # running mean of finished jobs' wall time (Retry-After)
        self.cancel_seconds = 0.0  # engine time spent removing cancelled requests (benchmarks)

    def _new_engine(self):
        """An engine that reads long prompts in chunks between decode steps (the backend's chunk size
        unless one was given), so a long prompt does not freeze the running streams."""
        engine = self.lm.engine(self.capture_layers)
        backend = engine.backend
        engine.prefill_chunk = self.prefill_chunk or (backend.max_chunk if chunked(backend) else None)
        return engine

    # -- lifecycle ----------------------------------------------------------------------
    def start(self) -> None:
        if self.alive:
            return
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="entropix-scheduler", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the thread; every unfinished job gets a 'cancelled' item."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None
        if self._deadline is not None:
            self._deadline.cancel()

    def drain(self, timeout: float) -> None:
        """Refuse new requests; after `timeout` seconds stop, ending the unfinished ones
        ('cancelled': streams get an error event). Safe to call again (the first deadline holds)."""
        with self._cond:
            if self.draining:
                return
            self.draining = True
            self._cond.notify_all()
        self._deadline = threading.Timer(max(0.0, timeout), self._expire)
        self._deadline.daemon = True
        self._deadline.start()

    def _expire(self) -> None:
        with self._cond:  # the engine thread ends the unfinished jobs and exits; stop() joins it
            self._stopping = True
            self._cond.notify_all()

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    # -- asyncio side ---------------------------------------------------------------------
    def validate(self, request: Request) -> None:
        """Raise EntropixError for a request the engine would refuse or that can never fit."""
        self.engine.validate(request)
        if request.n > self.max_rows:
            raise EntropixError(f"n is {request.n}; this server runs at most {self.max_rows} rows at once")
        if request.branching is not None and request.branching.max_rows > self.max_rows:  # forks fit the batch too
            request.branching = dataclasses.replace(request.branching, max_rows=self.max_rows)

    def submit(self, request: Request, loop: asyncio.AbstractEventLoop | None = None,
               queue: asyncio.Queue | None = None) -> Job:
        """Queue a request; its records arrive on the returned job's queue (call from the event loop)."""
        self.validate(request)
        job = Job(request, loop or asyncio.get_running_loop(), queue if queue is not None else asyncio.Queue())
        with self._cond:
            if self._stopping or self.draining:
                raise SchedulerBusy("the server is shutting down", retry_after=5, stopping=True)
            if len(self._pending) >= self.max_pending:
                raise SchedulerBusy(f"too many requests are waiting ({len(self._pending)}); try again later",
                                    retry_after=self._retry_after())
            self._pending.append(job)
            self._cond.notify_all()
        return job

    def _retry_after(self) -> float:
        """Seconds until a waiting slot is likely free: the mean time a finished job took (at least 1)."""
        return max(1.0, min(60.0, self._mean_job_s))

    def cancel(self, job: Job) -> None:
        """Stop a job (client went away). Safe to call more than once or after it finished."""
        with self._cond:
            if job.done or job.cancelled:
                return
            job.cancelled = True
            self._to_cancel.append(job)
            self._cond.notify_all()

    def stats(self) -> dict[str, Any]:
        with self._cond:
            return {
                "running_requests": len(self._running), "rows": len(self.engine.rows),
                "prefilling": len(self.engine.prefills),
                "reserved_rows": sum(reserved_rows(j.request) for j in self._running.values()),
                "pending_requests": len(self._pending), "max_rows": self.max_rows,
                "steps": self.steps, "tokens": self.tokens, "completed": self.completed,
                "cancelled": self.cancelled, "errors": self.errors, "max_batch_rows": self.max_batch_rows,
                "cancel_seconds": round(self.cancel_seconds, 4),
                "alive": self.alive,
            }

    # -- engine thread --------------------------------------------------------------------
    def _deliver(self, job: Job, kind: str, payload: Any = None) -> None:
        try:
            job.loop.call_soon_threadsafe(job.queue.put_nowait, (job, kind, payload))
        except RuntimeError:  # the client's event loop is closed: nobody is listening
            job.cancelled = True

    def _finish(self, job: Job, kind: str, payload: Any = None) -> None:
        job.done, job.finished, job.status = True, time.perf_counter(), kind
        if kind == "done":
            self._mean_job_s = 0.8 * self._mean_job_s + 0.2 * (job.finished - job.submitted)
        self._running.pop(job.id, None)
        setattr(self, _COUNTER[kind], getattr(self, _COUNTER[kind]) + 1)
        self._deliver(job, kind, payload)

    def _take_work(self) -> tuple[list[Job], list[Job]] | None:
        """Wait for work; return (cancelled, admitted) or None when stopping."""
        with self._cond:
            while not (self._stopping or self._pending or self._to_cancel or self.engine.active):
                self._cond.wait()
            if self._stopping:
                return None
            cancels, self._to_cancel = self._to_cancel, []
            admitted: list[Job] = []
            rows = sum(reserved_rows(job.request) for job in self._running.values() if not job.cancelled)
            while self._pending:
                job = self._pending[0]
                if job.cancelled:
                    self._pending.popleft()
                    continue
                if rows + reserved_rows(job.request) > self.max_rows:
                    break  # FIFO: later requests wait behind this one
                admitted.append(self._pending.popleft())
                rows += reserved_rows(job.request)
            return cancels, admitted

    def _run(self) -> None:
        try:
            while (work := self._take_work()) is not None:
                cancels, admitted = work
                for job in cancels:
                    if job.done:
                        continue
                    if job.id in self._running:
                        t0 = time.perf_counter()
                        self.engine.cancel(job.id)
                        self.cancel_seconds += time.perf_counter() - t0
                    self._finish(job, "cancelled")
                if admitted:
                    self._admit(admitted)
                if self.engine.active:
                    self._step()
        finally:
            self._shutdown()

    def _admit(self, jobs: list[Job]) -> None:
        now = time.perf_counter()
        try:
            self.engine.add([j.request for j in jobs])
        except Exception as e:  # one bad request must not sink the others: retry them one by one
            if len(jobs) == 1:
                self._fail(jobs[0], e)
                return
            for job in jobs:
                self._admit([job])
            return
        for job in jobs:
            job.started, job.status = now, "running"
            self._running[job.id] = job

    def _fail(self, job: Job, e: Exception) -> None:
        if not isinstance(e, EntropixError):
            log.error("request %s failed:\n%s", job.id, traceback.format_exc())
        self._finish(job, "error", str(e) if isinstance(e, EntropixError) else f"{type(e).__name__}: {e}")

    def _step(self) -> None:
        try:
            records = self.engine.step()
        except Exception as e:
            # The batch is in an unknown state: fail its requests and go on with a fresh engine.
            for job in list(self._running.values()):
                self._fail(job, e)
            self.engine = self._new_engine()
            return
        self.steps += 1
        self.tokens += len(records)
        self.max_batch_rows = max(self.max_batch_rows, len(records))
        by_job: dict[str, list[TokenRecord]] = {}
        for rec in records:
            by_job.setdefault(rec.request_id, []).append(rec)
        for rid, recs in by_job.items():
            job = self._running.get(rid)
            if job is not None:
                job.tokens += len(recs)
                self._deliver(job, "records", recs)
        # A job is done once none of its rows is left in the batch (rows may fork, so count rows).
        live = self.engine.live_ids()
        for rid in [rid for rid in self._running if rid not in live]:
            self._finish(self._running[rid], "done")

    def _shutdown(self) -> None:
        with self._cond:
            waiting = list(self._pending) + list(self._running.values())
            self._pending.clear()
        for job in waiting:
            if not job.done:
                self._finish(job, "cancelled")
        self.engine = self._new_engine()
