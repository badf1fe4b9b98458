"""The main job: `tfpar train` trains the reference GPT on real text.

- `config`: `TrainConfig`, every setting of a run, checked when made (no
  TensorFlow, so the flags are checked against it when parsed);
- `job`: `run(config, strategy)`: data, model, optimizer, checkpoint and
  resume, evaluation, outputs;
- `schedule`: the warm-up + cosine learning rate (`WarmupCosine`);
- `progress`: tokens/s, MFU and the per-step loss (`Throughput`);
- `sample`: text generation from the trained model;
- `report`: the loss-curve PNG and JSON files;
- `flags`: the absl flags of `tfpar train` (no TensorFlow import).

Example (what `tfpar train --strategy=data --num_simulated_devices=4` does)::

    tfpar.simulate_devices(4)
    strategy = tfpar.DataParallel()
    summary = tfpar.train.run(tfpar.train.TrainConfig(output_dir="runs/gpt"), strategy)
    summary["final_val_loss"] < summary["initial_val_loss"]
"""

import importlib

_LAZY = {"TrainConfig": "config", "TrainConfigError": "config", "run": "job",
         "WarmupCosine": "schedule", "Throughput": "progress", "generate": "sample",
         "config_from_flags": "flags"}

__all__ = sorted(_LAZY)


def __getattr__(name):
    if name in _LAZY:
        return getattr(importlib.import_module(f"tfpar.train.{_LAZY[name]}"), name)
    raise AttributeError(f"module 'tfpar.train' has no attribute {name!r}")
