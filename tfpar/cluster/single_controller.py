"""Pipelines whose stages live in other processes: process 0 drives every process's devices.

A pipeline across hosts (stages on different nodes, data-parallel pipelines
across more of them) runs here the way TensorFlow runs a program over remote
devices: one process, the *controller* (rank 0), runs the training program
and places each stage on the devices of the process that holds it
("/job:worker/replica:0/task:1/device:GPU:0"); every other process *serves*
its devices (a `tf.distribute.Server`) and runs nothing of its own. Each step
is one function that TensorFlow partitions by process; activations and
gradients go straight between the processes that hold the neighbouring
stages, and the data-parallel replicas' gradient sums meet on the devices of
replica 0, which hold the variables (`tfpar.Pipeline`'s hybrid).

Why this mechanism (measured on TensorFlow 2.21, BUILD_NOTES "Pipelines
across processes"): the runner's stages on remote devices match the same
pipeline on local devices to 3e-6 after 12 AdamW steps; DTensor stage meshes
cannot span processes (a cross-mesh copy needs both meshes on the same
hosts), and multi-client DTensor meshes of one process each collide (every
client numbers its collective groups from 0, so two clients' local meshes
join the same group). Tensor-parallel stages across processes therefore run
one program per process instead (`tfpar.strategies.pipeline.process_stages`).

What the processes do:

- **Roles.** The controller's TensorFlow job is `localhost` (what
  `tf.config.experimental_connect_to_cluster` calls its own task; naming it
  a task of the `worker` job leaves every remote device unplaceable), at the
  TF_CONFIG address of rank 0; rank r > 0 serves as task r-1 of the job
  `worker` at its own address.
- **Start-up.** Each side waits until the other's port accepts connections,
  up to `register_timeout_s`, and fails naming who never came.
- **Failure detection.** A killed process fails the controller's step at
  once (its connection resets). A process that hangs (stopped, or its host
  cut off) answers nothing, so the controller pings every server's CPU with a
  tiny op from a thread of its own (`Heartbeat`); a server silent for
  `heartbeat_timeout_s` ends the controller with `exit_codes.PEER_LOST`,
  which restarts the group (`tfpar launch`, the Kubernetes manifests).
- **The end.** A server exits when the controller's port closes: with
  `exit_codes.PREEMPTED` if it was sent SIGTERM (it keeps serving through a
  SIGTERM, because the controller's last checkpoint reads the variables that
  live on it); with 0 if the controller ended well, which it says by writing a
  file on the server's host through the server itself (`_mark_completed`, at
  its exit); else with `exit_codes.PEER_LOST`, so that the job restarts the
  server with the controller (an Indexed Job replaces only failed pods: a
  server that exited 0 would never come back).

Example (run under `tfpar launch --nproc 2`; `tfpar.flags.from_flags()` does
all of this for `--pp`)::

    cluster = tfpar.cluster.Cluster.from_env()
    if cluster.rank > 0:
        sys.exit(single_controller.serve(cluster))
    devices = single_controller.connect(cluster)  # [[rank 0's], [rank 1's]]
    strategy = tfpar.Pipeline(stages=2, devices=[devices[0][0], devices[1][0]])
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import signal
import socket
import sys
import threading
import time

from tfpar import exit_codes
from tfpar.cluster.tf_config import Cluster, ClusterConfigError, _parse_address

log = logging.getLogger("tfpar")

CONTROLLER_JOB = "localhost"
SERVER_JOB = "worker"


class ControllerError(RuntimeError):
    """The controller and its servers could not be brought together."""


def cluster_spec(cluster: Cluster) -> dict[str, list[str]]:
    """The TensorFlow cluster of the controller's job and the servers' job."""
    addresses = cluster.training_addresses
    if len(addresses) < 2:
        raise ClusterConfigError(
            f"a pipeline across processes needs at least 2 processes; the cluster has "
            f"{addresses}. Run it in one process, or launch more (tfpar launch --nproc).")
    return {CONTROLLER_JOB: addresses[:1], SERVER_JOB: addresses[1:]}


def task_prefix(rank: int) -> str:
    """The device-name prefix of the process of rank `rank` as the controller sees it."""
    if rank == 0:
        return f"/job:{CONTROLLER_JOB}/replica:0/task:0"
    return f"/job:{SERVER_JOB}/replica:0/task:{rank - 1}"


def completion_marker(rank: int, address: str) -> str:
    """The file on a server's host that says the controller ended well (named by
    the server's rank and address: hosts that share a /tmp keep them apart)."""
    host, port = _parse_address(address, "the cluster")
    return os.path.join("/tmp", f"tfpar-pipeline-{host}-{port}-rank{rank}.completed")


def _accepts(address: str, timeout_s: float = 1.0) -> bool:
    try:
        with socket.create_connection(_parse_address(address, "the cluster"), timeout=timeout_s):
            return True
    except OSError:
        return False


def _wait_for(addresses: dict[int, str], timeout_s: float, who: str) -> None:
    deadline = time.monotonic() + timeout_s
    waiting = dict(addresses)
    while waiting:
        waiting = {r: a for r, a in waiting.items() if not _accepts(a)}
        if not waiting:
            return
        if time.monotonic() > deadline:
            raise ControllerError(
                f"{who}: rank(s) {sorted(waiting)} at {sorted(waiting.values())} did not "
                f"accept connections within {timeout_s:.0f} s (--register_timeout). Check "
                "that every process of the job started and that the addresses are reachable.")
        time.sleep(0.2)


# --------------------------------------------------------------------- servers
def serve(cluster: Cluster, *, num_local_devices: int | None = None,
          register_timeout_s: float = 300.0, poll_s: float = 0.5) -> int:
    """Serves this process's devices to the controller until the controller ends.

    Returns the exit code for the process: `exit_codes.PREEMPTED` if it was
    sent SIGTERM meanwhile, 0 if the controller ended well, else
    `exit_codes.PEER_LOST`. `num_local_devices` splits the CPU into
    that many devices (simulated devices); GPUs are served as they are.
    Raises ControllerError if the controller never comes.
    """
    import tensorflow as tf

    spec = cluster_spec(cluster)
    rank = cluster.rank
    if rank == 0:
        raise ClusterConfigError("rank 0 is the controller: it connects, it does not serve.")
    config = tf.compat.v1.ConfigProto()
    if num_local_devices:
        # A server takes its devices from this config, not from tf.config's
        # logical devices (measured: those leave one CPU).
        config.device_count["CPU"] = num_local_devices
    marker = completion_marker(rank, cluster.address)
    with contextlib.suppress(FileNotFoundError):
        os.remove(marker)  # an earlier job's
    terminated = []
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: terminated.append(signum))
    try:
        server = tf.distribute.Server(tf.train.ClusterSpec(spec), job_name=SERVER_JOB,
                                      task_index=rank - 1, config=config)
        log.info("tfpar: rank %d serves its devices to the controller at %s", rank,
                 spec[CONTROLLER_JOB][0])
        controller = spec[CONTROLLER_JOB][0]
        _wait_for({0: controller}, register_timeout_s, f"rank {rank}")
        while _accepts(controller):
            time.sleep(poll_s)
        # A TensorFlow server cannot be stopped; it ends with the process, next.
        del server
    finally:
        signal.signal(signal.SIGTERM, previous)
    completed = os.path.exists(marker)
    with contextlib.suppress(FileNotFoundError):
        os.remove(marker)
    code = exit_codes.PREEMPTED if terminated else 0 if completed else exit_codes.PEER_LOST
    log.info("tfpar: the controller ended%s; rank %d exits with %d",
             "" if completed else " without completing", rank, code)
    return code


# ------------------------------------------------------------------ controller
def connect(cluster: Cluster, *, heartbeat_timeout_s: float = 10.0,
            register_timeout_s: float = 300.0) -> list[list[str]]:
    """Connects the controller (rank 0) to every server; returns each process's devices.

    The list is in rank order, each process's GPUs (else CPUs) by full name.
    Every process must have as many as the others. Starts the `Heartbeat`
    (none if `heartbeat_timeout_s` is 0).
    """
    import tensorflow as tf

    spec = cluster_spec(cluster)
    if cluster.rank != 0:
        raise ClusterConfigError(
            f"rank {cluster.rank} serves its devices; only rank 0 connects (call serve()).")
    _wait_for(dict(enumerate(spec[SERVER_JOB], start=1)), register_timeout_s, "the controller")
    tf.config.experimental_connect_to_cluster(tf.train.ClusterSpec(spec),
                                              job_name=CONTROLLER_JOB, task_index=0)
    devices = _devices_by_process(len(cluster.training_addresses))
    counts = {rank: len(names) for rank, names in enumerate(devices)}
    if len(set(counts.values())) != 1:
        raise ControllerError(
            f"the processes have different numbers of devices {counts} (rank: devices); a "
            "pipeline across processes needs the same number on each. Give every process "
            "the same --num_simulated_devices, or the same GPUs.")
    servers = {r: spec[SERVER_JOB][r - 1] for r in range(1, len(devices))}
    if heartbeat_timeout_s:
        Heartbeat([task_prefix(r) + "/device:CPU:0" for r in servers], heartbeat_timeout_s).start()
    _track_exit_status()
    atexit.register(_mark_completed, servers)
    return devices


# How the controller's program is ending: an uncaught exception or sys.exit(code).
_exit_status = {"code": 0}


def _track_exit_status() -> None:
    """Notes an uncaught exception, or the code given to sys.exit, for `_mark_completed`
    (an exit by signal or os._exit, as the heartbeat's, skips it: no mark)."""
    if getattr(sys.exit, "_tfpar_tracked", False):
        return
    hook, exit_ = sys.excepthook, sys.exit

    def excepthook(exc_type, exc, tb):
        _exit_status["code"] = 1
        hook(exc_type, exc, tb)

    def exit(code=0):
        _exit_status["code"] = code if isinstance(code, int) else (0 if code is None else 1)
        exit_(code)

    exit._tfpar_tracked = True
    sys.excepthook, sys.exit = excepthook, exit


def _mark_completed(servers: dict[int, str]) -> None:
    """At the controller's exit, when it ends with 0: writes each server's
    completion marker through the server itself (a file op on its CPU)."""
    import tensorflow as tf

    if _exit_status["code"] != 0:
        return
    for rank, address in servers.items():
        try:
            with tf.device(task_prefix(rank) + "/device:CPU:0"):
                tf.io.write_file(completion_marker(rank, address), "completed")
        except Exception as e:  # the server then exits with PEER_LOST: a restart, not a hang
            log.warning("tfpar: could not tell rank %d that the job completed: %s", rank, e)


def _devices_by_process(processes: int) -> list[list[str]]:
    import tensorflow as tf

    by_rank: list[dict[str, list[str]]] = [{"GPU": [], "CPU": []} for _ in range(processes)]
    for device in tf.config.list_logical_devices():
        if device.device_type not in ("GPU", "CPU"):
            continue
        name = device.name
        if not name.startswith("/job:"):
            name = task_prefix(0) + name
        for rank in range(processes):
            if name.startswith(task_prefix(rank) + "/"):
                by_rank[rank][device.device_type].append(name)
    return [kinds["GPU"] or kinds["CPU"] for kinds in by_rank]


class Heartbeat:
    """Ends the controller when a server stops answering.

    One thread per server runs a scalar copy onto that server's CPU and
    back, every `timeout_s / 4`; a watcher ends the process with
    `exit_codes.PEER_LOST` when a server's last answer is older than
    `timeout_s`. The pings do not queue behind the training step (measured:
    at most 26 ms during a pipeline step, median 2.6 ms). Ending the process
    from a thread is deliberate: the main thread is blocked inside a step
    that waits on the silent server and cannot be interrupted, and every
    tfpar checkpoint is committed atomically, so none is lost.
    """

    def __init__(self, devices: list[str], timeout_s: float):
        self.devices = devices
        self.timeout_s = timeout_s
        self.last_answer = {d: time.monotonic() for d in devices}

    def start(self) -> "Heartbeat":
        for device in self.devices:
            threading.Thread(target=self._ping, args=(device,), daemon=True,
                             name=f"tfpar-heartbeat {device}").start()
        threading.Thread(target=self._watch, daemon=True, name="tfpar-heartbeat").start()
        return self

    def _ping(self, device: str) -> None:
        import tensorflow as tf

        one = tf.constant(1.0)
        while True:
            try:
                with tf.device(device):
                    answer = tf.identity(one)
                answer.numpy()
            except Exception:  # the step reports a lost server itself, with its error
                return
            self.last_answer[device] = time.monotonic()
            time.sleep(self.timeout_s / 4)

    def _watch(self) -> None:
        while True:
            time.sleep(min(0.5, self.timeout_s / 4))
            now = time.monotonic()
            silent = [d for d, t in self.last_answer.items() if now - t > self.timeout_s]
            if silent:
                sys.stderr.write(
                    f"tfpar: {', '.join(silent)} answered nothing for {self.timeout_s:.0f} s "
                    f"(--heartbeat_timeout); exiting with {exit_codes.PEER_LOST} "
                    f"({exit_codes.describe(exit_codes.PEER_LOST)})\n")
                sys.stderr.flush()
                os._exit(exit_codes.PEER_LOST)
