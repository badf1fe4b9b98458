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


def current():
    """The strategy whose scope is active in this thread (innermost), if any."""
    stack = getattr(_active, "stack", None)
    return stack[-1] if stack else None


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
    """The strategy that owns a model's weights (created in its scope), if any."""
    for variable in getattr(model, "weights", ()):
        strategy = getattr(variable, "_tfpar_strategy", None)
        if strategy is not None:
            return strategy
    return None
