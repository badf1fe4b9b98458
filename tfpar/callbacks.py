"""Fault-tolerance callbacks that are safe on many workers.

`keras.callbacks.ModelCheckpoint` works as it is under tfpar's strategies:
`tfpar.compat` makes `Model.save`/`save_weights` write from the chief only.
`keras.callbacks.BackupAndRestore` does not: every worker writes the backup
(an HDF5 lock error or a makedirs race on a shared directory), and it writes
the weights and the epoch counter as two files, so a kill between the two
leaves a backup whose weights and epoch disagree. `BackupAndRestore` below
fixes both.
"""

from __future__ import annotations

import json
import logging

import keras
import tensorflow as tf

from tfpar import compat

log = logging.getLogger("tfpar")

_METADATA = "training_metadata.json"


class BackupAndRestore(keras.callbacks.BackupAndRestore):
    """`keras.callbacks.BackupAndRestore` for multi-worker jobs.

    - Only the chief writes; every worker restores from the chief's backup,
      so all workers resume at the same epoch with the same weights (the
      backup directory must be shared between workers: a volume or a bucket).
    - A backup is committed atomically: weights go to a new file first, then
      a small metadata file naming that file and the epoch replaces the old
      one with a rename. A process killed at any moment leaves the previous
      backup intact.

    What it guarantees: with ``save_freq="epoch"`` a restarted job resumes at
    the first unfinished epoch with the weights and optimizer state of the
    last finished one, and (with a data order that depends only on the epoch,
    e.g. no shuffle or a per-epoch seed) ends with bit-identical weights to an
    uninterrupted run. With an integer ``save_freq``, Keras restarts the
    interrupted epoch from its first batch on the weights of the last
    mid-epoch backup: no work is lost beyond ``save_freq`` batches, but the
    batches before the backup are seen twice, so the result is not identical
    to an uninterrupted run.

    Example::

        model.fit(ds, epochs=10,
                  callbacks=[tfpar.callbacks.BackupAndRestore("/ckpt/backup")])
    """

    def __init__(self, backup_dir, save_freq="epoch", delete_checkpoint=True):
        super().__init__(backup_dir, save_freq=save_freq,
                         delete_checkpoint=delete_checkpoint, double_checkpoint=False)
        self._metadata_path = tf.io.gfile.join(backup_dir, _METADATA)

    def _read_metadata(self):
        if not tf.io.gfile.exists(self._metadata_path):
            return None
        with tf.io.gfile.GFile(self._metadata_path, "r") as f:
            return json.loads(f.read())

    def _load_model(self):
        metadata = self._read_metadata()
        if metadata is None or "weights" not in metadata:
            return super()._load_model()  # a plain Keras backup, or none
        if not self.model.built:
            raise ValueError(
                "BackupAndRestore needs a built model to restore into; build it "
                "(call it on a batch, or give it an Input) before fit()."
            )
        optimizer = self.model.optimizer
        if optimizer is not None and not optimizer.built:
            optimizer.build(self.model.trainable_variables)
        self.model.load_weights(tf.io.gfile.join(self.backup_dir, metadata["weights"]))
        self.model._initial_epoch = metadata["epoch"]
        log.info("tfpar: resumed from %s at epoch %d", self.backup_dir, metadata["epoch"])

    def _save_model(self):
        if not compat.should_write(self.model.distribute_strategy):
            return
        tf.io.gfile.makedirs(self.backup_dir)
        previous = self._read_metadata() or {}
        name = f"backup-e{self._current_epoch}-b{self._last_batch_seen}.weights.h5"
        self.model.save_weights(tf.io.gfile.join(self.backup_dir, name), overwrite=True)
        metadata = {"epoch": self._current_epoch, "batch": self._last_batch_seen,
                    "weights": name}
        staging = self._metadata_path + ".tmp"
        with tf.io.gfile.GFile(staging, "w") as f:
            f.write(json.dumps(metadata))
        tf.io.gfile.rename(staging, self._metadata_path, overwrite=True)  # the commit
        stale = previous.get("weights")
        if stale and stale != name:
            stale_path = tf.io.gfile.join(self.backup_dir, stale)
            if tf.io.gfile.exists(stale_path):
                tf.io.gfile.remove(stale_path)

    def on_train_end(self, logs=None):
        if not compat.should_write(self.model.distribute_strategy):
            return
        if self.delete_checkpoint and tf.io.gfile.exists(self.backup_dir):
            tf.io.gfile.rmtree(self.backup_dir)
