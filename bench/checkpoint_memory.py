"""Benchmark: the host memory a checkpoint adds to a process, each way of writing it.

A model of about `--params` parameters (Dense layers of width 1024) with
AdamW (the state a backup holds: the weights and two moments, 3x the
parameters in float32) takes one training step; then one backup is written
each way, each in a fresh process, and the process's peak resident memory
during the save (the kernel's high-water mark, reset just before it through
/proc/self/clear_refs) is compared with its resident memory before it:

  keras        plain Keras: `model.save_weights(path)` (the baseline);
  image        tfpar's previous way: a host snapshot, then an in-memory HDF5
               image of it, then its bytes, then the file;
  sync         `BackupAndRestore(async_save=False)`: each tensor read and
               written in turn (`tfpar.compat._keras.write_weights_h5`);
  async        `BackupAndRestore(async_save=True)`: a host snapshot, written
               by a background thread straight to the file.

Prints, per way, the memory added in MiB and as a fraction of the state
(the issue's goal for a synchronous save: <= 0.25).

Usage::

    python bench/checkpoint_memory.py [--params 50000000] [--dir /tmp]
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

WAYS = ("keras", "image", "sync", "async")


def _status(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def measure(way: str, params: int, directory: str) -> dict:
    """In this process: build, train a step, then save once `way`; the bytes it added."""
    import keras
    import numpy as np

    from tfpar import callbacks
    from tfpar.compat._keras import snapshot_h5_bytes, state_bytes, weights_snapshot

    width = 1024
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((width,))] + [
        keras.layers.Dense(width) for _ in range(max(1, round(params / (width * width))))])
    model.compile(optimizer=keras.optimizers.AdamW(1e-4), loss="mse")
    x = np.random.RandomState(0).normal(size=(8, width)).astype("float32")
    model.train_on_batch(x, x)
    state = state_bytes(model)
    with open("/proc/self/clear_refs", "w") as f:  # resets VmHWM to the current RSS
        f.write("5")
    before = _status("VmRSS")
    path = os.path.join(directory, f"{way}.weights.h5")
    if way == "keras":
        model.save_weights(path)
    elif way == "image":
        callbacks._write_file(path, snapshot_h5_bytes(weights_snapshot(model)), (None,) * 3)
    else:
        backup = callbacks.BackupAndRestore(os.path.join(directory, way),
                                            async_save=way == "async", delete_checkpoint=False)
        backup.set_model(model)
        backup._current_epoch = 0
        backup._save_model()
        backup.wait_for_pending_save()
    added = _status("VmHWM") - before
    return {"way": way, "state_bytes": state, "added_bytes": added,
            "added_over_state": added / state, "rss_before_bytes": before}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--params", type=int, default=50_000_000)
    parser.add_argument("--dir", default=None)
    parser.add_argument("--way", choices=WAYS, help=argparse.SUPPRESS)  # one measurement
    args = parser.parse_args()
    if args.way:
        print(json.dumps(measure(args.way, args.params, args.dir)))
        return
    rows = []
    with tempfile.TemporaryDirectory(prefix="tfpar-bench-ckpt-mem-", dir=args.dir) as root:
        for way in WAYS:
            out = subprocess.run([sys.executable, __file__, "--way", way, "--params",
                                  str(args.params), "--dir", root], check=True,
                                 capture_output=True, text=True).stdout
            rows.append(json.loads(out.strip().splitlines()[-1]))
    state = rows[0]["state_bytes"]
    print(f"state (weights + AdamW moments): {state / 2**20:.0f} MiB")
    for row in rows:
        print(f"{row['way']:6s} added {row['added_bytes'] / 2**20:8.1f} MiB = "
              f"{row['added_over_state']:.2f} x the state")
    keras_added = rows[0]["added_bytes"] or 1
    for row in rows[1:]:
        print(f"{row['way']:6s} / keras: {row['added_bytes'] / keras_added:.2f}")


if __name__ == "__main__":
    main()
