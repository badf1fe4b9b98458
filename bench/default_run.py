"""The sweep behind `tfpar train`'s defaults: wall time, bits per byte, MFU, sample.

    python bench/default_run.py                      # the default run, fresh data dir
    python bench/default_run.py --sweep              # the candidates compared in BUILD_NOTES
    python bench/default_run.py --sweep --probe 60   # each candidate for 60 steps only

Each candidate is a real `tfpar train --num_simulated_devices=4` process with
its own output dir; the first run of a fresh `--data_dir` also prepares the
corpus and trains the tokenizer, as a user's first run does. Prints one JSON
line per run: wall seconds (whole command), training seconds (optimizer steps
only), tokens/s, MFU, validation bits per byte before and after, the sample.
The goal of the default: <= 200 s on a first run, <= 180 s after, <= 2.2
bits/byte, MFU >= 40% of the measured host peak on 2 cores.
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

CANDIDATES = {
    "default": [],
    "bytes tiny (the old default)": ["--tokenizer=bytes", "--model=tiny"],
    "bytes mini": ["--tokenizer=bytes", "--model=mini"],
    "bpe:2048 mini": ["--tokenizer=bpe:2048", "--model=mini"],
    "bpe:4096 mini": ["--tokenizer=bpe:4096", "--model=mini"],
    "bpe:4096 mini seq 256 batch 16": ["--tokenizer=bpe:4096", "--model=mini", "--seq_len=256",
                                       "--global_batch_size=16"],
    "bpe:4096 6x128": ["--tokenizer=bpe:4096", "--model=mini", "--layers=6"],
    "bpe:4096 4x192": ["--tokenizer=bpe:4096", "--model=mini", "--hidden=192", "--heads=6"],
}


def run(name, flags, data_dir, probe):
    out = tempfile.mkdtemp(prefix="tfpar-default-run-")
    args = ["tfpar", "train", "--num_simulated_devices=4", f"--output_dir={out}",
            f"--data_dir={data_dir}", *flags]
    if probe:
        args += [f"--train_steps={probe}", f"--eval_every={probe}", "--warmup_steps=10",
                 "--sample_tokens=0"]
    start = time.perf_counter()
    result = subprocess.run(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    wall = time.perf_counter() - start
    if result.returncode:
        print(result.stdout[-3000:], file=sys.stderr)
        return {"name": name, "exit": result.returncode}
    with open(os.path.join(out, "summary.json")) as f:
        s = json.load(f)
    with open(os.path.join(out, "sample.txt")) as f:
        sample = f.read()
    shutil.rmtree(out)
    return {"name": name, "flags": flags, "wall_s": round(wall, 1),
            "train_s": round(s["train_seconds"], 1), "steps": s["steps"],
            "parameters": s["parameters"], "tokens_per_s": round(s["tokens_per_second"]),
            "mfu": round(s["mfu"], 3), "peak_gflops": round(s["peak_flops"] / 1e9, 1),
            "bits_per_byte": [round(s["initial_val_bits_per_byte"], 3),
                              round(s["final_val_bits_per_byte"], 3)],
            "bytes_per_token": round(s["val_bytes_per_token"], 2), "sample": sample[:400]}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sweep", action="store_true", help="all candidates, not only the default")
    parser.add_argument("--probe", type=int, default=0, help="steps per candidate (0: the run's own)")
    parser.add_argument("--only", default=None, help="candidates whose name contains this")
    args = parser.parse_args()
    data_dir = tempfile.mkdtemp(prefix="tfpar-default-data-")
    names = list(CANDIDATES) if args.sweep else ["default"]
    if args.only:
        names = [n for n in names if args.only in n]
    try:
        # The first run prepares the corpus (and its tokenizer); the second reuses them.
        first = run("default (first run: prepares corpus and tokenizer)", [], data_dir,
                    args.probe)
        print(json.dumps(first), flush=True)
        for name in names:
            print(json.dumps(run(name, CANDIDATES[name], data_dir, args.probe)), flush=True)
    finally:
        shutil.rmtree(data_dir, ignore_errors=True)


if __name__ == "__main__":
    main()
