"""Pipeline parallelism for Keras models: micro-batches, stages, schedules, runner.

- `microbatch`: splitting a batch into equal micro-batches and merging outputs;
- `split`: cutting a Sequential or functional model into stages (a chain of blocks);
- `schedules`: the order of forward and backward actions per stage (GPipe, 1F1B);
- `runner`: `Pipeline`, the strategy that trains a model's stages with `model.fit`;
- `timeline`: when each action ran; bubble, step time, stashed activations, Chrome traces.

Example::

    tfpar.simulate_devices(2)
    strategy = tfpar.Pipeline(stages=2, microbatches=4, schedule="1f1b")
    with strategy.scope():
        model = keras.Sequential([keras.Input((16,)), keras.layers.Dense(64),
                                  keras.layers.Dense(64), keras.layers.Dense(1)])
        model.compile(optimizer="adamw", loss="mse")
    model.fit(x, y, batch_size=32)
"""

import importlib

# Loaded on first use: `balance` and `schedules` are pure Python, and
# `tfpar plan` uses them without starting TensorFlow.
_LAZY = {"Pipeline": "runner", "PipelineConfigError": "runner", "Stage": "runner",
         "GPipe": "schedules", "OneFOneB": "schedules", "Schedule": "schedules",
         "PipelineSplitError": "split", "FixedCost": "timeline", "Timeline": "timeline"}
_SUBMODULES = ("balance", "microbatch", "runner", "schedules", "split", "timeline")

__all__ = sorted(_LAZY) + list(_SUBMODULES)


def __getattr__(name):
    if name in _LAZY:
        return getattr(importlib.import_module(f"tfpar.strategies.pipeline.{_LAZY[name]}"), name)
    if name in _SUBMODULES:
        return importlib.import_module(f"tfpar.strategies.pipeline.{name}")
    raise AttributeError(f"module 'tfpar.strategies.pipeline' has no attribute {name!r}")
