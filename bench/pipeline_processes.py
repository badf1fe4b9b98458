"""Benchmark: a pipeline whose stages live in two processes, against the same pipeline in one.

Prints the `fit` step time and tokens/s of the reference GPT:
  - plain Keras on one device (the baseline of every ratio);
  - `Pipeline` of 2 stages on 2 simulated devices of this process;
  - the same pipeline across 2 processes under `tfpar launch` (one device
    each; rank 0 drives both, `tfpar.cluster.single_controller`);
same global batch and micro-batches, medians over rounds.

Usage::

    python bench/pipeline_processes.py [--size mini] [--batch 16] [--microbatches 4]

Both processes share the machine's cores, as the simulated devices do: this
measures what crossing processes costs (gRPC between them, the function
partitioned by process), never a speed-up.
"""

import argparse
import json
import os
import subprocess
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def parse_args():
    from gpt_step import add_arguments

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_arguments(parser)
    parser.add_argument("--across", action="store_true",
                        help="(internal) run as one rank of the 2-process job")
    return parser.parse_args()


def across(args):
    """One rank of the 2-process job: rank 1 serves, rank 0 times and prints JSON."""
    import tfpar
    from tfpar.cluster import Cluster, single_controller

    cluster = Cluster.from_env()
    if cluster.rank > 0:
        sys.exit(single_controller.serve(cluster, num_local_devices=1))
    tfpar.simulate_devices(1)
    from gpt_step import step_time

    dims = tfpar.ParallelDims(pp=2, microbatches=args.microbatches, schedule=args.schedule)
    times = [step_time(tfpar.strategies.build(dims, cluster=cluster), args.size, args.batch,
                       args.steps, warmup=2) for _ in range(args.rounds)]
    print(json.dumps({"across_processes": times}), flush=True)


def main():
    args = parse_args()
    if args.across:
        return across(args)
    import tfpar

    tfpar.simulate_devices(2)
    from gpt_step import step_time, summary

    times = {"one_device": [], "pp2 in one process": []}
    for _ in range(args.rounds):
        times["one_device"].append(step_time(None, args.size, args.batch, args.steps, 2))
        strategy = tfpar.Pipeline(stages=2, microbatches=args.microbatches,
                                  schedule=args.schedule)
        times["pp2 in one process"].append(
            step_time(strategy, args.size, args.batch, args.steps, 2))
    here = os.path.dirname(os.path.abspath(__file__))
    result = subprocess.run(
        [sys.executable, "-m", "tfpar.cli.main", "launch", "--nproc", "2", "--",
         sys.executable, os.path.join(here, "pipeline_processes.py"), "--across",
         *[f"--{k}={v}" for k, v in vars(args).items() if k != "across"]],
        capture_output=True, text=True, timeout=900, cwd=here)
    lines = [line.split("] ", 1)[-1] for line in result.stdout.splitlines()
             if '"across_processes"' in line]
    if result.returncode or not lines:
        sys.exit(f"the 2-process run failed ({result.returncode}):\n{result.stdout[-3000:]}")
    times["pp2 across 2 processes"] = json.loads(lines[-1])["across_processes"]

    results = summary(times, args)
    print(json.dumps(results, indent=2))
    local = results["step_time_s"]["pp2 in one process"]
    for name in times:
        print(f"{args.size} {name:>24}: {results['step_time_s'][name] * 1e3:7.1f} ms/step, "
              f"{results['tokens_per_s'][name]:8.0f} tokens/s, "
              f"{results['step_time_ratio_to_one_device'][name]:.2f} x one device's step, "
              f"{results['step_time_s'][name] / local:.2f} x the in-process pipeline's "
              f"({os.cpu_count()} shared cores: overhead, not speed-up)")


if __name__ == "__main__":
    main()
