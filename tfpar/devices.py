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


# Dense peak FLOP/s per GPU from the vendors' data sheets (SXM parts, no
# sparsity), by compute dtype: "float32" is TensorFloat-32, which TensorFlow
# uses for float32 matmuls on Ampere and newer.
PEAK_FLOPS = {
    "H200": {"bfloat16": 989e12, "float16": 989e12, "float32": 494e12},
    "H100": {"bfloat16": 989e12, "float16": 989e12, "float32": 494e12},
    "A100": {"bfloat16": 312e12, "float16": 312e12, "float32": 156e12},
    "A10": {"bfloat16": 125e12, "float16": 125e12, "float32": 62.5e12},
    "L4": {"bfloat16": 121e12, "float16": 121e12, "float32": 60e12},
    "V100": {"bfloat16": 15.7e12, "float16": 125e12, "float32": 15.7e12},
    "T4": {"bfloat16": 8.1e12, "float16": 65e12, "float32": 8.1e12},
}


def peak_flops(compute_dtype: str = "float32") -> tuple[float, str]:
    """Peak FLOP/s of this process's accelerator, and where the number comes from.

    A known GPU: its data-sheet dense peak for `compute_dtype`, per GPU.
    Anything else (CPUs, unknown GPUs): measured, as the best throughput of
    a 2048^3 matmul in `compute_dtype` on the first device over 8 runs (a
    1024^3 matmul measured 180-310 GFLOP/s on a 2-core host whose 2048^3
    reaches 350-390: a low peak would inflate MFU). Logical CPU
    devices share the host's cores, so a CPU's peak is the host's, once,
    however many simulated devices it is split into.
    """
    import tensorflow as tf

    gpus = tf.config.list_physical_devices("GPU")
    if gpus:
        name = tf.config.experimental.get_device_details(gpus[0]).get("device_name", "")
        for model, peaks in PEAK_FLOPS.items():
            if model in name.upper().replace("NVIDIA ", ""):
                return peaks.get(compute_dtype, peaks["float32"]), f"data sheet ({name})"
    return measure_matmul_flops(compute_dtype, n=2048, repeats=8), "measured (2048^3 matmul)"


def measure_matmul_flops(dtype: str = "float32", n: int = 1024, repeats: int = 5) -> float:
    """Best FLOP/s of an n x n x n matmul on the default device (after a warm-up)."""
    import time

    import tensorflow as tf

    a = tf.random.stateless_normal((n, n), seed=(1, 2), dtype=tf.float32)
    a = tf.cast(a, dtype)
    matmul = tf.function(lambda x: tf.reduce_sum(tf.cast(tf.matmul(x, x), tf.float32)))
    float(matmul(a))  # trace and warm up
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        float(matmul(a))
        best = min(best, time.perf_counter() - start)
    return 2.0 * n ** 3 / best
