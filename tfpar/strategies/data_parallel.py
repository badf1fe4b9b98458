"""Data parallelism: every replica holds the whole model and a slice of the batch.

Gradients are averaged with an all-reduce before every optimizer step
(average gradients, never parameters), so all replicas stay bit-identical.

The classes here *are* `tf.distribute` strategies (subclasses, not wrappers):
Keras's `fit` looks the strategy up with `tf.distribute.get_strategy()`, so
the plain Keras pattern works unchanged and costs nothing extra::

    import keras, tfpar
    tfpar.simulate_devices(4)
    strategy = tfpar.DataParallel()
    with strategy.scope():
        model = keras.Sequential([keras.layers.Dense(10)])
        model.compile(optimizer=keras.optimizers.AdamW(1e-3), loss="mse")
    model.fit(x, y, batch_size=64, epochs=2)   # 64 = the global batch
"""

from __future__ import annotations

import logging
from typing import Mapping, Sequence

import numpy as np
import tensorflow as tf

from tfpar import compat
from tfpar.parallel_dims import ParallelDims
from tfpar.cluster import Cluster, ClusterConfigError, discover, wait_until_resolvable
from tfpar.devices import DeviceConfigError, local_devices
from tfpar.strategies.base import StrategyBase, ring_all_reduce_bytes

log = logging.getLogger("tfpar")

ALL_REDUCE_LOCAL = ("auto", "nccl", "hierarchical_copy", "reduce_to_one")
COMMUNICATION = ("auto", "ring", "nccl")

# Failure-detection defaults for multi-worker jobs (seconds). A dead peer is
# noticed through the coordination service's heartbeat; a live but stuck one
# through the collective timeout, which must outlast the slowest legitimate
# collective (the first step also waits for every worker to trace and build).
# Registration waits for every worker to start: in a cluster that includes
# pulling images and scheduling pods.
DEFAULT_HEARTBEAT_TIMEOUT_S = 10.0
DEFAULT_COLLECTIVE_TIMEOUT_S = 300.0
DEFAULT_REGISTER_TIMEOUT_S = 300.0


REDUCE_DTYPES = ("bfloat16", "float16")


class _TFDistribute(StrategyBase):
    """The interface answers of a `tf.distribute` strategy (all replicas hold the model).

    `reduce_dtype` ("bfloat16", "float16" or None): the dtype gradients are
    all-reduced in. The float32 gradients are cast before the all-reduce and
    back after it, before clipping and the update (Horovod's compression,
    Megatron's bf16 gradient reduction): half the bytes on the wire, and each
    gradient element rounded to 16 bits (bfloat16: 8 significant bits, a
    relative error up to 2^-8 per rounding, float16: 11 bits but overflow above
    65504). Applied in `tfpar.compat.reduce_before_apply`.
    """

    reduce_dtype: str | None = None

    def _set_reduce_dtype(self, reduce_dtype: str | None) -> None:
        if reduce_dtype not in (None, *REDUCE_DTYPES):
            raise ValueError(f"{type(self).__name__}(reduce_dtype={reduce_dtype!r}): use one "
                             f"of {list(REDUCE_DTYPES)}, or None for the variables' dtype.")
        self.reduce_dtype = reduce_dtype

    def communication_report(self, model) -> dict:
        """Bytes one device sends per optimizer step for the gradient all-reduce
        (a ring all-reduce sends 2(n-1)/n of the payload), and the dtype."""
        n = self.num_replicas_in_sync
        payload = sum(int(np.prod(v.shape)) * _itemsize(self.reduce_dtype or v.dtype)
                      for v in model.trainable_weights)
        return {"reduce_dtype": self.reduce_dtype or "float32",
                "gradient_bytes_per_step": payload,
                "gradient_wire_bytes_per_device": ring_all_reduce_bytes(payload, n)}

    @property
    def dims(self) -> ParallelDims:
        return ParallelDims(dp=self.num_replicas_in_sync)

    @property
    def is_chief(self) -> bool:
        return bool(self.extended.should_checkpoint)

    def _devices(self) -> list[str]:
        return list(self.extended.worker_devices)


class OneDevice(_TFDistribute, tf.distribute.OneDeviceStrategy):
    """Everything on one device (the first GPU, else the CPU).

    The baseline every other strategy is compared with, and the strategy a
    script gets on a laptop, so that one script runs anywhere.

    Example::

        strategy = tfpar.OneDevice()          # or OneDevice("/gpu:1")
    """

    kind = "one_device"

    def __init__(self, device: str | None = None):
        compat.apply_keras_fixes()
        super().__init__(device or local_devices()[0])


class DataParallel(_TFDistribute, tf.distribute.MirroredStrategy):
    """Synchronous data parallelism over the devices of one host.

    Args:
      devices: device names (default: all local GPUs, else all local CPUs,
        which `tfpar.simulate_devices(n)` can split into n).
      all_reduce: "auto" (NCCL between GPUs, TensorFlow's choice otherwise),
        "nccl", "hierarchical_copy" (GPUs without NVLink/NCCL) or
        "reduce_to_one" (reduce on one device, then broadcast).
      reduce_dtype: "bfloat16" or "float16" to all-reduce gradients in 16 bits
        (see `_TFDistribute`); None: in the variables' dtype.

    Example::

        tfpar.simulate_devices(4)
        strategy = tfpar.DataParallel()
        strategy.num_replicas_in_sync   # 4
    """

    kind = "data"

    def __init__(self, devices: Sequence[str] | None = None, all_reduce: str = "auto",
                 reduce_dtype: str | None = None):
        compat.apply_keras_fixes()
        self._set_reduce_dtype(reduce_dtype)
        if all_reduce not in ALL_REDUCE_LOCAL:
            raise ValueError(
                f"DataParallel(all_reduce={all_reduce!r}): use one of "
                f"{list(ALL_REDUCE_LOCAL)}."
            )
        available = local_devices()
        devices = list(devices) if devices is not None else available
        if not devices:
            raise DeviceConfigError("DataParallel(devices=[]): give at least one device.")
        if all_reduce == "nccl" and not any("GPU" in d.upper() for d in devices):
            raise ValueError(
                f"DataParallel(all_reduce='nccl') needs GPUs, but the devices are "
                f"{devices}. Use all_reduce='auto' on CPUs."
            )
        cross_device_ops = {
            "auto": None,
            "nccl": lambda: tf.distribute.NcclAllReduce(),
            "hierarchical_copy": lambda: tf.distribute.HierarchicalCopyAllReduce(),
            "reduce_to_one": lambda: tf.distribute.ReductionToOneDevice(),
        }[all_reduce]
        # Read by MirroredStrategy's constructor: see compat.unique_collective_key_base.
        self._collective_key_base = compat.unique_collective_key_base()
        super().__init__(
            devices=devices,
            cross_device_ops=cross_device_ops() if cross_device_ops else None,
        )
        self.all_reduce = all_reduce


class MultiWorker(_TFDistribute, tf.distribute.MultiWorkerMirroredStrategy):
    """Synchronous data parallelism across processes and hosts.

    Each worker process holds a full replica per local GPU (one per CPU
    host); gradients are all-reduced across all of them with TensorFlow's
    collective ops.

    Args:
      cluster: a `tfpar.cluster.Cluster`, a TF_CONFIG dict or JSON string;
        default: `tfpar.cluster.discover()`: TF_CONFIG (`tfpar launch`,
        Kubeflow, Ray), else the pod environment of a `tfpar k8s render` job
        (JobSet or Indexed Job).
      communication: "auto", "ring" (gRPC rings, works everywhere) or "nccl".
      pack_bytes: pack gradients into chunks of this many bytes per
        all-reduce (0: TensorFlow's default).
      collective_timeout_s: fail a collective (all-reduce) that has not
        finished after this many seconds, e.g. because a peer is stuck
        (None: wait forever).
      heartbeat_timeout_s: declare a peer dead after this many seconds
        without a heartbeat; the others then fail with UnavailableError.
      register_timeout_s: fail at start-up if not every worker has joined
        within this many seconds (a worker that never starts would otherwise
        hang the rest in this constructor).
      reduce_dtype: "bfloat16" or "float16" to all-reduce gradients in 16 bits.

    Must be created at the start of the program, before TensorFlow runs any
    op: it starts this process's gRPC server and joins the cluster.

    Example (run by `tfpar launch --nproc 2 -- python train.py`)::

        strategy = tfpar.MultiWorker(collective_timeout_s=60)
        strategy.num_workers, strategy.is_chief   # (2, True) on worker 0
    """

    kind = "multi_worker"

    def __init__(
        self,
        cluster: Cluster | Mapping | str | None = None,
        communication: str = "auto",
        pack_bytes: int = 0,
        collective_timeout_s: float | None = DEFAULT_COLLECTIVE_TIMEOUT_S,
        heartbeat_timeout_s: float = DEFAULT_HEARTBEAT_TIMEOUT_S,
        register_timeout_s: float = DEFAULT_REGISTER_TIMEOUT_S,
        reduce_dtype: str | None = None,
    ):
        compat.apply_keras_fixes()
        self._set_reduce_dtype(reduce_dtype)
        if communication not in COMMUNICATION:
            raise ValueError(
                f"MultiWorker(communication={communication!r}): use one of "
                f"{list(COMMUNICATION)}."
            )
        if pack_bytes < 0:
            raise ValueError(f"MultiWorker(pack_bytes={pack_bytes}): must be >= 0.")
        for name, value in (("heartbeat_timeout_s", heartbeat_timeout_s),
                            ("register_timeout_s", register_timeout_s),
                            ("collective_timeout_s", collective_timeout_s)):
            if value is not None and value <= 0:
                raise ValueError(f"MultiWorker({name}={value}): must be > 0 seconds.")
        if cluster is None:
            found = discover()
            if found is None:
                raise ClusterConfigError(
                    "MultiWorker needs a cluster, but TF_CONFIG is not set and this is "
                    "not a pod of a tfpar Kubernetes job (no TFPAR_NUM_WORKERS). Run "
                    "the script under `tfpar launch --nproc N -- ...`, set "
                    "TF_CONFIG, or pass --worker_hosts and --task_index."
                )
            cluster = found.cluster
        elif not isinstance(cluster, Cluster):
            cluster = Cluster.from_tf_config(cluster)
        if cluster.task_type not in ("chief", "worker"):
            raise ClusterConfigError(
                f"MultiWorker runs on chief and worker tasks; this task is "
                f"{cluster.task_type!r}:{cluster.task_index}."
            )
        if compat.tensorflow_initialized():
            raise DeviceConfigError(
                "MultiWorker must be created before TensorFlow runs its first op "
                "(it starts this process's server and joins the cluster). Create "
                "the strategy at the top of main()."
            )
        # An unresolvable peer would otherwise surface only as a registration
        # timeout that names no host; peers' DNS records appear as their pods
        # start, so this waits as long as registration would.
        wait_until_resolvable(cluster, timeout_s=register_timeout_s)
        compat.configure_coordination_service(
            cluster,
            heartbeat_timeout_s=heartbeat_timeout_s,
            register_timeout_s=register_timeout_s,
        )
        resolver = tf.distribute.cluster_resolver.SimpleClusterResolver(
            tf.train.ClusterSpec({r: list(a) for r, a in cluster.jobs.items()}),
            task_type=cluster.task_type,
            task_id=cluster.task_index,
            num_accelerators={"GPU": len(tf.config.list_physical_devices("GPU"))},
            rpc_layer=cluster.rpc_layer,
        )
        implementation = {
            "auto": tf.distribute.experimental.CommunicationImplementation.AUTO,
            "ring": tf.distribute.experimental.CommunicationImplementation.RING,
            "nccl": tf.distribute.experimental.CommunicationImplementation.NCCL,
        }[communication]
        options = tf.distribute.experimental.CommunicationOptions(
            bytes_per_pack=pack_bytes,
            timeout_seconds=collective_timeout_s,
            implementation=implementation,
        )
        super().__init__(cluster_resolver=resolver, communication_options=options)
        self.cluster = cluster
        self.timeouts = {
            "collective_s": collective_timeout_s,
            "heartbeat_s": heartbeat_timeout_s,
            "register_s": register_timeout_s,
        }

    @property
    def num_workers(self) -> int:
        return self.cluster.num_workers

    @property
    def worker_index(self) -> int:
        return self.cluster.rank

    def any_worker(self, flag: bool) -> bool:
        """A scalar all-reduce: True on every worker if `flag` is set on any."""
        votes = self.run(lambda: tf.constant(1.0 if flag else 0.0, tf.float32))
        return float(self.reduce(tf.distribute.ReduceOp.SUM, votes, axis=None)) > 0

    def describe(self) -> dict:
        info = super().describe()
        info["cluster"] = self.cluster.to_tf_config()
        info["reduce_dtype"] = self.reduce_dtype
        info["timeouts"] = dict(self.timeouts)
        return info


def _itemsize(dtype) -> int:
    return tf.as_dtype(dtype).size
