"""absl flags that choose and configure a strategy; any training script reuses them.

Importing this module defines the strategy flags on absl's global
`flags.FLAGS`. A script then calls `from_flags()` inside `main`, after absl
has parsed them::

    from absl import app
    import tfpar
    from tfpar import flags as tfpar_flags  # defines --strategy, --dp, --tp, ...

    def main(argv):
        strategy = tfpar.from_flags()
        batch = tfpar_flags.global_batch_size(strategy, default=64)
        ...

    app.run(main)

    $ python train.py --dp=2 --tp=2 --num_simulated_devices=4 --global_batch_size=128

Parallel degrees: `--dp`, `--fsdp`, `--tp`, `--pp` (with `--microbatches`,
`--schedule` and `--virtual_stages`) give a `tfpar.ParallelDims`; `--strategy`, `--mesh`,
`--pipeline_stages` and `--pipeline_replicas` are shorthands for the same
thing (`--strategy=tensor --mesh=batch:2,model:2` is `--dp=2 --tp=2`).
Flags that say different things are refused.

Batch semantics: `--global_batch_size` is the number of examples in one
optimizer step summed over every replica of every worker (what Keras's
`batch_size` means under a strategy); `--per_replica_batch_size` is what one
device sees. Give at most one; the other follows from the replica count.

Every group of flags is defined by a function of an `absl.flags.FlagValues`
(`define_strategy_flags(fv)`, `define_batch_flags(fv)`, ...), so a command
line of its own can hold exactly the flags it reads; each function also
registers its validators on that FlagValues, so bad combinations are
rejected when the flags are parsed, before any model is built.
"""

from __future__ import annotations

import functools
import weakref
from typing import NoReturn

from absl import flags

from tfpar.cluster import Cluster, ClusterConfigError, Discovered, discover
from tfpar.parallel_dims import ParallelDims, ParallelDimsError
from tfpar.strategies.pipeline.schedules import SCHEDULES as _SCHEDULE_CLASSES

STRATEGIES = ("auto", "one_device", "data", "multi_worker", "sharded", "tensor", "pipeline")
ZERO_STAGES = (1, 2, 3)
ALL_REDUCE = ("auto", "nccl", "ring", "hierarchical_copy", "reduce_to_one")
PRECISIONS = ("float32", "mixed_bfloat16", "mixed_float16")
# Strategies whose flags exist but whose implementation has not landed yet.
NOT_YET_AVAILABLE: dict[str, str] = {}
# The schedules' one registry (pure Python): a schedule added there is a flag value here.
SCHEDULES = tuple(_SCHEDULE_CLASSES)
DEGREES = ("dp", "fsdp", "tp", "pp")

FLAGS = flags.FLAGS


def flag_group(define):
    """Makes `define(fv)` run once per FlagValues.

    A flag group (its flags and their validators) may be asked for by
    several modules and commands: the strategy flags by `tfpar train` and by
    any script importing this module, `--global_batch_size` by both the
    strategy flags and `tfpar plan`. absl refuses to define a flag twice, and
    a validator registered twice would run twice; the second call on the
    same FlagValues therefore does nothing::

        @flag_group
        def define_my_flags(fv):
            flags.DEFINE_integer("steps", 100, "Optimizer steps.", flag_values=fv)

        define_my_flags(fv); define_my_flags(fv)   # defines --steps once
    """
    done = weakref.WeakKeyDictionary()

    @functools.wraps(define)
    def define_once(fv: flags.FlagValues) -> flags.FlagValues:
        if fv not in done:
            done[fv] = True
            define(fv)
        return fv

    return define_once


# --------------------------------------------------------------- definitions
def define_flags(fv: flags.FlagValues, table: dict[str, tuple]) -> None:
    """Defines every flag of `table` on `fv`: {name: (absl DEFINE function, default, help)}.

        define_flags(fv, {"steps": (flags.DEFINE_integer, 100, "Optimizer steps.")})
    """
    for name, (define, default, help_text) in table.items():
        define(name, default, help_text, flag_values=fv)


def enum_flag(values):
    """The DEFINE function, for `define_flags`, of a flag that takes one of `values`."""
    def define(name, default, help_text, **kwargs):
        return flags.DEFINE_enum(name, default, values, help_text, **kwargs)
    return define


@flag_group
def define_batch_flags(fv: flags.FlagValues) -> None:
    """--global_batch_size: examples per optimizer step over the whole job."""
    flags.DEFINE_integer("global_batch_size", None,
                         "Examples per optimizer step over all replicas and workers.",
                         flag_values=fv)
    flags.register_validator("global_batch_size", _positive_or_none("global_batch_size"),
                             flag_values=fv)


@flag_group
def define_precision_flag(fv: flags.FlagValues) -> None:
    """--precision: the Keras dtype policy."""
    flags.DEFINE_enum("precision", "float32", PRECISIONS,
                      "Keras dtype policy. mixed_float16 adds dynamic loss scaling.",
                      flag_values=fv)


@flag_group
def define_schedule_flag(fv: flags.FlagValues) -> None:
    """--schedule: the pipeline schedule."""
    flags.DEFINE_enum("schedule", "1f1b", SCHEDULES,
                      "pipeline: gpipe (all forwards, then all backwards; stashes M "
                      "micro-batches), 1f1b (same bubble, stashes at most K), "
                      "interleaved_1f1b (V stages per device: bubble V times smaller; M a "
                      "multiple of K), zb_h1 (backward split in input and weight gradients: "
                      "a third of the bubble, 1F1B's peak memory) or zbv (V shape, 2 stages "
                      "per device, split backward: bubble near zero).",
                      flag_values=fv)


# The strategy flags, in the order --help lists them.
STRATEGY_FLAGS = {
    "strategy": (enum_flag(STRATEGIES), "auto",
        "How to spread training over devices (a shorthand for the degree flags). auto: "
        "from --dp/--tp/--pp if given, else multi_worker when a cluster is configured "
        "(TF_CONFIG or --worker_hosts), data when this host has several devices, else "
        "one_device."),
    "dp": (flags.DEFINE_integer, None,
        "Data-parallel degree: replicas that each see a share of every batch (default: "
        "every local device with --strategy=data)."),
    "fsdp": (flags.DEFINE_integer, None,
        "Sharded-data-parallel degree: devices that split each batch and, per "
        "--zero_stage, the optimizer state, gradients and weights (ZeRO/FSDP; default: "
        "every local device with --strategy=sharded)."),
    "zero_stage": (flags.DEFINE_integer, None,
        "With --fsdp: 1 shards the optimizer state, 2 also the gradients, 3 also the "
        "weights (FSDP). Default 3."),
    "tp": (flags.DEFINE_integer, None,
        "Tensor-parallel degree: devices that split each layer's weights (the mesh's "
        "model axis)."),
    "pp": (flags.DEFINE_integer, None,
        "Pipeline-parallel degree: stages the model's layers are cut into."),
    "worker_hosts": (flags.DEFINE_list, [],
        "Comma-separated host:port of every worker, for multi_worker without TF_CONFIG. "
        "Give the same list to every worker, and each its --task_index."),
    "chief_host": (flags.DEFINE_string, None,
        "host:port of a separate chief task (optional: by default worker 0 is the "
        "chief)."),
    "task_type": (enum_flag(["chief", "worker"]), "worker",
        "This process's role with --worker_hosts."),
    "task_index": (flags.DEFINE_integer, 0,
        "This process's index within its role, with --worker_hosts."),
    "num_simulated_devices": (flags.DEFINE_integer, 0,
        "Split the CPU into this many logical devices (for laptops and CI; they share "
        "the cores, so they show correctness, not speed). 0: off."),
    "all_reduce": (enum_flag(ALL_REDUCE), "auto",
        "Gradient all-reduce. data: auto|nccl|hierarchical_copy|reduce_to_one; "
        "multi_worker: auto|ring|nccl."),
    "reduce_dtype": (enum_flag(["float32", "bfloat16", "float16"]), "float32",
        "data, multi_worker: the dtype gradients are all-reduced in. bfloat16 or float16 "
        "halve the bytes on the wire (each gradient element rounded to 16 bits; the "
        "update stays in float32)."),
    "pack_bytes": (flags.DEFINE_integer, 0,
        "multi_worker: pack gradients into all-reduces of this many bytes (0: "
        "TensorFlow's default)."),
    "collective_timeout": (flags.DEFINE_float, 300.0,
        "multi_worker: seconds before a stuck all-reduce fails (0: never)."),
    "heartbeat_timeout": (flags.DEFINE_float, 10.0,
        "multi_worker: seconds without a heartbeat before a peer is declared dead and "
        "every worker fails; a pipeline across processes: seconds a stage process may "
        "stay silent before rank 0 exits with 211."),
    "register_timeout": (flags.DEFINE_float, 300.0,
        "multi_worker (and a pipeline across processes): seconds to wait at start-up for "
        "every worker to join before failing."),
    "per_replica_batch_size": (flags.DEFINE_integer, None,
        "Examples per optimizer step on each replica (device); the global batch is this "
        "times the number of replicas."),
    "mesh": (flags.DEFINE_string, None,
        "tensor: the device mesh, e.g. 'batch:2,model:2' (the same as --dp=2 --tp=2; "
        "batch x model = devices over all processes). Default: 'batch:1,model:N' over "
        "the N devices."),
    "layouts": (flags.DEFINE_string, "megatron",
        "tensor: how weights are split: 'megatron' (column/row-parallel MLP, attention "
        "by heads, vocabulary-split embedding) or 'replicated'. tfpar train "
        "--model=keras_hub:<family>: 'megatron' means the backbone's own get_layout_map "
        "where keras-hub has one (Gemma, Llama, Qwen)."),
    "pipeline_stages": (flags.DEFINE_integer, 0,
        "pipeline: number of stages K, the same as --pp (0: one per local device, or as "
        "many as --split_points make). Cuts balance the stages' parameter counts."),
    "microbatches": (flags.DEFINE_integer, 1,
        "pipeline: micro-batches M per batch; the per-replica batch should divide by "
        "it. More micro-batches shrink the bubble (K-1)/(M+K-1)."),
    "split_points": (flags.DEFINE_list, [],
        "pipeline: names of the layers that begin stages 1..K-1, e.g. block_2,block_4 "
        "(default: balanced automatic cuts)."),
    "virtual_stages": (flags.DEFINE_integer, 0,
        "pipeline: model stages per device V, for --schedule=interleaved_1f1b (default 2; "
        "the model is cut into K x V stages, device d holding d, d+K, ...) and zbv "
        "(always 2). 0: the schedule's own."),
    "pipeline_replicas": (flags.DEFINE_integer, 1,
        "pipeline: data-parallel copies of the pipeline on this host, the same as --dp "
        "(stages x replicas devices)."),
}


@flag_group
def define_strategy_flags(fv: flags.FlagValues) -> None:
    """The flags `from_flags()` reads: strategy, degrees, cluster, batch, precision."""
    define_batch_flags(fv)
    define_precision_flag(fv)
    define_schedule_flag(fv)
    define_flags(fv, STRATEGY_FLAGS)

    # Each rule is registered on its own, so an error names only its own flags.
    register = functools.partial(flags.register_validator, flag_values=fv)
    register_multi = functools.partial(flags.register_multi_flags_validator, flag_values=fv)
    register("strategy", lambda v: _strategy_available({"strategy": v}),
             message="--strategy not available")
    register("mesh", lambda v: v is None or _mesh_ok(v))
    register("layouts", lambda v: _check(
        v in ("megatron", "replicated"),
        f"--layouts={v}: use 'megatron' or 'replicated' (custom LayoutMaps are given in code: "
        "tfpar.TensorParallel(mesh, layout_map))."))
    for name in ("num_simulated_devices", "pack_bytes", "collective_timeout"):
        register(name, _non_negative(name))
    for name in ("heartbeat_timeout", "register_timeout"):
        register(name, _positive(name))
    for name in DEGREES:
        register(name, _degree(name))
    register_multi(["strategy", "zero_stage", "fsdp"], _zero_stage_fits)
    register_multi([*DEGREES, "zero_stage"], _runnable_degrees)
    register_multi(["global_batch_size", "per_replica_batch_size"], _one_batch_size)
    register_multi(["strategy", "worker_hosts", "chief_host", "task_type", "task_index"],
                   _cluster_hosts)
    register_multi(["strategy", "all_reduce"], _all_reduce_fits_strategy)
    register_multi(["strategy", "reduce_dtype", *DEGREES], _reduce_dtype_fits_strategy)
    register_multi(["strategy", "pipeline_stages", "microbatches", "split_points",
                    "pipeline_replicas", "num_simulated_devices", "dp", "pp", "schedule",
                    "virtual_stages"], _pipeline_flags)
    register_multi(["strategy", "mesh", "pipeline_stages", "split_points", "pipeline_replicas",
                    "schedule", "virtual_stages", *DEGREES], _shorthands_agree)
    register_multi(["schedule", "virtual_stages", "microbatches", "pipeline_stages",
                    "split_points", "pp"], _schedule_fits)


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
    return _positive_or_none("per_replica_batch_size")(f["per_replica_batch_size"])


def _positive_or_none(name):
    def check(value):
        return _check(value is None or value > 0, f"--{name}={value}: must be > 0.")
    return check


def _non_negative(name):
    def check(value):
        return _check(value >= 0, f"--{name}={value}: must be >= 0.")
    return check


def _positive(name):
    def check(value):
        return _check(value > 0, f"--{name}={value}: must be > 0 seconds.")
    return check


def _degree(name):
    def check(value):
        return _check(value is None or value >= 1,
                      f"--{name}={value}: a parallel degree is a whole number >= 1 (1 turns "
                      "that dimension off).")
    return check


def _runnable_degrees(f) -> bool:
    given = {k: f[k] for k in DEGREES if f[k] is not None and f[k] >= 1}
    stage = f["zero_stage"] if f["zero_stage"] in ZERO_STAGES else 3
    reason = ParallelDims(**given, zero_stage=stage).unsupported()
    return _check(reason is None, f"{' '.join(f'--{k}={v}' for k, v in given.items())}: "
                                  f"{reason}.")


def _zero_stage_fits(f) -> bool:
    stage = f["zero_stage"]
    if stage is None:
        return True
    _check(stage in ZERO_STAGES, f"--zero_stage={stage}: use 1 (optimizer state sharded), 2 "
                                 "(+ gradients) or 3 (+ weights, FSDP).")
    return _check(f["strategy"] == "sharded" or (f["fsdp"] or 1) > 1,
                  f"--zero_stage={stage} chooses what sharded data parallelism splits, but "
                  "the job has none; add --fsdp=N (or --strategy=sharded) or drop "
                  "--zero_stage.")


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
    stages, points, v = f["pipeline_stages"], f["split_points"], _virtual_stages(f)
    if points:
        _check(len(set(points)) == len(points),
               f"--split_points={','.join(points)}: names a layer twice; each split point "
               "begins a new stage.")
        how = ("give K-1 split points for K stages" if v == 1 else
               f"give K x V - 1 split points for K devices of V={v} stages each")
        _check(not stages or stages * v == len(points) + 1,
               f"--pipeline_stages={stages} but --split_points={','.join(points)} make "
               f"{len(points) + 1} stages; {how}, or drop --pipeline_stages.")
    pipeline = f["strategy"] == "pipeline" or (f["pp"] or 1) > 1
    pipeline_only = [f"--{n}" for n, default in (("pipeline_stages", 0), ("microbatches", 1),
                                                  ("pipeline_replicas", 1),
                                                  ("virtual_stages", 0))
                     if f[n] != default] + (["--split_points"] if points else [])
    if pipeline_only:
        _check(pipeline,
               f"{', '.join(pipeline_only)} configure the pipeline, but --strategy="
               f"{f['strategy']}; add --strategy=pipeline (or --pp=K) or drop them.")
    if pipeline and f["num_simulated_devices"]:
        need = (max(stages, (len(points) + 1) // v, f["pp"] or 0)
                * max(f["pipeline_replicas"], f["dp"] or 1))
        # Across processes (a pipeline rank 0 drives) each process holds its share.
        processes = _processes_in_environment()
        share = -(-need // processes)
        over = f" over {processes} processes" if processes > 1 else ""
        _check(need < 2 or f["num_simulated_devices"] >= share,
               f"--num_simulated_devices={f['num_simulated_devices']} is fewer than the "
               f"{need} devices the pipeline needs (stages x replicas){over}; use "
               f"--num_simulated_devices={share}.")
    return True


def _processes_in_environment() -> int:
    """Training processes of the cluster TF_CONFIG or a pod's environment
    describes (1 without one)."""
    try:
        found = discover()
    except ClusterConfigError:
        return 1  # reported where the cluster is built, with the flags' context
    return found.cluster.num_workers if found is not None else 1


def _virtual_stages(f) -> int:
    """V: --virtual_stages, or the schedule's own (0 or absent)."""
    from tfpar.strategies.pipeline.schedules import default_virtual_stages

    return f.get("virtual_stages") or default_virtual_stages(f.get("schedule", "1f1b"))


def _schedule_fits(f) -> bool:
    from tfpar.strategies.pipeline import schedules

    schedule, v = f["schedule"], f["virtual_stages"]
    _check(v >= 0, f"--virtual_stages={v}: must be >= 0 (0: the schedule's own).")
    v = v or schedules.default_virtual_stages(schedule)
    reason = schedules.virtual_stages_error(schedule, v)
    _check(reason is None, f"--schedule={schedule} --{reason}.")
    points = f["split_points"]
    devices = f["pp"] or f["pipeline_stages"] or 0
    if points and not devices:
        _check((len(points) + 1) % v == 0,
               f"--split_points make {len(points) + 1} stages, which do not fill K devices of "
               f"--virtual_stages={v}; give K x {v} - 1 split points.")
        devices = (len(points) + 1) // v
    if devices > 1:
        reason = schedules.get(schedule, v).check(devices, f["microbatches"])
        _check(reason is None, f"--schedule={schedule} --microbatches={f['microbatches']}: "
                               f"{reason}")
    return True


def _reduce_dtype_fits_strategy(f) -> bool:
    if f["reduce_dtype"] == "float32":
        return True
    other = [f"--{k}={f[k]}" for k in ("fsdp", "tp", "pp") if (f[k] or 1) > 1]
    if f["strategy"] not in ("auto", "data", "multi_worker"):
        other.insert(0, f"--strategy={f['strategy']}")
    return _check(not other,
                  f"--reduce_dtype={f['reduce_dtype']} compresses the gradient all-reduce of "
                  f"--strategy=data and multi_worker; {' '.join(other)} reduces gradients "
                  "inside its DTensor or pipeline step, where tfpar cannot cast them yet. Drop "
                  "--reduce_dtype, or use --dp.")


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


# The degrees each --strategy leaves off (1); the others it leaves to the
# devices or to the other flags.
_STRATEGY_OFF = {"one_device": DEGREES, "data": ("fsdp", "tp", "pp"), "sharded": ("pp",),
                 "multi_worker": ("fsdp", "tp", "pp"), "tensor": ("fsdp", "pp"),
                 "pipeline": ("fsdp", "tp")}


def _shorthand_degrees(f) -> dict[str, tuple[int, str]]:
    """The degrees the shorthand flags fix: {degree: (value, the flag that fixes it)}.

    >>> _shorthand_degrees({"strategy": "tensor", "mesh": "batch:2,model:2", ...})
    {"fsdp": (1, "--strategy=tensor"), "pp": (1, ...), "dp": (2, "--mesh=batch:2,model:2"),
     "tp": (2, "--mesh=batch:2,model:2")}
    """
    strategy = f["strategy"]
    fixed = {k: (1, f"--strategy={strategy}") for k in _STRATEGY_OFF.get(strategy, ())}
    if f["mesh"] and strategy in ("auto", "tensor"):
        try:
            mesh = ParallelDims.from_mesh(f["mesh"])
        except ParallelDimsError:
            mesh = None  # axes other than tfpar's: the mesh is the tensor strategy's alone
        if mesh is not None:
            fixed.update({k: (getattr(mesh, k), f"--mesh={f['mesh']}") for k in DEGREES
                          if getattr(mesh, k) > 1 or k in ("dp", "tp")})
    if f["split_points"]:
        fixed["pp"] = ((len(f["split_points"]) + 1) // _virtual_stages(f),
                       f"--split_points={','.join(f['split_points'])}")
    if f["pipeline_stages"]:
        fixed["pp"] = (f["pipeline_stages"], f"--pipeline_stages={f['pipeline_stages']}")
    if f["pipeline_replicas"] != 1:
        fixed["dp"] = (f["pipeline_replicas"], f"--pipeline_replicas={f['pipeline_replicas']}")
    return fixed


def _shorthands_agree(f) -> bool:
    fixed = _shorthand_degrees(f)
    for k in DEGREES:
        if f[k] is not None and k in fixed and fixed[k][0] != f[k]:
            value, flag = fixed[k]
            _check(False, f"{flag} and --{k}={f[k]} disagree: {flag} means --{k}={value}. "
                          f"Give one of them, or make them agree.")
    return True


define_strategy_flags(FLAGS)


# ------------------------------------------------------------- from the flags
def discover_from_flags(flag_values: flags.FlagValues = FLAGS) -> Discovered | None:
    """The cluster the flags name, else the one found where this runs, else None.

    Without --worker_hosts, `tfpar.cluster.discover()` looks at TF_CONFIG,
    then a Kubernetes JobSet or Indexed Job pod's environment. Raises
    ClusterConfigError if both the flags and the environment name one: two
    sources of truth for a cluster are a mistake waiting to happen.
    """
    f = flag_values
    found = discover()
    if f.worker_hosts:
        if found is not None:
            source = "TF_CONFIG" if found.source == "TF_CONFIG" else \
                f"the Kubernetes {found.source} environment"
            raise ClusterConfigError(
                f"both {source} and --worker_hosts describe a cluster; use one "
                f"(unset {'TF_CONFIG' if found.source == 'TF_CONFIG' else 'TFPAR_NUM_WORKERS'} "
                "or drop --worker_hosts)."
            )
        return Discovered(Cluster.from_hosts(
            f.worker_hosts, task_type=f.task_type,
            task_index=f.task_index, chief_host=f.chief_host,
        ), "flags")
    return found


def cluster_from_flags(flag_values: flags.FlagValues = FLAGS) -> Cluster | None:
    """The cluster of `discover_from_flags()`, or None."""
    found = discover_from_flags(flag_values)
    return None if found is None else found.cluster


def _given_degrees(f) -> dict[str, int]:
    return {k: f[k].value for k in DEGREES if f[k].value is not None}


def resolve_strategy_name(flag_values: flags.FlagValues = FLAGS) -> str:
    """--strategy with "auto" resolved (without building anything).

    auto follows the degree flags (and --mesh) when given; else a cluster
    means multi_worker, several local devices data, one device one_device.
    """
    f = flag_values
    if f.strategy != "auto":
        return f.strategy
    fixed = {k: v for k, (v, _) in _shorthand_degrees(_values(f)).items()}
    given = fixed | _given_degrees(f)
    if given:
        multi_process = cluster_from_flags(f) is not None
        return ParallelDims(**given).strategy_kind(multi_process=multi_process)
    if cluster_from_flags(f) is not None:
        return "multi_worker"
    if f.num_simulated_devices > 1:
        return "data"
    import tensorflow as tf

    if len(tf.config.list_physical_devices("GPU")) > 1:
        return "data"
    return "one_device"


def _values(f) -> dict:
    return {name: f[name].value for name in f}


def _local_device_count(f) -> int:
    """Devices one process trains on: --num_simulated_devices, else its GPUs or CPUs."""
    if f.num_simulated_devices:
        return f.num_simulated_devices
    from tfpar.devices import local_devices

    return len(local_devices())


def dims_from_flags(flag_values: flags.FlagValues = FLAGS) -> ParallelDims:
    """The parallel degrees the flags give, from the degree flags or their shorthands.

    ::

        --dp=2 --tp=2                                    ParallelDims(dp=2, tp=2)
        --strategy=tensor --mesh=batch:2,model:2         the same
        --strategy=pipeline --pipeline_stages=4 --pipeline_replicas=2 --microbatches=8
                                                         ParallelDims(pp=4, dp=2, microbatches=8)
        --strategy=data                                  ParallelDims(dp=<local devices>)

    A degree the shorthands leave open is filled from the devices: --strategy=data
    uses every local device, --strategy=tensor without --mesh or --tp puts them all
    on the model axis, --strategy=pipeline without --pipeline_stages makes one
    stage per device. Across workers (multi_worker) dp stays 1 unless --dp is
    given: the strategy counts every device of every worker.
    """
    from tfpar.strategies.tensor.mesh import num_clients

    f = flag_values
    name = resolve_strategy_name(f)
    degrees = dict.fromkeys(DEGREES, 1)
    degrees.update({k: v for k, (v, _) in _shorthand_degrees(_values(f)).items()})
    given = _given_degrees(f)
    degrees.update(given)
    fixed = set(_shorthand_degrees(_values(f))) | set(given)
    if name == "data" and "dp" not in fixed:
        degrees["dp"] = _local_device_count(f)
    elif name == "sharded" and "fsdp" not in fixed:
        degrees["fsdp"] = max(1, _local_device_count(f) * num_clients()
                              // (degrees["tp"] * degrees["dp"]))
    elif name == "tensor" and "tp" not in fixed:
        degrees["tp"] = max(1, _local_device_count(f) * num_clients() // degrees["dp"])
    elif name == "pipeline" and "pp" not in fixed:
        cluster = cluster_from_flags(f)
        processes = cluster.num_workers if cluster is not None else 1
        degrees["pp"] = max(1, _local_device_count(f) * processes // degrees["dp"])
    if degrees["pp"] > 1:
        return ParallelDims(**degrees, microbatches=f.microbatches, schedule=f.schedule,
                            virtual_stages=f.virtual_stages or None,
                            zero_stage=f.zero_stage or 3)
    return ParallelDims(**degrees, zero_stage=f.zero_stage or 3)


def from_flags(flag_values: flags.FlagValues = FLAGS):
    """Builds the strategy the flags ask for: `tfpar.strategies.build(dims_from_flags())`.

    Applies --num_simulated_devices and --precision first (both must happen
    before TensorFlow initializes), then builds OneDevice, DataParallel,
    MultiWorker, TensorParallel or Pipeline. Call it once, at the top of
    `main`. Raises ParallelDimsError when the degrees do not fit the devices.

    A pipeline across processes (--pp under `tfpar launch` or with a
    cluster) is driven by rank 0: on every other rank this call serves the
    process's devices until rank 0 ends, then exits the process
    (`tfpar.cluster.single_controller`), so the code after it runs on rank 0
    only. With --tp or --fsdp every rank returns its own stage's pipeline
    and runs the code after it (`tfpar.strategies.pipeline.process_stages`).
    """
    from tfpar.devices import simulate_devices
    from tfpar.precision import set_precision
    from tfpar.strategies import build
    from tfpar.strategies.tensor.mesh import num_clients

    f = flag_values
    name = resolve_strategy_name(f)
    if name in ("tensor", "sharded"):
        _export_dtensor_clients(f)
    cluster = dims = None
    if name == "pipeline":
        cluster = cluster_from_flags(f)
        dims = dims_from_flags(f)
        if cluster is not None and cluster.num_workers > 1 and cluster.rank > 0 \
                and dims.tp == 1 and dims.fsdp == 1:  # else every rank refuses, in build
            _serve_pipeline_devices(f, cluster)  # does not return
    # A multi-client DTensor mesh makes its own logical devices
    # (dtensor.initialize_accelerator_system); splitting them here would clash.
    if f.num_simulated_devices and not (name in ("tensor", "sharded") and num_clients() > 1):
        simulate_devices(f.num_simulated_devices)
    set_precision(f.precision)
    if name == "multi_worker":
        cluster = cluster_from_flags(f)
        if cluster is None:
            raise ClusterConfigError(
                "--strategy=multi_worker needs a cluster: run under `tfpar "
                "launch`, in a pod of `tfpar k8s render`, set TF_CONFIG, or pass "
                "--worker_hosts and --task_index."
            )
    return build(
        dims or dims_from_flags(f), kind=name, cluster=cluster, layouts=f.layouts,
        split_points=f.split_points or None, all_reduce=f.all_reduce,
        reduce_dtype=None if f.reduce_dtype == "float32" else f.reduce_dtype,
        num_local_devices=f.num_simulated_devices or None,
        multi_worker={"pack_bytes": f.pack_bytes,
                      "collective_timeout_s": f.collective_timeout or None,
                      "heartbeat_timeout_s": f.heartbeat_timeout,
                      "register_timeout_s": f.register_timeout})


def _serve_pipeline_devices(f, cluster) -> NoReturn:
    """Ranks > 0 of a pipeline across processes: serve this process's devices
    to rank 0, which runs the program, and exit when it ends
    (`tfpar.cluster.single_controller`)."""
    import sys

    from tfpar.cluster import single_controller

    sys.exit(single_controller.serve(
        cluster, num_local_devices=f.num_simulated_devices or None,
        register_timeout_s=f.register_timeout))


def _export_dtensor_clients(f):
    """In a Kubernetes pod (or with TF_CONFIG / --worker_hosts) the discovered
    cluster is the DTensor client list, unless a launcher already set it."""
    import os

    cluster = cluster_from_flags(f)
    if cluster is not None and "DTENSOR_JOBS" not in os.environ:
        os.environ.update(cluster.dtensor_env())


def global_batch_size(strategy, default: int | None = None,
                      flag_values: flags.FlagValues = FLAGS) -> int:
    """The global batch the flags ask for, checked against the replica count.

    --per_replica_batch_size wins if given; else --global_batch_size; else
    `default` (a global batch).
    """
    from tfpar.data import resolve_global_batch_size

    f = flag_values
    return resolve_global_batch_size(
        strategy,
        global_batch_size=f.global_batch_size
        if f.global_batch_size or f.per_replica_batch_size else default,
        per_replica_batch_size=f.per_replica_batch_size,
    )
