"""Crash-consistent checkpoints: kills at every step of a commit, and a full disk.

A process killed at any step of a backup's commit leaves the previous
backup as the latest, and a relaunch resumes from it; `tfpar train` on a
full disk exits 2 with one line and keeps the previous checkpoint.

`TFPAR_CHECKPOINT_FAULT=STEP@2` (see `tfpar.callbacks.COMMIT_STEPS`) makes
the worker SIGKILL itself right after STEP of its second backup (the end of
epoch 2 of 3). A relaunch must resume from the last committed backup (the
first, or the second once its metadata was renamed) and end with the
weights of an uninterrupted run, bit for bit.
"""

import json
import re
import sys

import h5py
import numpy as np
import pytest

import tfpar
from conftest import run, tfpar_cli, worker_command
from tfpar.callbacks import COMMIT_STEPS, BackupAndRestore
from tfpar.compat._keras import weights_file_bound, weights_h5_bytes
from tfpar.data import corpus
from tfpar.train import TrainConfig, job

pytestmark = pytest.mark.multiprocess

COMMITTED_AFTER = COMMIT_STEPS.index("metadata_renamed")


def weights(out):
    saved = np.load(f"{out}.rank0.npz")
    return [saved[f"arr_{i}"] for i in range(len(saved.files))]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    out = tmp_path_factory.mktemp("uninterrupted") / "out"
    result = run(worker_command("--epochs=3", f"--out={out}"), timeout=120)
    assert "rank 0 done" in result.stdout, result.stdout[-3000:]
    return weights(out)


@pytest.mark.parametrize("step, async_save", [(step, False) for step in COMMIT_STEPS]
                         + [("weights_partial", True), ("metadata_staged", True)],
                         ids=lambda v: v if isinstance(v, str) else ("async" if v else "sync"))
def test_a_kill_at_each_commit_step_leaves_the_last_committed_backup_and_resumes_exactly(
        uninterrupted, tmp_path, step, async_save):
    backup, out = tmp_path / "backup", tmp_path / "out"
    flags = ("--epochs=3", f"--backup_dir={backup}", f"--out={out}",
             "--async_save" if async_save else "--noasync_save")
    killed = run(worker_command(*flags), env={"TFPAR_CHECKPOINT_FAULT": f"{step}@2"},
                 timeout=120)
    assert killed.returncode == -9, killed.stdout[-3000:]
    assert f"killing this process after {step}" in killed.stdout

    epoch = 2 if COMMIT_STEPS.index(step) >= COMMITTED_AFTER else 1
    metadata = json.loads((backup / "training_metadata.json").read_text())
    assert metadata == {"epoch": epoch, "step_in_epoch": 0,
                        "weights": f"backup-e{epoch}-b0.weights.h5"}
    resumed = run(worker_command(*flags), timeout=120)
    assert "rank 0 done" in resumed.stdout, resumed.stdout[-3000:]
    assert f"at epoch {epoch}, batch 0" in resumed.stdout
    for a, b in zip(uninterrupted, weights(out)):
        assert np.array_equal(a, b)
    # What the killed save left behind is gone after the relaunch's own saves.
    assert sorted(p.name for p in backup.iterdir()) == [
        "backup-e3-b0.weights.h5", "training_metadata.json"]


def test_tfpar_train_on_a_full_disk_exits_2_with_one_line_and_keeps_the_last_checkpoint(
        tmp_path, small_disk):
    data_dir = str(tmp_path / "tfds")
    corpus.prepare(corpus.DEFAULT_DATASET, data_dir)
    config = TrainConfig(model="tiny", tokenizer="bytes", layers=1, seq_len=32, data_dir=data_dir)
    shape = config.gpt_config(256)
    strategy = tfpar.OneDevice()
    model = job._compiled_model(config, shape, strategy)
    with strategy.scope():
        model.optimizer.build(model.trainable_variables)
    size, bound = len(weights_h5_bytes(model)), weights_file_bound(model)
    out = tmp_path / "out"
    # The checkpoint directory on a disk with room for one checkpoint, not two.
    small_disk(-(-bound // 4096) * 4096 + 8192, out / "checkpoint")

    result = tfpar_cli("train", "--model=tiny", "--tokenizer=bytes", "--layers=1",
                       "--seq_len=32", "--global_batch_size=16",
                       "--train_steps=24", "--eval_every=6", "--eval_batches=2",
                       "--warmup_steps=2", "--sample_tokens=8", "--peak_tflops=1",
                       f"--data_dir={data_dir}", f"--output_dir={out}", timeout=180)
    assert result.returncode == 2, result.stdout[-3000:]
    errors = [line for line in result.stdout.splitlines() if line.startswith("tfpar train: ")]
    needed = re.fullmatch(
        f"tfpar train: cannot write the checkpoint {re.escape(str(out))}/checkpoint/"
        r"backup-e2-b0\.weights\.h5: "
        r"no space left on its file system \(it needs about ([0-9.]+) MB, [0-9.]+ MB free\); free "
        r"space there or give another directory. The previous checkpoint is intact.", errors[-1])
    assert needed, errors[-1]
    # The bound a save checks before it writes (the tensors and HDF5's own bytes).
    assert abs(float(needed.group(1)) - bound / 1e6) <= 0.01
    assert "Traceback" not in result.stdout
    assert BackupAndRestore(str(out / "checkpoint")).position() == (1, 0)
    assert sorted(p.name for p in (out / "checkpoint").iterdir()) == [
        "backup-e1-b0.weights.h5", "training_metadata.json"]
    with h5py.File(out / "checkpoint" / "backup-e1-b0.weights.h5") as f:
        assert "optimizer" in f


EXIT_AFTER_ASYNC_SAVE = """
import sys, time
import keras, numpy as np
import tfpar.callbacks as callbacks

upstream = callbacks._write_file
def slow_write(*args):  # a write still going on when the program fails
    time.sleep(2)
    upstream(*args)
callbacks._write_file = slow_write

class Fail(keras.callbacks.Callback):
    def on_epoch_end(self, epoch, logs=None):
        raise RuntimeError("the program fails right after a save")

model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)])
model.compile(optimizer="adam", loss="mse")
model.fit(np.ones((8, 4)), np.ones((8, 2)), epochs=2, verbose=0, callbacks=[
    callbacks.BackupAndRestore(sys.argv[1], delete_checkpoint=False, async_save=True), Fail()])
"""


def test_a_process_that_fails_after_an_async_save_exits_only_once_the_save_is_committed(
        tmp_path):
    result = run([sys.executable, "-c", EXIT_AFTER_ASYNC_SAVE, str(tmp_path)], timeout=120)
    assert result.returncode == 1 and "the program fails right after a save" in result.stdout
    assert json.loads((tmp_path / "training_metadata.json").read_text()) == {
        "epoch": 1, "step_in_epoch": 0, "weights": "backup-e1-b0.weights.h5"}
    assert (tmp_path / "backup-e1-b0.weights.h5").stat().st_size > 0
