"""Private TensorFlow calls tfpar relies on that are not Keras patches.

Each says why and what it was verified on, so a TensorFlow upgrade has one
file to check: DTensor's accelerator state and its all-reduce-combining
pass, the coordination service (failure detection for multi-worker jobs),
MirroredStrategy's collective keys, and moving a Keras variable's
TensorFlow variable to another device (the pipeline).
"""

from __future__ import annotations

import logging
import os

import tensorflow as tf

log = logging.getLogger("tfpar")


def dtensor_accelerator_system_initialized() -> bool:
    """Whether dtensor.initialize_accelerator_system ran (no public API in TF 2.21)."""
    from tensorflow.dtensor.python import accelerator_util  # private

    return accelerator_util.is_initialized()


def configure_dtensor() -> None:
    """Turns off DTensor's all-reduce-combining optimization.

    With it on (TensorFlow 2.21 default), a variable read that follows a write
    in the same function can return the old value on multi-device meshes, so
    Adam and momentum updates are silently lost (weights off by 6e-2 after 5
    steps on 2x2 and 4x1 meshes). TensorFlow reads the variable when it
    compiles DTensor functions; tests/test_tensor_parallel.py keeps a
    multi-step stateful-optimizer check that fails if it comes back.
    """
    key = "DTENSOR_ENABLE_COMBINE_ALL_REDUCES_OPTIMIZATION"
    if os.environ.get(key, "0") != "0":
        log.warning("tfpar: %s=%s is known to lose optimizer updates; setting it to 0.",
                    key, os.environ[key])
    os.environ[key] = "0"


# ---------------------------------------------------------------------------
# TensorFlow's coordination service: failure detection for multi-worker jobs.
# MultiWorkerMirroredStrategy configures the service itself, with no
# heartbeat setting and no registration barrier, unless one is configured
# before it is created. Without the barrier, a worker that never starts leaves
# the others hanging inside the strategy constructor for minutes; with it they
# fail after `register_timeout_s` ("Barrier timed out ...
# Wait_for_all_tasks_to_register"). `cluster_register_with_barrier` is not a
# parameter of the (private) configure call, so it is set on the config proto.
# Verified on TensorFlow 2.21.
# ---------------------------------------------------------------------------
def configure_coordination_service(
    cluster, *, heartbeat_timeout_s: float, register_timeout_s: float,
    shutdown_timeout_s: float = 30.0,
) -> None:
    from tensorflow.compiler.xla.tsl.protobuf import coordination_config_pb2
    from tensorflow.python.eager import context

    jobs = [
        coordination_config_pb2.CoordinatedJob(name=role, num_tasks=len(cluster.jobs[role]))
        for role in ("chief", "worker")
        if role in cluster.jobs
    ]
    ctx = context.context()
    ctx.configure_coordination_service(
        service_type="standalone",
        service_leader=cluster.coordination_leader,
        heartbeat_timeout_in_ms=int(heartbeat_timeout_s * 1000),
        cluster_register_timeout_in_ms=int(register_timeout_s * 1000),
        shutdown_barrier_timeout_in_ms=int(shutdown_timeout_s * 1000),
        coordinated_jobs=jobs,
    )
    ctx._coordination_service_config.cluster_register_with_barrier = True


def wait_for_every_process(barrier: str, timeout_s: float) -> None:
    """Blocks until every process of the job has reached `barrier`.

    The coordination service's barrier (TensorFlow 2.21: `Context.wait_at_barrier`).
    Process 0 hosts the service: when it exits, every other process's next
    TensorFlow op fails ("the leader task was preempted/died"), even a local
    one after the last collective. A job whose processes can finish at
    different times ends with this barrier. Raises after `timeout_s` if a
    process never arrives.
    """
    from tensorflow.python.eager import context

    context.context().wait_at_barrier(barrier, int(timeout_s * 1000))


# ---------------------------------------------------------------------------
# Collective keys of MirroredStrategy (TensorFlow 2.21).
# Every MirroredStrategy numbers its collective groups from the same start
# (`_collective_key_base` is 0 for all), and TensorFlow caches a collective's
# parameters per (group, instance) key for the life of the process. A second
# strategy over the same devices that trains another model then collides
# with the first: "Shape mismatch in the collective instance 100 ... expected
# shape [2] but another member in the group expected shape [676]". Each
# tfpar.DataParallel gets a key range of its own.
# ---------------------------------------------------------------------------
_COLLECTIVE_KEY_STRIDE = 100_000
_collective_key_bases = iter(range(_COLLECTIVE_KEY_STRIDE, 2**30, _COLLECTIVE_KEY_STRIDE))


def unique_collective_key_base() -> int:
    """A collective group-key base no other strategy of this process uses."""
    return next(_collective_key_bases)


def tensorflow_initialized() -> bool:
    """Whether TensorFlow's runtime context (and so its devices) is fixed."""
    from tensorflow.python.eager import context

    return context.context()._context_handle is not None


# ---------------------------------------------------------------------------
# Moving a Keras variable to another device (tfpar.Pipeline).
# Keras 3 has no API to place an existing variable; its TensorFlow backend
# keeps the tf.Variable in `Variable._value` (keras/src/backend/tensorflow/
# core.py, verified on 3.15.1) and reads it only through that attribute, so a
# copy made under tf.device replaces it and every layer, optimizer slot made
# later (colocated with it) and checkpoint sees the moved one. Must run before
# any tf.function that uses the variable is traced.
# ---------------------------------------------------------------------------
def place_variable(variable, device: str) -> None:
    """Re-creates the tf.Variable behind a Keras variable on `device`, same value."""
    old = getattr(variable, "_value", None)
    if not isinstance(old, tf.Variable):
        raise TypeError(f"variable {getattr(variable, 'path', variable)!r} has no TensorFlow "
                        "variable to move (is it a DTensor or an uninitialized variable?).")
    with tf.init_scope(), tf.device(device):
        variable._value = tf.Variable(
            tf.identity(old.read_value()), dtype=old.dtype, trainable=old.trainable,
            name=variable.name, aggregation=old.aggregation, synchronization=old.synchronization)
