"""Pipeline x tensor x data parallelism in one job: pipeline stages on DTensor meshes.

The equivalence matrix runs on 8 simulated devices in its own process
(tests/workers/three_d_equivalence.py); in-process tests have 4 devices.
"""

import collections
import json
import sys

import keras
import numpy as np
import pytest

import tfpar
from consistency_cases import TOLERANCE
from conftest import WORKERS, run
from tfpar.strategies.pipeline import schedules
from tfpar.strategies.pipeline.runner import PipelineConfigError, action_scope

SHAPE = tfpar.models.GPTConfig(layers=2, hidden=32, heads=4, vocab=64, seq_len=16)


def tokens(rows=16):
    return np.random.RandomState(0).randint(0, SHAPE.vocab, size=(rows, SHAPE.seq_len + 1)).astype(
        "int32")


def compiled(strategy, optimizer="adamw", shape=SHAPE):
    with strategy.scope():
        keras.utils.set_random_seed(0)
        model = tfpar.models.gpt(shape)
        model.compile(optimizer=optimizer, loss=tfpar.models.lm_loss())
    return model


@pytest.mark.multiprocess
def test_every_layout_and_schedule_on_eight_devices_matches_one_device():
    """(pp 2, tp 2, dp 2) and (pp 4, tp 2) under 1F1B, (pp 2, tp 4) and (pp 2, fsdp 2,
    tp 2) under GPipe: 10 AdamW steps of a 2-block GPT against the exact
    single-device run; a checkpoint of the 3-D model that loads into a plain
    model and back; global_clipnorm. (`python tests/workers/three_d_equivalence.py
    all` runs every layout under both schedules: README.md, "3-D parallelism".)"""
    result = run([sys.executable, str(WORKERS / "three_d_equivalence.py")], timeout=600,
                 check=True)
    rows = json.loads(result.stdout.strip().splitlines()[-1])
    assert rows.pop("moved") > 100 * TOLERANCE  # training moved the weights far
    assert rows.pop("checkpoint") == {"plain_from_3d": 0.0, "3d_from_plain": 0.0}
    # global_clipnorm: one norm over both stage meshes, as over one device's gradients.
    clipped = rows.pop("clipped")
    assert clipped["max_abs_diff"] <= TOLERANCE and clipped["clipping_moved"] > 100 * TOLERANCE
    assert len(rows) == 4, rows
    for name, row in rows.items():
        assert row["max_abs_diff"] <= TOLERANCE, (name, row)
        dims = row["dims"]
        assert dims["pp"] * dims["tp"] * dims["dp"] * dims["fsdp"] == dims["world_size"] == 8
        # A device holds its stage's part of the tensor (and ZeRO-3) split: less
        # than 1/(tp x fsdp) of the model (a whole model split that many ways, with
        # its LayerNorms whole, is more).
        split = dims["tp"] * dims["fsdp"]
        assert row["parameter_bytes_per_device"] < row["parameter_bytes_total"] / split, (
            name, row)
        if dims["fsdp"] > 1:  # the optimizer state is sharded with its weight
            assert row["optimizer_bytes_per_device"] < 2.1 * row["parameter_bytes_per_device"]


def data_ancestors(targets) -> set:
    """The names of every op that an op of `targets` reads through data (op
    inputs only: control dependencies are not followed)."""
    seen, stack = set(), list(targets)
    while stack:
        for tensor in stack.pop().inputs:
            producer = tensor.op
            if producer.name not in seen:
                seen.add(producer.name)
                stack.append(producer)
    return seen


def unordered_pairs(strategy, model, schedule, stages=2, microbatches=4):
    """Consecutive actions of one device whose order no data edge enforces: some
    output of the first (an op whose result leaves the action: an activation or
    gradient sent on, a gradient sum, the loss) is not read by the second."""
    x = tokens()
    graph = strategy.step_graph(model, (x[:, :-1], x[:, 1:]))
    by_scope = collections.defaultdict(list)
    for op in graph.get_operations():
        by_scope[op.name.split("/")[0]].append(op)
    missing = []
    for device in range(stages):
        order = schedules.get(schedule).stage_order(device, stages, microbatches)
        for before, then in zip(order, order[1:]):
            assert by_scope[action_scope(then)], action_scope(then)
            inside = action_scope(before)
            outputs = {op.name for op in by_scope[inside]
                       if any(c.name.split("/")[0] != inside
                              for t in op.outputs for c in t.consumers())}
            assert outputs, inside
            if not outputs <= data_ancestors(by_scope[action_scope(then)]):
                missing.append((str(before), str(then)))
    return missing


def test_each_stage_mesh_action_waits_for_the_previous_one_through_data():
    """DTensor drops control dependencies between pure ops, so stage meshes order
    each device's actions through data: every action of `stage_order` reads
    every output of its device's previous action, so none of that action's
    work can end after this one's. Device stages order by control
    dependencies, which this walk ignores: there it finds the pairs unordered."""
    for schedule in ("1f1b", "interleaved_1f1b"):
        meshes = tfpar.Pipeline(stages=2, tensor_parallel=2, microbatches=4, schedule=schedule)
        model = compiled(meshes, shape=tfpar.models.GPTConfig(
            layers=4, hidden=32, heads=2, vocab=64, seq_len=16))
        assert unordered_pairs(meshes, model, schedule) == [], schedule
    devices = tfpar.Pipeline(stages=2, microbatches=4, schedule="1f1b")
    assert len(unordered_pairs(devices, compiled(devices), "1f1b")) >= 4


def test_tensor_parallel_stages_split_each_weight_on_its_stage_mesh():
    strategy = tfpar.Pipeline(stages=2, tensor_parallel=2, microbatches=2)
    model = compiled(strategy)
    strategy.prepare(model)
    meshes = strategy.stage_meshes.meshes
    assert [len(m.local_devices()) for m in meshes] == [2, 2]
    # Stage k's (replica, shard) sits on the device ParallelDims.coordinates names.
    dims = strategy.dims
    for device in range(dims.world_size):
        c = dims.coordinates(device)
        assert meshes[c["pp"]].local_devices()[c["dp"] * dims.tp + c["tp"]].endswith(
            f"CPU:{device}")
    up = next(w for w in model.weights if w.path.endswith("mlp_up/kernel"))
    assert up._layout.sharding_specs == ["unsharded", "model"]
    report = strategy.memory_report(model)
    assert report["parameter_bytes_total"] == sum(int(np.prod(w.shape)) * 4 for w in model.weights)
    assert strategy.dims == tfpar.ParallelDims(pp=2, tp=2, microbatches=2)
    assert tfpar.strategies.build(tfpar.ParallelDims(pp=2, tp=2, microbatches=2)).dims == \
        strategy.dims


@pytest.mark.multiprocess
def test_sharded_stages_keep_a_shard_of_each_weight_and_its_optimizer_state():
    """pp 2 x fsdp 2 (ZeRO-3 inside each stage): every weight that divides is
    split on its stage mesh's batch axis, so a device holds about a quarter."""
    strategy = tfpar.strategies.build(tfpar.ParallelDims(pp=2, fsdp=2, microbatches=2))
    assert isinstance(strategy, tfpar.Pipeline) and strategy.batch_axis == "batch"
    model = compiled(strategy)
    strategy.prepare(model)
    up = next(w for w in model.weights if w.path.endswith("mlp_up/kernel"))
    assert "batch" in up._layout.sharding_specs
    slots = [v for v in model.optimizer.variables
             if v.path.split("/")[-1].startswith(up.path.replace("/", "_") + "_")]
    assert slots and all(v._layout == up._layout for v in slots)
    report = strategy.memory_report(model)
    assert report["parameter_bytes_per_device"] < 0.3 * report["parameter_bytes_total"]
    assert strategy.dims == tfpar.ParallelDims(pp=2, fsdp=2, microbatches=2)


@pytest.mark.multiprocess
@pytest.mark.parametrize("schedule", ["1f1b", "interleaved_1f1b"])
def test_a_profiled_step_of_stage_meshes_runs_each_device_in_its_schedules_order(
        schedule, tmp_path):
    """The 3-D timeline (TensorFlow's profiler, one track per stage mesh): each
    mesh's actions in the order the schedule gives its device, one at a time."""
    strategy = tfpar.Pipeline(stages=2, tensor_parallel=2, microbatches=4, schedule=schedule)
    model = compiled(strategy, shape=tfpar.models.GPTConfig(
        layers=4, hidden=32, heads=2, vocab=64, seq_len=16))
    data = tokens()
    model.fit(data[:, :-1], data[:, 1:], batch_size=16, verbose=0)  # traced
    timeline = strategy.profile_step(model, data[:, :-1], data[:, 1:])
    for rank in range(2):
        expected = [str(a) for a in strategy.schedule.stage_order(rank, 2, 4)]
        assert timeline.order()[(0, rank)] == expected, (rank, timeline.order())
        spans = sorted((s for s in timeline.of_step() if s.stage == rank),
                       key=lambda s: s.start)
        assert all(a.end <= b.start + 1e-9 for a, b in zip(spans, spans[1:]))
    assert 0 < timeline.bubble_fraction() < 1 and timeline.step_time() > 0
    trace = json.loads(open(timeline.save_chrome_trace(str(tmp_path / "t.json"))).read())
    tracks = {e["args"]["name"] for e in trace["traceEvents"] if e.get("ph") == "M"
              and e.get("name") == "thread_name"}
    assert any("CPU:2" in t and "CPU:3" in t for t in tracks), tracks


def test_a_split_backward_cannot_be_profiled_and_says_why():
    from tfpar.strategies.pipeline.profile import ProfileError, action_of

    assert action_of("tf.StatefulPartitionedCall/gradient_tape/F1_stage0/d/MatMul") == (
        "B", 1, 0, 0)
    assert action_of("tf.StatefulPartitionedCall_1/W2_stage3_replica1/AddN") == ("W", 2, 3, 1)
    assert action_of("tf.StatefulPartitionedCall/adam_w/AssignAddVariableOp") is None
    strategy = tfpar.Pipeline(stages=2, microbatches=4, schedule="zb_h1")
    with pytest.raises(ProfileError, match="splits the backward into B and W"):
        strategy.profile_step(None, None)


@pytest.mark.parametrize("make, message", [
    (lambda: tfpar.Pipeline(stages=2, tensor_parallel=0), "tensor_parallel=0: must be"),
    (lambda: tfpar.Pipeline(stages=2, tensor_parallel=2, record_timeline=True),
     "record_timeline=True with tensor_parallel or fsdp > 1"),
    (lambda: tfpar.Pipeline(stages=2, fsdp=2, replicas=2), "use fsdp=4 (replicas=1)"),
    (lambda: tfpar.Pipeline(devices=["/job:localhost/replica:0/task:0/device:CPU:0",
                                     "/job:worker/replica:0/task:0/device:CPU:0"],
                            record_timeline=True), "record_timeline=True with stages on other"),
    (lambda: tfpar.Pipeline(stages=4, tensor_parallel=2), "needs 8 devices; this process has 4 (CPU)"),
    (lambda: tfpar.Pipeline(stages=2, tensor_parallel=2, devices=["CPU:0", "CPU:1", "CPU:2"]),
     "3 devices do not make 2 stages of 2"),
])
def test_impossible_tensor_parallel_pipelines_are_refused_saying_why(make, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        make()


@pytest.mark.parametrize("optimizer, message", [
    (lambda: keras.optimizers.LossScaleOptimizer(keras.optimizers.AdamW()),
     "LossScaleOptimizer (mixed_float16) is not supported"),
    (lambda: keras.optimizers.AdamW(gradient_accumulation_steps=2),
     "gradient_accumulation_steps=2 is not supported"),
])
def test_optimizers_the_stage_meshes_cannot_step_are_refused_at_the_split(optimizer, message):
    strategy = tfpar.Pipeline(stages=2, tensor_parallel=2, microbatches=2)
    with strategy.scope():
        model = compiled(strategy, optimizer=optimizer())
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        strategy.prepare(model)
    assert isinstance(PipelineConfigError("x"), ValueError)
