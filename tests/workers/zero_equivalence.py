"""Prints one JSON line: max |dw| from the exact single-device run for each
sharded layout (ZeRO-1/2/3 on 4 devices, FSDP 2 x TP 2, HSDP 2 x 2), with
recomputation off and on, after 12 AdamW steps of a GPT; and the bytes each
keeps. A layout that refuses recomputation (HSDP) reports the refusal.

One process for the whole matrix (tests/test_sharded.py runs it): the
in-process part of the suite stays fast.
"""

import json
import sys
from pathlib import Path

import tfpar

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from consistency_cases import max_abs_diff, train_lm  # noqa: E402

STEPS, BATCH = 12, 16
SHAPE = tfpar.models.GPTConfig(layers=2, hidden=32, heads=2, vocab=64, seq_len=16)
# name: (fsdp, tp, zero stage, dp), recomputation modes. Recomputation changes
# what ZeRO-3 gathers (again in the backward); under ZeRO-1/2 the weights are
# whole and it runs as under TensorParallel (tests/test_recompute.py). ZeRO-3
# without it runs in-process (tests/test_sharded.py).
LAYOUTS = {"zero1": ((4, 1, 1, 1), ("none",)), "zero2": ((4, 1, 2, 1), ("none",)),
           "zero3": ((4, 1, 3, 1), ("full",)), "fsdp2xtp2": ((2, 2, 3, 1), ("none", "full")),
           "hsdp2x2": ((2, 1, 3, 2), ("none", "full"))}


def train(strategy, recompute):
    return train_lm(strategy, SHAPE, recompute, steps=STEPS, batch=BATCH)


def main():
    tfpar.simulate_devices(4)
    exact = train(tfpar.OneDevice(), "none")
    rows = {}
    for name, ((fsdp, tp, stage, dp), modes) in LAYOUTS.items():
        for recompute in modes:
            strategy = tfpar.ShardedDataParallel(fsdp=fsdp, zero_stage=stage, tp=tp, dp=dp)
            try:
                model = train(strategy, recompute)
            except ValueError as e:  # RecomputeError, through Keras's layer-call wrapper
                rows[f"{name} {recompute}"] = {"refused": str(e)}
                continue
            rows[f"{name} {recompute}"] = {"max_abs_diff": max_abs_diff(exact, model),
                                           **strategy.memory_report(model)}
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
