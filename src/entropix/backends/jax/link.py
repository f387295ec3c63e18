"""The control link of a multi-process JAX engine: process 0 sends each backend call to the others.

Plain TCP, one connection per process, messages length-prefixed. Process 0 only writes and
the others only read what process 0 wrote: the others connect out to the address process 0
published in JAX's coordination service, and a connection must open with the job's token
(published there too), so nothing outside the job can feed a process. Liveness is not this
link's concern (backends/peers.py watches it); a closed connection only ends a follower.
"""

from __future__ import annotations

import pickle
import socket
import struct
import time
from typing import Any

from ... import EntropixError

_HELLO = b"EPXL"
_HEADER = struct.Struct("!Q")
_ID = struct.Struct("!I")


class PeerGone(EntropixError):
    """A process of the job closed its control connection."""

    def __init__(self, process: int, why: str) -> None:
        super().__init__(f"process {process} is gone ({why})")
        self.process = process


def _read_exact(conn: socket.socket, n: int) -> bytes | None:
    parts, got = [], 0
    while got < n:
        chunk = conn.recv(min(n - got, 1 << 20))
        if not chunk:
            return None
        parts.append(chunk)
        got += len(chunk)
    return b"".join(parts)


class LeaderLink:
    """Process 0's side: accepts the other processes, then sends them every message."""

    def __init__(self, host: str, token: bytes) -> None:
        self.token = token
        self.server = socket.create_server((host, 0))
        self.address = f"{host}:{self.server.getsockname()[1]}"
        self.conns: dict[int, socket.socket] = {}

    def accept(self, processes: range, timeout: float) -> None:
        """Wait until every process in `processes` has connected with the token."""
        deadline = time.monotonic() + timeout
        while set(processes) - set(self.conns):
            left = deadline - time.monotonic()
            if left <= 0:
                missing = sorted(set(processes) - set(self.conns))
                raise EntropixError(f"process(es) {', '.join(map(str, missing))} did not join within {timeout:.0f} s")
            self.server.settimeout(left)
            try:
                conn, _ = self.server.accept()
            except socket.timeout:
                continue
            conn.settimeout(5.0)
            hello = _read_exact(conn, len(_HELLO) + len(self.token) + _ID.size)
            if not hello or hello[:len(_HELLO) + len(self.token)] != _HELLO + self.token:
                conn.close()  # not one of ours
                continue
            conn.settimeout(None)
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self.conns[_ID.unpack(hello[-_ID.size:])[0]] = conn

    def send(self, msg: Any) -> None:
        data = pickle.dumps(msg, protocol=pickle.HIGHEST_PROTOCOL)
        frame = _HEADER.pack(len(data)) + data
        for process, conn in self.conns.items():
            try:
                conn.sendall(frame)
            except OSError as e:
                raise PeerGone(process, e.strerror or type(e).__name__) from None

    def close(self) -> None:
        for conn in self.conns.values():
            try:
                conn.close()
            except OSError:
                pass
        self.server.close()


class FollowerLink:
    """A process's side: connects to process 0 and reads its messages."""

    def __init__(self, address: str, process: int, token: bytes, timeout: float) -> None:
        host, _, port = address.rpartition(":")
        try:
            self.conn = socket.create_connection((host, int(port)), timeout=timeout)
        except OSError as e:
            raise EntropixError(f"cannot reach process 0's control link at {address}: {e.strerror or e}") from None
        self.conn.settimeout(None)
        self.conn.sendall(_HELLO + token + _ID.pack(process))

    def recv(self) -> Any | None:
        """The next message, or None once process 0 closed the link."""
        try:
            head = _read_exact(self.conn, _HEADER.size)
            data = head and _read_exact(self.conn, _HEADER.unpack(head)[0])
        except OSError:
            return None
        return pickle.loads(data) if data else None

    def close(self) -> None:
        try:
            self.conn.close()
        except OSError:
            pass
