"""`tfpar plan`: its memory model matches tfpar's own runs, its choices match the literature."""

import json

import numpy as np
import pytest

import tfpar
from conftest import tfpar_cli
from tfpar.models import SIZES, GPTConfig
from tfpar.parallel_dims import ParallelDims
from tfpar.strategies.pipeline import split
from tfpar.plan import Hardware, Workload, cost, recommend, variable_bytes

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


# ------------------------------------------------------------- the step time
def test_the_matmul_efficiency_reproduces_a_measured_22b_block_within_5_percent():
    """Where `cost.GEMM_EFFICIENCY` comes from: one block of a 22B GPT (hidden 6144,
    64 heads, tensor 8, micro-batch 4, context 2048, 16 bits, no recomputation) took
    7.7 ms forward and 11.9 ms backward on Selene's A100s (Korthikanti et al., 2022,
    "Reducing Activation Recomputation in Large Transformer Models", Table 4). Its
    forward all-reduces twice; that code overlaps the backward's all-reduces with
    the weight gradients, so the backward is compute alone."""
    shape = GPTConfig(layers=48, hidden=6144, heads=64, vocab=51200, seq_len=2048)
    hw = Hardware(devices=8, **A100_80GB_NODES)
    block = cost.block_forward(Workload(shape, 4, precision="mixed_float16"), 4, 8, hw)
    compute = sum(block.values())
    activation = 4 * 2048 * 6144 * 2
    all_reduce = 2 * 7 / 8 * activation / (300e9 * cost.NVLINK_EFFICIENCY)
    assert compute + 2 * all_reduce == pytest.approx(7.7e-3, rel=0.05)
    assert 2 * compute == pytest.approx(11.9e-3, rel=0.05)


def test_matmuls_with_few_flops_per_byte_run_at_the_memory_roof_not_the_matmul_rate():
    # GPT-3's dense matmuls, split 8 ways, are compute-bound: they run at
    # the sustained matmul rate. GPT-2 small's attention scores q k^T multiply over a
    # head of 64: s*d/(2d + s) = 57 FLOPs per byte, so HBM bounds them at about a third
    # of the peak.
    hw = Hardware(devices=8, **A100_80GB_NODES)

    def achieved(shape, tensor):
        block = cost.block_forward(Workload(shape, 8, precision="mixed_bfloat16"), 1,
                                   tensor, hw)
        s, h, heads = shape.seq_len, shape.hidden, shape.heads / tensor
        dense = 2 * s * 12 * h * h / tensor / block["matmul_s"]
        core = 2 * 2 * heads * s * s * shape.head_dim / block["core_matmul_s"]
        return dense / 312e12, core / 312e12

    assert achieved(SIZES["gpt3-175b"], 8)[0] == pytest.approx(cost.GEMM_EFFICIENCY)
    roof = 1024 * 64 / (2 * 64 + 1024) * 2039e9 * cost.MEMORY_EFFICIENCY / 312e12
    assert achieved(SIZES["gpt2-small"], 1)[1] == pytest.approx(roof, rel=0.01)
    assert roof < 0.5 * cost.GEMM_EFFICIENCY


# Narayanan et al. (2021), "Efficient Large-Scale Language Model Training on GPU
# Clusters Using Megatron-LM" (SC'21, arXiv 2104.04473), Table 1: parameters
# (billions), heads, hidden, layers, tensor, pipeline, GPUs, global batch, and the
# achieved TFLOP/s per GPU; then the micro-batch and the virtual stages per device
# of the authors' own scripts for that table (Megatron-LM examples/sc21/
# run_table_1.sh: --micro-batch-size, --num-layers-per-virtual-pipeline-stage).
TABLE_1 = [
    (1.7, 24, 2304, 24, 1, 1, 32, 512, 137, 16, 1),
    (3.6, 32, 3072, 30, 2, 1, 64, 512, 138, 16, 1),
    (7.5, 32, 4096, 36, 4, 1, 128, 512, 142, 16, 1),
    (18.4, 48, 6144, 40, 8, 1, 256, 1024, 135, 8, 1),
    (39.1, 64, 8192, 48, 8, 2, 512, 1536, 138, 4, 1),
    (76.1, 80, 10240, 60, 8, 4, 1024, 1792, 140, 2, 3),     # 5 layers per virtual stage
    (145.6, 96, 12288, 80, 8, 8, 1536, 2304, 148, 2, 2),    # 5
    (310.1, 128, 16384, 96, 8, 16, 1920, 2160, 155, 1, 2),  # 3
    (529.6, 128, 20480, 105, 8, 35, 2520, 2520, 163, 1, 3),  # 1
    (1008.0, 160, 25600, 128, 8, 64, 3072, 3072, 163, 1, 1),
]


@pytest.mark.parametrize("row", TABLE_1, ids=[f"{r[0]:g}B" for r in TABLE_1])
def test_predicted_tflops_per_gpu_match_narayanan_2021_table_1_within_10_percent(row):
    """Every row of Table 1 of Narayanan et al. (2021): GPT, vocabulary 51,200,
    context 2048, 16-bit (fp16) with full activation recomputation, the interleaved
    schedule where the authors' script sets virtual stages, on DGX A100 nodes (8
    GPUs, 312 TFLOP/s, NVLink in a node, 8 x 200 Gb/s HDR per node), data degree
    = GPUs / (tensor x pipeline).

    "Achieved TFLOP/s" is counted as the paper counts it (its Eq. 3, with the
    recomputed forward): F = 96 B s l h^2 (1 + s/(6h) + V/(16 l h)) per iteration,
    divided by the predicted step time and the GPUs. Nothing here is set per row:
    the model's constants come from data sheets, NCCL and GEMM benchmarks and one
    22B block measured in another paper (`cost.GEMM_EFFICIENCY`).
    """
    params, heads, hidden, layers, t, p, gpus, batch, published, micro_batch, v = row
    d = gpus // (t * p)
    m = batch // (d * micro_batch)
    schedule = "interleaved_1f1b" if v > 1 else "1f1b"
    s, h, l, V = 2048, hidden, layers, 51200
    # The row as printed: its parameters by the paper's Eq. 2 (tied embeddings), to
    # the printed 0.1 billion.
    assert 12 * l * h ** 2 * (1 + 13 / (12 * h) + (V + s) / (12 * l * h)) == pytest.approx(
        params * 1e9, abs=0.05e9)
    shape = GPTConfig(layers=layers, hidden=hidden, heads=heads, vocab=V, seq_len=s)
    dims = (ParallelDims(dp=d, tp=t, pp=p, microbatches=m, schedule=schedule,
                         virtual_stages=v) if p > 1 else ParallelDims(dp=d, tp=t))
    work = Workload(shape, batch, precision="mixed_float16", schedule=schedule,
                    recompute="full")
    seconds = cost.step(work, dims, micro_batch, Hardware(devices=gpus, **A100_80GB_NODES))
    flops = 96 * batch * s * l * h ** 2 * (1 + s / (6 * h) + V / (16 * l * h))
    predicted = flops / (seconds["step_s"] * gpus) / 1e12
    assert abs(predicted - published) / published <= 0.10, (predicted, published)


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


def test_the_mesh_picture_draws_each_device_s_stage_replica_and_shard(tmp_path):
    from tfpar.plan.render import mesh_png

    dims = ParallelDims(pp=2, dp=2, tp=4, microbatches=8)
    assert [tuple(dims.coordinates(i).values()) for i in (0, 3, 4, 8, 15)] == [
        (0, 0, 0, 0), (0, 0, 0, 3), (0, 1, 0, 0), (1, 0, 0, 0), (1, 1, 0, 3)]
    mesh_png(str(tmp_path / "mesh.png"), dims, devices_per_node=8)
    assert (tmp_path / "mesh.png").read_bytes()[:4] == b"\x89PNG"
    # GPT-3 175B's 16 x 8 x 8 is drawn as its first pipeline replica (64 devices).
    mesh_png(str(tmp_path / "175b.png"), ParallelDims(dp=16, tp=8, pp=8, microbatches=96), 8)
    with pytest.raises(ValueError, match="draws up to 128 devices; one pipeline replica of "
                                         r"pp 64 x dp 6 x tp 8 has 512"):
        mesh_png(str(tmp_path / "1t.png"), ParallelDims(dp=6, tp=8, pp=64, microbatches=64), 8)
    with pytest.raises(Exception, match=r"device 16: the job has devices 0..15"):
        dims.coordinates(16)
