"""Mixed precision: one call sets Keras's global dtype policy.

- "float32": everything in float32.
- "mixed_bfloat16": compute in bfloat16, variables in float32. bfloat16 has
  float32's exponent range, so no loss scaling is needed.
- "mixed_float16": compute in float16, variables in float32. float16
  gradients underflow, so Keras's `compile` wraps the optimizer in a
  `keras.optimizers.LossScaleOptimizer` (dynamic loss scaling) for models
  built under this policy; `set_precision` relies on that and tests it.

Example::

    tfpar.set_precision("mixed_bfloat16")   # before building the model
"""

from __future__ import annotations

import keras

PRECISIONS = ("float32", "mixed_bfloat16", "mixed_float16")


def set_precision(precision: str) -> None:
    """Sets the global Keras dtype policy used by layers built after it."""
    if precision not in PRECISIONS:
        raise ValueError(
            f"precision={precision!r}: use one of {list(PRECISIONS)}."
        )
    keras.mixed_precision.set_global_policy(precision)
