"""Prints one JSON line: per-device bytes of each ZeRO stage on N simulated devices.

    python tests/workers/zero_bytes.py N

The model and its AdamW slots are built, not trained: the bytes are the
variables'. A process of its own, for N other than the suite's 4 devices.
"""

import json
import sys

import keras

import tfpar

SHAPE = tfpar.models.GPTConfig(layers=2, hidden=64, heads=2, vocab=256, seq_len=32)


def reports(devices: int) -> dict:
    rows = {}
    for stage in (1, 2, 3):
        strategy = tfpar.ShardedDataParallel(fsdp=devices, zero_stage=stage)
        with strategy.scope():
            model = tfpar.models.gpt(SHAPE)
            model.compile(optimizer=keras.optimizers.AdamW(1e-3), loss=tfpar.models.lm_loss())
            model.optimizer.build(model.trainable_variables)
        rows[stage] = strategy.memory_report(model)
    return rows


if __name__ == "__main__":
    n = int(sys.argv[1])
    tfpar.simulate_devices(n)
    print(json.dumps({"parameters": SHAPE.num_parameters, "stages": reports(n)}))
