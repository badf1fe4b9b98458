"""`tfpar plan`: recommends data, tensor and pipeline degrees (`tfpar.plan`)."""

from __future__ import annotations

import sys

from tfpar import flags as tfpar_flags
from tfpar.cli.flags import Command, write_error
from tfpar.models.flags import define_model_flags
from tfpar.plan import flags as plan_flags


def _define_shared_flags(fv) -> None:
    """--global_batch_size, --precision, --schedule: the same flags as tfpar train's."""
    tfpar_flags.define_batch_flags(fv)
    tfpar_flags.define_precision_flag(fv)
    tfpar_flags.define_schedule_flag(fv)


def run(fv, program) -> int:
    from tfpar.plan import recommend
    from tfpar.plan.render import dumps, mesh_png, schedule_png, table

    try:
        result = recommend(plan_flags.workload_from_flags(fv), plan_flags.hardware_from_flags(fv),
                           runnable_only=fv.runnable_only)
    except ValueError as e:
        write_error("plan", str(e))
        return 2
    print(dumps(result) if fv.format == "json" else table(result, top=fv.top))
    best = result.best
    if best is None:
        sys.stderr.write(f"tfpar plan: {result.reasons[0]}\n")
        return 1
    if fv.timeline_png:
        dims = best.dims
        schedule_png(fv.timeline_png, max(dims.pp, 2), best.microbatches,
                     f"data={dims.dp} tensor={dims.tp} pipeline={dims.pp}: "
                     f"{max(dims.pp, 2)} stages, {best.microbatches} micro-batches")
    if fv.mesh_png:
        try:
            mesh_png(fv.mesh_png, best.dims, result.hardware.devices_per_node)
        except ValueError as e:
            write_error("plan", str(e))
            return 2
    return 0


COMMAND = Command(
    name="plan",
    summary="recommend data/tensor/pipeline degrees for a model and a cluster",
    usage="--model SIZE --devices N --global_batch_size B [--devices_per_node G] "
          "[--device_memory GIB] [--precision P] [--format table|json] ...",
    example="tfpar plan --model=gpt3-175b --devices=1024 --global_batch_size=1536 "
            "--precision=mixed_bfloat16 --recompute=full",
    groups=(("model", define_model_flags),
            ("shared with tfpar train", _define_shared_flags),
            ("plan", plan_flags.define_plan_flags)),
    run=run,
)
