"""Benchmark: tfpar.TensorParallel memory per device and step time.

Prints, for the reference GPT under the "megatron" preset:
  A. per-device parameter + AdamW-state bytes on a batch:1,model:N mesh vs
     the ideal 1/N of one device's (what is left above it is the replicated
     part: LayerNorms, position embeddings, row-parallel biases);
  B. the `fit` step time of TensorParallel on batch:1,model:2 and
     batch:2,model:2 simulated meshes vs plain single-device Keras, same
     global batch, same process.

Usage::

    python bench/tensor_parallel.py [--size mini] [--memory_size gpt2-small]

Simulated CPU devices share the machine's cores, so B measures DTensor's
overhead (SPMD expansion, collectives between logical devices), never a
speed-up.
"""

import argparse
import json
import os
import platform
import statistics

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import tfpar  # noqa: E402

tfpar.simulate_devices(4)

import keras  # noqa: E402
import tensorflow as tf  # noqa: E402
from gpt_step import step_time  # noqa: E402


def memory(size, model_axis):
    strategy = tfpar.TensorParallel(f"batch:1,model:{model_axis}", "megatron")
    with strategy.scope():
        model = tfpar.models.gpt(size)
        model.compile(optimizer=keras.optimizers.AdamW(1e-3), loss=tfpar.models.lm_loss())
        model.optimizer.build(model.trainable_variables)
    report = strategy.memory_report(model)
    per_device = report["parameter_bytes_per_device"] + report["optimizer_bytes_per_device"]
    one_device = 3 * report["parameter_bytes_total"]  # weights + two AdamW slots
    return {"model_axis": model_axis, "parameters": tfpar.models.config(size).num_parameters,
            "bytes_per_device": per_device, "bytes_one_device": one_device,
            "ratio_to_one_device": per_device / one_device, "ideal_ratio": 1 / model_axis}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", default="mini", help="GPT size for step times")
    parser.add_argument("--memory_size", default="gpt2-small", help="GPT size for memory")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--steps", type=int, default=15)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()

    results = {"machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                           "tensorflow": tf.__version__, "keras": keras.__version__},
               # The widest mesh first: see tfpar.strategies.tensor.mesh (TF 2.21 hangs otherwise).
               "memory": [memory(args.memory_size, n) for n in (4, 2)]}
    times = {"one_device": [], "batch:1,model:2": [], "batch:2,model:2": []}
    for _ in range(args.rounds):
        times["one_device"].append(step_time(None, args.size, args.batch, args.steps, warmup=3))
        for mesh in ("batch:2,model:2", "batch:1,model:2"):
            strategy = tfpar.TensorParallel(mesh, "megatron")
            times[mesh].append(step_time(strategy, args.size, args.batch, args.steps, warmup=3))
    base = statistics.median(times["one_device"])
    results["step_time_s"] = {k: statistics.median(v) for k, v in times.items()}
    results["step_time_ratio_to_one_device"] = {
        k: statistics.median(v) / base for k, v in times.items()}
    print(json.dumps(results, indent=2))
    for m in results["memory"]:
        print(f"{args.memory_size} on model:{m['model_axis']}: per-device params+AdamW "
              f"{m['bytes_per_device'] / 2**20:.1f} MiB = {m['ratio_to_one_device']:.3f} of one "
              f"device's (ideal {m['ideal_ratio']:.3f})")
    for mesh in ("batch:1,model:2", "batch:2,model:2"):
        print(f"{args.size} step time, TensorParallel {mesh} / one device: "
              f"{results['step_time_ratio_to_one_device'][mesh]:.2f} (simulated devices share "
              f"{os.cpu_count()} cores: overhead, not speed-up)")


if __name__ == "__main__":
    main()
