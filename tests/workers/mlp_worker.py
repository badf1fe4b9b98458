"""A training script driven by tfpar's flags, run by the multi-process tests.

It is what a user's script looks like (strategy from flags, build and compile
under the scope, `model.fit`), plus a few test hooks: fixed initial weights,
writing the final weights, killing itself at an epoch, removing a Keras fix.
"""

import json
import os
import signal
import sys

from absl import app, flags

import tfpar
from tfpar import flags as tfpar_flags  # noqa: F401  (defines the strategy flags)

flags.DEFINE_string("out", None, "Write final weights (.npz) and a report (.json) here.")
flags.DEFINE_integer("epochs", 3, "Epochs.")
flags.DEFINE_integer("examples", 256, "Training examples.")
flags.DEFINE_string("backup_dir", None, "BackupAndRestore directory.")
flags.DEFINE_bool("preemption", False, "With --backup_dir: PreemptionCheckpoint (save on SIGTERM).")
flags.DEFINE_integer("backup_every", 0, "With --backup_dir: back up every N batches (0: per epoch).")
flags.DEFINE_bool("async_save", False, "With --backup_dir: write backups in a background thread.")
flags.DEFINE_string("checkpoint_path", None, "ModelCheckpoint file path (.weights.h5 or .keras).")
flags.DEFINE_string("save_path", None, "model.save() path after fit.")
flags.DEFINE_integer("kill_at_epoch", -1, "SIGKILL this process at the start of this epoch...")
flags.DEFINE_integer("kill_rank", 1, "... if it is this rank ...")
flags.DEFINE_string("kill_once_marker", None, "... and this file does not exist yet (it is created).")
flags.DEFINE_multi_string("without_fix", [], "Remove this tfpar.compat Keras fix.")
flags.DEFINE_float("sleep_per_batch", 0.0, "Seconds to sleep after each batch (slow runs).")
FLAGS = flags.FLAGS


def make_data(n):
    import numpy as np

    rng = np.random.RandomState(42)
    x = rng.normal(size=(n, 16)).astype("float32")
    w = rng.normal(size=(16, 4)).astype("float32")
    y = np.tanh(x @ w) + 0.1 * rng.normal(size=(n, 4)).astype("float32")
    return x, y.astype("float32")


def initial_weights(model):
    import numpy as np

    rng = np.random.RandomState(7)
    return [rng.normal(scale=0.3, size=w.shape).astype("float32") for w in model.get_weights()]


def main(argv):
    import keras
    import numpy as np

    from tfpar import compat
    from tfpar.callbacks import BackupAndRestore, PreemptionCheckpoint

    strategy = tfpar.from_flags()
    if FLAGS.without_fix:
        compat.remove_keras_fixes(*FLAGS.without_fix)
    rank = strategy.worker_index
    batch = tfpar_flags.global_batch_size(strategy, default=32)
    x, y = make_data(FLAGS.examples)
    with strategy.scope():
        model = keras.Sequential([
            keras.Input((16,)),
            # Named for the tensor-parallel "megatron" preset: column- then row-parallel.
            keras.layers.Dense(32, activation="tanh", name="mlp_up"),
            keras.layers.Dense(4, name="mlp_down"),
        ])
        model.set_weights(initial_weights(model))
        model.compile(optimizer=keras.optimizers.AdamW(1e-2, weight_decay=1e-3),
                      loss="mse", metrics=["mae"])
    dataset = tfpar.data.from_arrays((x, y), strategy, global_batch_size=batch)

    callbacks = []
    if FLAGS.backup_dir:
        backup = PreemptionCheckpoint if FLAGS.preemption else BackupAndRestore
        callbacks.append(backup(FLAGS.backup_dir, save_freq=FLAGS.backup_every or "epoch",
                                delete_checkpoint=False, async_save=FLAGS.async_save))
    if FLAGS.checkpoint_path:
        callbacks.append(keras.callbacks.ModelCheckpoint(
            FLAGS.checkpoint_path,
            save_weights_only=FLAGS.checkpoint_path.endswith(".weights.h5")))

    class Hooks(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            marker = FLAGS.kill_once_marker
            if (epoch == FLAGS.kill_at_epoch and rank == FLAGS.kill_rank
                    and not (marker and os.path.exists(marker))):
                if marker:
                    open(marker, "w").close()
                print(f"test hook: rank {rank} kills itself at epoch {epoch}", flush=True)
                os.kill(os.getpid(), signal.SIGKILL)

        def on_train_batch_end(self, batch, logs=None):
            if FLAGS.sleep_per_batch:
                import time

                time.sleep(FLAGS.sleep_per_batch)

    history = model.fit(dataset, epochs=FLAGS.epochs, verbose=2,
                        callbacks=callbacks + [Hooks()])
    if FLAGS.save_path:
        model.save(FLAGS.save_path.format(rank=rank))
    if FLAGS.out:
        weights = model.get_weights()
        path = f"{FLAGS.out}.rank{rank}"
        np.savez(path + ".npz", *weights)
        with open(path + ".json", "w") as f:
            json.dump({
                "history": history.history,
                "steps": int(model.optimizer.iterations.numpy()),
                "replicas": strategy.num_replicas_in_sync,
                "workers": strategy.num_workers,
                "strategy": strategy.kind,
            }, f)
    print(f"rank {rank} done", flush=True)


if __name__ == "__main__":
    app.run(main)
