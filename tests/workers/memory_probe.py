"""Prints one JSON line: a strategy's memory report and measured step peak for a GPT.

    python tests/workers/memory_probe.py STRATEGY DEVICES LAYERS HIDDEN SEQ BATCH VOCAB RECOMPUTE

STRATEGY: data | zero1 | zero2 | zero3 | one_device. A fresh process per run:
the CPU allocator's statistics need TF_CPU_ALLOCATOR_USE_BFC before
TensorFlow starts, and simulated devices are fixed at the first op.
"""

import json
import os
import sys
import time

os.environ["TF_CPU_ALLOCATOR_USE_BFC"] = "true"

import keras  # noqa: E402
import numpy as np  # noqa: E402

import tfpar  # noqa: E402


def strategy_for(name: str, devices: int):
    if name == "one_device":
        return tfpar.OneDevice()
    if name == "data":
        return tfpar.DataParallel()
    return tfpar.ShardedDataParallel(fsdp=devices, zero_stage=int(name[-1]))


def main(argv):
    name, devices, layers, hidden, seq, batch, vocab, recompute = argv[1:9]
    devices, layers, hidden, seq, batch, vocab = map(int, (devices, layers, hidden, seq, batch,
                                                           vocab))
    tfpar.simulate_devices(devices)
    shape = tfpar.models.GPTConfig(layers=layers, hidden=hidden, heads=max(1, hidden // 64),
                                   vocab=vocab, seq_len=seq)
    strategy = strategy_for(name, devices)
    with strategy.scope():
        model = tfpar.models.gpt(shape, recompute=recompute)
        model.compile(optimizer=keras.optimizers.AdamW(1e-3), loss=tfpar.models.lm_loss())
    tokens = np.random.RandomState(0).randint(0, vocab, size=(batch, seq + 1)).astype("int32")
    x, y = tokens[:, :-1], tokens[:, 1:]
    peak = tfpar.memory.step_peak_bytes(model, x, y)
    start = time.perf_counter()
    for _ in range(3):
        model.train_on_batch(x, y)
    step = (time.perf_counter() - start) / 3
    report = strategy.memory_report(model) if hasattr(strategy, "memory_report") else {}
    report.pop("per_device", None)
    print(json.dumps({"strategy": name, "parameters": shape.num_parameters,
                      "peak_step_bytes": peak, "step_seconds": step, **report}))


if __name__ == "__main__":
    main(sys.argv)
