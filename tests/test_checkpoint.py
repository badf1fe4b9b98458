"""`tfpar.callbacks.BackupAndRestore` in one process: background writes, failed writes, a full disk.

Kills at each step of a commit, and preemption under every strategy, run
in real processes: tests/test_checkpoint_faults.py, tests/test_preemption.py.
"""

import errno
import json
import os

import h5py
import keras
import numpy as np
import pytest

from tfpar.callbacks import BackupAndRestore, CheckpointWriteError
from tfpar.compat._keras import (snapshot_h5_bytes, weights_file_bound, weights_h5_bytes,
                                 weights_snapshot)

BATCHES = 8  # per epoch


class Interrupted(Exception):
    """Stands for a process killed mid-training (the callbacks after it never run)."""


class InterruptAt(keras.callbacks.Callback):
    def __init__(self, epoch, batch):
        super().__init__()
        self.at = (epoch, batch)
        self.epoch = 0

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch = epoch

    def on_train_batch_end(self, batch, logs=None):
        if (self.epoch, batch) == self.at:
            raise Interrupted()


def data():
    rng = np.random.RandomState(0)
    x = rng.normal(size=(BATCHES * 16, 16)).astype("float32")
    return x, np.tanh(x @ rng.normal(size=(16, 4))).astype("float32")


def mlp(hidden=32):
    """The same initial weights every time."""
    model = keras.Sequential([keras.Input((16,)), keras.layers.Dense(hidden, activation="tanh"),
                              keras.layers.Dense(4)])
    rng = np.random.RandomState(7)
    model.set_weights([rng.normal(scale=0.3, size=w.shape).astype("float32")
                       for w in model.get_weights()])
    model.compile(optimizer=keras.optimizers.Adam(1e-2), loss="mse")
    return model


def fit(model, epochs, callbacks):
    x, y = data()
    model.fit(x, y, batch_size=16, epochs=epochs, shuffle=False, verbose=0, callbacks=callbacks)
    return model.get_weights()


def metadata(backup_dir):
    return json.loads((backup_dir / "training_metadata.json").read_text())


@pytest.fixture(scope="module")
def uninterrupted():
    return fit(mlp(), 3, [])


def test_async_backups_resume_mid_epoch_to_the_weights_of_an_uninterrupted_run(
        uninterrupted, tmp_path):
    backup = BackupAndRestore(str(tmp_path), save_freq=3, delete_checkpoint=False,
                              async_save=True)
    with pytest.raises(Interrupted):
        fit(mlp(), 3, [backup, InterruptAt(epoch=1, batch=6)])
    backup.wait_for_pending_save()  # a killed process's write would be lost: still resumable
    assert (metadata(tmp_path)["epoch"], metadata(tmp_path)["step_in_epoch"]) == (1, 7)
    resumed = fit(mlp(), 3, [BackupAndRestore(str(tmp_path), save_freq=3, async_save=True)])
    for a, b in zip(uninterrupted, resumed):
        assert np.array_equal(a, b)
    assert not tmp_path.exists()  # delete_checkpoint: removed after the pending write


def test_a_snapshot_keeps_the_state_of_its_step_while_training_goes_on():
    """An async backup is serialized after later steps have updated the variables."""
    model = mlp()
    fit(model, 1, [])
    at_the_step = weights_h5_bytes(model)
    snapshot = weights_snapshot(model)
    fit(model, 1, [])  # weights and optimizer state change (in place where TF can)
    assert snapshot_h5_bytes(snapshot) == at_the_step
    assert weights_h5_bytes(model) != at_the_step


def test_a_backup_file_is_the_file_keras_save_weights_writes(tmp_path):
    model = mlp()
    fit(model, 1, [BackupAndRestore(str(tmp_path / "backup"), delete_checkpoint=False)])
    model.save_weights(str(tmp_path / "keras.weights.h5"))
    restored = [mlp(), mlp()]
    for m, path in zip(restored, ["backup/backup-e1-b0.weights.h5", "keras.weights.h5"]):
        m.optimizer.build(m.trainable_variables)
        m.load_weights(str(tmp_path / path))
    for a, b in zip(*[m.get_weights() + [v.numpy() for v in m.optimizer.variables]
                      for m in restored]):
        assert np.array_equal(a, b)


def test_a_failing_background_write_is_raised_at_the_next_save(tmp_path, monkeypatch):
    backup = BackupAndRestore(str(tmp_path), delete_checkpoint=False, async_save=True)
    model = mlp()
    fit(model, 1, [backup])  # epoch 1's backup: committed at the next wait
    backup.wait_for_pending_save()

    def failing_fsync(fd):
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(os, "fsync", failing_fsync)
    with pytest.raises(CheckpointWriteError, match=r"backup-e2-b0\.weights\.h5: \[Errno 5\] "
                       r"Input/output error\. The previous checkpoint is intact"):
        # Epoch 2's write fails in the background; epoch 3's save raises it.
        fit(model, 3, [BackupAndRestore(str(tmp_path), delete_checkpoint=False,
                                        async_save=True)])
    assert metadata(tmp_path)["weights"] == "backup-e1-b0.weights.h5"
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "backup-e1-b0.weights.h5", "training_metadata.json"]


# ----------------------------------------------------------------- full disk
@pytest.mark.parametrize("async_save", [False, True], ids=["sync", "async"])
def test_a_full_disk_raises_one_error_naming_the_file_and_the_space_and_keeps_the_last_backup(
        small_disk, async_save):
    model = mlp(hidden=512)
    model.optimizer.build(model.trainable_variables)
    size, bound = len(weights_h5_bytes(model)), weights_file_bound(model)
    assert size <= bound
    # Room for the bound a save checks first (so for one backup and its metadata), and
    # less than that left beside the first backup.
    disk = small_disk(-(-bound // 4096) * 4096 + 8192)
    assert size > 8192
    backup = BackupAndRestore(str(disk), delete_checkpoint=False, async_save=async_save)
    fit(model, 1, [backup])
    backup.wait_for_pending_save()
    first = model.get_weights()

    with pytest.raises(CheckpointWriteError) as error:
        fit(model, 3, [BackupAndRestore(str(disk), delete_checkpoint=False,
                                        async_save=async_save)])
    message = str(error.value)
    assert message.startswith(f"cannot write the checkpoint {disk}/backup-e2-b0.weights.h5: "
                              "no space left on its file system (it needs about "
                              f"{bound / 1e6:.2f} MB, "), message
    assert "\n" not in message and message.endswith("The previous checkpoint is intact.")
    # The half-written file is gone; the last backup is the latest and whole.
    assert sorted(p.name for p in disk.iterdir()) == [
        "backup-e1-b0.weights.h5", "training_metadata.json"]
    assert BackupAndRestore(str(disk)).position() == (1, 0)
    restored = mlp(hidden=512)
    restored.optimizer.build(restored.trainable_variables)
    restored.load_weights(str(disk / "backup-e1-b0.weights.h5"))
    for a, b in zip(first, restored.get_weights()):
        assert np.array_equal(a, b)
    with h5py.File(disk / "backup-e1-b0.weights.h5") as f:
        assert "optimizer" in f
