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
| pp x tp (x dp) | `Pipeline` whose stages are DTensor meshes "batch:dp,model:tp" (`stage_meshes`) |
| fsdp x pp | refused: not in this release (`ParallelDims.unsupported`) |
"""

from __future__ import annotations

from tfpar.parallel_dims import ParallelDims, ParallelDimsError


# The degrees each strategy can run besides data replicas.
_RUNS = {"one_device": (), "data": (), "multi_worker": (), "tensor": ("tp",),
         "sharded": ("fsdp", "tp"), "pipeline": ("pp", "tp")}


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
        (data parallelism across workers, or a multi-client tensor mesh).
      layouts: `TensorParallel`'s LayoutMap or preset name.
      split_points: `Pipeline`'s cut points (layer names), else balanced cuts.
      all_reduce: `DataParallel`'s all-reduce, or `MultiWorker`'s communication.
      num_local_devices: devices per process of a multi-client mesh (CPU).
      multi_worker: further `MultiWorker` arguments (timeouts, pack_bytes).
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
    if dims.tp > 1 and cluster is not None:
        raise ParallelDimsError(
            f"{dims}: a pipeline of tensor-parallel stages runs in one process (its stage "
            "meshes copy activations between each other, which DTensor does only between "
            "meshes of the same processes); run it without tfpar launch, on one host.")
    return strategies.Pipeline(stages=dims.pp, split_points=split_points,
                               microbatches=dims.microbatches, schedule=dims.schedule,
                               virtual_stages=dims.virtual_stages, replicas=dims.dp,
                               tensor_parallel=dims.tp,
                               layout_map=layouts if dims.tp > 1 else "megatron")
