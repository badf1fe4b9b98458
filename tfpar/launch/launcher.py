"""Runs N copies of a training command on this host as one multi-worker job.

tfpar's torchrun: picks free ports on 127.0.0.1, gives each process its own
TF_CONFIG, prefixes every output line with the process's rank, and watches
the group. When any process fails it stops the others (SIGTERM to each
process group, SIGKILL after a grace period, so no child is left behind),
reports the failed rank with its last lines, and then follows the exit-code
contract of `tfpar.exit_codes`, which the Kubernetes manifests of
`tfpar k8s render` follow too:

- a permanent code (1, 2: an uncaught error, a bad flag or configuration)
  ends the launch with that code; a restart would fail the same way;
- any other failure (a signal, 210 preempted, 211 peer lost, other codes)
  starts the whole group again, up to `max_restarts` times (a training
  script with `tfpar.callbacks.BackupAndRestore` then resumes from its
  backup), and ends the launch with the last code once they are used up.

Every rank's gRPC server listens on all of the host's interfaces (that is
TensorFlow's, whatever TF_CONFIG says), so other hosts can reach it; with
`private_network=True` (`--private_network`) all ranks share a network
namespace of their own with loopback only (`tfpar.launch.private_network`).

Example::

    $ tfpar launch --nproc 2 -- python train.py --strategy=multi_worker
    [rank 0] Epoch 1/3
    ...

This module does not import TensorFlow: the launcher starts in milliseconds
and its own failures cannot be TensorFlow's.
"""

from __future__ import annotations

import collections
import dataclasses
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from typing import Mapping, Sequence, TextIO

from tfpar import exit_codes
from tfpar.cluster import Cluster
from tfpar.launch import private_network

# Environment each process gets besides TF_CONFIG.
ENV_RANK = "TFPAR_RANK"
ENV_WORLD_SIZE = "TFPAR_WORLD_SIZE"
ENV_RESTART = "TFPAR_RESTART_COUNT"

# Keras progress output, which only the chief's stream keeps: the bar lines
# ("4/4 ━━━━ 0s 3ms/step - loss: ..." with verbose=1, "8/8 - 1s - 30ms/step -
# loss: ..." with verbose=2, "[=====>...]" in older Keras) and the
# "Epoch 1/3" headers that go with them.
_PROGRESS_LINE = re.compile(
    r"━|^\s*\d+/\d+ \[[=>.]*\]|^\s*\d+/\d+ - .*step|^Epoch \d+/\d+\s*$")


class LaunchError(RuntimeError):
    """The launch cannot start (bad arguments, no command)."""


def free_ports(n: int, host: str = "127.0.0.1") -> list[int]:
    """n distinct ports that were free a moment ago on `host`."""
    sockets, ports = [], []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind((host, 0))
            sockets.append(s)
            ports.append(s.getsockname()[1])
    finally:
        for s in sockets:
            s.close()
    return ports


def _group_members_alive(pgid: int) -> list[int]:
    """PIDs in process group `pgid` that are not zombies (Linux /proc)."""
    alive = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                # pid (comm) state ppid pgrp ...; comm may contain spaces.
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            alive.append(int(entry))
    return alive


def _wait_until_group_is_gone(pgid: int, timeout_s: float) -> None:
    if not os.path.isdir("/proc"):
        return
    deadline = time.monotonic() + timeout_s
    while _group_members_alive(pgid) and time.monotonic() < deadline:
        time.sleep(0.02)


@dataclasses.dataclass
class _Worker:
    rank: int
    process: subprocess.Popen
    tail: collections.deque
    reader: threading.Thread


@dataclasses.dataclass
class Launcher:
    """A local multi-worker launch.

    Attributes:
      nproc: number of processes (workers); rank 0 is the chief.
      max_restarts: restarts of the whole group after a failure that is not
        permanent (`tfpar.exit_codes.PERMANENT` ends the launch at once).
      grace_period_s: how long stopped processes get between SIGTERM and
        SIGKILL (time to write a checkpoint).
      host: the address every worker binds and is reached at.
      tail_lines: lines of a failed process's output to show.
      env: extra environment for every process.
      out: where the prefixed output goes.
      private_network: run every rank in one new network namespace with
        loopback only, so no other host (nor the host itself) reaches the
        ranks' ports; the ranks then reach no network either. Linux, root.
    """

    nproc: int
    max_restarts: int = 0
    grace_period_s: float = 10.0
    host: str = "127.0.0.1"
    tail_lines: int = 20
    env: Mapping[str, str] = dataclasses.field(default_factory=dict)
    out: TextIO = sys.stdout
    private_network: bool = False

    def __post_init__(self):
        if self.nproc < 1:
            raise LaunchError(f"--nproc={self.nproc}: must be >= 1.")
        if self.max_restarts < 0:
            raise LaunchError(f"--max_restarts={self.max_restarts}: must be >= 0.")
        if self.grace_period_s < 0:
            raise LaunchError(f"--grace_period={self.grace_period_s}: must be >= 0.")
        if self.private_network:
            reason = private_network.unavailable_reason()
            if reason is not None:
                raise LaunchError(f"--private_network: {reason}.")
            if self.host != "127.0.0.1":
                raise LaunchError(f"--private_network: host={self.host!r}, but the ranks' "
                                  "only interface is loopback; use 127.0.0.1.")
        self._lock = threading.Lock()
        self._workers: list[_Worker] = []
        self._stopping = False
        self._network = private_network.PrivateNetwork()

    # ----------------------------------------------------------------- output
    def _say(self, line: str) -> None:
        with self._lock:
            self.out.write(line if line.endswith("\n") else line + "\n")
            self.out.flush()

    def _pump(self, rank: int, stream, tail: collections.deque) -> None:
        is_chief = rank == 0
        buffer = b""
        while True:
            chunk = stream.read1(65536) if hasattr(stream, "read1") else stream.read(65536)
            if not chunk:
                break
            buffer += chunk
            # Progress bars redraw with '\r'; each redraw is a line of its own.
            parts = re.split(rb"\r\n|\n|\r", buffer)
            buffer = parts.pop()
            for raw in parts:
                self._emit(rank, raw, is_chief, tail)
        if buffer:
            self._emit(rank, buffer, is_chief, tail)

    def _emit(self, rank, raw: bytes, is_chief: bool, tail) -> None:
        line = raw.decode("utf-8", errors="replace").rstrip()
        if not line:
            return
        tail.append(line)
        if not is_chief and _PROGRESS_LINE.search(line):
            return
        self._say(f"[rank {rank}] {line}")

    # ------------------------------------------------------------ processes
    def _start(self, command: Sequence[str], attempt: int) -> None:
        ports = free_ports(self.nproc, self.host)
        cluster = Cluster.from_hosts([f"{self.host}:{p}" for p in ports])
        self._workers = []
        for rank in range(self.nproc):
            env = dict(os.environ)
            env.update(self.env)
            task = cluster.for_task("worker", rank)
            # Both descriptions of the same cluster: TF_CONFIG for
            # tf.distribute (data parallelism), DTENSOR_* for DTensor meshes
            # (tensor parallelism); a process uses the one its strategy needs.
            env.update(task.dtensor_env())
            env.update({
                "TF_CONFIG": task.to_json(),
                ENV_RANK: str(rank),
                ENV_WORLD_SIZE: str(self.nproc),
                ENV_RESTART: str(attempt),
                "PYTHONUNBUFFERED": "1",
            })
            argv = list(command)
            if self._network.is_open:
                argv = self._network.command(argv)
            process = subprocess.Popen(
                argv, env=env, stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                # A session of its own: the group can be signalled as a whole,
                # children of the training script included.
                start_new_session=True,
            )
            tail = collections.deque(maxlen=self.tail_lines)
            reader = threading.Thread(target=self._pump, args=(rank, process.stdout, tail),
                                      daemon=True)
            reader.start()
            self._workers.append(_Worker(rank, process, tail, reader))

    def _signal_group(self, worker: _Worker, sig: int) -> None:
        try:
            os.killpg(worker.process.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass

    def stop_all(self) -> None:
        """SIGTERM every process group, then SIGKILL what is left after the grace period."""
        for w in self._workers:
            self._signal_group(w, signal.SIGTERM)
        deadline = time.monotonic() + self.grace_period_s
        for w in self._workers:
            try:
                w.process.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
        for w in self._workers:
            # The group may hold children even when the leader has exited.
            self._signal_group(w, signal.SIGKILL)
            w.process.wait()
        for w in self._workers:
            # SIGKILL is delivered asynchronously: return only once no member
            # of the group is still running, so "stopped" means stopped.
            _wait_until_group_is_gone(w.process.pid, timeout_s=10.0)
            w.reader.join(timeout=5)

    def _watch(self) -> _Worker | None:
        """Waits until every process succeeded (None) or one failed (it).

        When several have failed by the time the group is looked at, a
        failure that is not permanent wins: a rank whose peer was killed
        fails with 1 (an uncaught collective error) right after it, and the
        kill, not the error it caused, decides whether to restart.
        """
        while True:
            codes = [w.process.poll() for w in self._workers]
            failed = [w for w, code in zip(self._workers, codes) if code not in (None, 0)]
            if failed:
                return min(failed,
                           key=lambda w: w.process.returncode in exit_codes.PERMANENT)
            if None not in codes:
                return None
            time.sleep(0.05)

    def run(self, command: Sequence[str]) -> int:
        """Runs the group (restarting it up to max_restarts); returns the exit code."""
        if not command:
            raise LaunchError(
                "no command to launch; put it after '--', e.g. "
                "`tfpar launch --nproc 2 -- python train.py`."
            )
        previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}

        def on_signal(signum, frame):
            self._stopping = True
            self._say(f"tfpar launch: got {signal.Signals(signum).name}; stopping all ranks")
            self.stop_all()
            raise SystemExit(128 + signum)

        in_main_thread = threading.current_thread() is threading.main_thread()
        if in_main_thread:
            for s in previous:
                signal.signal(s, on_signal)
        try:
            if self.private_network:
                try:
                    # One namespace for the whole launch; a fresh one has every port free.
                    self._network.open()
                except private_network.PrivateNetworkError as e:
                    raise LaunchError(f"--private_network: {e}.") from None
            for attempt in range(self.max_restarts + 1):
                self._start(command, attempt)
                failed = self._watch()
                if failed is None:
                    for w in self._workers:
                        w.reader.join(timeout=5)
                    return 0
                code = failed.process.returncode
                failed.reader.join(timeout=2)
                self.stop_all()
                tail = "\n".join(f"    {line}" for line in failed.tail)
                self._say(
                    f"tfpar launch: rank {failed.rank} (pid {failed.process.pid}) "
                    f"failed ({exit_codes.describe(code)}); stopped the other "
                    f"{self.nproc - 1} rank(s). Last lines of rank {failed.rank}:\n{tail}"
                )
                if code in exit_codes.PERMANENT:
                    permanent = " and ".join(str(c) for c in exit_codes.PERMANENT)
                    self._say(
                        f"tfpar launch: rank {failed.rank} exited with {code} "
                        f"({exit_codes.describe(code)}): not restarted, exit codes "
                        f"{permanent} are permanent (tfpar.exit_codes)")
                    return code
                if attempt < self.max_restarts:
                    self._say(f"tfpar launch: restarting all {self.nproc} ranks "
                              f"(restart {attempt + 1} of {self.max_restarts})")
                    continue
                if self.max_restarts:
                    self._say(f"tfpar launch: all {self.max_restarts} restart(s) used; "
                              f"giving up")
                # A process killed by signal N reports -N; a shell says 128 + N.
                return code if code > 0 else 128 - code
        finally:
            if in_main_thread:
                for s, handler in previous.items():
                    signal.signal(s, handler)
            if not self._stopping:
                self.stop_all()
            self._network.close()
        return 1
