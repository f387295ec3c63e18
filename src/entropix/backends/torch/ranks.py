"""Tensor-parallel ranks: starting them, and rank 0 leading the others step by step.

`start(spec, tp)` gives rank 0 a Session whose `backend()` is a `ShardedBackend`: each
backend call that runs the model (prefill, select, advance) is broadcast to every rank over a
gloo group of torch.distributed, then run on this rank's part; the model's own collectives
(all-reduce, all-gather; NCCL on CUDA, gloo on the CPU) keep the ranks in step. `sample` runs on
rank 0 alone: the gathered logits and attention statistics are whole there.

Two ways to get ranks:
- on one machine, `start` spawns ranks 1..N-1 itself (`python -m entropix.backends.torch.ranks`);
- under `torchrun` (RANK, WORLD_SIZE, LOCAL_RANK set) every process runs the same command:
  rank 0 goes on with it, the others call `follow` inside `start` and exit when rank 0 is done.

A rank that dies makes every later call raise `WorkerLost` (its message says which rank),
and, with `exit_on_lost`, rank 0 exits a moment later (the server first answers 503). A rank
that stalls without dying would hold rank 0 in a collective for ever: heartbeats over TCP
(backends/peers.py) notice it after `peer_timeout` seconds, and rank 0 then kills its ranks, as
if that one had died. The other ranks exit when rank 0 is gone or silent as long.
"""

from __future__ import annotations

import atexit
import logging
import math
import os
import subprocess
import sys
import threading
import time
from datetime import timedelta
from typing import Any, Callable, NoReturn

from ... import EntropixError
from ...io.checkpoint import Checkpoint
from ...io.source import open_checkpoint
from .. import peers
from ..lockstep import LockstepBackend, TwinIds
from ..peers import DEFAULT_TIMEOUT_S
from .backend import TorchBackend
from .tp import load_shard, rank_slices

CONTROL_TIMEOUT = timedelta(days=30)  # a follower waits for rank 0's next step for as long as a server idles
START_TIMEOUT = timedelta(seconds=300)  # the compute group's collectives and the rendezvous
EXIT_GRACE_S = 2.0  # how long rank 0 keeps answering (503) after a rank died, before it exits
EXIT_STATUS = 3
CHILD_EXIT_WAIT_S = 2.0  # a failed broadcast waits this long to see whether a rank exited
_STARTED: list["Session"] = []  # rank 0's sessions in this process: see leave()


class WorkerLost(EntropixError):
    """A tensor-parallel rank is gone: nothing can be computed any more."""


def under_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ and "MASTER_ADDR" in os.environ


class Session:
    """This process's place in the tensor-parallel group, and rank 0's link to the others."""

    def __init__(self, rank: int, world: int, local_rank: int, device: str, children=(), exit_on_lost=True) -> None:
        self.rank, self.world, self.local_rank, self.device = rank, world, local_rank, device
        self.children: list[subprocess.Popen] = list(children)
        self.exit_on_lost = exit_on_lost
        self.dead: str | None = None  # why the group can compute no more
        self.model = None  # this rank's part (backends.torch.tp)
        self.ctrl = None  # the gloo group rank 0 broadcasts its steps over
        self.threads = 0  # this process's CPU threads before the ranks shared the cores
        self.peers: peers.Watch | None = None  # rank 0: the other ranks' heartbeats
        self.beat: peers.Beat | None = None  # the others: rank 0's
        self._lock = threading.RLock()
        self.ids = TwinIds()
        self._closed = False

    # -- rank 0 -------------------------------------------------------------------------
    def backend(self, capture_layers: tuple[int, ...] = (-1,)) -> "ShardedBackend":
        """A fresh backend on rank 0 whose model calls run on every rank."""
        return ShardedBackend(self, capture_layers)

    def run(self, bid: int, capture_layers: tuple[int, ...], op: str, args: tuple, local) -> Any:
        """Broadcast one backend call, then make it here; WorkerLost if a rank is gone."""
        import torch.distributed as dist

        with self._lock:
            if self.dead:
                raise WorkerLost(self.dead)
            freed = self.ids.take_freed()
            try:
                dist.broadcast_object_list([("call", freed, bid, capture_layers, op, args)], src=0, group=self.ctrl)
                return local()
            except Exception as e:
                if not isinstance(e, dist.DistError) and not self._children_gone(CHILD_EXIT_WAIT_S):
                    raise
                self.lost(self.dead or f"a tensor-parallel rank stopped answering ({type(e).__name__}: {e})")
                raise WorkerLost(self.dead) from None

    def _children_gone(self, wait: float) -> bool:
        """Whether a spawned rank has exited, waiting a little: a collective can fail on a peer's
        death before that peer is seen to have exited."""
        deadline = time.monotonic() + wait
        while not self._check_children():
            if not self.children or time.monotonic() > deadline:
                return False
            time.sleep(0.05)
        return True

    def _check_children(self) -> bool:
        for r, p in enumerate(self.children, start=1):
            if p.poll() is not None:
                self.dead = self.dead or f"tensor-parallel rank {r} (pid {p.pid}) exited with status {p.returncode}"
                return True
        return False

    def lost(self, why: str) -> None:
        """Mark the group dead; with exit_on_lost, end this process after a short grace."""
        if self.dead and self._closed:
            return
        self.dead = self.dead or why
        self._closed = True
        if self.exit_on_lost:
            threading.Thread(target=self._exit_soon, daemon=True).start()

    def peer_lost(self, why: str) -> None:
        """Rank 0's heartbeat watch lost a rank: the group is dead, and its ranks are killed (SIGKILL
        ends a stopped one too), which also ends a collective waiting on it here."""
        self._children_gone(0.5)  # a rank that exited: say so, with its status
        self.lost(self.dead or f"tensor-parallel {why}")
        self._kill_children()

    def _exit_soon(self) -> None:
        time.sleep(EXIT_GRACE_S)
        print(f"entropix: error: {self.dead}; stopping", file=sys.stderr, flush=True)
        self._kill_children()
        os._exit(EXIT_STATUS)

    def watch(self) -> None:
        """Rank 0 with spawned ranks: notice a rank's death even while idle."""
        def loop() -> None:
            while not self._closed:
                if self._check_children():
                    self.lost(self.dead)
                    return
                time.sleep(0.2)

        threading.Thread(target=loop, name="entropix-tp-watch", daemon=True).start()

    def close(self) -> None:
        """Tell the other ranks to stop, and wait for the ones this process started."""
        import torch.distributed as dist

        with self._lock:
            if self._closed:
                self._kill_children()
                return
            self._closed = True
            try:
                if self.rank == 0 and self.ctrl is not None and not self.dead:
                    dist.broadcast_object_list([("stop",)], src=0, group=self.ctrl)
            except Exception:
                pass
            for p in self.children:
                try:
                    p.wait(10)
                except subprocess.TimeoutExpired:
                    pass
            self._kill_children()
            if self.peers is not None and not self.dead:  # after a loss the others must see rank 0 go, not a goodbye
                self.peers.close()
            if dist.is_initialized():
                dist.destroy_process_group()
            if self.threads:
                import torch

                torch.set_num_threads(self.threads)

    def _kill_children(self) -> None:
        for p in self.children:
            if p.poll() is None:
                p.kill()


class ShardedBackend(LockstepBackend):
    """The Backend protocol on rank 0: every call that runs the model is made on all ranks."""

    name = "torch"

    def __init__(self, session: Session, capture_layers: tuple[int, ...] = (-1,)) -> None:
        super().__init__(session, TorchBackend(session.model, tuple(capture_layers)), capture_layers)

    def sample(self, groups, top_k: int):
        if self.session.dead:
            raise WorkerLost(self.session.dead)
        return self.local.sample(groups, top_k)  # no collectives: rank 0 holds the whole logits


# -- followers -------------------------------------------------------------------------

def follow(session: Session) -> None:
    """Ranks 1..N-1: make rank 0's backend calls on this rank's part until it says stop."""
    import torch.distributed as dist

    backends: dict[int, TorchBackend] = {}
    while True:
        box = [None]
        dist.broadcast_object_list(box, src=0, group=session.ctrl)
        msg = box[0]
        if msg[0] == "stop":
            return
        _, freed, bid, layers, op, args = msg
        for f in freed:
            backends.pop(f, None)
        if bid not in backends:
            backends[bid] = TorchBackend(session.model, layers)
        getattr(backends[bid], op)(*args)


# -- starting ----------------------------------------------------------------------------

def _rank_device(device: str | None, local_rank: int) -> str:
    import torch

    if device in (None, "auto"):
        return f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise EntropixError(f"device {device!r} asked for, but CUDA is not available")
        if torch.cuda.device_count() <= local_rank:
            raise EntropixError(f"rank {local_rank} needs cuda:{local_rank}, but {torch.cuda.device_count()} GPUs are visible")
        return f"cuda:{local_rank}"
    if device != "cpu":
        raise EntropixError(f"tensor parallelism runs on cpu or cuda, not {device!r}")
    return "cpu"


def _init_group(session: Session, store=None) -> None:
    import torch
    import torch.distributed as dist

    cuda = session.device.startswith("cuda")
    if cuda:
        torch.cuda.set_device(session.device)
    else:  # the ranks on one machine share its cores
        local = int(os.environ.get("LOCAL_WORLD_SIZE", session.world))
        session.threads = torch.get_num_threads()  # given back by close()
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local))
    kw = dict(store=store) if store is not None else {}
    dist.init_process_group("nccl" if cuda else "gloo", rank=session.rank, world_size=session.world,
                            timeout=START_TIMEOUT, **kw)
    session.ctrl = dist.new_group(backend="gloo", timeout=CONTROL_TIMEOUT)


def _load_part(session: Session, spec: str | None, dtype: str | None, ckpt=None):

    ckpt = ckpt or open_checkpoint(spec)
    session.model = load_shard(ckpt, session.rank, session.world, session.device, dtype, group=_compute_group())
    return ckpt


def _compute_group():
    import torch.distributed as dist

    return dist.group.WORLD


def _spawn(spec: str | None, world: int, device: str | None, dtype: str | None, port: int,
           extra_env: dict[str, str]) -> list[subprocess.Popen]:
    children = []
    for r in range(1, world):
        env = dict(os.environ, ENTROPIX_TP_RANK=str(r), ENTROPIX_TP_WORLD=str(world), ENTROPIX_TP_PORT=str(port),
                   ENTROPIX_TP_PARENT=str(os.getpid()), **extra_env)
        cmd = [sys.executable, "-m", "entropix.backends.torch.ranks", "--model", spec or "", "--device", device or "auto",
               "--dtype", dtype or "auto"]
        children.append(subprocess.Popen(cmd, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL))
    return children


def start(spec: str | None, tp: int | None = None, *, device: str | None = "auto", dtype: str | None = "auto",
          exit_on_lost: bool = True, peer_timeout: float | None = DEFAULT_TIMEOUT_S) -> tuple[Session, Checkpoint]:
    """Rank 0's session over `tp` ranks (spawned here, or torchrun's) and the checkpoint it read.
    On torchrun's other ranks this follows rank 0 and exits the process when it is done: it
    never returns there. `peer_timeout`: seconds a rank may stay silent (None: the default)."""
    import torch.distributed as dist

    timeout = _check_peer_timeout(peer_timeout)
    if under_torchrun():
        session, ckpt = _join_torchrun(spec, tp, device, dtype, exit_on_lost, timeout), None
    else:
        session, ckpt = _spawn_ranks(spec, tp, device, dtype, exit_on_lost, timeout)
    atexit.register(session.close)
    _STARTED.append(session)
    try:
        ckpt = _load_part(session, spec, dtype, ckpt)
        dist.barrier(group=session.ctrl)  # every rank has its part
        if session.peers is not None:
            session.peers.wait_connected(timeout)  # each connected before loading: this does not wait
    except WorkerLost:
        raise
    except Exception as e:
        session._check_children()
        session.close()
        if session.dead or isinstance(e, dist.DistError):
            raise WorkerLost(f"{session.dead or e} while loading (see its error above)") from None
        raise
    return session, ckpt


def started() -> bool:
    """Whether this process led tensor-parallel ranks."""
    return bool(_STARTED)


def leave(code: int) -> NoReturn:
    """End a process that led ranks: close its sessions, flush, and exit without the interpreter's
    teardown. gloo's threads outlive destroy_process_group, and one that meets the teardown aborts the
    process after its work is done ("terminate called without an active exception", about one exit in
    forty on a loaded 2-core machine), turning a good run's status 0 into a SIGABRT."""
    for session in _STARTED:
        session.close()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe or stream: nothing more can reach it
            pass
    logging.shutdown()
    os._exit(code)


def _check_peer_timeout(peer_timeout: float | None) -> float:
    t = DEFAULT_TIMEOUT_S if peer_timeout is None else float(peer_timeout)
    if not (t > 0 and math.isfinite(t)):
        raise EntropixError(f"--peer-timeout must be a number of seconds above 0, got {peer_timeout}")
    return t


def _join_torchrun(spec: str | None, tp: int | None, device: str | None, dtype: str | None, exit_on_lost: bool,
                   timeout: float) -> Session:
    """This process's session in torchrun's group; on ranks other than 0 this never returns."""
    world, rank = int(os.environ["WORLD_SIZE"]), int(os.environ["RANK"])
    if tp not in (None, world):
        raise EntropixError(f"--tp {tp} under torchrun with {world} processes: they must agree")
    local = int(os.environ.get("LOCAL_RANK", rank))
    session = Session(rank, world, local, _rank_device(device, local), exit_on_lost=exit_on_lost)
    _init_group(session)
    _share_heartbeat(session, timeout)
    if rank != 0:
        _follower_main(session, spec, dtype)
    return session


def _share_heartbeat(session: Session, timeout: float) -> None:
    """Under torchrun: rank 0 listens for heartbeats and tells the others where, over the control group."""
    import torch.distributed as dist

    box: list[Any] = [None]
    if session.rank == 0 and session.world > 1:
        one_node = os.environ.get("LOCAL_WORLD_SIZE") == os.environ["WORLD_SIZE"]
        session.peers = peers.Watch(range(1, session.world), timeout, session.peer_lost, label="rank",
                                    host="127.0.0.1" if one_node else os.environ["MASTER_ADDR"])
        box = [(session.peers.address, timeout)]
    dist.broadcast_object_list(box, src=0, group=session.ctrl)
    if session.rank != 0:
        address, timeout = box[0]
        session.beat = peers.follow_leader(address, session.rank, timeout, _leader_lost(session.rank), label="rank")


def _spawn_ranks(spec: str | None, tp: int | None, device: str | None, dtype: str | None, exit_on_lost: bool,
                 timeout: float) -> tuple[Session, Checkpoint]:
    """Rank 0 here, with ranks 1..N-1 started as processes of this one."""
    import torch.distributed as dist

    world = int(tp or 1)
    if world < 1:
        raise EntropixError(f"--tp must be at least 1, got {world}")
    ckpt = open_checkpoint(spec)  # bad paths and impossible splits fail before any rank starts
    rank_slices(ckpt.config, 0, world)
    session = Session(0, world, 0, _rank_device(device, 0), exit_on_lost=exit_on_lost)
    store = dist.TCPStore("127.0.0.1", 0, world, is_master=True, timeout=START_TIMEOUT, wait_for_workers=False)
    if world > 1:  # before the ranks start: they connect first thing, and are watched while loading too
        session.peers = peers.Watch(range(1, world), timeout, session.peer_lost, label="rank")
        heartbeat = {"ENTROPIX_TP_HEARTBEAT": session.peers.address, "ENTROPIX_TP_PEER_TIMEOUT": repr(timeout)}
        session.children = _spawn(spec, world, device, dtype, store.port, heartbeat)
    session.watch()
    _init_group(session, store)
    return session, ckpt


def _follower_main(session: Session, spec: str | None, dtype: str | None) -> None:
    """A follower's whole life: load its part, follow rank 0, exit the process."""
    import torch.distributed as dist

    code = 0
    try:
        _load_part(session, spec, dtype)
        dist.barrier(group=session.ctrl)
        follow(session)
        if session.beat is not None:
            session.beat.close()  # a normal end: rank 0 is told so, and reports nothing
    except Exception as e:  # rank 0 went away, or this rank failed: say so, once
        print(f"entropix: tensor-parallel rank {session.rank}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}",
              file=sys.stderr, flush=True)
        code = 1
    finally:
        try:
            if dist.is_initialized():
                dist.destroy_process_group()
        except Exception:
            pass
        os._exit(code)


def _leader_lost(rank: int) -> Callable[[str], None]:
    """A follower's end when rank 0 is gone or silent: it would otherwise wait in a collective for ever."""
    def lost(why: str) -> None:
        print(f"entropix: tensor-parallel rank {rank}: {why}; stopping", file=sys.stderr, flush=True)
        os._exit(EXIT_STATUS)

    return lost


def _watch_parent(parent: int) -> None:
    """A spawned rank ends with the process that started it (however that one ended)."""
    def loop() -> None:
        while True:
            try:
                os.kill(parent, 0)
            except OSError:
                os._exit(1)
            time.sleep(0.5)

    threading.Thread(target=loop, daemon=True).start()


def _spawned_main(argv: list[str] | None = None) -> None:
    """Entry of a rank that `start` spawned: its rank, group size and rendezvous in the environment."""
    import argparse

    import torch.distributed as dist

    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default="auto")
    a = ap.parse_args(argv)
    rank, world = int(os.environ["ENTROPIX_TP_RANK"]), int(os.environ["ENTROPIX_TP_WORLD"])
    _watch_parent(int(os.environ["ENTROPIX_TP_PARENT"]))
    try:
        session = Session(rank, world, rank, _rank_device(a.device, rank))
        session.beat = peers.follow_leader(os.environ["ENTROPIX_TP_HEARTBEAT"], rank,
                                           float(os.environ["ENTROPIX_TP_PEER_TIMEOUT"]), _leader_lost(rank),
                                           label="rank")
        store = dist.TCPStore("127.0.0.1", int(os.environ["ENTROPIX_TP_PORT"]), world, is_master=False,
                              timeout=START_TIMEOUT)
        _init_group(session, store)
    except Exception as e:
        print(f"entropix: tensor-parallel rank {rank}: {e}", file=sys.stderr, flush=True)
        os._exit(1)
    _follower_main(session, a.model or None, a.dtype)


if __name__ == "__main__":
    _spawned_main()
