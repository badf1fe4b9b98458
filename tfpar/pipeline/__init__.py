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

from tfpar.pipeline.runner import Pipeline, PipelineConfigError, Stage
from tfpar.pipeline.schedules import GPipe, OneFOneB, Schedule
from tfpar.pipeline.split import PipelineSplitError
from tfpar.pipeline.timeline import FixedCost, Timeline

__all__ = ["Pipeline", "PipelineConfigError", "PipelineSplitError", "Stage", "Schedule",
           "GPipe", "OneFOneB", "Timeline", "FixedCost"]
