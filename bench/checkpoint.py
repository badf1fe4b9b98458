"""Benchmark: how long a checkpoint stalls training, written in the step or in the background.

An MLP of about `--params` parameters (with AdamW's two moments, a backup is
3x that in float32) trains with `tfpar.callbacks.BackupAndRestore` saving
every `--save_every` batches, twice:

  sync    the backup is written, fsync'ed and committed before the next step;
  async   the step boundary only snapshots the `.weights.h5` bytes to host
          memory; a background thread writes, syncs and commits them.

The stall of a save is the time the training thread spends in it (for
async: waiting for the previous write, if it is not done, plus the
snapshot). The figure the issue asks for is the ratio async / sync (goal
<= 0.2, with a save that takes >= 1 s).

It also times TensorFlow's own asynchronous checkpoint
(`tf.train.Checkpoint.write` with `CheckpointOptions(enable_async=True)`)
of the same model, for the record in BUILD_NOTES: it writes TensorFlow's
format, not the `.weights.h5` file the backups are.

Usage::

    python bench/checkpoint.py [--params 24000000] [--saves 4] [--save_every 20] [--dir /tmp]
"""

import argparse
import json
import os
import shutil
import statistics
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def build(params: int):
    import keras
    import numpy as np

    keras.utils.set_random_seed(0)
    width = 1024
    layers = max(1, round(params / (width * width)))
    model = keras.Sequential([keras.Input((width,))]
                             + [keras.layers.Dense(width, activation="relu")
                                for _ in range(layers)])
    model.compile(optimizer=keras.optimizers.AdamW(1e-4), loss="mse")
    model.optimizer.build(model.trainable_variables)
    rng = np.random.RandomState(0)
    x = rng.normal(size=(64, width)).astype("float32")
    return model, x


def stalls(model, x, directory: str, async_save: bool, saves: int, save_every: int) -> dict:
    """Seconds the training thread spent in each save, and the run's wall time."""
    import tensorflow as tf

    from tfpar.callbacks import BackupAndRestore

    backup = BackupAndRestore(directory, save_freq=save_every, delete_checkpoint=False,
                              async_save=async_save)
    spent = []
    save = backup._save_model

    def timed(*args, **kwargs):
        start = time.perf_counter()
        save(*args, **kwargs)
        spent.append(time.perf_counter() - start)

    backup._save_model = timed
    data = tf.data.Dataset.from_tensors((x, x)).repeat()
    start = time.perf_counter()
    model.fit(data, epochs=1, steps_per_epoch=saves * save_every, verbose=0,
              callbacks=[backup])  # on_train_end waits for the last write
    wall = time.perf_counter() - start
    return {"stall_seconds": spent, "wall_seconds": wall}


def tf_async_checkpoint(model, directory: str) -> dict:
    import tensorflow as tf

    checkpoint = tf.train.Checkpoint(model=model, optimizer=model.optimizer)
    options = tf.train.CheckpointOptions(enable_async=True)
    prefix = os.path.join(directory, "tf-async")
    times = []
    try:
        for _ in range(3):
            start = time.perf_counter()
            checkpoint.write(prefix, options=options)
            times.append(time.perf_counter() - start)
        start = time.perf_counter()
        checkpoint.sync()
        last_write = time.perf_counter() - start
    except Exception as e:  # noqa: BLE001  (recorded, not fatal: it is the alternative)
        return {"error": f"{type(e).__name__}: {str(e)[:300]}"}
    return {"call_seconds": times, "sync_wait_seconds": last_write}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--params", type=int, default=24_000_000)
    parser.add_argument("--saves", type=int, default=4)
    parser.add_argument("--save_every", type=int, default=20)
    parser.add_argument("--dir", default=None, help="Where backups go (default: a temp dir).")
    args = parser.parse_args()

    from tfpar.compat._keras import weights_h5_bytes

    model, x = build(args.params)
    parameters = sum(int(v.numpy().size) for v in model.trainable_variables)
    size = len(weights_h5_bytes(model))
    model.train_on_batch(x, x)  # trace the step before timing anything
    root = tempfile.mkdtemp(prefix="tfpar-bench-ckpt-", dir=args.dir)
    try:
        results = {}
        for mode in ("sync", "async"):
            results[mode] = stalls(model, x, os.path.join(root, mode), mode == "async",
                                   args.saves, args.save_every)
        results["tf_async_checkpoint"] = tf_async_checkpoint(model, root)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    # The first save of each run also creates the directory; the median of
    # the rest is the steady state.
    sync = statistics.median(results["sync"]["stall_seconds"][1:])
    async_ = statistics.median(results["async"]["stall_seconds"][1:])
    report = {"parameters": parameters, "backup_bytes": size,
              "sync_stall_seconds": sync, "async_stall_seconds": async_,
              "async_over_sync": async_ / sync, **results}
    print(json.dumps(report, indent=1))
    print(f"checkpoint of {size / 1e6:.0f} MB ({parameters:,} parameters + AdamW state): "
          f"stall per save {sync:.3f} s sync, {async_:.3f} s async; "
          f"async/sync = {async_ / sync:.3f} (goal <= 0.2)")


if __name__ == "__main__":
    main()
