"""The strategy that runs a `ParallelDims`: one function, every degree.

    strategy = tfpar.strategies.build(tfpar.ParallelDims(dp=2, tp=2))   # TensorParallel
    strategy = tfpar.strategies.build(tfpar.ParallelDims(pp=4, microbatches=8))  # Pipeline
    strategy.dims == ParallelDims(dp=2, tp=2)                           # it reports the same

Which strategy runs which degrees:

| degrees | strategy |
| --- | --- |
| all 1 | `OneDevice` |
| dp (one process) | `DataParallel` over dp local devices |
| dp (a cluster) | `MultiWorker`: dp is every replica of every worker |
| tp (x dp) | `TensorParallel` on the mesh "batch:dp,model:tp" |
| fsdp (x tp, or x dp: HSDP) | `ShardedDataParallel` (ZeRO-`zero_stage`) on "batch:dp*fsdp,model:tp" |
| pp (x dp) | `Pipeline` with pp stages and dp replicas |
| pp (x dp) across processes | `Pipeline` driven by rank 0 over every process's devices (`tfpar.cluster.single_controller`) |
| pp (x dp) across processes x tp/fsdp (x dp) inside each | `Pipeline` with a `ProcessGroup`: every process runs its own stage's mesh (`tfpar.strategies.pipeline.process_stages`) |
| pp x tp (x dp) | `Pipeline` whose stages are DTensor meshes "batch:dp,model:tp" (`stage_meshes`), one process |
| pp x fsdp (x tp) | `Pipeline` whose stage meshes "batch:fsdp,model:tp" shard their weights (ZeRO-3) |
"""

from __future__ import annotations

from tfpar.parallel_dims import ParallelDims, ParallelDimsError


# The degrees each strategy can run besides data replicas.
_RUNS = {"one_device": (), "data": (), "multi_worker": (), "tensor": ("tp",),
         "sharded": ("fsdp", "tp"), "pipeline": ("pp", "tp", "fsdp")}


def build(dims: ParallelDims, *, kind: str | None = None, cluster=None, layouts="megatron",
          split_points=None, all_reduce: str = "auto", num_local_devices: int | None = None,
          multi_worker: dict | None = None, reduce_dtype: str | None = None):
    """Builds the tfpar strategy that runs `dims`.

    Args:
      dims: the degrees.
      kind: the strategy to run them with, when the user named one (a tensor
        mesh with a model axis of 1 is still `TensorParallel`); default: the
        one `dims.strategy_kind()` picks.
      cluster: a `tfpar.cluster.Cluster` when this process is one of several
        (data parallelism across workers, a multi-client tensor mesh, or a
        pipeline across processes, which rank 0 drives).
      layouts: `TensorParallel`'s LayoutMap or preset name.
      split_points: `Pipeline`'s cut points (layer names), else balanced cuts.
      all_reduce: `DataParallel`'s all-reduce, or `MultiWorker`'s communication.
      num_local_devices: devices per process of a multi-client mesh (CPU).
      multi_worker: further `MultiWorker` arguments (timeouts, pack_bytes); a
        pipeline across processes takes its heartbeat and register timeouts.
      reduce_dtype: `DataParallel`'s and `MultiWorker`'s gradient all-reduce dtype.

    Raises ParallelDimsError when the degrees do not fit the devices, or
    when this release cannot run them.
    """
    from tfpar import strategies
    from tfpar.devices import local_devices

    default = dims.strategy_kind(multi_process=cluster is not None)
    kind = kind or default
    if kind not in _RUNS:
        raise ParallelDimsError(f"strategy {kind!r}: use one of {sorted(_RUNS)}.")
    extra = [f"{k}={getattr(dims, k)}" for k in ("fsdp", "tp", "pp")
             if getattr(dims, k) > 1 and k not in _RUNS[kind]]
    if extra or (kind == "one_device" and dims.world_size > 1):
        raise ParallelDimsError(
            f"the {kind} strategy cannot run {dims} ({', '.join(extra) or f'dp={dims.dp}'}); "
            f"these degrees run as {default}.")
    if reduce_dtype is not None and kind not in ("data", "multi_worker"):
        raise ParallelDimsError(
            f"reduce_dtype={reduce_dtype!r} compresses the gradient all-reduce of the data and "
            f"multi_worker strategies; {kind} ({dims}) reduces gradients inside its step. "
            "Leave it out, or use data parallelism.")
    if kind == "one_device":
        return strategies.OneDevice()
    if kind == "data":
        devices = local_devices()
        if dims.dp > len(devices):
            dims.validate(len(devices))
        return strategies.DataParallel(devices=devices[:dims.dp], all_reduce=all_reduce,
                                       reduce_dtype=reduce_dtype)
    if kind == "multi_worker":
        strategy = strategies.MultiWorker(
            cluster=cluster, communication="auto" if all_reduce == "auto" else all_reduce,
            reduce_dtype=reduce_dtype, **(multi_worker or {}))
        if dims.dp > 1 and strategy.num_replicas_in_sync != dims.dp:
            raise ParallelDimsError(
                f"dp={dims.dp}, but the cluster has {strategy.num_replicas_in_sync} replicas "
                f"({strategy.num_workers} workers); across workers every device is a "
                "data-parallel replica: drop --dp, or match it.")
        return strategy
    if kind == "sharded":
        return strategies.ShardedDataParallel(
            dims.fsdp, dims.zero_stage, dp=dims.dp, tp=dims.tp,
            layout_map=layouts if dims.tp > 1 else "replicated",
            num_local_devices=num_local_devices)
    if kind == "tensor":
        return strategies.TensorParallel(dims.mesh_spec(), layouts,
                                         num_local_devices=num_local_devices)
    devices = group = None
    local_dp = dims.dp
    if cluster is not None and cluster.num_workers > 1:
        if dims.tp > 1 or dims.fsdp > 1:
            group, local_dp = _process_group(dims, cluster, multi_worker or {})
        else:
            devices = _devices_across_processes(dims, cluster, multi_worker or {})
    return strategies.Pipeline(stages=dims.pp, split_points=split_points,
                               microbatches=dims.microbatches, schedule=dims.schedule,
                               virtual_stages=dims.virtual_stages, replicas=local_dp,
                               tensor_parallel=dims.tp, fsdp=dims.fsdp, devices=devices,
                               layout_map=layouts if dims.tp > 1 else "megatron",
                               process_group=group)


def _process_group(dims: ParallelDims, cluster, timeouts: dict):
    """Tensor-parallel (or sharded) stages across processes: each process holds
    one stage's mesh (or one data-parallel replica's share of it) and runs that
    stage itself (`tfpar.strategies.pipeline.process_stages`). Returns the
    group and the data-parallel devices inside each process."""
    from tfpar.cluster.process_group import ProcessGroup

    per_stage, local_dp = dims.process_stages(cluster.num_workers)
    group = ProcessGroup.from_cluster(
        cluster, heartbeat_timeout_s=timeouts.get("heartbeat_timeout_s", 30.0),
        connect_timeout_s=timeouts.get("register_timeout_s", 300.0))
    return group, local_dp


def _devices_across_processes(dims: ParallelDims, cluster, timeouts: dict) -> list[list[str]]:
    """The pipeline's devices when its stages live in several processes: rank 0
    connects to every process (`tfpar.cluster.single_controller`) and lays the
    job's devices out pipeline-outermost, then data (stage k's replica r is
    device k*dp + r in rank order), as `ParallelDims.coordinates` does."""
    from tfpar.cluster import single_controller

    if cluster.rank != 0:
        raise ParallelDimsError(
            f"rank {cluster.rank} of a pipeline across processes serves its devices to rank "
            "0 and builds no strategy: call tfpar.cluster.single_controller.serve(cluster) "
            "there (tfpar.flags.from_flags does).")
    per_process = single_controller.connect(
        cluster, heartbeat_timeout_s=timeouts.get("heartbeat_timeout_s", 10.0),
        register_timeout_s=timeouts.get("register_timeout_s", 300.0))
    flat = [device for devices in per_process for device in devices]
    if dims.pp * dims.dp != len(flat):
        raise ParallelDimsError(
            f"{dims} needs pp x dp = {dims.pp * dims.dp} devices, but the job has "
            f"{len(per_process)} processes x {len(per_process[0])} devices = {len(flat)}. "
            "Change --pp/--dp, the number of processes, or the devices per process.")
    return [[flat[k * dims.dp + r] for k in range(dims.pp)] for r in range(dims.dp)]
