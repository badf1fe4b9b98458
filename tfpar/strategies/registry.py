"""The strategies that are not `tf.distribute` strategies, and how Keras finds them.

`TensorParallel` (DTensor) and `Pipeline` (staged runner) own their models'
variables and run their own step functions, so Keras's `fit` cannot find
them through `tf.distribute.get_strategy()`. Both follow one small protocol:

- `scope()` enters the strategy with `entered(strategy)`; every Keras variable
  created inside goes through `strategy.initialize_variable(variable, value,
  upstream)`, which also tags it with `_tfpar_strategy`;
- `strategy.step_function(model, kind)` returns Keras's train, test or
  predict function (`kind` is "train", "test" or "predict") for a model whose
  weights carry the tag.

`tfpar.compat` patches Keras's variable initializer and step-function
factories once and dispatches through `current()` and `strategy_of(model)`,
so adding a strategy touches neither Keras nor the other strategies.
"""

from __future__ import annotations

import contextlib
import threading

_active = threading.local()
# Set by `tfpar.strategies.keras_distribution.enable()`: outside any tfpar
# scope, the Keras distribution set with `keras.distribution.set_distribution`
# stands for a tfpar strategy.
_keras_distribution = None


def current():
    """The strategy whose scope is active in this thread (innermost), if any; else
    the one behind the Keras distribution, when that bridge is enabled."""
    stack = getattr(_active, "stack", None)
    if stack:
        return stack[-1]
    if _keras_distribution is not None:
        return _keras_distribution()
    return None


def follow_keras_distribution(resolve) -> None:
    """Makes `current()` fall back to `resolve()` (None: stop)."""
    global _keras_distribution
    _keras_distribution = resolve


@contextlib.contextmanager
def entered(strategy):
    """Makes `strategy` the current one for the variables created inside."""
    stack = getattr(_active, "stack", None)
    if stack is None:
        stack = _active.stack = []
    stack.append(strategy)
    try:
        yield strategy
    finally:
        stack.pop()


def tag(keras_variable, strategy) -> None:
    keras_variable._tfpar_strategy = strategy


def strategy_of(model):
    """The strategy that owns a model's weights (created in its scope), if any.

    A subclassed model compiled in a scope has no weights until its first
    step builds it; its optimizer's step counter, made by `compile`, was
    created in the scope and names the strategy.
    """
    optimizer = getattr(model, "optimizer", None)
    for variable in (*getattr(model, "weights", ()), *getattr(optimizer, "variables", ())):
        strategy = getattr(variable, "_tfpar_strategy", None)
        if strategy is not None:
            return strategy
    return None


def host_loop(model, run_batch, finish=None):
    """Keras's train or test function for a strategy that runs one compiled call per batch.

    Keras's own function loops over `steps_per_execution` batches inside one
    graph, pulling them from the iterator in the graph; a DTensor program
    (its inputs must be packed onto the mesh first) and the pipeline runner
    (its micro-batch count follows each batch's rows) cannot, so the loop runs
    on the host: `run_batch(batch)` per batch, `finish` on the last outputs.
    Returns Keras's logs, or raises StopIteration when the data ran out.
    """
    import tensorflow as tf

    def function(iterator):
        outputs = None
        for _ in range(model.steps_per_execution):
            try:
                data = next(iterator)
            except (StopIteration, tf.errors.OutOfRangeError):
                break
            outputs = run_batch(data)
        if outputs is None:
            raise StopIteration
        return outputs if finish is None else finish(outputs)

    return function
