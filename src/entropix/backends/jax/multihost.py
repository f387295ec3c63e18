"""The JAX backend over several processes: a TPU pod slice's hosts, or local CPU processes.

Every process runs the same command. `jax.distributed.initialize` joins them and the mesh
spans every process's devices; each process reads only the checkpoint slices its own devices
hold (loader.py). Process 0 alone runs the host engine (scheduler, HTTP server, output). A
jitted function whose arrays span processes must be launched by all of them, in the same
order, or their collectives wait for ever: so every backend call is first sent over the
control link (link.py) and then made on process 0, and the others make the same calls on
their twins of process 0's backends.

Liveness (backends/peers.py): a process that dies or stays silent for `peer_timeout` seconds
makes process 0's model unavailable (the server answers 503 naming it) and process 0 exits
a moment later; the others exit when process 0 is gone.
"""

from __future__ import annotations

import io
import os
import secrets
import sys
import threading
import time
from dataclasses import dataclass
from typing import Any

from ... import EntropixError
from .. import peers
from ..lockstep import LockstepBackend, TwinIds
from .link import FollowerLink, LeaderLink, PeerGone

START_TIMEOUT_S = 300.0  # joining, publishing addresses, loading: a 405B checkpoint takes minutes
EXIT_GRACE_S = 2.0  # how long process 0 keeps answering 503 after a process was lost, before it exits
EXIT_STATUS = 3
LOST_WAIT_S = 2.0  # a failed step waits this long for the watch to say which process went away
_KEY = "entropix/multihost/"


class ProcessLost(EntropixError):
    """A process of the job is gone or silent: nothing can be computed any more."""


@dataclass(frozen=True)
class Cluster:
    """This process's place in a job: the CLI's --coordinator, --num-processes, --process-id."""

    coordinator: str | None = None
    num_processes: int | None = None
    process_id: int | None = None

    @property
    def given(self) -> bool:
        return any(v is not None for v in (self.coordinator, self.num_processes, self.process_id))

    def check(self) -> None:
        if not self.given:
            return
        if self.coordinator is None or self.num_processes is None or self.process_id is None:
            raise EntropixError("--coordinator HOST:PORT, --num-processes N and --process-id I go together")
        host, _, port = self.coordinator.rpartition(":")
        if not host or not port.isdigit():
            raise EntropixError(f"--coordinator takes HOST:PORT, got {self.coordinator!r}")
        if self.num_processes < 1 or not 0 <= self.process_id < self.num_processes:
            raise EntropixError(f"--process-id must be in [0, {self.num_processes}) with --num-processes "
                                f"{self.num_processes}, got {self.process_id}")


def on_tpu_pod() -> bool:
    """Whether this is a Cloud TPU VM whose peers JAX finds by itself (no flags needed)."""
    try:
        from jax._src.clusters import cloud_tpu_cluster as tpu
    except ImportError:  # another JAX layout: the flags still work
        return False
    return any(c.is_env_present() for c in (tpu.GceTpuCluster, tpu.GkeTpuCluster))


def initialize(cluster: Cluster) -> tuple[int, int]:
    """Join the job (before any other JAX call of this process); (process id, process count)."""
    import jax

    cluster.check()
    jax.config.update("jax_cpu_collectives_implementation", "gloo")  # CPU devices of several processes
    try:
        if cluster.given:
            jax.distributed.initialize(cluster.coordinator, cluster.num_processes, cluster.process_id,
                                       initialization_timeout=int(START_TIMEOUT_S))
        else:
            jax.distributed.initialize()
    except Exception as e:  # JAX's messages are long: keep the first line
        raise EntropixError(f"joining the JAX job failed: {str(e).splitlines()[0] if str(e) else type(e).__name__}") \
            from None
    return jax.process_index(), jax.process_count()


def native_stdout_to_stderr() -> None:
    """Send what C++ libraries print on stdout (gloo's "connected to N peer ranks") to stderr, so
    that stdout holds only the command's output; Python's sys.stdout keeps the real one."""
    sys.stdout.flush()
    keep = os.dup(1)
    os.dup2(2, 1)
    sys.stdout = io.TextIOWrapper(io.FileIO(keep, "w"), encoding=sys.stdout.encoding,
                                  errors=sys.stdout.errors, line_buffering=sys.stdout.line_buffering)


def _kv():
    from jax._src import distributed

    return distributed.global_state.client


def _link_host() -> str:
    """Where process 0 listens: the coordinator's host (an address the others reach it at)."""
    from jax._src import distributed

    host = (distributed.global_state.coordinator_address or "127.0.0.1").rpartition(":")[0]
    return host.strip("[]") or "127.0.0.1"


class Session:
    """Process 0's link to the other processes, and what LoadedModel asks of it."""

    def __init__(self, processes: int, link: LeaderLink, exit_on_lost: bool = True) -> None:
        self.processes, self.link, self.exit_on_lost = processes, link, exit_on_lost
        self.watch: peers.Watch | None = None
        self.model: Any = None  # loader.JaxModel: this process's part of the mesh
        self.dead: str | None = None  # why the job can compute no more
        self._lock = threading.RLock()
        self.ids = TwinIds()
        self._closed = False

    def backend(self, capture_layers: tuple[int, ...] = (-1,)) -> "LeaderBackend":
        return LeaderBackend(self, capture_layers)

    def run(self, bid: int, capture_layers: tuple[int, ...], op: str, args: tuple, local) -> Any:
        """Send one backend call to the other processes, then make it here."""
        with self._lock:
            if self.dead:
                raise ProcessLost(self.dead)
            freed = self.ids.take_freed()
            try:
                self.link.send(("call", freed, bid, capture_layers, op, args))
                return local()
            except PeerGone as e:
                self.lost(str(e))
                raise ProcessLost(self.dead) from None
            except Exception:
                if self._wait_dead(LOST_WAIT_S):  # a collective failed because a process went away
                    raise ProcessLost(self.dead) from None
                raise

    def _wait_dead(self, wait: float) -> bool:
        deadline = time.monotonic() + wait
        while not self.dead and time.monotonic() < deadline:
            time.sleep(0.05)
        return bool(self.dead)

    def lost(self, why: str) -> None:
        """Mark the job dead; with exit_on_lost, end this process after a short grace."""
        first = self.dead is None
        self.dead = self.dead or why
        if first and self.exit_on_lost:
            threading.Thread(target=self._exit_soon, daemon=True).start()

    def _exit_soon(self) -> None:
        time.sleep(EXIT_GRACE_S)
        print(f"entropix: error: {self.dead}; stopping", file=sys.stderr, flush=True)
        os._exit(EXIT_STATUS)  # not sys.exit: JAX's shutdown would wait for the lost process

    def close(self) -> None:
        """Tell the other processes the command is done (they exit 0)."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            if self.watch is not None:
                self.watch.close()
            if not self.dead:
                try:
                    self.link.send(("stop",))
                except PeerGone:
                    pass
            self.link.close()


class LeaderBackend(LockstepBackend):
    """The Backend protocol on process 0: every call, the sampler's too, is made on every process
    (the sampler step's inputs are arrays over the whole mesh)."""

    name = "jax"

    def __init__(self, session: Session, capture_layers: tuple[int, ...] = (-1,)) -> None:
        from .backend import JaxBackend

        super().__init__(session, JaxBackend(session.model, tuple(capture_layers)), capture_layers)

    def sample(self, groups, top_k: int):
        return self._all("sample", list(groups), int(top_k))

    def synchronize(self) -> None:
        self._all("synchronize")


def follow(model: Any, link: FollowerLink) -> bool:
    """Processes 1..N-1: make process 0's backend calls until it says stop (True) or is gone (False)."""
    from .backend import JaxBackend

    backends: dict[int, JaxBackend] = {}
    while True:
        msg = link.recv()
        if msg is None:
            return False
        if msg[0] == "stop":
            return True
        _, freed, bid, layers, op, args = msg
        for f in freed:
            backends.pop(f, None)
        if bid not in backends:
            backends[bid] = JaxBackend(model, layers)
        # A call that fails here may have launched part of its collectives, or none, while process 0's
        # did not fail: no way to stay in step, so the caller ends this process and process 0 sees it go.
        getattr(backends[bid], op)(*args)


# -- starting ------------------------------------------------------------------------------

def _one_line(e: BaseException) -> str:
    text = str(e).splitlines()[0] if str(e) else ""
    return text if isinstance(e, EntropixError) else f"{type(e).__name__}: {text}"


def _load(ckpt, tp: int, dp: int, device: str | None, dtype: str | None, progress: bool):
    """This process's part of the model on a mesh over every process's devices."""
    import jax
    from jax.experimental import multihost_utils

    from .loader import load

    if tp * dp != jax.device_count():  # a process without a device in the mesh could not take part
        raise EntropixError(f"--tp {tp} x --dp {dp} must use every device of the job's {jax.process_count()} "
                            f"processes: {jax.device_count()} in all")
    model = load(ckpt, device=device, dtype=dtype, tp=tp, dp=dp, progress=progress)
    multihost_utils.sync_global_devices("entropix: every process holds its part")
    return model


def _leader_link(host: str, token: bytes) -> LeaderLink:
    try:
        return LeaderLink(host, token)
    except OSError:  # the coordinator's name is not an address of this host's: listen on all
        link = LeaderLink("", token)
        link.address = f"{host}:{link.address.rpartition(':')[2]}"
        return link


def _lead(n: int, ckpt, tp: int, dp: int, device, dtype, peer_timeout: float, exit_on_lost: bool) -> Session:
    import atexit

    token = secrets.token_hex(16)
    host = _link_host()
    session = Session(n, _leader_link(host, token.encode()), exit_on_lost)
    session.watch = peers.Watch(range(1, n), peer_timeout, session.lost, label="process", host=host)
    kv = _kv()
    kv.key_value_set(_KEY + "link", session.link.address)
    kv.key_value_set(_KEY + "watch", session.watch.address)
    kv.key_value_set(_KEY + "token", token)
    atexit.register(session.close)
    session.link.accept(range(1, n), START_TIMEOUT_S)
    session.watch.wait_connected(START_TIMEOUT_S)
    session.model = _load(ckpt, tp, dp, device, dtype, progress=True)
    return session


def _leader_lost(process: int):
    def lost(why: str) -> None:
        print(f"entropix: process {process}: {why}; stopping", file=sys.stderr, flush=True)
        os._exit(EXIT_STATUS)

    return lost


def _follower_main(pid: int, ckpt, tp: int, dp: int, device, dtype, peer_timeout: float) -> None:
    """Processes 1..N-1, whole life: join process 0, load this part, follow, exit."""
    import jax

    try:
        kv = _kv()

        def get(key: str) -> str:
            return kv.blocking_key_value_get(_KEY + key, int(START_TIMEOUT_S * 1000))

        beat = peers.follow_leader(get("watch"), pid, peer_timeout, _leader_lost(pid), label="process")
        link = FollowerLink(get("link"), pid, get("token").encode(), START_TIMEOUT_S)
        done = follow(_load(ckpt, tp, dp, device, dtype, progress=False), link)
    except Exception as e:  # say it once on this host; process 0 sees this one go
        print(f"entropix: process {pid}: {_one_line(e)}", file=sys.stderr, flush=True)
        os._exit(1)
    if not done:
        _leader_lost(pid)("process 0 closed the control link")
    beat.close()
    jax.distributed.shutdown()  # process 0 waits for every process here before it exits
    os._exit(0)


def start(spec: str | None, tp: int = 1, dp: int = 1, *, device: str | None = "auto", dtype: str | None = "auto",
          cluster: Cluster = Cluster(), peer_timeout: float = peers.DEFAULT_TIMEOUT_S,
          exit_on_lost: bool = True):
    """(process 0's Session, the checkpoint), or None when the job has one process. On the
    other processes this follows process 0 and ends the process: it never returns there."""
    from ...io.source import open_checkpoint

    if peer_timeout <= 0:
        raise EntropixError(f"--peer-timeout must be above 0 seconds, got {peer_timeout}")
    ckpt = open_checkpoint(spec)  # a bad path fails on every host before anything joins
    pid, n = initialize(cluster)
    if n == 1:
        return None
    native_stdout_to_stderr()
    if pid != 0:
        _follower_main(pid, ckpt, tp, dp, device, dtype, peer_timeout)
    return _lead(n, ckpt, tp, dp, device, dtype, peer_timeout, exit_on_lost), ckpt
