"""Sharded data parallelism (ZeRO-1/2/3, FSDP x TP, HSDP): the exact training, a share of the bytes.

In-process (4 simulated devices): ZeRO-3 against the exact single-device
run, and each stage's bytes against the ideal and `tfpar plan`'s model. In
processes of their own: the whole equivalence matrix with recomputation off
and on, the bytes on 8 devices, and the allocator peak of a step.
"""

import json
import sys

import keras
import pytest

import tfpar
from conftest import WORKERS, run
from consistency_cases import max_abs_diff, train_lm
from tfpar.parallel_dims import ParallelDims
from tfpar.plan import cost

STEPS, BATCH = 12, 16
SHAPE = tfpar.models.GPTConfig(layers=2, hidden=32, heads=2, vocab=64, seq_len=16)
TOLERANCE = 1e-5


def train(strategy, recompute="none"):
    return train_lm(strategy, SHAPE, recompute, steps=STEPS, batch=BATCH)


def ideal(stage: int, parameter_bytes: int, n: int) -> dict:
    """Per-device bytes of fp32 AdamW training at a ZeRO stage (ZeRO paper, fp32)."""
    p = parameter_bytes
    return {"parameter_bytes_per_device": p / n if stage >= 3 else p,
            "gradient_bytes_per_device": p / n if stage >= 2 else p,
            "optimizer_bytes_per_device": 2 * p / n}


def assert_within(measured: dict, expected: dict, rel: float):
    for key, value in expected.items():
        assert abs(measured[key] - value) <= rel * value, (key, measured[key], value)


def test_zero3_trains_like_one_device_and_holds_a_quarter_of_everything():
    exact = train(tfpar.OneDevice())
    strategy = tfpar.ShardedDataParallel(fsdp=4, zero_stage=3)
    model = train(strategy)
    assert max_abs_diff(exact, model) <= TOLERANCE
    report = strategy.memory_report(model)
    assert_within(report, ideal(3, report["parameter_bytes_total"], 4), 0.05)
    assert strategy.dims == ParallelDims(fsdp=4, zero_stage=3)
    weights = {w.path for w in model.trainable_weights}
    slots = {v.path for v in model.optimizer.variables if v.shape.rank}
    stored = [axes for path, (_, axes) in strategy.variables.items()
              if path in weights or path in slots]
    assert len(stored) == 3 * len(weights)  # each weight and its two moments
    assert all("batch" in axes for axes in stored)


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_each_stage_keeps_its_ideal_bytes_and_the_plan_predicts_them(stage):
    strategy = tfpar.ShardedDataParallel(fsdp=4, zero_stage=stage)
    with strategy.scope():
        model = tfpar.models.gpt(SHAPE)
        model.compile(optimizer=keras.optimizers.AdamW(1e-3), loss=tfpar.models.lm_loss())
        model.optimizer.build(model.trainable_variables)
    report = strategy.memory_report(model)
    assert_within(report, ideal(stage, report["parameter_bytes_total"], 4), 0.05)
    planned = cost.memory(cost.Workload(SHAPE, BATCH, precision="float32"),
                          strategy.dims, micro_batch=BATCH // 4)
    assert_within(report, {"parameter_bytes_per_device": planned["weights"],
                           "gradient_bytes_per_device": planned["gradients"],
                           "optimizer_bytes_per_device": planned["optimizer"]}, 0.05)


@pytest.mark.multiprocess
def test_every_sharded_layout_with_and_without_recomputation_matches_one_device():
    """ZeRO-1, -2, -3 (+ recomputation), FSDP 2 x TP 2 and HSDP 2 x 2 (each with and
    without), 12 AdamW steps, against the exact run (tests/workers/zero_equivalence.py)."""
    result = run([sys.executable, str(WORKERS / "zero_equivalence.py")], timeout=600,
                 check=True)
    rows = json.loads(result.stdout.strip().splitlines()[-1])
    assert len(rows) == 7, rows
    assert "recomputation under HSDP" in rows.pop("hsdp2x2 full")["refused"]
    for name, row in rows.items():
        assert row["max_abs_diff"] <= TOLERANCE, (name, row)
    # HSDP: sharded within each pair of devices, replicated across the pairs.
    hsdp = rows["hsdp2x2 none"]
    assert hsdp["parameter_bytes_per_device"] == hsdp["parameter_bytes_total"] / 2
    # FSDP x TP: each weight split over both axes, about a quarter per device.
    both = rows["fsdp2xtp2 none"]
    assert both["parameter_bytes_per_device"] <= 0.3 * both["parameter_bytes_total"]


@pytest.mark.multiprocess
def test_on_eight_devices_each_stage_keeps_within_five_percent_of_the_ideal():
    result = run([sys.executable, str(WORKERS / "zero_bytes.py"), "8"], timeout=300,
                 check=True)
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert sorted(out["stages"]) == ["1", "2", "3"], out  # every ZeRO stage reported
    for stage, report in out["stages"].items():
        assert_within(report, ideal(int(stage), report["parameter_bytes_total"], 8), 0.05)


PEAK_SHAPE = ["4", "4", "512", "32", "8", "4096"]  # devices, layers, hidden, seq, batch, vocab


def peak(strategy: str, recompute: str) -> dict:
    result = run([sys.executable, str(WORKERS / "memory_probe.py"), strategy, *PEAK_SHAPE,
                  recompute], timeout=300, check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.multiprocess
def test_zero3_with_recomputation_needs_under_half_the_step_peak_of_data_parallel():
    # 16.8M parameters, 4 x 512 hidden: the weights and their AdamW state dominate.
    data, zero3 = peak("data", "none"), peak("zero3", "full")
    assert zero3["peak_step_bytes"] <= 0.5 * data["peak_step_bytes"], (zero3, data)
    assert zero3["parameter_bytes_per_device"] * 4 == data["parameter_bytes_per_device"]


def test_sharded_strategy_from_the_degree_flags():
    strategy = tfpar.strategies.build(ParallelDims(fsdp=2, tp=2, zero_stage=2))
    assert isinstance(strategy, tfpar.ShardedDataParallel)
    assert strategy.mesh_shape == {"batch": 2, "model": 2} and strategy.zero_stage == 2
    assert strategy.layouts == "megatron"


@pytest.mark.multiprocess
def test_two_processes_shard_one_zero3_mesh_and_match_one_device(tmp_path):
    """`tfpar launch` gives each process its DTENSOR_* client: the 4-way ZeRO-3
    mesh spans 2 processes x 2 devices, each feeding its half of every batch."""
    from conftest import launched_mlp_diff

    diff, report = launched_mlp_diff(tmp_path, "--fsdp=4", "--zero_stage=3",
                                     "--num_simulated_devices=2")
    assert diff <= TOLERANCE
    assert report == {**report, "steps": 24, "workers": 2, "replicas": 4, "strategy": "sharded"}
