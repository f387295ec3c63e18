"""Serving under load on the tiny model: chunked prefill between decode steps, row slots that
are reused without copying the others, the row limit with branching, stop strings."""

from __future__ import annotations

import asyncio
import random

import pytest

from entropix.decode.records import Request
from entropix.decode.stops import StopText
from entropix.sampler import catalog
from entropix.sampler.policy import Greedy
from entropix.serve.scheduler import Scheduler

from tinymodel import tiny_lm

LONG = [i % 250 + 1 for i in range(300)]


@pytest.fixture(scope="module")
def tiny():
    return tiny_lm(max_position_embeddings=4096)


def _requests():
    return [Request(prompt=list(range(1, 40)), policy=Greedy(), max_tokens=30, id="a"),
            Request(prompt=LONG, policy=Greedy(), max_tokens=20, n=2, id="b"),
            Request(prompt=list(range(7, 20)), policy=Greedy(), max_tokens=25, id="c")]


def _run(tiny, chunk, cancel_at=None, on_step=None):
    engine = tiny.engine((-1,))
    engine.prefill_chunk = chunk
    engine.add(_requests())
    out, steps = {}, 0
    while engine.active:
        recs = engine.step()
        for r in recs:
            out.setdefault((r.request_id, r.choice), []).append(r.token)
        steps += 1
        if on_step:
            on_step(engine, recs)
        if steps == cancel_at:
            engine.cancel("c")
    return out, engine


def test_chunked_prefill_runs_between_decode_steps_and_gives_the_same_tokens(tiny):
    whole, _ = _run(tiny, None)
    seen = []  # per step while the long prompt is read: did the short rows get their token?
    chunked, _ = _run(tiny, 64, on_step=lambda e, recs: seen.append(
        (bool(e.prefills), {r.request_id for r in recs})))
    assert chunked == whole
    reading = [ids for pending, ids in seen if pending]
    assert len(reading) >= len(LONG) // 64 - 1  # the long prompt took several steps...
    assert all({"a", "c"} <= ids for ids in reading)  # ...and the running rows decoded in each of them


def test_a_cancelled_prefill_is_dropped(tiny):
    engine = tiny.engine((-1,))
    engine.prefill_chunk = 64
    engine.add([Request(prompt=LONG, policy=Greedy(), max_tokens=4, id="long")])
    engine.step()
    assert engine.prefills and engine.backend._partial
    engine.cancel("long")
    assert not engine.active and not engine.backend._partial


def test_finished_and_cancelled_rows_free_their_slots_without_copying_the_others(tiny):
    ptrs = []

    def watch(engine, recs):
        cache = engine.backend.cache
        if cache is not None:
            ptrs.append((cache.full.k.data_ptr(), cache.full.batch))

    alone, _ = _run(tiny, None)
    out, engine = _run(tiny, None, cancel_at=3, on_step=watch)
    assert all(out[k] == alone[k] for k in out if k[0] != "c") and len(out[("c", 0)]) == 3
    # one cache tensor throughout: rows leaving (c cancelled, then the others finishing) moved no other row
    assert len(set(ptrs)) == 1


def test_a_freed_slot_is_taken_by_the_next_row(tiny):
    engine = tiny.engine((-1,))
    engine.add([Request(prompt=[1, 2, 3], policy=Greedy(), max_tokens=50, id=f"r{i}") for i in range(3)])
    engine.step()
    engine.cancel("r0")
    assert engine.backend.slot == [1, 2]
    engine.add([Request(prompt=[4, 5], policy=Greedy(), max_tokens=5, id="new")])
    assert engine.backend.slot == [1, 2, 0]  # the lowest free slot
    recs = engine.step()
    assert [r.request_id for r in recs] == ["r1", "r2", "new"]


ALWAYS_BRANCH = {"low_ent": 0, "med_ent": 50, "high_ent": 50, "low_vent": 0, "med_vent": 0, "high_vent": 0}


def test_branching_requests_stay_under_max_rows(tiny):
    dec = catalog.build("entropix-branching", catalog.parameters("entropix-branching", sampler_config=ALWAYS_BRANCH),
                        tiny)
    sched = Scheduler(tiny, max_rows=12)
    sched.start()

    async def main():
        jobs = [sched.submit(Request(prompt=[10 + i, 20, 30], policy=dec.policy, max_tokens=12, seed=i,
                                     branching=dec.branching)) for i in range(8)]
        kinds = []
        for job in jobs:
            while True:
                _, kind, _ = await asyncio.wait_for(job.queue.get(), 120)
                if kind != "records":
                    kinds.append(kind)
                    break
        return kinds

    try:
        kinds = asyncio.run(main())
    finally:
        sched.stop()
    assert kinds == ["done"] * 8
    assert sched.max_batch_rows <= 12
    assert sched.max_batch_rows > 1  # they did fork (each may hold 8 rows: one runs at a time here)


def test_stop_strings_spanning_tokens_match_a_character_by_character_reference():
    def reference(text, stops):  # the first stop to complete, the text before it
        for end in range(1, len(text) + 1):
            done = [s for s in stops if text[:end].endswith(s)]
            if done:
                return text[:end - max(map(len, done))], True
        return text, False

    rng = random.Random(0)
    for _ in range(2000):
        alphabet = "ab<|>"
        stops = tuple("".join(rng.choice(alphabet) for _ in range(rng.randint(1, 5))) for _ in range(rng.randint(1, 3)))
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 30)))
        st, out, hit, i = StopText(stops), "", False, 0
        while i < len(text) and not hit:
            j = i + rng.randint(1, 4)
            delta, hit = st.feed(text[i:j])
            out, i = out + delta, j
            assert len(st.held) < max(map(len, stops))  # only a bounded tail is ever scanned again
        if not hit:
            out += st.flush()
        assert (out, hit) == reference(text, stops), (stops, text)


def test_drain_refuses_new_requests_and_ends_running_ones_at_the_deadline(tiny):
    from entropix.serve.scheduler import SchedulerBusy

    sched = Scheduler(tiny, max_rows=4)
    sched.start()

    async def main():
        job = sched.submit(Request(prompt=[1, 2, 3], policy=Greedy(), max_tokens=3000))
        while job.tokens < 2:
            await asyncio.sleep(0.01)
        t0 = asyncio.get_running_loop().time()
        sched.drain(0.3)
        with pytest.raises(SchedulerBusy) as e:
            sched.submit(Request(prompt=[1, 2], policy=Greedy(), max_tokens=2))
        assert e.value.stopping
        while True:
            _, kind, _ = await asyncio.wait_for(job.queue.get(), 60)
            if kind != "records":
                return kind, asyncio.get_running_loop().time() - t0, job.tokens

    try:
        kind, took, tokens = asyncio.run(main())
    finally:
        sched.stop()
    assert kind == "cancelled" and took >= 0.3 and tokens < 3000
