"""One strategy interface: every tfpar strategy answers the same questions the same way."""

import keras
import numpy as np
import pytest

import tfpar
from tfpar.parallel_dims import ParallelDims, ParallelDimsError
from tfpar.strategies import Strategy, build, should_write

SHAPE = "tiny"


def _strategies():
    # The widest DTensor mesh first: TensorFlow 2.21 cannot build a wider one later.
    return {
        "tensor": lambda: tfpar.TensorParallel("batch:2,model:2"),
        "one_device": tfpar.OneDevice,
        "data": tfpar.DataParallel,
        "pipeline": lambda: tfpar.Pipeline(stages=2, microbatches=2, replicas=2),
    }


EXPECTED_DIMS = {
    "tensor": ParallelDims(dp=2, tp=2),
    "one_device": ParallelDims(),
    "data": ParallelDims(dp=4),
    "pipeline": ParallelDims(dp=2, pp=2, microbatches=2),
}


def _model(strategy):
    with strategy.scope():
        keras.utils.set_random_seed(0)
        model = tfpar.models.gpt(SHAPE)
        model.compile(optimizer=keras.optimizers.AdamW(1e-3), loss=tfpar.models.lm_loss())
        model.optimizer.build(model.trainable_variables)
    return model


@pytest.mark.parametrize("kind", list(_strategies()))
def test_every_strategy_implements_the_interface_and_reports_its_dims(kind):
    strategy = _strategies()[kind]()
    assert isinstance(strategy, Strategy)
    assert strategy.kind == kind and strategy.dims == EXPECTED_DIMS[kind]
    assert strategy.dims.batch_shards == strategy.num_replicas_in_sync
    info = strategy.describe()
    assert ParallelDims.from_dict(info["dims"]) == strategy.dims
    assert info["workers"] == 1 and info["worker_index"] == 0 and strategy.is_chief
    # One process: it writes, agrees with itself, and feeds every row.
    assert strategy.should_write() and should_write(strategy)
    assert strategy.any_worker(True) and not strategy.any_worker(False)
    assert strategy.local_batch_rows(32) == (0, 32)


@pytest.mark.parametrize("kind", ["one_device", "data", "tensor", "pipeline"])
def test_memory_report_counts_what_one_device_holds(kind):
    strategy = _strategies()[kind]()
    model = _model(strategy)
    report = strategy.memory_report(model)
    full = sum(int(np.prod(v.shape)) * 4 for v in model.weights)
    trainable = sum(int(np.prod(v.shape)) * 4 for v in model.trainable_weights)
    assert report["parameter_bytes_total"] == full
    per_device = report["parameter_bytes_per_device"]
    if kind in ("one_device", "data"):  # every replica holds the whole model
        assert per_device == full and report["gradient_bytes_per_device"] == trainable
        assert report["optimizer_bytes_per_device"] >= 2 * trainable  # AdamW's two moments
    elif kind == "tensor":  # the megatron layouts split most of the GPT over model:2
        assert 0.5 * full <= per_device < 0.65 * full
    else:  # two stages: the fuller holds more than half, less than all
        stages = report["per_device"]
        assert len(stages) == 2
        assert sum(r["parameter_bytes_per_device"] for r in stages.values()) == full
        assert 0.5 * full <= per_device < full


def test_a_model_answers_with_the_strategy_it_was_built_under():
    strategy = tfpar.Pipeline(stages=2)
    model = _model(strategy)
    assert tfpar.strategies.strategy_for(model) is strategy
    assert should_write(model)
    plain = tfpar.models.gpt(SHAPE)
    assert should_write(plain)  # no strategy: the default one, which writes


@pytest.mark.parametrize("dims, kind", [
    (ParallelDims(), "one_device"),
    (ParallelDims(dp=2), "data"),
    (ParallelDims(dp=2, tp=2), "tensor"),
    (ParallelDims(pp=2, dp=2, microbatches=4, schedule="gpipe"), "pipeline"),
])
def test_build_runs_the_degrees_it_is_given(dims, kind):
    strategy = build(dims)
    assert strategy.kind == kind and strategy.dims == dims


def test_a_named_strategy_runs_degrees_it_can_hold():
    # A model axis of 1 is still tensor parallelism when asked for: DTensor data parallelism.
    strategy = build(ParallelDims(dp=4), kind="tensor")
    assert strategy.kind == "tensor" and strategy.mesh_shape == {"batch": 4, "model": 1}
    with pytest.raises(ParallelDimsError, match=r"the data strategy cannot run dp 2 x tp 2 "
                                                r"\(tp=2\); these degrees run as tensor"):
        build(ParallelDims(dp=2, tp=2), kind="data")


@pytest.mark.parametrize("dims, message", [
    (ParallelDims(fsdp=2, dp=2, zero_stage=1), "replicas of sharded groups (dp=2 x fsdp=2, HSDP) run"),
    (ParallelDims(fsdp=2, pp=2, dp=2), "a pipeline shards its stages at ZeRO stage 3 over every "
                                       "data device of a stage (fsdp), not with dp=2 x fsdp=2"),
    (ParallelDims(dp=8), "= 8 devices, but the job has 4"),
])
def test_build_refuses_what_cannot_run_naming_the_degrees(dims, message):
    with pytest.raises(ParallelDimsError, match=message.replace("(", r"\(").replace(")", r"\)")):
        build(dims)
