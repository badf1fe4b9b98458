"""The timeline of a pipeline step from TensorFlow's profiler: for stage meshes (3-D runs).

`Pipeline(record_timeline=True)` times actions with Python markers on the
data path, which DTensor programs cannot run. TensorFlow's profiler records
every op a DTensor program runs, though, and keeps the runner's name scopes
(measured on TensorFlow 2.21: an op of the forward of micro-batch 1 on model
stage 1 is "tf.StatefulPartitionedCall/F1_stage1/...", one call prefix per
mesh; its gradient ops are "…/gradient_tape/F1_stage1/..."). So one
profiled step gives each action's span: from the first of its ops to start
to the last to end. The spans go into a `Timeline`, with its step time,
bubble fraction, order and Chrome trace (one track per stage mesh, named by
its devices: every device of a mesh runs the same program).

A gradient op carries its forward's scope whichever action runs it, so a
split backward's B (input gradients) and W (weight gradients) cannot be told
apart by name: schedules with a split backward (ZB-H1, ZBV) are refused.

Example::

    strategy = tfpar.Pipeline(stages=2, tensor_parallel=2, microbatches=4)
    ...
    model.fit(x, y, batch_size=16, epochs=1)          # traced once
    timeline = profile_step(strategy, model, x[:16], y[:16])
    timeline.order()            # {(0, 0): ["F0", "F1", "B0", ...], (0, 1): [...]}
    timeline.save_chrome_trace("three_d.json")
"""

from __future__ import annotations

import glob
import re
import shutil
import tempfile

from tfpar.strategies.pipeline.timeline import Span, Timeline

# An action's scope inside an op name: "F3_stage1", "W0_stage2_replica1", with
# "gradient_tape/" before it on the ops the backward of that forward runs.
_ACTION = re.compile(r"(?:^|/)(gradient_tape/)?([FBW])(\d+)_stage(\d+)(?:_replica(\d+))?/")


class ProfileError(ValueError):
    """A step that the profiler cannot split into actions."""


def action_of(op_name: str) -> tuple[str, int, int, int] | None:
    """(kind, micro-batch, model stage, replica) of the action that ran an op, from
    its name; None for ops outside actions (the optimizer's update, the loss sum).

    >>> action_of("tf.StatefulPartitionedCall/gradient_tape/F1_stage0/dense/MatMul")
    ('B', 1, 0, 0)
    """
    match = _ACTION.search(op_name)
    if match is None:
        return None
    gradient, kind, microbatch, stage, replica = match.groups()
    return ("B" if gradient else kind), int(microbatch), int(stage), int(replica or 0)


def profile_step(strategy, model, x, y=None, sample_weight=None) -> Timeline:
    """Runs one training step of `model` on the batch (x, y) under TensorFlow's
    profiler and returns its actions' spans as a `Timeline` (step 0).

    Train once before (the step is traced then; tracing is not in the profile).
    Raises ProfileError for a schedule with a split backward, or if the
    profile holds no action of the step.
    """
    import tensorflow as tf
    from tensorflow.tsl.profiler.protobuf import xplane_pb2  # TF 2.21's XSpace proto

    if strategy.schedule.split_backward:
        raise ProfileError(
            f"schedule {strategy.schedule.name!r} splits the backward into B and W, whose "
            "ops carry the same names (their forward's scope); profile a schedule without "
            "a split backward (gpipe, 1f1b, interleaved_1f1b), or use record_timeline=True "
            "on device stages.")
    logdir = tempfile.mkdtemp(prefix="tfpar-profile-")
    try:
        tf.profiler.experimental.start(logdir)
        try:
            model.train_on_batch(x, y, sample_weight=sample_weight)
        finally:
            tf.profiler.experimental.stop()
        paths = glob.glob(f"{logdir}/**/*.xplane.pb", recursive=True)
        space = xplane_pb2.XSpace()
        with open(paths[0], "rb") as f:
            space.ParseFromString(f.read())
    finally:
        shutil.rmtree(logdir, ignore_errors=True)

    rank_of = {stage.spec.index: stage.rank for stage in strategy.stages}
    first, last = {}, {}  # action -> its first op's start, its last op's end
    for plane in space.planes:
        if not plane.name.startswith("/host:"):
            continue
        names = plane.event_metadata
        for line in plane.lines:
            for event in line.events:
                action = action_of(names[event.metadata_id].name)
                if action is None:
                    continue
                start = line.timestamp_ns * 1e-9 + event.offset_ps * 1e-12
                end = start + event.duration_ps * 1e-12
                first[action] = min(first.get(action, start), start)
                last[action] = max(last.get(action, end), end)
    if not last:
        raise ProfileError("the profile holds no op of the step's actions; train once before "
                           "profiling, so that the step runs (not traces) here.")
    return _timeline(strategy, rank_of, first, last)


def _timeline(strategy, rank_of, first, last) -> Timeline:
    """Spans from each action's first and last op.

    An action ends with its last op (its outputs). Its start is when it could
    run: when its device's previous action and the actions it reads had ended,
    as the marker timeline dates it. Its first op is no guide: ops that read
    only weights or the step's inputs (a variable read, the loss's cast of the
    labels, gradient terms of forward values) run as soon as the step starts
    (measured: 10-20% of an action's ops, up to 40 ms early).
    """
    from tfpar.strategies.pipeline import schedules

    timeline = Timeline()
    timeline.step = 0
    meshes = strategy.stage_meshes
    for rank in sorted(set(rank_of.values())):
        timeline.devices[(0, rank)] = (
            ",".join(d.rsplit("/", 1)[-1] for d in meshes.meshes[rank].local_devices())
            if meshes is not None else strategy.devices[0][rank])
    virtual = strategy.schedule.virtual_stages > 1
    stages = len(rank_of)
    previous: dict[tuple[int, int], float] = {}  # (replica, device) -> its last end so far
    for action in sorted(last, key=last.get):
        kind, microbatch, stage, replica = action
        lane = (replica, rank_of[stage])
        reads = schedules.dependencies(schedules.Action(kind, stage, microbatch), stages)
        ready = [previous.get(lane)] + [last.get((d.kind, d.microbatch, d.stage, replica))
                                        for d in reads]
        ready = [t for t in ready if t is not None]
        start = max(ready) if ready else first[action]
        previous[lane] = last[action]
        timeline.spans.append(Span(0, replica, rank_of[stage], microbatch, kind,
                                   min(start, last[action]), last[action],
                                   stage if virtual else -1))
    return timeline
