"""Benchmark: a pipeline whose stages live in two processes, against the same pipeline in one.

Prints the `fit` step time and tokens/s of the reference GPT:
  - plain Keras on one device (the baseline of every ratio);
  - `Pipeline` of 2 stages on 2 simulated devices of this process (with
    `--tp T`: each stage tensor-parallel over T devices, 2T in all);
  - the same pipeline across 2 processes under `tfpar launch`: one device
    each, rank 0 driving both (`tfpar.cluster.single_controller`); with
    `--tp T`, T devices each, every process running its own stage's mesh
    (`tfpar.strategies.pipeline.process_stages`);
same global batch and micro-batches, medians over rounds.

Usage::

    python bench/pipeline_processes.py [--size mini] [--batch 16] [--microbatches 4] [--tp 2]
    python bench/pipeline_processes.py --tp 2 --ideal

`--ideal` (with `--tp`) compares the tensor-parallel stages across processes
with their schedule's ideal step: each process runs on one thread (2
processes, 2 cores: the stages really overlap), records its timeline, and
the schedule is simulated (`Schedule.simulate`) with each stage's measured
mean forward and backward times; the ratio of the measured span of the
actions to that ideal is the runner's own cost in the schedule (sends,
receives, waits).

Both processes share the machine's cores, as the simulated devices do: this
measures what crossing processes costs (gRPC between them and the function
partitioned by process; or, with --tp, messages over TCP and one function
call per action), never a speed-up.
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
    parser.add_argument("--tp", type=int, default=1, help="tensor-parallel degree of each stage")
    parser.add_argument("--ideal", action="store_true",
                        help="with --tp: the step against the schedule's ideal (one thread each)")
    parser.add_argument("--across", action="store_true",
                        help="(internal) run as one rank of the 2-process job")
    return parser.parse_args()


def across(args):
    """One rank of the 2-process job; rank 0 prints JSON. Without --tp rank 1
    serves its device; with it, every rank trains its own stage."""
    import tfpar
    from tfpar.cluster import Cluster, single_controller

    cluster = Cluster.from_env()
    if cluster.rank > 0 and args.tp == 1:
        sys.exit(single_controller.serve(cluster, num_local_devices=1))
    tfpar.simulate_devices(args.tp)
    from gpt_step import step_time

    dims = tfpar.ParallelDims(pp=2, tp=args.tp, microbatches=args.microbatches,
                              schedule=args.schedule)
    strategy = tfpar.strategies.build(dims, cluster=cluster, kind="pipeline")
    times = [step_time(strategy, args.size, args.batch, args.steps, warmup=2)
             for _ in range(args.rounds)]
    if cluster.rank == 0:
        print(json.dumps({"across_processes": times}), flush=True)


def ideal(args):
    """One rank of `--ideal`: one thread per process, the timeline recorded;
    rank 0 prints the measured action span and wall step against the ideal."""
    import statistics

    import tensorflow as tf

    tf.config.threading.set_intra_op_parallelism_threads(1)
    tf.config.threading.set_inter_op_parallelism_threads(1)
    import tfpar
    from tfpar.cluster import Cluster
    from tfpar.cluster.process_group import ProcessGroup

    cluster = Cluster.from_env()
    tfpar.simulate_devices(args.tp)
    from gpt_step import step_time

    strategy = tfpar.Pipeline(stages=2, tensor_parallel=args.tp, microbatches=args.microbatches,
                              schedule=args.schedule, record_timeline=True,
                              process_group=ProcessGroup.from_cluster(cluster))
    wall = step_time(strategy, args.size, args.batch, args.steps, warmup=2)
    if cluster.rank != 0:
        return
    timeline = strategy.timeline
    measured = timeline.steps()[2:]  # after the warm-up steps
    spans = [s for s in timeline.spans if s.step in measured]
    cost = {kind: [statistics.mean(s.end - s.start for s in spans
                                   if s.kind == kind and s.model_stage == k) for k in range(2)]
            for kind in ("F", "B")}
    best = strategy.schedule.simulate(2, args.microbatches, forward_cost=cost["F"],
                                      backward_cost=cost["B"], weight_cost=0.0)["step_time"]
    span = statistics.median(timeline.step_time(step) for step in measured)
    print(json.dumps({"ideal": {
        "forward_s": cost["F"], "backward_s": cost["B"], "ideal_s": best,
        "actions_span_s": span, "wall_step_s": wall,
        "span_over_ideal": span / best, "wall_over_ideal": wall / best}}), flush=True)


def main():
    args = parse_args()
    if args.across:
        return ideal(args) if args.ideal else across(args)
    if args.ideal:
        if args.tp == 1:
            sys.exit("--ideal times tensor-parallel stages across processes: give --tp 2.")
        return launch_ideal(args)
    import tfpar

    tfpar.simulate_devices(2 * args.tp)
    from gpt_step import step_time, summary

    layout = "pp2" if args.tp == 1 else f"pp2 x tp{args.tp}"
    local_name, across_name = f"{layout} in one process", f"{layout} across 2 processes"
    times = {"one_device": [], local_name: []}
    for _ in range(args.rounds):
        times["one_device"].append(step_time(None, args.size, args.batch, args.steps, 2))
        strategy = tfpar.Pipeline(stages=2, microbatches=args.microbatches,
                                  schedule=args.schedule, tensor_parallel=args.tp)
        times[local_name].append(step_time(strategy, args.size, args.batch, args.steps, 2))
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
    times[across_name] = json.loads(lines[-1])["across_processes"]

    results = summary(times, args)
    print(json.dumps(results, indent=2))
    local = results["step_time_s"][local_name]
    for name in times:
        print(f"{args.size} {name:>24}: {results['step_time_s'][name] * 1e3:7.1f} ms/step, "
              f"{results['tokens_per_s'][name]:8.0f} tokens/s, "
              f"{results['step_time_ratio_to_one_device'][name]:.2f} x one device's step, "
              f"{results['step_time_s'][name] / local:.2f} x the in-process pipeline's "
              f"({os.cpu_count()} shared cores: overhead, not speed-up)")


def launch_ideal(args):
    here = os.path.dirname(os.path.abspath(__file__))
    result = subprocess.run(
        [sys.executable, "-m", "tfpar.cli.main", "launch", "--nproc", "2", "--",
         sys.executable, os.path.join(here, "pipeline_processes.py"), "--across",
         *[f"--{k}={v}" for k, v in vars(args).items() if k not in ("across", "ideal")],
         "--ideal"], capture_output=True, text=True, timeout=900, cwd=here)
    lines = [line.split("] ", 1)[-1] for line in result.stdout.splitlines() if '"ideal"' in line]
    if result.returncode or not lines:
        sys.exit(f"the 2-process run failed ({result.returncode}):\n{result.stdout[-3000:]}")
    row = json.loads(lines[-1])["ideal"]
    print(json.dumps(row, indent=2))
    print(f"{args.size} pp2 x tp{args.tp} across 2 processes ({args.schedule}, M="
          f"{args.microbatches}, one thread each): actions span {row['actions_span_s'] * 1e3:.1f} "
          f"ms, ideal {row['ideal_s'] * 1e3:.1f} ms ({row['span_over_ideal']:.2f}x); wall step "
          f"{row['wall_step_s'] * 1e3:.1f} ms ({row['wall_over_ideal']:.2f}x the ideal)")


if __name__ == "__main__":
    main()
