"""One seed, one model: `tfpar train` under every layout ends where one device ends.

The determinism matrix of the main job, run through `tfpar train`'s own
flags (`tfpar.train.flags`, `tfpar.flags.from_flags`, `tfpar.train.run`: the
CLI without its process start) on the suite's 4 simulated devices, and as
real `tfpar train` / `tfpar launch` processes where a layout needs other
processes or more devices. Every run: the reference GPT (2 blocks), the
default BPE tokenizer, the job's own optimizer (AdamW, warm-up and cosine
decay, weight decay with its exclusions, global-norm clipping), 20 optimizer
steps from one seed. Each final model must be within 1e-5 of the one-device
run, weight by weight.

The attention key biases are left out of the comparison: a key bias adds
q.b to every score of a query, which softmax ignores, so its exact gradient
is 0; what it gets is rounding noise of the summation order, which Adam
turns into steps of up to lr / epsilon times its size, different under
every layout (tests/test_train.py's `weights` says the same).

The learning rate is 5e-5: where an id's gradient contributions nearly
cancel, Adam divides a sum that is mostly rounding noise by its own size, so
a few embedding elements move by up to about lr per step differently under
another summation order (at lr 1e-3, 1-2 of the 262,144 token-embedding
elements ended 2-5e-5 apart, every other weight within 1.3e-6). Training
moves the weights 5.9e-4 here, 59 times the tolerance.

Mixed precision (bfloat16 compute, float32 weights) is compared with one
device in mixed precision, at `MIXED_TOLERANCE`: bfloat16 keeps 8 bits of
mantissa, so a product summed in another order (another layout) can round to
a neighbouring bfloat16 value, 0.4% apart, and training carries that on.
Measured: 3.4e-4 under data, tensor and pipeline parallelism, as far as one
device in mixed precision is from one device in float32 (3.5e-4).
"""

import json
import sys

import keras
import numpy as np
import pytest

import tfpar
from conftest import NUM_DEVICES, tfpar_cli

STEPS = 20
COMMON = ["--model=tiny", "--layers=2", "--seq_len=32", "--global_batch_size=16",
          f"--train_steps={STEPS}", f"--eval_every={STEPS}", "--eval_batches=1",
          "--learning_rate=5e-5", "--warmup_steps=5", "--weight_decay=0.1", "--clip_norm=1.0",
          "--sample_tokens=0", "--noasync_checkpoint", "--seed=7"]
ONE_DEVICE = ["--strategy=one_device"]
TOLERANCE = 1e-5
MIXED_TOLERANCE = 1e-3


def train(data_dir, output_dir, *flags):
    """`tfpar train COMMON flags` in this process, as the CLI runs it; the summary."""
    from absl import flags as absl_flags

    from tfpar.flags import from_flags
    from tfpar.train import config_from_flags, run
    from tfpar.train.flags import define_train_flags

    fv = absl_flags.FlagValues()
    define_train_flags(fv)
    fv(["train", *COMMON, f"--num_simulated_devices={NUM_DEVICES}", f"--data_dir={data_dir}",
        f"--output_dir={output_dir}", *flags])
    strategy = from_flags(fv)
    try:
        return run(config_from_flags(strategy, flag_values=fv), strategy)
    finally:
        # What a `tfpar train` process sets for its whole life, undone for the next run here.
        from tensorflow.python.framework import config as tf_config

        from tfpar.precision import set_precision

        set_precision("float32")
        tf_config.disable_op_determinism()


def weights(output_dir) -> dict:
    """{path: value} of the saved model.keras, without the attention key biases."""
    model = keras.saving.load_model(str(output_dir / "model.keras"))
    return {v.path: np.asarray(v.numpy(), np.float64) for v in model.weights
            if not v.path.endswith("key/bias")}


def max_abs_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float(np.max(np.abs(a[k] - b[k]))) for k in a)


def check(layout: str, got: dict, expected: dict, tolerance: float = TOLERANCE) -> None:
    diff = max_abs_diff(got, expected)
    print(f"determinism: {layout}: max |dw| {diff:.2e}")  # the measured table (pytest -s)
    assert diff <= tolerance, f"{layout}: max |dw| {diff:.2e} > {tolerance}"


@pytest.fixture(scope="module")
def fresh(tmp_path_factory):
    """One device on a data directory that the run itself prepares (the corpus
    and the BPE tokenizer): (data dir, output dir)."""
    data_dir = tmp_path_factory.mktemp("fresh-data")
    out = tmp_path_factory.mktemp("one-device-fresh")
    train(data_dir, out, *ONE_DEVICE)
    return data_dir, out


@pytest.fixture(scope="module")
def reference(fresh, tmp_path_factory):
    """The same run again, on the now prepared data directory."""
    data_dir, _ = fresh
    out = tmp_path_factory.mktemp("one-device")
    train(data_dir, out, *ONE_DEVICE)
    return weights(out)


def test_a_fresh_data_directory_and_a_prepared_one_train_bit_identical_models(fresh, reference):
    _, out = fresh
    first = weights(out)
    assert max_abs_diff(first, reference) == 0.0
    # ... and training moved the weights far more than the tolerance (5.9e-4 when measured).
    keras.utils.set_random_seed(7)
    summary = json.loads((out / "summary.json").read_text())
    initial = tfpar.models.gpt(tfpar.models.GPTConfig(**summary["model_config"]))
    initial = {v.path: v.numpy() for v in initial.weights if v.path in reference}
    assert max_abs_diff(initial, reference) > 30 * TOLERANCE


LAYOUTS = {
    "data": ["--dp=4"],
    "tensor": ["--dp=2", "--tp=2"],
    "zero1": ["--fsdp=4", "--zero_stage=1"],
    "zero3": ["--fsdp=4"],
    "fsdp_x_tensor": ["--fsdp=2", "--tp=2"],
    "pipeline_gpipe": ["--pp=2", "--microbatches=4", "--schedule=gpipe"],
    "pipeline_1f1b": ["--pp=2", "--microbatches=4", "--schedule=1f1b"],
    "pipeline_interleaved": ["--pp=2", "--microbatches=4", "--schedule=interleaved_1f1b",
                             "--virtual_stages=2"],
    "pipeline_zb_h1": ["--pp=2", "--microbatches=4", "--schedule=zb_h1"],
    "pipeline_zbv": ["--pp=2", "--microbatches=4", "--schedule=zbv"],
    "pipeline_x_tensor": ["--pp=2", "--tp=2", "--microbatches=4"],
}


@pytest.mark.parametrize("layout", LAYOUTS)
def test_every_layout_trains_the_one_device_model(layout, fresh, reference, tmp_path):
    data_dir, _ = fresh
    train(data_dir, tmp_path, *LAYOUTS[layout])
    check(layout, weights(tmp_path), reference)


@pytest.fixture(scope="module")
def accumulated_reference(fresh, tmp_path_factory):
    data_dir, _ = fresh
    out = tmp_path_factory.mktemp("one-device-accumulated")
    train(data_dir, out, "--grad_accum_steps=2", *ONE_DEVICE)
    return weights(out)


@pytest.mark.parametrize("layout", ["data", "pipeline_1f1b"])
def test_gradient_accumulation_trains_the_one_device_model(layout, fresh, accumulated_reference,
                                                           tmp_path):
    data_dir, _ = fresh
    train(data_dir, tmp_path, "--grad_accum_steps=2", *LAYOUTS[layout])
    check(layout, weights(tmp_path), accumulated_reference)


@pytest.fixture(scope="module")
def mixed_reference(fresh, tmp_path_factory):
    data_dir, _ = fresh
    out = tmp_path_factory.mktemp("one-device-mixed")
    summary = train(data_dir, out, "--precision=mixed_bfloat16", *ONE_DEVICE)
    assert summary["precision"] == "mixed_bfloat16"
    return weights(out)


@pytest.mark.parametrize("layout", ["data", "tensor", "pipeline_1f1b"])
def test_mixed_precision_trains_the_one_device_mixed_precision_model(
        layout, fresh, mixed_reference, reference, tmp_path):
    data_dir, _ = fresh
    summary = train(data_dir, tmp_path, "--precision=mixed_bfloat16", *LAYOUTS[layout])
    assert summary["precision"] == "mixed_bfloat16"
    check(f"mixed_bfloat16 {layout}", weights(tmp_path), mixed_reference, MIXED_TOLERANCE)


def test_op_determinism_is_a_flag_and_trains_the_same_model(fresh, reference, tmp_path):
    data_dir, _ = fresh
    summary = train(data_dir, tmp_path, "--deterministic", *LAYOUTS["tensor"])
    assert summary["deterministic"] is True
    check("deterministic tensor", weights(tmp_path), reference)


HUB = ["--model=keras_hub:llama", "--layers=2", "--hidden=64", "--heads=4"]


@pytest.mark.hub
def test_a_keras_hub_model_trains_the_same_under_tensor_parallelism(fresh, tmp_path_factory):
    pytest.importorskip("keras_hub", reason="keras-hub is not installed (BUILD_NOTES.md, keras-hub)")
    data_dir, _ = fresh
    one, out = tmp_path_factory.mktemp("hub-one"), tmp_path_factory.mktemp("hub-tensor")
    train(data_dir, one, *HUB, *ONE_DEVICE)
    train(data_dir, out, *HUB, *LAYOUTS["tensor"])
    check("keras_hub:llama tensor", weights(out), weights(one))


# ------------------------------------------- layouts that need other processes
PROCESS_LAYOUTS = {
    # (tfpar launch --nproc, the train flags)
    "multi_worker": (2, ["--strategy=multi_worker"]),
    "three_d": (1, ["--pp=2", "--tp=2", "--dp=2", "--microbatches=4",
                    "--num_simulated_devices=8"]),
    "pipeline_across_processes": (2, ["--pp=2", "--microbatches=4",
                                      "--num_simulated_devices=1"]),
    "tensor_stages_across_processes": (2, ["--pp=2", "--tp=2", "--microbatches=4",
                                           "--num_simulated_devices=2"]),
}

WORLD = {"multi_worker": 2, "three_d": 8, "pipeline_across_processes": 2,
         "tensor_stages_across_processes": 4}


@pytest.mark.multiprocess
@pytest.mark.parametrize("layout", PROCESS_LAYOUTS)
def test_layouts_across_processes_train_the_one_device_model(layout, fresh, reference, tmp_path):
    data_dir, _ = fresh
    nproc, flags = PROCESS_LAYOUTS[layout]
    train_command = ["train", *COMMON, f"--data_dir={data_dir}", f"--output_dir={tmp_path}",
                     *flags]
    if nproc > 1:
        result = tfpar_cli("launch", "--nproc", str(nproc), "--", sys.executable, "-m",
                           "tfpar.cli.main", *train_command, timeout=400)
    else:
        result = tfpar_cli(*train_command, timeout=400)
    assert result.returncode == 0, result.stdout[-3000:]
    check(layout, weights(tmp_path), reference)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["dims"]["world_size"] == WORLD[layout]
    if layout == "multi_worker":  # the chief prints, and writes alone
        assert summary["workers"] == 2
        assert "[rank 0] tfpar train: validation loss" in result.stdout
        assert "[rank 1] tfpar train: validation loss" not in result.stdout
