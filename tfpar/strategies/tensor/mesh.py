"""Device meshes for tensor parallelism: parse "batch:2,model:2", build the DTensor mesh.

A mesh arranges devices in a named grid. The "batch" axis splits each batch
(data parallelism); the "model" axis splits weights (tensor parallelism).
`keras.distribution.DeviceMesh` is the user-facing description (so code
written for Keras's JAX `ModelParallel` carries over); `build_mesh` turns it
into a `tf.experimental.dtensor.Mesh`, on one process or, when the DTENSOR_*
variables name several clients (`tfpar launch` sets them), across processes.

Example::

    >>> parse_mesh("batch:2,model:2")
    (('batch', 'model'), (2, 2))
"""

from __future__ import annotations

import os
import re

BATCH_AXIS = "batch"
MODEL_AXIS = "model"
_AXIS = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


class MeshError(ValueError):
    """A mesh that cannot be built from the given spec or devices."""


def parse_mesh(spec: str) -> tuple[tuple[str, ...], tuple[int, ...]]:
    """'batch:2,model:2' -> (('batch', 'model'), (2, 2))."""
    if not isinstance(spec, str) or not spec.strip():
        raise MeshError(f"mesh {spec!r}: write it as 'axis:size,...', e.g. 'batch:2,model:2'.")
    names, sizes = [], []
    for part in spec.split(","):
        name, sep, size = part.strip().partition(":")
        if not sep or not _AXIS.match(name) or not size.strip().isdigit():
            raise MeshError(
                f"mesh {spec!r}: {part.strip()!r} is not 'axis:size' (e.g. 'model:4')."
            )
        if name in names:
            raise MeshError(f"mesh {spec!r}: axis {name!r} appears twice.")
        if int(size) < 1:
            raise MeshError(f"mesh {spec!r}: axis {name!r} has size {size}; sizes are >= 1.")
        names.append(name)
        sizes.append(int(size))
    return tuple(names), tuple(sizes)


# Devices of the first mesh this process built (single-client). TensorFlow
# 2.21 deadlocks (ParallelDevice::Join, no error) when a later mesh spans more
# devices than the first one did: a 2-device mesh then a 4-device mesh hangs
# at the first variable of the second; 4 -> 2 -> 4 works.
_first_mesh_devices: int | None = None


def span_every_device_first(device_type: str, mesh_devices: int) -> None:
    """Before building meshes of `mesh_devices` devices directly (a pipeline's stage
    meshes): makes this process's first mesh span all its devices of
    `device_type` if no mesh exists yet (built first, small meshes would make
    any later, larger one hang), and refuses meshes larger than an existing
    first one, as `build_mesh` does."""
    if num_clients() > 1:
        return
    if _first_mesh_devices is not None:
        _check_not_larger_than_first("a stage mesh", mesh_devices)
        return
    import tensorflow as tf
    from tensorflow.experimental import dtensor

    count = len(tf.config.list_logical_devices(device_type))
    mesh = build_mesh(("batch",), (count,), device_type=device_type)
    # The hang comes with the first op on a larger mesh: run one here.
    dtensor.copy_to_mesh(tf.zeros([]), dtensor.Layout.replicated(mesh, 0))


def _check_not_larger_than_first(what: str, devices: int) -> None:
    """Refuses a mesh of more devices than this process's first one (TensorFlow
    2.21 hangs on its first op)."""
    if _first_mesh_devices is not None and devices > _first_mesh_devices:
        raise MeshError(
            f"{what} spans {devices} devices, more than the {_first_mesh_devices} of this "
            "process's first mesh; TensorFlow 2.21 hangs on that. Build the largest mesh "
            "first, or use a new process per mesh size.")


def num_clients() -> int:
    """Processes that share one mesh (DTensor multi-client), from DTENSOR_JOBS."""
    jobs = os.environ.get("DTENSOR_JOBS", "")
    return len([j for j in jobs.split(",") if j]) or 1


def client_id() -> int:
    return int(os.environ.get("DTENSOR_CLIENT_ID", "0"))


def build_mesh(names, sizes, device_type: str | None = None, num_local_devices: int | None = None):
    """A DTensor mesh over this process's devices (and its peers' when multi-client).

    Single process: the first prod(sizes) local devices of `device_type`
    (GPUs if present, else CPUs). Multi-client: DTensor's accelerator system
    is initialized with `num_local_devices` per client and the mesh spans
    all clients, client 0's devices first.
    """
    import math

    import tensorflow as tf
    from tensorflow.experimental import dtensor

    total = math.prod(sizes)
    if device_type is None:
        device_type = "GPU" if tf.config.list_physical_devices("GPU") else "CPU"
    clients = num_clients()
    if clients > 1:
        from tfpar import compat

        if not compat.dtensor_accelerator_system_initialized():
            kwargs = {}
            if device_type == "CPU" and num_local_devices:
                kwargs["num_logical_cpu_devices"] = num_local_devices
            dtensor.initialize_accelerator_system(device_type, **kwargs)
        local = len(dtensor.local_devices(device_type))
        if local * clients != total:
            raise MeshError(
                f"mesh {dict(zip(names, sizes))} needs {total} devices, but {clients} "
                f"clients x {local} local {device_type} devices = {local * clients}. "
                "Change the mesh or --num_simulated_devices (devices per process)."
            )
        return dtensor.create_distributed_mesh(list(zip(names, sizes)), device_type=device_type)
    global _first_mesh_devices
    devices = tf.config.list_logical_devices(device_type)
    if total > len(devices):
        raise MeshError(
            f"mesh {dict(zip(names, sizes))} needs {total} {device_type} devices, but this "
            f"process has {len(devices)}: {[d.name for d in devices]}. Use a smaller mesh, "
            "more devices (--num_simulated_devices on CPU), or more processes (tfpar launch)."
        )
    _check_not_larger_than_first(f"mesh {dict(zip(names, sizes))}", total)
    if _first_mesh_devices is None:
        _first_mesh_devices = total
    return dtensor.create_mesh(list(zip(names, sizes)),
                               devices=[d.name for d in devices[:total]],
                               device_type=device_type)
