"""The server's scheduler on a tiny model: continuous batching, the row cap, cancellation,
and what a failed decode step does."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

import pytest

from entropix import EntropixError
from entropix.decode.records import Request
from entropix.sampler.policy import Greedy, TokenPolicy
from entropix.serve.scheduler import Scheduler

from tinymodel import tiny_lm


@pytest.fixture(scope="module")
def tiny():
    return tiny_lm(max_position_embeddings=4096)  # room for long requests that get cancelled


@pytest.fixture
def sched(tiny):
    s = Scheduler(tiny, max_rows=4)
    s.start()
    yield s
    s.stop()


def _req(tiny, text: str, max_tokens: int = 4, n: int = 1, stop: bool = True, policy=None) -> Request:
    return Request(prompt=tiny.tokenizer.encode(text), policy=policy or Greedy(), max_tokens=max_tokens,
                   n=n, stop_ids=tiny.tokenizer.stop_ids if stop else frozenset())


async def _drain(job, timeout: float = 60.0):
    """All records of a job and how it ended."""
    records = []
    while True:
        _, kind, payload = await asyncio.wait_for(job.queue.get(), timeout)
        if kind == "records":
            records.extend(payload)
        else:
            return records, kind, payload


def test_concurrent_requests_decode_in_the_same_steps(tiny, sched):
    async def main():
        jobs = [sched.submit(_req(tiny, f"Count to {i}:", max_tokens=4, stop=False)) for i in range(3)]
        return await asyncio.gather(*[_drain(j) for j in jobs])

    results = asyncio.run(main())
    for recs, kind, _ in results:
        assert kind == "done"
        assert [r.index for r in recs] == [0, 1, 2, 3]
        assert recs[-1].finish_reason == "length"
    assert sched.max_batch_rows >= 2  # they shared decode steps, not one after another
    assert sched.steps < 3 * 4
    assert sched.stats()["completed"] == 3


def test_batched_text_equals_alone(tiny, sched):
    """Greedy text of a request does not depend on what else is in the batch."""
    async def alone():
        return await _drain(sched.submit(_req(tiny, "The capital of France is", max_tokens=5, stop=False)))

    async def together():
        jobs = [sched.submit(_req(tiny, "The capital of France is", max_tokens=5, stop=False)),
                sched.submit(_req(tiny, "Write a long poem about the sea and the wind:", max_tokens=5, stop=False))]
        return await asyncio.gather(*[_drain(j) for j in jobs])

    solo, _, _ = asyncio.run(alone())
    (mixed, _, _), _ = asyncio.run(together())
    assert [r.token for r in mixed] == [r.token for r in solo]


def test_row_cap_queues_the_rest(tiny):
    s = Scheduler(tiny, max_rows=2)
    s.start()
    try:
        async def main():
            jobs = [s.submit(_req(tiny, f"Item {i}:", max_tokens=3, stop=False)) for i in range(3)]
            pending_seen = s.stats()["pending_requests"]
            results = await asyncio.gather(*[_drain(j) for j in jobs])
            return pending_seen, results, jobs

        pending_seen, results, jobs = asyncio.run(main())
        assert all(kind == "done" for _, kind, _ in results)
        assert s.max_batch_rows <= 2
        # the third request was admitted only after the first two left the batch
        assert jobs[2].started >= min(jobs[0].finished, jobs[1].finished)
        assert pending_seen >= 1
        with pytest.raises(EntropixError, match="at most 2 rows"):
            s.validate(_req(tiny, "x", n=3))
    finally:
        s.stop()


def test_cancel_stops_generation(tiny, sched):
    async def main():
        job = sched.submit(_req(tiny, "Tell me a very long story:", max_tokens=4000, stop=False))
        first = []
        while len(first) < 2:  # wait until it is really decoding
            _, kind, payload = await asyncio.wait_for(job.queue.get(), 60)
            assert kind == "records"
            first.extend(payload)
        sched.cancel(job)
        recs, kind, _ = await _drain(job)
        return job, first + recs, kind

    job, recs, kind = asyncio.run(main())
    assert kind == "cancelled"
    assert job.status == "cancelled"
    assert len(recs) < 4000 and job.tokens < 4000
    t0 = time.monotonic()
    while sched.stats()["rows"] and time.monotonic() - t0 < 10:
        time.sleep(0.02)
    assert sched.stats()["rows"] == 0  # its rows left the engine
    assert sched.stats()["cancelled"] == 1
    sched.cancel(job)  # a second cancel is harmless

    async def after():  # and the scheduler keeps serving
        return await _drain(sched.submit(_req(tiny, "Hello", max_tokens=2, stop=False)))

    assert asyncio.run(after())[1] == "done"


def test_cancel_while_waiting(tiny):
    s = Scheduler(tiny, max_rows=1)
    s.start()
    try:
        async def main():
            a = s.submit(_req(tiny, "First:", max_tokens=3, stop=False))
            b = s.submit(_req(tiny, "Second:", max_tokens=3, stop=False))
            s.cancel(b)  # still queued behind a
            return await asyncio.gather(_drain(a), _drain(b))

        (ra, ka, _), (rb, kb, _) = asyncio.run(main())
        assert ka == "done" and len(ra) == 3
        assert kb == "cancelled" and rb == []
    finally:
        s.stop()


@dataclass(frozen=True)
class _Broken(TokenPolicy):
    """A policy that fails at its first step (its host-side inputs raise)."""

    def host_inputs(self, rows):
        raise RuntimeError("boom")


def test_a_failed_step_fails_the_batch_and_starts_a_fresh_engine(tiny):
    """A policy fails inside the engine step, which the whole batch shares: its running jobs
    fail with the error, a request still waiting is untouched, and a fresh engine goes on."""
    s = Scheduler(tiny, max_rows=2)
    try:
        async def main():
            bad = s.submit(_req(tiny, "Hi", max_tokens=3, policy=_Broken()))
            neighbour = s.submit(_req(tiny, "Hello there", max_tokens=3, stop=False))
            waiting = s.submit(_req(tiny, "Later", max_tokens=3, stop=False, n=2))  # does not fit beside them
            s.start()  # all three queued first: the first two are admitted together
            return await asyncio.gather(_drain(bad), _drain(neighbour), _drain(waiting))

        old_engine = s.engine
        (recs, kind, msg), (_, n_kind, n_msg), (w_recs, w_kind, _) = asyncio.run(main())
        assert kind == "error" and "boom" in msg and recs == []
        assert n_kind == "error" and "boom" in n_msg  # it shared the failed step
        assert w_kind == "done" and len(w_recs) == 2 * 3  # admitted into the fresh engine
        assert s.engine is not old_engine
        assert s.alive and s.stats()["errors"] == 2 and s.stats()["rows"] == 0
    finally:
        s.stop()


def test_submit_validates(tiny, sched):
    async def main():
        with pytest.raises(EntropixError, match="empty"):
            sched.submit(Request(prompt=[], policy=Greedy()))
        with pytest.raises(EntropixError, match="context"):
            sched.submit(Request(prompt=[1] * tiny.config.max_position_embeddings, policy=Greedy()))

    asyncio.run(main())
    assert sched.stats()["pending_requests"] == 0


def test_stop_cancels_unfinished_jobs(tiny):
    s = Scheduler(tiny, max_rows=2)
    s.start()

    async def main():
        job = s.submit(_req(tiny, "Go on forever:", max_tokens=4000, stop=False))
        _, kind, _ = await asyncio.wait_for(job.queue.get(), 60)
        assert kind == "records"
        await asyncio.to_thread(s.stop)
        return await _drain(job)

    _, kind, _ = asyncio.run(main())
    assert kind == "cancelled"
    assert not s.alive
