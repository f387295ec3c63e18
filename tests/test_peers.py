"""Liveness over TCP (backends/peers.py) with real sockets and processes: stalled (SIGSTOP) and
killed peers and leaders are reported, naming them; a normal end reports nothing."""

from __future__ import annotations

import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

from entropix import EntropixError
from entropix.backends.peers import DEFAULT_TIMEOUT_S, Watch, follow_leader

pytestmark = pytest.mark.slow  # subprocesses, and waits of a few heartbeat timeouts

T = 1.5  # heartbeat timeout of these tests: beats every 0.375 s
MARGIN = 1.5  # a busy machine's scheduling, on top of the timeout

PEER = """
import os, sys, time
from entropix.backends.peers import follow_leader
def lost(why):
    print("LOST", why, flush=True)
    os._exit(7)
beat = follow_leader(sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), lost, label=sys.argv[4])
print("READY", flush=True)
if sys.argv[5] == "busy":  # the main thread holds the GIL in Python code: the beats still get their turns
    while True:
        sum(range(10000))
if sys.argv[5] == "close":
    beat.close()
    print("CLOSED", flush=True)
time.sleep(600)
"""

LEADER = """
import sys, time
from entropix.backends.peers import Watch
w = Watch([1], float(sys.argv[1]), lambda why: print("LOST", why, flush=True))
print(w.address, flush=True)
if sys.argv[2] == "close":
    w.wait_connected(30)
    w.close()
    print("CLOSED", flush=True)
time.sleep(600)
"""


class Proc:
    """A Python subprocess whose stdout lines can be awaited."""

    def __init__(self, script: str, *args) -> None:
        self.p = subprocess.Popen([sys.executable, "-c", script, *map(str, args)], stdout=subprocess.PIPE,
                                  stdin=subprocess.DEVNULL, text=True)
        self.lines: queue.Queue = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.p.stdout:
            self.lines.put(line.strip())

    def line(self, timeout: float = 30) -> str:
        return self.lines.get(timeout=timeout)

    def signal(self, sig: int) -> None:
        os.kill(self.p.pid, sig)

    def end(self) -> None:
        if self.p.poll() is None:
            self.p.send_signal(signal.SIGCONT)
            self.p.kill()
        self.p.wait(10)


class Reports:
    """An on_lost that keeps what it was told, and when."""

    def __init__(self) -> None:
        self.why: list[str] = []
        self.at: list[float] = []
        self.event = threading.Event()

    def __call__(self, why: str) -> None:
        self.why.append(why)
        self.at.append(time.monotonic())
        self.event.set()

    def wait(self, since: float, timeout: float) -> float:
        """Seconds from `since` to the first report."""
        assert self.event.wait(timeout), "on_lost was not called"
        return self.at[0] - since


@pytest.fixture
def procs():
    started: list[Proc] = []

    def start(script: str, *args) -> Proc:
        started.append(Proc(script, *args))
        return started[-1]

    yield start
    for p in started:
        p.end()


def _peer(procs, watch: Watch, peer: int, mode: str = "sleep") -> Proc:
    p = procs(PEER, watch.address, peer, watch.timeout, watch.label, mode)
    assert p.line() == "READY"
    return p


def test_a_stopped_peer_is_reported_within_the_timeout_naming_it(procs):
    got = Reports()
    watch = Watch([1, 2], T, got, label="rank")
    try:
        one, two = _peer(procs, watch, 1), _peer(procs, watch, 2, "busy")
        watch.wait_connected(30)
        time.sleep(2 * T)  # beats keep both alive, the one whose main thread never lets go of the GIL too
        assert got.why == []
        two.signal(signal.SIGSTOP)
        elapsed = got.wait(time.monotonic(), T + MARGIN)
        assert got.why == [f"rank 2 stopped answering (no heartbeat for {T} s)"]
        assert T * 0.5 <= elapsed <= T + MARGIN, elapsed
        two.signal(signal.SIGCONT)  # woken up, it finds its leader's connection closed, and ends
        assert two.line(T + MARGIN) == "LOST rank 0 is gone (its connection closed)"
        assert two.p.wait(10) == 7
        one.signal(signal.SIGKILL)
        time.sleep(0.5)
        assert len(got.why) == 1  # once: the group is broken after the first
    finally:
        watch.close()


def test_a_killed_peer_is_reported_at_once(procs):
    got = Reports()
    watch = Watch([1], 10.0, got)  # far longer than the report takes: the closed connection says it
    try:
        p = _peer(procs, watch, 1)
        watch.wait_connected(30)
        p.signal(signal.SIGKILL)
        assert got.wait(time.monotonic(), 5) < 1.0
        assert got.why == ["process 1 is gone (its connection closed)"]
    finally:
        watch.close()


def test_a_normal_end_reports_nothing_on_either_side(procs):
    got = Reports()
    watch = Watch([1, 2], T, got)
    try:
        leaver, stayer = _peer(procs, watch, 1, "close"), _peer(procs, watch, 2)
        watch.wait_connected(30)
        assert leaver.line() == "CLOSED"
        leaver.signal(signal.SIGKILL)  # after its normal end: its connection closing is no loss
        time.sleep(T)
    finally:
        watch.close()
    time.sleep(2 * T)  # the peer no longer hears beats, and was told that is fine
    assert got.why == [] and stayer.p.poll() is None and stayer.lines.empty()


@pytest.mark.parametrize("how", ["stop", "kill"])
def test_a_stalled_or_killed_leader_makes_the_follower_report_it(procs, how):
    leader = procs(LEADER, T, "run")
    got = Reports()
    beat = follow_leader(leader.line(), 1, T, got)
    try:
        time.sleep(2 * T)
        assert got.why == []  # heartbeats both ways
        leader.signal(signal.SIGSTOP if how == "stop" else signal.SIGKILL)
        elapsed = got.wait(time.monotonic(), T + MARGIN)
        if how == "stop":
            assert got.why == [f"process 0 stopped answering (no heartbeat for {T} s)"]
            assert T * 0.5 <= elapsed <= T + MARGIN, elapsed
        else:
            assert got.why == ["process 0 is gone (its connection closed)"] and elapsed < 1.0
    finally:
        beat.close()


def test_a_leader_that_ends_normally_is_no_loss(procs):
    leader = procs(LEADER, T, "close")
    got = Reports()
    beat = follow_leader(leader.line(), 1, T, got)
    try:
        assert leader.line() == "CLOSED"
        time.sleep(2 * T)
        leader.signal(signal.SIGKILL)
        time.sleep(0.5)
        assert got.why == []
    finally:
        beat.close()


def test_wait_connected_names_the_peers_that_never_came():
    watch = Watch([1, 2, 3], 5.0, Reports(), label="rank")
    try:
        with socket.create_connection(("127.0.0.1", int(watch.address.rpartition(":")[2]))) as stranger:
            stranger.sendall(b"GET / HTTP/1.0\n\n")  # not a peer: turned away, and no harm done
            assert stranger.recv(16) == b""
        beat = follow_leader(watch.address, 2, 5.0, Reports(), label="rank")
        with pytest.raises(EntropixError) as e:
            watch.wait_connected(0.5)
        assert str(e.value) == f"ranks 1, 3 never connected to rank 0's heartbeat at {watch.address} (waited 0.5 s)"
        more = follow_leader(watch.address, 1, 5.0, Reports(), label="rank")
        with pytest.raises(EntropixError, match=r"^rank 3 never connected"):
            watch.wait_connected(0.5)
        beat.close()
        more.close()
    finally:
        watch.close()


def test_bad_timeouts_and_unreachable_leaders_are_one_line_errors():
    for bad in (0, -1.0, float("nan")):
        with pytest.raises(EntropixError, match="timeout must be a number of seconds above 0"):
            Watch([1], bad, print)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed = f"127.0.0.1:{s.getsockname()[1]}"  # bound, not listening: refused
    with pytest.raises(EntropixError) as e:
        follow_leader(closed, 4, 1.0, print, label="rank")
    assert str(e.value).startswith(f"rank 4 cannot reach rank 0's heartbeat at {closed}: ")
    assert "\n" not in str(e.value) and DEFAULT_TIMEOUT_S == 30.0
