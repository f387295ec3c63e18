"""Liveness between the processes of one group: process 0 watches the others, each of them watches process 0.

A collective waits for ever on a process that stalls without dying (SIGSTOP, a hung driver), and a
closed framework connection is noticed only by the next collective. So each process also keeps
one plain TCP connection to process 0 (stdlib only: torch's ranks and JAX's processes share it)
and both ends send a heartbeat every timeout/4 seconds from a daemon thread; that thread runs while
the main thread waits in C code (torch and XLA release the GIL there). A side that hears nothing for
`timeout` seconds, or sees the connection close, calls its `on_lost(why)` once.

On the wire: a peer connects and sends "hello <peer>\\n"; then each side sends BEAT bytes, and
BYE when it ends normally (the other side then stops watching it and reports nothing).
"""

from __future__ import annotations

import errno
import math
import socket
import threading
import time
from typing import Callable, Sequence

from .. import EntropixError

DEFAULT_TIMEOUT_S = 30.0
_BEAT, _BYE = b".", b"q"
_DONTWAIT = getattr(socket, "MSG_DONTWAIT", 0)  # a beat never waits on a peer that stopped reading
_HELLO_MAX = 64


def _check_timeout(timeout: float) -> float:
    t = float(timeout)
    if not (t > 0 and math.isfinite(t)):
        raise EntropixError(f"the heartbeat timeout must be a number of seconds above 0, got {timeout}")
    return t


def _split(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise EntropixError(f"not a host:port address: {address!r}")
    return host.strip("[]"), int(port)


def _plural(label: str, n: int) -> str:
    return label if n == 1 else label + ("es" if label.endswith("s") else "s")


class _Link:
    """One watched connection: heartbeats out, and waiting for the other side's."""

    def __init__(self, sock: socket.socket, timeout: float) -> None:
        self.sock, self.timeout = sock, timeout
        self.closed = False
        self._send_lock = threading.Lock()

    def send(self, data: bytes) -> None:
        with self._send_lock:
            try:
                self.sock.send(data, _DONTWAIT)
            except OSError:  # gone, or not reading: the other thread's recv says which
                pass

    def watch(self, seen: bytes = b"") -> str | None:
        """Block until the other side ends: None for a normal end (BYE), else why it was lost."""
        data = seen
        while _BYE not in data:
            try:
                data = self.sock.recv(256)
            except socket.timeout:
                return f"stopped answering (no heartbeat for {self.timeout} s)"
            except OSError:
                return "is gone (its connection closed)"
            if not data:
                return "is gone (its connection closed)"
        return None

    def close(self, bye: bool) -> None:
        self.closed = True
        if bye:
            self.send(_BYE)
        try:  # shutdown wakes the thread blocked in recv; close alone does not
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()


def _start(target: Callable[..., None], *args, name: str) -> None:
    threading.Thread(target=target, args=args, name=name, daemon=True).start()


def _listen(host: str, port: int) -> socket.socket:
    """A listening socket on host:port, or on every interface when `host` is a name peers reach this
    machine at but not one of its own addresses (a NAT, a cluster's front name)."""
    try:
        try:
            return socket.create_server((host, port))
        except OSError as e:
            if not isinstance(e, socket.gaierror) and e.errno != errno.EADDRNOTAVAIL:
                raise
            return socket.create_server(("", port))
    except OSError as e:
        raise EntropixError(f"cannot listen for heartbeats on {host}:{port}: {e.strerror or e}") from None


class Watch:
    """Process 0's side: heartbeats to and from every peer; `on_lost(why)` once when one is gone or silent."""

    def __init__(self, peers: Sequence[int], timeout: float, on_lost: Callable[[str], None], *,
                 label: str = "process", host: str = "127.0.0.1", port: int = 0) -> None:
        self.timeout, self.label = _check_timeout(timeout), label
        self.peers = sorted({int(p) for p in peers})
        self._on_lost = on_lost
        self._cond = threading.Condition()
        self._links: dict[int, _Link] = {}
        self._closed = self._fired = False
        self._stop = threading.Event()
        self._server = _listen(host, port)
        self._server.settimeout(0.5)  # the accept loop looks at _closed this often
        self.address = f"{host}:{self._server.getsockname()[1]}"
        _start(self._accept, name=f"entropix-{label}-watch-accept")
        _start(self._beat, name=f"entropix-{label}-watch-beat")

    def wait_connected(self, timeout: float) -> None:
        """Return once every peer has connected; EntropixError naming those that did not."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while missing := [p for p in self.peers if p not in self._links]:
                left = deadline - time.monotonic()
                if left <= 0 or self._closed:
                    names = f"{_plural(self.label, len(missing))} {', '.join(map(str, missing))}"
                    raise EntropixError(f"{names} never connected to {self.label} 0's heartbeat at {self.address} "
                                        f"(waited {timeout:g} s)")
                self._cond.wait(left)

    def close(self) -> None:
        """A normal end: tell the peers (they report nothing) and stop watching."""
        with self._cond:
            if self._closed:
                return
            self._closed = True
            links = list(self._links.values())
            self._cond.notify_all()
        self._stop.set()
        for link in links:
            link.close(bye=True)
        self._server.close()

    def _accept(self) -> None:
        while not self._closed:
            try:
                conn, _ = self._server.accept()
            except socket.timeout:
                continue
            except OSError:
                return  # closed
            _start(self._greet, conn, name=f"entropix-{self.label}-watch-peer")

    def _greet(self, conn: socket.socket) -> None:
        """Read a peer's hello, then watch it until it ends."""
        conn.settimeout(self.timeout)
        data = b""
        try:
            while b"\n" not in data and len(data) < _HELLO_MAX and (chunk := conn.recv(_HELLO_MAX)):
                data += chunk
        except OSError:
            pass
        line, _, rest = data.partition(b"\n")
        word, _, num = line.decode("ascii", "replace").partition(" ")
        peer = int(num) if word == "hello" and num.isdigit() else -1
        link = _Link(conn, self.timeout)
        with self._cond:
            if self._closed or peer not in self.peers or peer in self._links:
                conn.close()  # a stranger, or a peer twice: not ours to watch
                return
            self._links[peer] = link
            self._cond.notify_all()
        link.send(_BEAT)  # the peer's clock starts now, not a quarter timeout later
        why = link.watch(rest)
        if why is None:
            link.close(bye=False)  # the peer ended normally: nothing more to watch
        else:
            self._lost(peer, link, why)

    def _lost(self, peer: int, link: _Link, why: str) -> None:
        with self._cond:
            if self._closed or link.closed or self._fired:
                return
            self._fired = True
        link.close(bye=False)  # a stalled peer that wakes up finds its leader gone, and ends
        self._on_lost(f"{self.label} {peer} {why}")

    def _beat(self) -> None:
        while not self._stop.wait(self.timeout / 4):
            with self._cond:
                links = list(self._links.values())
            for link in links:
                if not link.closed:
                    link.send(_BEAT)


class Beat:
    """A peer's side: heartbeats to process 0, and `on_lost(why)` once when it is gone or silent."""

    def __init__(self, sock: socket.socket, leader: str, timeout: float, on_lost: Callable[[str], None]) -> None:
        self._link, self._leader, self._on_lost = _Link(sock, timeout), leader, on_lost
        self._stop = threading.Event()
        _start(self._beat, name="entropix-peer-beat")
        _start(self._watch, name="entropix-peer-watch")

    def close(self) -> None:
        """A normal end of this peer: tell process 0 (it reports nothing) and stop watching it."""
        if self._link.closed:
            return
        self._stop.set()
        self._link.close(bye=True)

    def _beat(self) -> None:
        while not self._stop.wait(self._link.timeout / 4):
            self._link.send(_BEAT)

    def _watch(self) -> None:
        why = self._link.watch()
        if why is None or self._link.closed:
            return
        self._stop.set()
        self._link.close(bye=False)
        self._on_lost(f"{self._leader} {why}")


def follow_leader(address: str, peer: int, timeout: float, on_lost: Callable[[str], None], *,
                  label: str = "process") -> Beat:
    """Connect peer `peer` to process 0's Watch at `address` and keep the heartbeat both ways."""
    timeout = _check_timeout(timeout)
    host, port = _split(address)
    try:
        sock = socket.create_connection((host, port), timeout=timeout)
        sock.sendall(f"hello {int(peer)}\n".encode())
    except OSError as e:
        raise EntropixError(f"{label} {peer} cannot reach {label} 0's heartbeat at {address}: "
                            f"{e.strerror or e}") from None
    sock.settimeout(timeout)
    return Beat(sock, f"{label} 0", timeout, on_lost)
