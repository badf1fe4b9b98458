"""Benchmark: pipeline x tensor x data layouts against one device and each other.

Prints, for the reference GPT on 8 simulated devices, the `fit` step time and
tokens/s of:
  - plain Keras on one device (the baseline of every ratio);
  - `Pipeline` of device stages (pp 2);
  - `TensorParallel` (tp 2);
  - pipelines of tensor-parallel stage meshes: pp 2 x tp 2, pp 2 x tp 2 x dp 2,
    pp 4 x tp 2;
same global batch, same micro-batches, same process, medians over rounds.

Usage::

    python bench/three_d.py [--size mini] [--batch 16] [--microbatches 4]

Simulated CPU devices share the machine's cores: this measures what each
layout costs on top of the same arithmetic (sends between meshes, the
schedule's data dependencies, DTensor's SPMD programs), never a speed-up.
Fixed-cost stages (`tfpar.strategies.pipeline.FixedCost`), with which
bench/pipeline.py compares device stages to their schedule's ideal step,
cannot run here: their sleeps are Python calls, which DTensor programs refuse.
Tensor-parallel stages are compared with their schedule's ideal across
processes instead, where each stage runs on a core of its own:
`python bench/pipeline_processes.py --tp 2 --ideal`.
"""

import argparse
import json
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import tfpar  # noqa: E402

tfpar.simulate_devices(8)

from gpt_step import add_arguments, step_time, summary  # noqa: E402

# name: (pp, tp, dp); None: TensorParallel; (0, 0, 0): one device. The
# largest stage mesh (4 devices) comes before the smaller ones and
# TensorParallel's: TensorFlow 2.21 hangs when a mesh is larger than the
# process's first (tfpar.strategies.tensor.mesh).
LAYOUTS = {
    "one_device": (0, 0, 0),
    "pp2": (2, 1, 1),
    "pp2 x tp2 x dp2": (2, 2, 2),
    "pp2 x tp2": (2, 2, 1),
    "pp4 x tp2": (4, 2, 1),
    "tp2": None,
}


def strategy_for(name, microbatches, schedule):
    layout = LAYOUTS[name]
    if layout is None:
        return tfpar.TensorParallel("batch:1,model:2", "megatron")
    pp, tp, dp = layout
    if pp == 0:
        return None
    return tfpar.Pipeline(stages=pp, tensor_parallel=tp, replicas=dp,
                          microbatches=microbatches, schedule=schedule)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_arguments(parser)
    args = parser.parse_args()

    times = {name: [] for name in LAYOUTS}
    for _ in range(args.rounds):
        for name in LAYOUTS:
            times[name].append(step_time(strategy_for(name, args.microbatches, args.schedule),
                                         args.size, args.batch, args.steps, warmup=2))
    results = summary(times, args)
    print(json.dumps(results, indent=2))
    for name in LAYOUTS:
        print(f"{args.size} {name:>16}: {results['step_time_s'][name] * 1e3:7.1f} ms/step, "
              f"{results['tokens_per_s'][name]:8.0f} tokens/s, "
              f"{results['step_time_ratio_to_one_device'][name]:.2f} x one device's step "
              f"(8 simulated devices on {os.cpu_count()} cores: overhead, not speed-up)")


if __name__ == "__main__":
    main()
