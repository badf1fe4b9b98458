"""`tfpar train`: the main job trains the reference GPT on the embedded corpus.

The in-process tests call `tfpar.train.run` on the suite's simulated devices;
the CLI tests run `tfpar train` (and `tfpar launch ... tfpar train`) as a
user would. All read the corpus from a data dir prepared once per module.
"""

import json
import struct
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf

import tfpar
from conftest import run, tfpar_cli
from tfpar.data import corpus
from tfpar.train import TrainConfig, TrainConfigError


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("tfds"))
    corpus.prepare(corpus.DEFAULT_DATASET, path)
    return path


def tiny(data_dir, output_dir, **overrides):
    """A short run of a 1-block GPT: 2 x 6 optimizer steps of 16 windows of 32 bytes."""
    settings = dict(output_dir=str(output_dir), data_dir=data_dir, model="tiny",
                    tokenizer="bytes", layers=1, seq_len=32,
                    global_batch_size=16, train_steps=12, eval_every=6, eval_batches=2,
                    warmup_steps=2, lr_decay_steps=12, sample_tokens=8)
    settings.update(overrides)
    return TrainConfig(**settings)


def weights(output_dir):
    """{path: value} of the trained model's weights, without the attention key biases.

    A key bias adds q.b to every score of a query, which softmax ignores: its
    exact gradient is 0, and Adam turns the rounding noise it gets instead
    into lr-sized steps that no two summation orders share.
    """
    model = keras.saving.load_model(str(output_dir / "model.keras"))
    return {v.path: v.numpy() for v in model.weights if not v.path.endswith("key/bias")}


def max_abs_diff(a, b):
    assert a.keys() == b.keys()
    return max(float(np.max(np.abs(a[k] - b[k]))) for k in a)


# ------------------------------------------------------------ equivalences
@pytest.fixture(scope="module")
def uninterrupted(data_dir, tmp_path_factory):
    """Batches of 16 accumulated 2 at a time, 12 optimizer steps in one go.

    One device: tracing an accumulating step on 4 replicas costs about 20 s
    here; the data-parallel job runs in the CLI tests, and accumulation on 4
    replicas is checked against one device in test_optimizer_fix.py."""
    out = tmp_path_factory.mktemp("uninterrupted")
    summary = tfpar.train.run(tiny(data_dir, out, grad_accum_steps=2), tfpar.OneDevice())
    return out, summary


def test_the_job_lowers_the_validation_loss_and_counts_optimizer_steps(uninterrupted):
    _, summary = uninterrupted
    assert summary["steps"] == 12 and summary["grad_accum_steps"] == 2
    assert summary["tokens_per_step"] == 16 * 2 * 32
    assert summary["final_val_loss"] < 0.75 * summary["initial_val_loss"], summary


def test_a_resumed_run_ends_bit_identical_to_an_uninterrupted_one(uninterrupted, data_dir,
                                                                  tmp_path):
    out, _ = uninterrupted
    first = tfpar.train.run(tiny(data_dir, tmp_path, grad_accum_steps=2, train_steps=6),
                            tfpar.OneDevice())
    assert first["resumed_from_step"] == 0
    resumed = tfpar.train.run(tiny(data_dir, tmp_path, grad_accum_steps=2), tfpar.OneDevice())
    assert resumed["resumed_from_step"] == 6
    assert resumed["initial_val_loss"] == first["initial_val_loss"]
    assert max_abs_diff(weights(out), weights(tmp_path)) == 0.0


def test_accumulating_2_batches_equals_one_step_on_the_double_batch(
        uninterrupted, data_dir, tmp_path):
    out, _ = uninterrupted
    tfpar.train.run(tiny(data_dir, tmp_path, global_batch_size=32), tfpar.OneDevice())
    single = weights(tmp_path)
    diff = max_abs_diff(weights(out), single)
    assert diff <= 1e-5, diff
    # Training moved the weights far more than that.
    keras.utils.set_random_seed(0)
    initial = tfpar.models.gpt(tfpar.models.GPTConfig(**json.loads(
        (out / "summary.json").read_text())["model_config"]))
    initial = {v.path: v.numpy() for v in initial.weights if v.path in single}
    assert max_abs_diff(initial, single) > 1e-2


def test_a_checkpoint_of_other_settings_is_refused_with_the_fix(uninterrupted, data_dir):
    out, _ = uninterrupted
    with pytest.raises(TrainConfigError, match="global_batch_size=16.*give a new --output_dir"):
        tfpar.train.run(tiny(data_dir, out, global_batch_size=32), tfpar.OneDevice())


@pytest.mark.parametrize("settings, message", [
    ({"train_steps": 50, "eval_every": 20}, "not a multiple of --eval_every=20"),
    ({"grad_accum_steps": 0}, "--grad_accum_steps=0: must be >= 1"),
    ({"warmup_steps": 100, "train_steps": 40, "eval_every": 20}, "--warmup_steps=100"),
    ({"clip_norm": -1.0}, "--clip_norm=-1.0"),
])
def test_bad_settings_are_refused_naming_the_flag(settings, message):
    with pytest.raises(TrainConfigError, match=message):
        TrainConfig(**settings)


# --------------------------------------------------------------- the CLI
def summary_of(path):
    return json.loads((path / "summary.json").read_text())


def is_png(path):
    data = path.read_bytes()
    width, height = struct.unpack(">II", data[16:24])
    return data[:8] == b"\x89PNG\r\n\x1a\n" and width >= 400 and height >= 300


def scalar_tags(log_dir):
    tags = set()
    for event_file in log_dir.rglob("events.out.tfevents.*"):
        for record in tf.data.TFRecordDataset(str(event_file)):
            event = tf.compat.v1.Event.FromString(record.numpy())
            tags.update(value.tag for value in event.summary.value)
    return tags


# The default tokenizer (bpe:4096, trained once in the module's data dir) on the tiny GPT.
SHORT = ["--model=tiny", "--train_steps=20", "--eval_every=10", "--eval_batches=2",
         "--global_batch_size=16", "--seq_len=32", "--warmup_steps=5", "--sample_tokens=40"]


@pytest.mark.multiprocess
def test_tfpar_train_data_parallel_writes_every_output(data_dir, tmp_path):
    result = tfpar_cli("train", "--strategy=data", "--num_simulated_devices=4",
                       f"--data_dir={data_dir}", f"--output_dir={tmp_path}", *SHORT, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:]
    assert "Epoch 2/2" in result.stdout and "tokens_per_second" in result.stdout
    summary = summary_of(tmp_path)
    assert summary["strategy"] == "data" and summary["devices"] == 4
    assert summary["dims"]["dp"] == 4 and summary["dims"]["world_size"] == 4
    assert summary["steps"] == 20 and summary["data"].startswith("TFDS python_stdlib")
    assert summary["final_val_loss"] < 0.9 * summary["initial_val_loss"]  # 8.3 nats at start
    assert summary["tokens_per_second"] > 0 and 0 < summary["mfu"] < 1
    memory = summary["memory"]  # replicated: every device holds everything
    assert memory["parameter_bytes_per_device"] == memory["parameter_bytes_total"]
    assert memory["optimizer_bytes_per_device"] >= 2 * memory["parameter_bytes_per_device"]
    assert memory["peak_step_bytes"] > memory["parameter_bytes_per_device"]
    assert 0.3 * 2**30 < memory["host_peak_bytes"] < 8 * 2**30  # TensorFlow alone: 0.4-0.5 GiB
    assert summary["communication"]["gradient_wire_bytes_per_device"] == pytest.approx(
        1.5 * memory["gradient_bytes_per_device"])  # 2(n-1)/n of float32 gradients, n = 4
    assert "tfpar train: memory per device: parameters" in result.stdout
    # bits per byte = nats per token / ln 2 / bytes per token (BPE tokens: 3-4 bytes)
    assert 3 < summary["val_bytes_per_token"] < 4.5
    assert summary["final_val_bits_per_byte"] == pytest.approx(
        summary["final_val_loss"] / np.log(2) / summary["val_bytes_per_token"])
    assert summary["tokenizer"] == "bpe:4096" and (tmp_path / "tokenizer.json").exists()
    assert is_png(tmp_path / "loss.png")
    assert (tmp_path / "sample.txt").read_text().startswith("def")
    assert {"epoch_loss", "epoch_tokens_per_second", "epoch_mfu",
            "epoch_bits_per_byte"} <= scalar_tags(  # validation: the val_ prefix dropped
        tmp_path / "tensorboard"), scalar_tags(tmp_path / "tensorboard")
    # What a user types: `import tfpar` registers the GPT's layers, though it loads no Keras.
    loaded = run([sys.executable, "-c", "import tfpar, keras, numpy as np, sys; "
                  f"m = keras.saving.load_model({str(tmp_path / 'model.keras')!r}); "
                  "print('logits', m.predict(np.zeros((1, 32), 'int32'), verbose=0).shape)"],
                 timeout=120)
    assert "logits (1, 32, 4096)" in loaded.stdout, loaded.stdout[-3000:]
    assert "tfpar train: dp 4 x tp 1 x pp 1 on 4 CPU devices (data)" in result.stdout
    assert summary["layout"] == "dp 4 x tp 1 x pp 1 on 4 CPU devices"
    assert "zero_stage" not in summary["dims"] and "schedule" not in summary["dims"]
    state = json.loads((tmp_path / "train_state.json").read_text())
    assert [step for step, _ in state["val_losses"]] == [0, 10, 20]


@pytest.mark.multiprocess
def test_tfpar_train_runs_the_plans_pipeline_of_tensor_parallel_stages(data_dir, tmp_path):
    """`tfpar plan --format=json` -> `tfpar train --plan`: with 1 MiB per device the
    plan's best layout for the tiny GPT on 4 devices is pp 2 x tp 2 (two stages,
    each a 2-device tensor-parallel mesh, the job's global gradient clipping
    taken over both meshes). (The plain pipeline's `tfpar train` runs are in
    tests/test_preemption.py.)"""
    plan = tfpar_cli("plan", "--model=tiny", "--seq_len=32", "--global_batch_size=4",
                     "--devices=4", "--devices_per_node=4", "--device_memory=0.00095",
                     "--format=json")
    assert plan.returncode == 0, plan.stdout[-3000:]
    best = json.loads(plan.stdout)["recommended"]
    assert best["tfpar_flags"].startswith("--tp=2 --pp=2 --microbatches=4 "), best["tfpar_flags"]
    (tmp_path / "plan.json").write_text(plan.stdout)
    result = tfpar_cli("train", f"--plan={tmp_path / 'plan.json'}", "--num_simulated_devices=4",
                       f"--data_dir={data_dir}", f"--output_dir={tmp_path}",
                       *[a for a in SHORT if not a.startswith(("--global_batch_size", "--seq_len",
                                                                "--model"))],
                       timeout=300)
    assert result.returncode == 0, result.stdout[-3000:]
    summary = summary_of(tmp_path)
    assert summary["strategy"] == "pipeline" and summary["strategy_details"]["stages"] == 2
    assert summary["strategy_details"]["tensor_parallel"] == 2
    assert summary["dims"] == best["dims"]
    assert summary["global_batch_size"] == 4
    # 20 steps of 4 sequences: 8.38 -> 7.58 nats when measured.
    assert summary["final_val_loss"] < summary["initial_val_loss"] - 0.5
    # Each device holds half of its stage: under half the model.
    memory = summary["memory"]
    assert memory["parameter_bytes_per_device"] < 0.5 * memory["parameter_bytes_total"]


@pytest.mark.multiprocess
def test_an_unprepared_tfds_dataset_fails_at_once_with_the_fix(tmp_path):
    result = tfpar_cli("train", "--dataset=tiny_shakespeare", f"--data_dir={tmp_path}",
                       f"--output_dir={tmp_path / 'out'}", timeout=120)
    assert result.returncode == 2
    assert "'tiny_shakespeare' is not prepared" in result.stdout
    assert "--text_files=GLOB" in result.stdout
    assert result.elapsed < 60  # no download retries


# ------------------------------------------------- other text, other tokenizers
class LowercaseLetters:
    """A user tokenizer: 26 letters and one id for everything else."""

    vocab_size = 27

    def encode(self, text):
        codes = tf.cast(tf.io.decode_raw(tf.strings.lower(text), tf.uint8), tf.int32) - 97
        return tf.where((codes >= 0) & (codes < 26), codes, 26)

    def decode(self, ids):
        return "".join(chr(97 + i) if i < 26 else " " for i in ids)


def test_text_files_and_a_user_tokenizer_train_through_the_same_job(tmp_path):
    for i in range(3):
        (tmp_path / f"doc{i}.txt").write_text("the quick brown fox jumps over the lazy dog " * 200)
    summary = tfpar.train.run(TrainConfig(
        output_dir=str(tmp_path / "out"), text_files=str(tmp_path / "*.txt"),
        model="tiny", tokenizer="test_train:LowercaseLetters", seq_len=16, global_batch_size=8,
        train_steps=10, eval_every=5, eval_batches=1, warmup_steps=1, sample_tokens=8,
        sample_prompt="the "), tfpar.OneDevice())
    assert summary["model_config"]["vocab"] == 128  # 27 padded to a multiple of 128
    assert summary["data"].startswith("files ")
    assert summary["final_val_loss"] < 0.75 * summary["initial_val_loss"]
    assert (tmp_path / "out" / "sample.txt").read_text().startswith("the ")


@pytest.mark.multiprocess
def test_tfpar_train_sharded_zero3_with_recomputation_keeps_a_quarter_per_device(tmp_path):
    result = tfpar_cli("train", "--fsdp=4", "--zero_stage=3", "--recompute=full",
                       "--num_simulated_devices=4", "--tokenizer=bytes",
                       f"--output_dir={tmp_path}", *SHORT, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:]
    summary = summary_of(tmp_path)
    assert summary["strategy"] == "sharded" and summary["recompute"] == "full"
    assert summary["dims"]["fsdp"] == 4 and summary["dims"]["zero_stage"] == 3
    memory = summary["memory"]
    assert memory["parameter_bytes_per_device"] == memory["parameter_bytes_total"] / 4
    assert memory["gradient_bytes_per_device"] == memory["parameter_bytes_total"] / 4
    assert memory["peak_step_bytes"] > 0
    assert summary["final_val_loss"] < 0.9 * summary["initial_val_loss"]
