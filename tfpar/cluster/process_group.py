"""Point-to-point messages between the processes of a job, with failure detection.

A pipeline whose stages are tensor-parallel and live in different processes
runs one program per process (`tfpar.strategies.pipeline.process_stages`):
each process drives its own stage's DTensor mesh, and activations and their
gradients cross between neighbouring stages as messages. TensorFlow cannot
carry them (measured, BUILD_NOTES "Pipelines across processes"): a DTensor
mesh cannot be copied to another process's mesh, and collectives between
the processes of a multi-client job collide with the DTensor meshes' own
(every process numbers its collective groups from 0). So `ProcessGroup`
carries them itself, over TCP, the way torch.distributed.pipelining's
point-to-point sends do over their process group:

- **Connections.** Every pair of processes holds one connection: rank i
  connects to each rank below it at its TF_CONFIG address, and accepts the
  ranks above. A rank that never comes fails start-up after
  `connect_timeout_s`, naming it.
- **Messages** are a tag, NumPy arrays and a small JSON value (logs), framed
  as a JSON header and the arrays' raw bytes: no pickle, so a connection
  cannot run code in the receiver.
- **Sends never block** the training thread: each connection has a sender
  thread and a queue. A pipeline schedule whose per-process order is valid
  then cannot deadlock, whatever the sizes.
- **Failure detection.** Each sender sends a ping every `heartbeat_interval_s`
  when idle. A receive waits only while its peer is alive: a peer whose
  connection closed without saying goodbye (killed), or that sent nothing for
  `heartbeat_timeout_s` (stopped, or its host cut off), raises `PeerLostError`
  at once, which `tfpar.callbacks.PreemptionCheckpoint` turns into exit code
  `tfpar.exit_codes.PEER_LOST` (211): the launcher or the Kubernetes Job
  restarts the group, which resumes from its last checkpoint.

Example::

    cluster = tfpar.cluster.Cluster.from_env()   # under tfpar launch --nproc 2
    group = ProcessGroup.from_cluster(cluster)
    if group.rank == 0:
        group.send(1, "act0", [np.ones((2, 3), "float32")])
    else:
        arrays, _ = group.recv(0, "act0")
    group.close()
"""

from __future__ import annotations

import atexit
import collections
import json
import logging
import os
import queue
import socket
import struct
import sys
import threading
import time

import numpy as np
import tensorflow as tf

from tfpar import exit_codes

log = logging.getLogger("tfpar")

_LENGTH = struct.Struct("!Q")
_PING, _BYE, _MESSAGE = "ping", "bye", "msg"


class PeerLostError(tf.errors.UnavailableError):
    """A process of the group died, hung or was cut off while this one needed it."""

    def __init__(self, message: str):
        super().__init__(None, None, message)


class ProcessGroupError(RuntimeError):
    """The processes could not be brought together."""


def _split_address(address: str) -> tuple[str, int]:
    from tfpar.cluster.tf_config import _parse_address

    return _parse_address(address, "process group")


class ProcessGroup:
    """Messages between `len(addresses)` processes; this one is `rank`.

    Args:
      rank: this process's index.
      addresses: "host:port" of every process (rank order); each listens on its own.
      heartbeat_timeout_s: a peer silent this long is lost.
      heartbeat_interval_s: how often an idle connection pings (default: a
        quarter of the timeout, at most 1 s).
      connect_timeout_s: how long start-up waits for every peer.
    """

    def __init__(self, rank: int, addresses: list[str], *, heartbeat_timeout_s: float = 30.0,
                 heartbeat_interval_s: float | None = None, connect_timeout_s: float = 300.0):
        if not 0 <= rank < len(addresses):
            raise ProcessGroupError(f"rank={rank} is not one of the {len(addresses)} processes "
                                    f"of {addresses}.")
        if heartbeat_interval_s is None:
            heartbeat_interval_s = min(1.0, heartbeat_timeout_s / 4)
        if heartbeat_timeout_s <= 2 * heartbeat_interval_s:
            raise ProcessGroupError(
                f"heartbeat_timeout_s={heartbeat_timeout_s} must exceed twice the ping "
                f"interval ({heartbeat_interval_s} s), or a healthy peer would be declared lost.")
        self.rank, self.size = rank, len(addresses)
        self.addresses = list(addresses)
        self.heartbeat_timeout_s = heartbeat_timeout_s
        self.heartbeat_interval_s = heartbeat_interval_s
        self._lock = threading.Condition()
        self._inbox: dict[tuple[int, str], collections.deque] = collections.defaultdict(
            collections.deque)
        self._last_seen: dict[int, float] = {}
        self._ended: dict[int, str] = {}  # peer -> "bye" or why its connection broke
        self._sockets: dict[int, socket.socket] = {}
        self._outboxes: dict[int, queue.Queue] = {}
        self._threads: dict[str, list[threading.Thread]] = {"send": [], "recv": []}
        self._closed = False
        self._connect(connect_timeout_s)
        _exit_peer_lost_when_uncaught()
        # A process that returns from its program must still deliver what it
        # queued (its last send is often the gathered weights) before the
        # interpreter stops the sender threads.
        atexit.register(self.close)

    @classmethod
    def from_cluster(cls, cluster, **timeouts) -> "ProcessGroup":
        """The group of a `tfpar.cluster.Cluster` (TF_CONFIG): one process per task, at its address."""
        return cls(cluster.rank, list(cluster.training_addresses), **timeouts)

    # ------------------------------------------------------------ start-up
    def _connect(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        host, port = _split_address(self.addresses[self.rank])
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            listener.bind(("", port))
        except OSError as e:
            raise ProcessGroupError(
                f"rank {self.rank} cannot listen on port {port} ({self.addresses[self.rank]}): "
                f"{e}. Another process holds it; give this task a free port in TF_CONFIG.") \
                from e
        listener.listen(self.size)
        listener.settimeout(0.2)
        try:
            for peer in range(self.rank):
                self._adopt(peer, self._dial(peer, deadline))
            while len(self._sockets) < self.size - 1:
                if time.monotonic() > deadline:
                    missing = [r for r in range(self.size)
                               if r != self.rank and r not in self._sockets]
                    raise ProcessGroupError(
                        f"rank {self.rank}: ranks {missing} "
                        f"({[self.addresses[r] for r in missing]}) did not connect within "
                        f"{timeout_s:.0f} s. Start every process of the job (tfpar launch, "
                        "or the Job's pods), or raise the timeout.")
                try:
                    conn, _ = listener.accept()
                except socket.timeout:
                    continue
                conn.settimeout(max(1.0, deadline - time.monotonic()))
                peer = int.from_bytes(_read_exactly(conn, 4), "big")
                if not self.rank < peer < self.size or peer in self._sockets:
                    conn.close()
                    continue
                self._adopt(peer, conn)
        finally:
            listener.close()

    def _dial(self, peer: int, deadline: float) -> socket.socket:
        host, port = _split_address(self.addresses[peer])
        while True:
            try:
                conn = socket.create_connection((host, port), timeout=2.0)
                conn.sendall(self.rank.to_bytes(4, "big"))
                return conn
            except OSError as e:
                if time.monotonic() > deadline:
                    raise ProcessGroupError(
                        f"rank {self.rank} could not reach rank {peer} at "
                        f"{self.addresses[peer]}: {e}. Is it running, and is the port open "
                        "between the hosts?") from e
                time.sleep(0.2)

    def _adopt(self, peer: int, conn: socket.socket) -> None:
        conn.settimeout(None)
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._sockets[peer] = conn
        self._last_seen[peer] = time.monotonic()
        self._outboxes[peer] = queue.Queue()
        for kind, loop in (("recv", self._receive_loop), ("send", self._send_loop)):
            thread = threading.Thread(target=loop, args=(peer, conn), daemon=True,
                                      name=f"tfpar-{kind}-{peer}")
            self._threads[kind].append(thread)
            thread.start()

    # ------------------------------------------------------------ threads
    def _send_loop(self, peer: int, conn: socket.socket) -> None:
        outbox = self._outboxes[peer]
        while True:
            try:
                frame = outbox.get(timeout=self.heartbeat_interval_s)
            except queue.Empty:
                frame = _frame(_PING)
            try:
                conn.sendall(frame)
            except OSError as e:
                self._end(peer, f"sending failed: {e}")
                return
            if frame is _FINAL:
                # Nothing follows a goodbye: the peer reads to it and closes
                # without unread bytes, which would reset the connection.
                try:
                    conn.shutdown(socket.SHUT_WR)
                except OSError:
                    pass
                return

    def _receive_loop(self, peer: int, conn: socket.socket) -> None:
        try:
            while True:
                header_length = _LENGTH.unpack(_read_exactly(conn, _LENGTH.size))[0]
                header = json.loads(_read_exactly(conn, header_length))
                arrays = []
                for dtype, shape in header.get("arrays", ()):
                    size = int(np.prod(shape)) * np.dtype(dtype).itemsize
                    arrays.append(np.frombuffer(_read_exactly(conn, size), dtype).reshape(shape))
                with self._lock:
                    self._last_seen[peer] = time.monotonic()
                    if header["kind"] == _BYE:
                        self._ended[peer] = _BYE
                        self._lock.notify_all()
                        # Answer it, so that the peer can close at once.
                        self._outboxes[peer].put(_FINAL)
                        return
                    if header["kind"] == _MESSAGE:
                        nones = set(header.get("nones", ()))
                        it = iter(arrays)
                        values = [None if i in nones else next(it)
                                  for i in range(len(arrays) + len(nones))]
                        self._inbox[(peer, header["tag"])].append((values, header.get("meta")))
                        self._lock.notify_all()
        except (OSError, EOFError, ValueError) as e:
            self._end(peer, f"its connection broke ({e or type(e).__name__})")

    def _end(self, peer: int, why: str) -> None:
        with self._lock:
            self._ended.setdefault(peer, why)
            self._lock.notify_all()

    # ------------------------------------------------------------ messages
    def send(self, peer: int, tag: str, arrays=(), meta=None) -> None:
        """Queues `arrays` (NumPy arrays or None) and `meta` (JSON) for `peer`; returns at once."""
        self._check_peer(peer)
        self._outboxes[peer].put(_frame(_MESSAGE, tag, list(arrays), meta))

    def recv(self, peer: int, tag: str):
        """(arrays, meta) of the next message `tag` from `peer`; waits while the peer lives.

        Raises `PeerLostError` as soon as the peer is known dead or has been
        silent for `heartbeat_timeout_s`.
        """
        self._check_peer(peer)
        key = (peer, tag)
        with self._lock:
            while not self._inbox[key]:
                why = self._ended.get(peer)
                silent = time.monotonic() - self._last_seen[peer]
                if why is not None:
                    how = ("ended" if why == _BYE else f"was lost: {why}")
                    raise PeerLostError(f"rank {self.rank} waited for {tag!r} from rank {peer} "
                                        f"({self.addresses[peer]}), which {how}.")
                if silent > self.heartbeat_timeout_s:
                    raise PeerLostError(
                        f"rank {self.rank} waited for {tag!r} from rank {peer} "
                        f"({self.addresses[peer]}), silent for {silent:.1f} s "
                        f"(heartbeat_timeout_s={self.heartbeat_timeout_s}): hung or cut off.")
                self._lock.wait(timeout=min(0.5, self.heartbeat_interval_s))
            return self._inbox[key].popleft()

    def any(self, flag: bool, tag: str = "any") -> bool:
        """Whether `flag` is set on any process (every process must call it)."""
        for peer in self._peers():
            self.send(peer, tag, meta=bool(flag))
        result = bool(flag)
        for peer in self._peers():
            result |= bool(self.recv(peer, tag)[1])
        return result

    def all_sum(self, value: float, tag: str = "sum") -> float:
        """The sum of `value` over every process, in rank order (every process must call it)."""
        for peer in self._peers():
            self.send(peer, tag, meta=float(value))
        values = {self.rank: float(value)}
        for peer in self._peers():
            values[peer] = float(self.recv(peer, tag)[1])
        return sum(values[r] for r in range(self.size))

    def barrier(self, tag: str = "barrier") -> None:
        self.any(False, tag)

    def _peers(self):
        return [r for r in range(self.size) if r != self.rank]

    def _check_peer(self, peer: int) -> None:
        if peer == self.rank or peer not in self._sockets:
            raise ProcessGroupError(f"rank {self.rank} has no peer {peer} (group of {self.size}).")

    def close(self) -> None:
        """Delivers what was queued, says goodbye to every peer and closes the
        connections; also run at the process's exit. Waits for a peer only
        while it is alive (not ended, not silent past the heartbeat timeout)."""
        if self._closed:
            return
        self._closed = True
        for outbox in self._outboxes.values():
            outbox.put(_FINAL)

        def alive(thread, peer):
            with self._lock:
                return (thread.is_alive() and peer not in self._ended
                        and time.monotonic() - self._last_seen[peer] < self.heartbeat_timeout_s)

        peers = list(self._sockets)
        for thread, peer in zip(self._threads["send"], peers):
            while alive(thread, peer):
                thread.join(timeout=0.1)
        # The peers' goodbyes (answered at once by a live peer): closing a
        # socket with unread data resets the connection, and a reset may drop
        # what the peer has not read yet.
        deadline = time.monotonic() + 2.0
        for thread in self._threads["recv"]:
            thread.join(timeout=max(0.0, deadline - time.monotonic()))
        for conn in self._sockets.values():
            try:
                conn.close()
            except OSError:
                pass


def _exit_peer_lost_when_uncaught() -> None:
    """An uncaught `PeerLostError` ends the process with `exit_codes.PEER_LOST`
    (211), which restarts the group, rather than 1, which is permanent; with
    `os._exit`, so that nothing waits for the peer that is gone."""
    if getattr(sys.excepthook, "_tfpar_peer_lost", False):
        return
    previous = sys.excepthook

    def hook(exc_type, exc, tb):
        previous(exc_type, exc, tb)
        if issubclass(exc_type, PeerLostError):
            sys.stderr.write(f"tfpar: a peer process was lost; exiting with "
                             f"{exit_codes.PEER_LOST} ({exit_codes.describe(exit_codes.PEER_LOST)})\n")
            sys.stderr.flush()
            sys.stdout.flush()
            os._exit(exit_codes.PEER_LOST)

    hook._tfpar_peer_lost = True
    sys.excepthook = hook


def _frame(kind: str, tag: str = "", arrays=(), meta=None) -> bytes:
    # np.asarray keeps a scalar 0-d (np.ascontiguousarray would make it 1-d).
    present = [np.asarray(a) for a in arrays if a is not None]
    present = [a if a.flags.c_contiguous else a.copy() for a in present]
    header = {"kind": kind, "tag": tag, "meta": meta,
              "nones": [i for i, a in enumerate(arrays) if a is None],
              "arrays": [(a.dtype.str, list(a.shape)) for a in present]}
    raw = json.dumps(header).encode()
    return b"".join([_LENGTH.pack(len(raw)), raw] + [a.tobytes() for a in present])


_FINAL = _frame(_BYE)


def _read_exactly(conn: socket.socket, size: int) -> bytes:
    chunks, left = [], size
    while left:
        chunk = conn.recv(min(left, 1 << 22))
        if not chunk:
            raise EOFError("closed")
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)
