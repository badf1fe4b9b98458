"""Benchmark: what `tfpar train --deterministic` (TensorFlow's op determinism) costs.

Runs the same `tfpar train` job twice per round, as separate processes (op
determinism is process-wide and cannot be undone for the kernels already
chosen), with and without `--deterministic`, alternating the order each
round, and prints the steady-state tokens/s of each (`summary.json`, timed
after the first, tracing step) and the ratio deterministic / default.

Usage::

    python bench/determinism.py [--rounds 3] [--steps 60] [-- extra tfpar train flags]

On CPUs TensorFlow's kernels are deterministic already for this model, so the
ratio is about 1 (noise); on GPUs op determinism swaps in slower kernels for
some reductions and scatters (the embedding's gradient among them).
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile


def run_job(flags, deterministic, data_dir):
    with tempfile.TemporaryDirectory() as out:
        command = [sys.executable, "-m", "tfpar.cli.main", "train", f"--output_dir={out}",
                   f"--data_dir={data_dir}", *flags]
        if deterministic:
            command.append("--deterministic")
        subprocess.run(command, check=True, stdout=subprocess.DEVNULL,
                       env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"))
        with open(os.path.join(out, "summary.json")) as f:
            return json.load(f)["tokens_per_second"]


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--data_dir", default=None, help="a prepared data dir (default: a new one)")
    parser.add_argument("extra", nargs="*", help="more tfpar train flags, after --")
    args = parser.parse_args()
    flags = ["--model=tiny", "--seq_len=64", "--global_batch_size=16",
             f"--train_steps={args.steps}", f"--eval_every={args.steps}", "--eval_batches=1",
             "--sample_tokens=0", "--noasync_checkpoint", *args.extra]
    data_dir = args.data_dir or tempfile.mkdtemp(prefix="tfpar-bench-data-")
    run_job(flags, False, data_dir)  # prepares the corpus and the tokenizer once
    rates = {False: [], True: []}
    for r in range(args.rounds):
        for deterministic in ((False, True) if r % 2 == 0 else (True, False)):
            rates[deterministic].append(run_job(flags, deterministic, data_dir))
    default, determ = statistics.median(rates[False]), statistics.median(rates[True])
    print(f"flags: {' '.join(flags)}")
    print(f"default        tokens/s: median {default:,.0f}  runs {[round(x) for x in rates[False]]}")
    print(f"--deterministic tokens/s: median {determ:,.0f}  runs {[round(x) for x in rates[True]]}")
    print(f"ratio deterministic / default: {determ / default:.3f}")


if __name__ == "__main__":
    main()
