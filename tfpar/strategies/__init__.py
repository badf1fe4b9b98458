"""tfpar's strategies: one class per way of spreading a model over devices.

- `base`: the interface every strategy implements (`Strategy`), and the one
  place that decides which process writes shared files (`should_write`) and
  makes the writer's copy of a model whole before it does (`gather_weights`);
- `data_parallel`: `OneDevice`, `DataParallel`, `MultiWorker`
  (`tf.distribute` strategies: every replica holds the whole model);
- `sharded`: `ShardedDataParallel` (ZeRO-1/2/3, FSDP: the data-parallel
  state split over the devices, on `TensorParallel`'s DTensor mesh);
- `tensor`: `TensorParallel` with its device `mesh` and weight `layouts`
  (DTensor: one layer's weights split over devices);
- `pipeline`: `Pipeline` with its `split`ter, `schedules` and `runner`
  (the model's layers cut into stages on consecutive devices);
- `registry`: how Keras finds the strategies that are not `tf.distribute` ones;
- `from_dims`: `build(dims)`, the strategy a `tfpar.ParallelDims` describes.

The package loads TensorFlow only when a strategy class is first used, so
the pure parts (`tfpar.plan` uses the pipeline's schedules and balancing)
start without it.
"""

import importlib

_LAZY = {"OneDevice": "data_parallel", "DataParallel": "data_parallel",
         "MultiWorker": "data_parallel", "TensorParallel": "tensor.tensor_parallel",
         "ShardedDataParallel": "sharded",
         "Pipeline": "pipeline.runner", "Strategy": "base", "should_write": "base",
         "strategy_for": "base", "gather_weights": "base", "build": "from_dims"}

__all__ = sorted(_LAZY)


def __getattr__(name):
    if name in _LAZY:
        module = importlib.import_module(f"tfpar.strategies.{_LAZY[name]}")
        return getattr(module, name)
    raise AttributeError(f"module 'tfpar.strategies' has no attribute {name!r}")
