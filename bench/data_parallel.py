"""Benchmark: tfpar's data parallelism against the plain tf.distribute way.

In one run it measures
  A. Keras `fit` of the same model under raw `tf.distribute.MirroredStrategy`
     and under `tfpar.DataParallel`, on the same simulated devices, in
     alternating rounds (goal: ratio <= 1.03; tfpar's strategy *is* a
     MirroredStrategy, so any gap is noise);
  B. one process (`tfpar.OneDevice`) against `tfpar launch --nproc 2`
     (`tfpar.MultiWorker`), same global batch.

Usage::

    python bench/data_parallel.py [--devices 4] [--steps 60] [--rounds 3]

Simulated CPU devices and local workers share the machine's cores: these
numbers measure tfpar's overhead and the cost of collectives, not speed-up.
"""

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
HERE = os.path.dirname(os.path.abspath(__file__))


def build_and_time(strategy, steps, batch, warmup=10):
    """Seconds per optimizer step of `fit` (after a warm-up fit that traces)."""
    import keras
    import numpy as np

    rng = np.random.RandomState(0)
    x = rng.normal(size=(batch * (steps + warmup), 256)).astype("float32")
    y = rng.randint(0, 10, size=(len(x),))
    with strategy.scope():
        model = keras.Sequential([keras.Input((256,)),
                                  keras.layers.Dense(512, activation="relu"),
                                  keras.layers.Dense(512, activation="relu"),
                                  keras.layers.Dense(10)])
        model.compile(optimizer=keras.optimizers.AdamW(1e-3),
                      loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.fit(x[: batch * warmup], y[: batch * warmup], batch_size=batch, epochs=1, verbose=0)
    start = time.perf_counter()
    model.fit(x[batch * warmup:], y[batch * warmup:], batch_size=batch, epochs=1, verbose=0)
    return (time.perf_counter() - start) / steps


def part_a(args):
    import tensorflow as tf

    import tfpar

    tfpar.simulate_devices(args.devices)
    devices = [d.name for d in tf.config.list_logical_devices("CPU")]
    raw, ours = [], []
    for _ in range(args.rounds):
        raw.append(build_and_time(tf.distribute.MirroredStrategy(devices), args.steps, args.batch))
        ours.append(build_and_time(tfpar.DataParallel(), args.steps, args.batch))
    return {"mirrored_s_per_step": statistics.median(raw),
            "tfpar_s_per_step": statistics.median(ours),
            "ratio_tfpar_over_mirrored": statistics.median(ours) / statistics.median(raw),
            "rounds": args.rounds, "devices": args.devices}


def worker(args):
    import tfpar

    strategy = tfpar.MultiWorker() if os.environ.get("TF_CONFIG") else tfpar.OneDevice()
    seconds = build_and_time(strategy, args.steps, args.batch)
    if strategy.is_chief:
        print("BENCH " + json.dumps({"s_per_step": seconds}), flush=True)


def run_worker(prefix, args):
    command = prefix + [sys.executable, os.path.abspath(__file__), "--worker",
                        f"--steps={args.steps}", f"--batch={args.batch}"]
    out = subprocess.run(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                         check=True).stdout
    line = next(l for l in out.splitlines() if "BENCH " in l)
    return json.loads(line.split("BENCH ", 1)[1])["s_per_step"]


def part_b(args):
    launch = [sys.executable, "-m", "tfpar.cli.main", "launch", "--nproc", "2", "--"]
    single, multi = [], []
    for _ in range(args.rounds):
        single.append(run_worker([], args))
        multi.append(run_worker(launch, args))
    return {"one_process_s_per_step": statistics.median(single),
            "launch_nproc2_s_per_step": statistics.median(multi),
            "ratio_nproc2_over_one_process": statistics.median(multi) / statistics.median(single)}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--devices", type=int, default=4)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--batch", type=int, default=256, help="global batch")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)
    import keras
    import tensorflow as tf

    machine = {"cpus": os.cpu_count(), "python": platform.python_version(),
               "tensorflow": tf.__version__, "keras": keras.__version__}
    b = part_b(args)  # subprocesses first: part A fixes this process's devices
    a = part_a(args)
    print(json.dumps({"machine": machine, "mirrored_vs_tfpar": a, "one_vs_two_workers": b},
                     indent=2))
    print(f"\ntfpar.DataParallel / tf.distribute.MirroredStrategy step time: "
          f"{a['ratio_tfpar_over_mirrored']:.3f} (goal <= 1.03)")
    print(f"tfpar launch --nproc 2 / one process step time:          "
          f"{b['ratio_nproc2_over_one_process']:.3f} (same global batch; workers share "
          f"{machine['cpus']} cores)")


if __name__ == "__main__":
    main()
