"""Local devices: listing them, and simulating several on one CPU.

Simulated devices are logical CPU devices made by
`tf.config.set_logical_device_configuration`. They run real TensorFlow and
real collectives, so they prove that distributed code is correct, but they
share the host's cores: they measure overhead, never speed-up.

Example::

    import tfpar
    tfpar.simulate_devices(4)          # before any TensorFlow op runs
    strategy = tfpar.DataParallel()    # 4 replicas on CPU:0..CPU:3
"""

from __future__ import annotations

# TensorFlow is imported inside the functions: the launcher and the CLI import
# this module for its error type and must start without TensorFlow.


class DeviceConfigError(RuntimeError):
    """Devices were asked for in a way TensorFlow cannot provide."""


def simulate_devices(n: int) -> list[str]:
    """Splits the host CPU into `n` logical devices; returns their names.

    Must run before TensorFlow initializes its runtime (before the first op,
    strategy or `tf.config.list_logical_devices` call). Calling it again with
    the same `n` is a no-op.

    Raises:
      DeviceConfigError: if `n` < 1, or TensorFlow is already initialized
        with a different device count.
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise DeviceConfigError(
            f"simulate_devices(n={n!r}): n must be a positive integer "
            "(the number of logical CPU devices)."
        )
    import tensorflow as tf

    from tfpar import compat

    cpu = tf.config.list_physical_devices("CPU")[0]
    wanted = [tf.config.LogicalDeviceConfiguration()] * n
    current = tf.config.get_logical_device_configuration(cpu)
    if compat.tensorflow_initialized():
        have = len(tf.config.list_logical_devices("CPU"))
        if have == n:
            return [d.name for d in tf.config.list_logical_devices("CPU")]
        raise DeviceConfigError(
            f"simulate_devices({n}): TensorFlow is already initialized with "
            f"{have} CPU device(s), and devices cannot change after that. Call "
            "tfpar.simulate_devices() (or pass --num_simulated_devices) at the "
            "start of the program, before any TensorFlow op runs."
        )
    if current is None or len(current) != n:
        tf.config.set_logical_device_configuration(cpu, wanted)
    # Logical CPU devices share one inter-op thread pool, by default one
    # thread per core: on 2 cores, 4 pipeline stages (or replicas) that each
    # wait on work of their own could run only 2 at a time. A thread per
    # device on top of the cores lets each device have an op in flight.
    if tf.config.threading.get_inter_op_parallelism_threads() == 0:
        import os

        tf.config.threading.set_inter_op_parallelism_threads(n + (os.cpu_count() or 1))
    return [d.name for d in tf.config.list_logical_devices("CPU")]


def local_devices() -> list[str]:
    """The devices a data-parallel strategy uses by default: GPUs, else CPUs."""
    import tensorflow as tf

    gpus = tf.config.list_logical_devices("GPU")
    if gpus:
        return [d.name for d in gpus]
    return [d.name for d in tf.config.list_logical_devices("CPU")]
