"""`tfpar.callbacks.BackupAndRestore` in one process: background writes, failed writes, a full disk.

Kills at each step of a commit, and preemption under every strategy, run
in real processes: tests/test_checkpoint_faults.py, tests/test_preemption.py.
"""

import errno
import json
import os
import shutil
import subprocess

import h5py
import keras
import numpy as np
import pytest

import tfpar
from tfpar.callbacks import BackupAndRestore, CheckpointWriteError
from tfpar.compat._keras import weights_h5_bytes

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


def test_an_async_backup_holds_the_state_of_its_step_not_of_when_it_is_written(tmp_path):
    """The snapshot is taken at the step boundary; training goes on meanwhile."""
    model = mlp()
    backup = BackupAndRestore(str(tmp_path), delete_checkpoint=False, async_save=True)
    fit(model, 1, [backup])
    at_epoch_end = weights_h5_bytes(model)
    backup.wait_for_pending_save()
    fit(model, 1, [])  # the weights move on
    assert (tmp_path / metadata(tmp_path)["weights"]).read_bytes() == at_epoch_end


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
@pytest.fixture
def small_disk(tmp_path):
    """mount(size) -> a directory on a tmpfs of `size` bytes, unmounted afterwards."""
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a small tmpfs needs root and mount(8)")
    mounted = []

    def mount(size):
        path = tmp_path / "disk"
        path.mkdir()
        subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tfpar-test", str(path)],
                       check=True)
        mounted.append(path)
        return path

    yield mount
    for path in mounted:
        subprocess.run(["umount", str(path)], check=True)


@pytest.mark.parametrize("async_save", [False, True], ids=["sync", "async"])
def test_a_full_disk_raises_one_error_naming_the_file_and_the_space_and_keeps_the_last_backup(
        small_disk, async_save):
    model = mlp(hidden=512)
    model.optimizer.build(model.trainable_variables)
    size = len(weights_h5_bytes(model))
    # Room for one backup and its metadata, not for a second beside it.
    disk = small_disk(-(-int(size * 1.5) // 4096) * 4096 + 8192)
    backup = BackupAndRestore(str(disk), delete_checkpoint=False, async_save=async_save)
    fit(model, 1, [backup])
    backup.wait_for_pending_save()
    first = model.get_weights()

    with pytest.raises(CheckpointWriteError) as error:
        fit(model, 3, [BackupAndRestore(str(disk), delete_checkpoint=False,
                                        async_save=async_save)])
    message = str(error.value)
    assert message.startswith(f"cannot write the checkpoint {disk}/backup-e2-b0.weights.h5: "
                              "no space left on its file system (it needs "
                              f"{size / 1e6:.2f} MB, "), message
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
