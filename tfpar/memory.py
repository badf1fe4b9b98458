"""The measured memory peak of a training step, per device.

`Strategy.memory_report(model)` counts what the variables hold (parameters,
gradients, optimizer state). What a step really needs on top (activations
kept for the backward, gathered weights, temporaries) shows only in the
allocator's statistics: `tf.config.experimental.get_memory_info(device)`,
which reports on GPUs always and on CPUs when TensorFlow's BFC allocator is
on (`TF_CPU_ALLOCATOR_USE_BFC=true`, read once when TensorFlow starts;
`tfpar train` sets it). Logical CPU devices (`--num_simulated_devices`)
share one allocator: a device's peak is the host's divided by the devices.

Example::

    os.environ["TF_CPU_ALLOCATOR_USE_BFC"] = "true"      # before TensorFlow starts
    peak = tfpar.callbacks.StepPeak()        # reads the functions below
    model.fit(data, steps_per_epoch=4, callbacks=[peak])
    peak.bytes_per_device                                 # e.g. 412_090_368

Without allocator statistics (a CPU without BFC), `bytes_per_device` is None.
"""

from __future__ import annotations

import os

BFC_ENV = "TF_CPU_ALLOCATOR_USE_BFC"


def enable_cpu_statistics() -> None:
    """Turns CPU allocator statistics on; only has effect before TensorFlow starts."""
    os.environ.setdefault(BFC_ENV, "true")


def _devices(strategy=None) -> tuple[list[str], int]:
    """(the allocators to read, the devices sharing them)."""
    import tensorflow as tf

    gpus = tf.config.list_logical_devices("GPU")
    if gpus:
        return [d.name for d in gpus], 1
    cpus = tf.config.list_logical_devices("CPU")
    return [cpus[0].name], len(cpus)


def reset_peak() -> bool:
    """Starts a new peak on every local allocator; False when there are no statistics."""
    import tensorflow as tf

    names, _ = _devices()
    try:
        for name in names:
            tf.config.experimental.reset_memory_stats(name)
    except (ValueError, tf.errors.InvalidArgumentError):
        return False
    return True


def peak_bytes_per_device() -> int | None:
    """The largest peak of any local device since `reset_peak` (None without statistics)."""
    import tensorflow as tf

    names, sharing = _devices()
    try:
        peaks = [tf.config.experimental.get_memory_info(name)["peak"] for name in names]
    except (ValueError, tf.errors.InvalidArgumentError):
        return None
    return int(max(peaks) // sharing)


def step_peak_bytes(model, x, y) -> int | None:
    """The allocator peak per device of one `train_on_batch(x, y)`, after one
    untimed step that traces the function and creates the optimizer's slots.

        peak = tfpar.memory.step_peak_bytes(model, tokens[:, :-1], tokens[:, 1:])
    """
    model.train_on_batch(x, y)
    if not reset_peak():
        return None
    model.train_on_batch(x, y)
    return peak_bytes_per_device()


def host_peak_bytes() -> int:
    """This process's peak resident host memory so far (the kernel's high-water
    mark of its RSS: weights, optimizer state, checkpoint snapshots and the
    runtime itself, about 0.4-0.5 GiB for TensorFlow and tfpar before any model)."""
    import resource
    import sys

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # bytes on macOS, KiB on Linux
