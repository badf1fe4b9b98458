"""`tfpar plan`: its memory model matches tfpar's own runs, its choices match the literature."""

import json

import numpy as np
import pytest

import tfpar
from conftest import tfpar_cli
from tfpar.models import SIZES, GPTConfig
from tfpar.parallel_dims import ParallelDims
from tfpar.strategies.pipeline import split
from tfpar.plan import Hardware, Workload, recommend, variable_bytes

SHAPE = GPTConfig(layers=4, hidden=64, heads=4, vocab=256, seq_len=64)


def test_the_analytic_layers_and_cuts_are_the_built_models():
    model = tfpar.models.gpt(SHAPE)
    # Keras numbers the embeddings' add op per process (add, add_3, ...).
    ops = [("add" if op.name.startswith("add") else op.name, split._parameters(op))
           for op in split.operations(model)]
    assert ops == SHAPE.layer_parameters()
    assert split.valid_cuts(model) == SHAPE.pipeline_cuts()
    assert sum(n for _, n in SHAPE.layer_parameters()) == model.count_params()


def built(strategy):
    import keras

    with strategy.scope():
        model = tfpar.models.gpt(SHAPE)
        model.compile(optimizer=keras.optimizers.AdamW(1e-3), loss=tfpar.models.lm_loss())
    return model


# The widest mesh first: TensorFlow 2.21 cannot build a wider one later in a process.
@pytest.mark.parametrize("tensor", [4, 2])
def test_predicted_variable_bytes_match_tensor_parallel_within_5_percent(tensor):
    strategy = tfpar.TensorParallel(f"batch:1,model:{tensor}", "megatron",
                                    num_local_devices=tensor)
    model = built(strategy)
    with strategy.scope():
        model.optimizer.build(model.trainable_variables)  # slots take their weight's layout
    report = strategy.memory_report(model)
    measured = report["parameter_bytes_per_device"] + report["optimizer_bytes_per_device"]
    predicted = variable_bytes(SHAPE, tensor=tensor)[0]
    assert abs(predicted - measured) <= 0.05 * measured, (predicted, measured)


def _bytes(variable):
    return int(np.prod(variable.shape)) * np.dtype(variable.dtype).itemsize


@pytest.mark.parametrize("stages", [2, 4])
def test_predicted_variable_bytes_match_each_pipeline_stage_within_5_percent(stages):
    strategy = tfpar.Pipeline(stages=stages)
    model = built(strategy)
    placed = strategy.prepare(model)  # splits, moves each stage's weights, builds the slots
    measured = {stage.device: 0 for stage in placed}
    for variable in model.weights + model.optimizer.variables:
        device = variable.value.device
        for stage in placed:
            if device.endswith(stage.device.split("/")[-1]):
                measured[stage.device] += _bytes(variable)
    predicted = variable_bytes(SHAPE, pipeline=stages)
    for stage, expected in zip(placed, predicted):
        got = measured[stage.device]
        assert abs(expected - got) <= 0.05 * got, (stage, expected, got)


# ------------------------------------------------------------ the literature
A100_80GB_NODES = dict(devices_per_node=8, memory_gib=80, peak_tflops=312,
                       intra_node_gbps=300, inter_node_gbps=25)


def test_gpt3_175b_on_1024_a100_is_megatrons_tensor_8_pipeline_8_data_16():
    # Narayanan et al. (2021), Table 1: 175B on 1024 A100s, batch 1536, t=8, p=8,
    # micro-batch 1, with activation recomputation.
    plan = recommend(Workload(SIZES["gpt3-175b"], 1536, precision="mixed_bfloat16",
                              recompute="full"), Hardware(devices=1024, **A100_80GB_NODES))
    best = plan.best
    assert (best.dims.dp, best.dims.tp, best.dims.pp, best.micro_batch) == (16, 8, 8, 1)
    assert best.dims == ParallelDims(dp=16, tp=8, pp=8, microbatches=96)


def test_without_recomputation_gpt3_175b_needs_a_deeper_pipeline():
    plan = recommend(Workload(SIZES["gpt3-175b"], 1536, precision="mixed_bfloat16"),
                     Hardware(devices=1024, **A100_80GB_NODES))
    best = plan.best.dims
    assert best.tp == 8 and best.pp > 8
    assert best.world_size == 1024


def test_mt_nlg_530b_keeps_tensor_in_the_node_and_pipelines_across_nodes():
    # Smith et al. (2022): 530B on 2240 A100s (280 nodes), t=8, p=35, d=8, batch 1920.
    mt_nlg = GPTConfig(layers=105, hidden=20480, heads=128, vocab=50304, seq_len=2048)
    plan = recommend(Workload(mt_nlg, 1920, precision="mixed_bfloat16", recompute="full"),
                     Hardware(devices=2240, **A100_80GB_NODES))
    best = plan.best.dims
    assert best.tp == 8 and best.pp >= 20, best


def test_a_model_that_fits_one_device_is_trained_data_parallel():
    plan = recommend(Workload(SIZES["gpt3-1.3b"], 512, precision="mixed_bfloat16"),
                     Hardware(devices=8, **A100_80GB_NODES))
    best = plan.best
    assert (best.dims.tp, best.dims.pp) == (1, 1)
    assert best.tfpar_flags.startswith("--dp=8 ")
    assert "pure data parallelism" in plan.reasons[0]


def test_configurations_that_do_not_fit_are_rejected_and_nothing_fitting_says_what_to_do():
    plan = recommend(Workload(SIZES["gpt3-175b"], 64, precision="mixed_bfloat16"),
                     Hardware(devices=8, **A100_80GB_NODES))
    assert plan.best is None and not any(c.fits for c in plan.candidates)
    assert "nothing fits" in plan.reasons[0] and "use more devices" in plan.reasons[0]


# ------------------------------------------------------------------- the CLI
@pytest.mark.multiprocess
def test_plan_prints_a_table_and_json_with_the_recommendation(tmp_path):
    args = ["plan", "--model=gpt3-175b", "--devices=1024", "--global_batch_size=1536",
            "--precision=mixed_bfloat16", "--recompute=full"]
    table = tfpar_cli(*args, timeout=60)
    assert table.returncode == 0, table.stdout
    assert "state GiB" in table.stdout and "\n>    16    -      8     8" in table.stdout
    result = tfpar_cli(*args, "--format=json", f"--timeline_png={tmp_path / 's.png'}",
                       timeout=60)
    assert result.returncode == 0, result.stdout
    recommended = json.loads(result.stdout)["recommended"]
    assert {k: recommended[k] for k in ("data", "tensor", "pipeline", "microbatches")} == {
        "data": 16, "tensor": 8, "pipeline": 8, "microbatches": 96}
    # The plan speaks ParallelDims, and the flags it prints are the degree flags.
    assert ParallelDims.from_dict(recommended["dims"]) == ParallelDims(
        dp=16, tp=8, pp=8, microbatches=96)
    assert (tmp_path / "s.png").read_bytes()[:4] == b"\x89PNG"
    assert result.elapsed < 30  # no TensorFlow: planning is arithmetic


@pytest.mark.multiprocess
def test_plan_that_cannot_fit_exits_1_and_bad_input_exits_2():
    nothing = tfpar_cli("plan", "--model=gpt3-175b", "--devices=8", "--global_batch_size=64",
                        timeout=60)
    assert nothing.returncode == 1 and "nothing fits" in nothing.stdout
    missing = tfpar_cli("plan", "--model=gpt3-175b", "--global_batch_size=64", timeout=60)
    assert missing.returncode == 2 and "--devices is required" in missing.stdout
    bad = tfpar_cli("plan", "--model=gpt5", "--devices=8", timeout=60)
    assert bad.returncode != 0 and "--model=gpt5: use one of" in bad.stdout
