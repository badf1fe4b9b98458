"""absl flags that choose and configure a strategy; any training script reuses them.

Importing this module defines the flags. A script then calls `from_flags()`
inside `main`, after absl has parsed them::

    from absl import app
    import tfpar
    from tfpar import flags as tfpar_flags  # defines --strategy, ...

    def main(argv):
        strategy = tfpar.from_flags()
        batch = tfpar_flags.global_batch_size(strategy, default=64)
        ...

    app.run(main)

    $ python train.py --strategy=data --num_simulated_devices=4 --global_batch_size=128

Batch semantics: `--global_batch_size` is the number of examples in one
optimizer step summed over every replica of every worker (what Keras's
`batch_size` means under a strategy); `--per_replica_batch_size` is what one
device sees. Give at most one; the other follows from the replica count.

Bad combinations are rejected when the flags are parsed, before any model is
built.
"""

from __future__ import annotations

from absl import flags

from tfpar.cluster import Cluster, ClusterConfigError, Discovered, discover

STRATEGIES = ("auto", "one_device", "data", "multi_worker", "tensor", "pipeline")
ALL_REDUCE = ("auto", "nccl", "ring", "hierarchical_copy", "reduce_to_one")
PRECISIONS = ("float32", "mixed_bfloat16", "mixed_float16")
# Strategies whose flags exist but whose implementation has not landed yet.
NOT_YET_AVAILABLE: dict[str, str] = {}
SCHEDULES = ("gpipe", "1f1b")

FLAGS = flags.FLAGS


def _define(define, name, *args, **kwargs):
    # Several tfpar modules (or a user's script, twice) may import this one;
    # absl refuses to define a flag twice.
    if name not in FLAGS:
        define(name, *args, **kwargs)


_define(flags.DEFINE_enum, "strategy", "auto", STRATEGIES,
        "How to spread training over devices. auto: multi_worker when a "
        "cluster is configured (TF_CONFIG or --worker_hosts), data when this "
        "host has several devices, else one_device.")
_define(flags.DEFINE_list, "worker_hosts", [],
        "Comma-separated host:port of every worker, for multi_worker without "
        "TF_CONFIG. Give the same list to every worker, and each its "
        "--task_index.")
_define(flags.DEFINE_string, "chief_host", None,
        "host:port of a separate chief task (optional: by default worker 0 is "
        "the chief).")
_define(flags.DEFINE_enum, "task_type", "worker", ["chief", "worker"],
        "This process's role with --worker_hosts.")
_define(flags.DEFINE_integer, "task_index", 0,
        "This process's index within its role, with --worker_hosts.")
_define(flags.DEFINE_integer, "num_simulated_devices", 0,
        "Split the CPU into this many logical devices (for laptops and CI; "
        "they share the cores, so they show correctness, not speed). 0: off.")
_define(flags.DEFINE_enum, "all_reduce", "auto", ALL_REDUCE,
        "Gradient all-reduce. data: auto|nccl|hierarchical_copy|reduce_to_one; "
        "multi_worker: auto|ring|nccl.")
_define(flags.DEFINE_integer, "pack_bytes", 0,
        "multi_worker: pack gradients into all-reduces of this many bytes "
        "(0: TensorFlow's default).")
_define(flags.DEFINE_float, "collective_timeout", 300.0,
        "multi_worker: seconds before a stuck all-reduce fails (0: never).")
_define(flags.DEFINE_float, "heartbeat_timeout", 10.0,
        "multi_worker: seconds without a heartbeat before a peer is declared "
        "dead and every worker fails.")
_define(flags.DEFINE_float, "register_timeout", 300.0,
        "multi_worker: seconds to wait at start-up for every worker to join "
        "before failing.")
_define(flags.DEFINE_integer, "global_batch_size", None,
        "Examples per optimizer step over all replicas and workers.")
_define(flags.DEFINE_integer, "per_replica_batch_size", None,
        "Examples per optimizer step on each replica (device); the global "
        "batch is this times the number of replicas.")
_define(flags.DEFINE_string, "mesh", None,
        "tensor: the device mesh, e.g. 'batch:2,model:2' (batch x model = devices "
        "over all processes). Default: 'batch:1,model:N' over the N devices.")
_define(flags.DEFINE_string, "layouts", "megatron",
        "tensor: how weights are split: 'megatron' (column/row-parallel MLP, "
        "attention by heads, vocabulary-split embedding) or 'replicated'.")
_define(flags.DEFINE_integer, "pipeline_stages", 0,
        "pipeline: number of stages K (0: one per local device, or as many as "
        "--split_points make). Cuts balance the stages' parameter counts.")
_define(flags.DEFINE_integer, "microbatches", 1,
        "pipeline: micro-batches M per batch; the per-replica batch should divide by "
        "it. More micro-batches shrink the bubble (K-1)/(M+K-1).")
_define(flags.DEFINE_enum, "schedule", "1f1b", SCHEDULES,
        "pipeline: gpipe (all forwards, then all backwards; stashes M micro-batches) "
        "or 1f1b (same bubble, stashes at most K).")
_define(flags.DEFINE_list, "split_points", [],
        "pipeline: names of the layers that begin stages 1..K-1, e.g. block_2,block_4 "
        "(default: balanced automatic cuts).")
_define(flags.DEFINE_integer, "pipeline_replicas", 1,
        "pipeline: data-parallel copies of the pipeline on this host (stages x "
        "replicas devices).")
_define(flags.DEFINE_enum, "precision", "float32", PRECISIONS,
        "Keras dtype policy. mixed_float16 adds dynamic loss scaling.")


# ------------------------------------------------------------------ validators
def _check(condition: bool, message: str) -> bool:
    if not condition:
        raise flags.ValidationError(message)
    return True


def _strategy_available(f) -> bool:
    strategy = f["strategy"]
    return _check(strategy not in NOT_YET_AVAILABLE,
                  f"--strategy={strategy}: {NOT_YET_AVAILABLE.get(strategy)} is not "
                  "available in this tfpar version yet. Use --strategy=data (one "
                  "host) or --strategy=multi_worker (many hosts).")


def _mesh_ok(spec) -> bool:
    from tfpar.strategies.tensor.mesh import MeshError, parse_mesh

    try:
        names, _ = parse_mesh(spec)
    except MeshError as e:
        return _check(False, f"--mesh: {e}")
    return _check("batch" in names,
                  f"--mesh={spec}: needs a 'batch' axis (size 1 for pure tensor "
                  "parallelism), e.g. 'batch:1,model:4'.")


def _one_batch_size(f) -> bool:
    _check(not (f["global_batch_size"] and f["per_replica_batch_size"]),
           f"--global_batch_size={f['global_batch_size']} and "
           f"--per_replica_batch_size={f['per_replica_batch_size']} were both "
           "given; give one (global = per_replica x replicas).")
    for name in ("global_batch_size", "per_replica_batch_size"):
        _check(f[name] is None or f[name] > 0, f"--{name}={f[name]}: must be > 0.")
    return True


def _non_negative(name):
    def check(value):
        return _check(value >= 0, f"--{name}={value}: must be >= 0.")
    return check


def _positive(name):
    def check(value):
        return _check(value > 0, f"--{name}={value}: must be > 0 seconds.")
    return check


def _cluster_hosts(f) -> bool:
    if f["task_index"] and not f["worker_hosts"]:
        _check(False,
               f"--task_index={f['task_index']} was given without --worker_hosts; "
               "give every worker the same --worker_hosts list (or use "
               "TF_CONFIG / tfpar launch).")
    if f["chief_host"] and not f["worker_hosts"]:
        _check(False, "--chief_host was given without --worker_hosts.")
    if f["worker_hosts"]:
        _check(f["strategy"] in ("auto", "multi_worker"),
               f"--worker_hosts describes a cluster, but --strategy={f['strategy']} "
               "trains on one host. Use --strategy=multi_worker (or auto).")
        try:
            Cluster.from_hosts(f["worker_hosts"], task_type=f["task_type"],
                               task_index=f["task_index"], chief_host=f["chief_host"])
        except ClusterConfigError as e:
            _check(False, f"--worker_hosts/--chief_host/--task_index: {e}")
    return True


def _pipeline_flags(f) -> bool:
    for name in ("pipeline_stages", "microbatches", "pipeline_replicas"):
        low = 0 if name == "pipeline_stages" else 1
        _check(f[name] >= low, f"--{name}={f[name]}: must be >= {low}.")
    stages, points = f["pipeline_stages"], f["split_points"]
    if points:
        _check(len(set(points)) == len(points),
               f"--split_points={','.join(points)}: names a layer twice; each split point "
               "begins a new stage.")
        _check(not stages or stages == len(points) + 1,
               f"--pipeline_stages={stages} but --split_points={','.join(points)} make "
               f"{len(points) + 1} stages; give K-1 split points for K stages, or drop "
               "--pipeline_stages.")
    pipeline_only = [f"--{n}" for n, default in (("pipeline_stages", 0), ("microbatches", 1),
                                                  ("pipeline_replicas", 1))
                     if f[n] != default] + (["--split_points"] if points else [])
    if pipeline_only:
        _check(f["strategy"] == "pipeline",
               f"{', '.join(pipeline_only)} configure the pipeline, but --strategy="
               f"{f['strategy']}; add --strategy=pipeline or drop them.")
    if f["strategy"] == "pipeline" and f["num_simulated_devices"] and (stages or len(points) + 1 > 1):
        need = max(stages, len(points) + 1) * f["pipeline_replicas"]
        _check(f["num_simulated_devices"] >= need,
               f"--num_simulated_devices={f['num_simulated_devices']} is fewer than the "
               f"{need} devices the pipeline needs (stages x --pipeline_replicas); use "
               f"--num_simulated_devices={need}.")
    return True


def _all_reduce_fits_strategy(f) -> bool:
    strategy, all_reduce = f["strategy"], f["all_reduce"]
    if strategy == "multi_worker":
        _check(all_reduce not in ("hierarchical_copy", "reduce_to_one"),
               f"--all_reduce={all_reduce} is for --strategy=data; "
               "multi_worker uses auto, ring or nccl.")
    if strategy in ("data", "one_device"):
        _check(all_reduce != "ring",
               "--all_reduce=ring is a multi-worker all-reduce; with "
               f"--strategy={strategy} use auto, nccl, hierarchical_copy or "
               "reduce_to_one.")
    return True


# Each rule is registered on its own, so an error names only its own flags.
flags.register_validator("strategy", lambda v: _strategy_available({"strategy": v}),
                         message="--strategy not available")
flags.register_validator("mesh", lambda v: v is None or _mesh_ok(v))
flags.register_validator("layouts", lambda v: _check(
    v in ("megatron", "replicated"),
    f"--layouts={v}: use 'megatron' or 'replicated' (custom LayoutMaps are given in code: "
    "tfpar.TensorParallel(mesh, layout_map))."))
for _name in ("num_simulated_devices", "pack_bytes", "collective_timeout"):
    flags.register_validator(_name, _non_negative(_name))
for _name in ("heartbeat_timeout", "register_timeout"):
    flags.register_validator(_name, _positive(_name))
flags.register_multi_flags_validator(
    ["global_batch_size", "per_replica_batch_size"], _one_batch_size)
flags.register_multi_flags_validator(
    ["strategy", "worker_hosts", "chief_host", "task_type", "task_index"], _cluster_hosts)
flags.register_multi_flags_validator(["strategy", "all_reduce"], _all_reduce_fits_strategy)
flags.register_multi_flags_validator(
    ["strategy", "pipeline_stages", "microbatches", "split_points", "pipeline_replicas",
     "num_simulated_devices"], _pipeline_flags)


# ------------------------------------------------------------- from the flags
def discover_from_flags() -> Discovered | None:
    """The cluster the flags name, else the one found where this runs, else None.

    Without --worker_hosts, `tfpar.cluster.discover()` looks at TF_CONFIG,
    then a Kubernetes JobSet or Indexed Job pod's environment. Raises
    ClusterConfigError if both the flags and the environment name one: two
    sources of truth for a cluster are a mistake waiting to happen.
    """
    found = discover()
    if FLAGS.worker_hosts:
        if found is not None:
            source = "TF_CONFIG" if found.source == "TF_CONFIG" else \
                f"the Kubernetes {found.source} environment"
            raise ClusterConfigError(
                f"both {source} and --worker_hosts describe a cluster; use one "
                f"(unset {'TF_CONFIG' if found.source == 'TF_CONFIG' else 'TFPAR_NUM_WORKERS'} "
                "or drop --worker_hosts)."
            )
        return Discovered(Cluster.from_hosts(
            FLAGS.worker_hosts, task_type=FLAGS.task_type,
            task_index=FLAGS.task_index, chief_host=FLAGS.chief_host,
        ), "flags")
    return found


def cluster_from_flags() -> Cluster | None:
    """The cluster of `discover_from_flags()`, or None."""
    found = discover_from_flags()
    return None if found is None else found.cluster


def resolve_strategy_name() -> str:
    """--strategy with "auto" resolved (without building anything)."""
    if FLAGS.strategy != "auto":
        return FLAGS.strategy
    if cluster_from_flags() is not None:
        return "multi_worker"
    if FLAGS.num_simulated_devices > 1:
        return "data"
    import tensorflow as tf

    if len(tf.config.list_physical_devices("GPU")) > 1:
        return "data"
    return "one_device"


def from_flags():
    """Builds the strategy the flags ask for.

    Applies --num_simulated_devices and --precision first (both must happen
    before TensorFlow initializes), then builds OneDevice, DataParallel or
    MultiWorker. Call it once, at the top of `main`.
    """
    from tfpar import strategies
    from tfpar.devices import simulate_devices
    from tfpar.strategies.tensor.mesh import num_clients
    from tfpar.precision import set_precision

    name = resolve_strategy_name()
    if name == "tensor":
        _export_dtensor_clients()
    # A multi-client DTensor mesh makes its own logical devices
    # (dtensor.initialize_accelerator_system); splitting them here would clash.
    if FLAGS.num_simulated_devices and not (name == "tensor" and num_clients() > 1):
        simulate_devices(FLAGS.num_simulated_devices)
    set_precision(FLAGS.precision)
    if name == "one_device":
        return strategies.OneDevice()
    if name == "data":
        return strategies.DataParallel(all_reduce=FLAGS.all_reduce)
    if name == "multi_worker":
        cluster = cluster_from_flags()
        if cluster is None:
            raise ClusterConfigError(
                "--strategy=multi_worker needs a cluster: run under `tfpar "
                "launch`, in a pod of `tfpar k8s render`, set TF_CONFIG, or pass "
                "--worker_hosts and --task_index."
            )
        return strategies.MultiWorker(
            cluster=cluster,
            communication="auto" if FLAGS.all_reduce == "auto" else FLAGS.all_reduce,
            pack_bytes=FLAGS.pack_bytes,
            collective_timeout_s=FLAGS.collective_timeout or None,
            heartbeat_timeout_s=FLAGS.heartbeat_timeout,
            register_timeout_s=FLAGS.register_timeout,
        )
    if name == "tensor":
        return _tensor_from_flags()
    if name == "pipeline":
        from tfpar.strategies.pipeline import Pipeline

        return Pipeline(stages=FLAGS.pipeline_stages or None,
                        split_points=FLAGS.split_points or None,
                        microbatches=FLAGS.microbatches, schedule=FLAGS.schedule,
                        replicas=FLAGS.pipeline_replicas)
    raise ValueError(f"--strategy={name}: {NOT_YET_AVAILABLE.get(name, 'unknown')}")


def _export_dtensor_clients():
    """In a Kubernetes pod (or with TF_CONFIG / --worker_hosts) the discovered
    cluster is the DTensor client list, unless a launcher already set it."""
    import os

    cluster = cluster_from_flags()
    if cluster is not None and "DTENSOR_JOBS" not in os.environ:
        os.environ.update(cluster.dtensor_env())


def _tensor_from_flags():
    from tfpar.strategies.tensor.mesh import num_clients
    from tfpar.strategies import TensorParallel

    mesh = FLAGS.mesh
    if mesh is None:
        import tensorflow as tf

        devices = (len(tf.config.list_logical_devices("GPU"))
                   or len(tf.config.list_logical_devices("CPU")))
        mesh = f"batch:1,model:{devices * num_clients()}"
    return TensorParallel(mesh, FLAGS.layouts,
                          num_local_devices=FLAGS.num_simulated_devices or None)


def global_batch_size(strategy, default: int | None = None) -> int:
    """The global batch the flags ask for, checked against the replica count.

    --per_replica_batch_size wins if given; else --global_batch_size; else
    `default` (a global batch).
    """
    from tfpar.data import resolve_global_batch_size

    return resolve_global_batch_size(
        strategy,
        global_batch_size=FLAGS.global_batch_size
        if FLAGS.global_batch_size or FLAGS.per_replica_batch_size else default,
        per_replica_batch_size=FLAGS.per_replica_batch_size,
    )
