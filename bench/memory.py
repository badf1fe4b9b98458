"""The largest GPT each data-parallel way trains under a per-device memory budget.

    python bench/memory.py [--budget_mib=512] [--devices=4]

For `DataParallel` (plain tf.distribute MirroredStrategy: every replica
holds everything), ZeRO-1, ZeRO-3 and ZeRO-3 with full recomputation, GPTs
of growing depth (hidden 512, context 32, batch 8, vocabulary 4096: the
weights dominate) are trained in fresh processes (tests/workers/memory_probe.py)
and the allocator's measured peak of a step (TF_CPU_ALLOCATOR_USE_BFC;
simulated devices share the host's allocator, so a device's peak is the
host's divided by the devices) is compared with the budget. Prints, for
each, the deepest model that fits, its parameters, its peak and its step
time; then the ratios to DataParallel. Simulated CPU devices share the
same cores: the step times show the overhead of sharding, not a speed-up.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROBE = ROOT / "tests" / "workers" / "memory_probe.py"
DEPTHS = (1, 2, 4, 6, 8, 12, 16, 24, 32, 48, 64)
WAYS = {"DataParallel": ("data", "none"), "ZeRO-1": ("zero1", "none"),
        "ZeRO-3": ("zero3", "none"), "ZeRO-3 + recompute": ("zero3", "full")}
HIDDEN, SEQ, BATCH, VOCAB = 512, 32, 8, 4096


def probe(strategy: str, recompute: str, devices: int, layers: int) -> dict | None:
    args = [sys.executable, str(PROBE), strategy, str(devices), str(layers), str(HIDDEN),
            str(SEQ), str(BATCH), str(VOCAB), recompute]
    result = subprocess.run(args, capture_output=True, text=True, cwd=ROOT, timeout=900)
    if result.returncode != 0:
        return None
    return json.loads(result.stdout.strip().splitlines()[-1])


def largest(strategy: str, recompute: str, devices: int, budget: int) -> dict | None:
    best = None
    for layers in DEPTHS:
        row = probe(strategy, recompute, devices, layers)
        if row is None or row["peak_step_bytes"] is None or row["peak_step_bytes"] > budget:
            break
        best = row | {"layers": layers}
    return best


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--budget_mib", type=int, default=512)
    parser.add_argument("--devices", type=int, default=4)
    args = parser.parse_args()
    budget = args.budget_mib * 2 ** 20
    print(f"budget {args.budget_mib} MiB per device, {args.devices} simulated devices; GPT "
          f"hidden {HIDDEN}, context {SEQ}, batch {BATCH}, vocabulary {VOCAB}")
    results = {}
    for name, (strategy, recompute) in WAYS.items():
        row = largest(strategy, recompute, args.devices, budget)
        results[name] = row
        if row is None:
            print(f"{name:<20} nothing fits")
            continue
        print(f"{name:<20} {row['layers']:>3} layers  {row['parameters'] / 1e6:>7.1f}M params  "
              f"peak {row['peak_step_bytes'] / 2**20:>7.1f} MiB  step {row['step_seconds']:.3f} s",
              flush=True)
    base = results.get("DataParallel")
    if base:
        print("\nratios to DataParallel (largest model that fits; step time at that size):")
        for name, row in results.items():
            if row:
                print(f"  {name:<20} parameters x{row['parameters'] / base['parameters']:.2f}  "
                      f"step time x{row['step_seconds'] / base['step_seconds']:.2f}")
        same = {name: probe(*WAYS[name], args.devices, base["layers"]) for name in WAYS}
        print(f"\nat DataParallel's largest ({base['layers']} layers): step peak and time:")
        for name, row in same.items():
            if row:
                print(f"  {name:<20} peak x{row['peak_step_bytes'] / base['peak_step_bytes']:.2f}  "
                      f"step time x{row['step_seconds'] / base['step_seconds']:.2f}")


if __name__ == "__main__":
    main()
