"""The learning-rate schedule of `tfpar train`: linear warm-up, then cosine decay.

What LLM trainers use (GPT-3, Megatron, nanoGPT): the rate rises linearly
from 0 to `peak` over `warmup_steps`, then follows a half cosine down to
`peak * min_ratio` at `decay_steps`, and stays there.

Steps are *optimizer* steps. With Keras's gradient accumulation the
optimizer's counter advances once per micro-step, so the schedule divides it
by `accumulation` (the number of micro-steps per update): the rate of an
update does not depend on how its gradient was accumulated.

Example::

    schedule = WarmupCosine(peak=3e-3, warmup_steps=100, decay_steps=2000, min_ratio=0.1)
    optimizer = keras.optimizers.AdamW(schedule, weight_decay=0.1, global_clipnorm=1.0)
"""

from __future__ import annotations

import math

import keras


@keras.saving.register_keras_serializable(package="tfpar")
class WarmupCosine(keras.optimizers.schedules.LearningRateSchedule):
    """Linear warm-up to `peak`, cosine decay to `peak * min_ratio` at `decay_steps`."""

    def __init__(self, peak: float, warmup_steps: int, decay_steps: int, min_ratio: float = 0.1,
                 accumulation: int = 1):
        if peak <= 0:
            raise ValueError(f"peak learning rate {peak}: must be > 0.")
        if not 0 <= warmup_steps <= decay_steps:
            raise ValueError(f"warmup_steps={warmup_steps}, decay_steps={decay_steps}: need "
                             "0 <= warmup_steps <= decay_steps.")
        if not 0 <= min_ratio <= 1:
            raise ValueError(f"min_ratio={min_ratio}: must be in [0, 1].")
        if accumulation < 1:
            raise ValueError(f"accumulation={accumulation}: must be >= 1.")
        self.peak, self.warmup_steps = float(peak), int(warmup_steps)
        self.decay_steps = int(decay_steps)
        self.min_ratio, self.accumulation = float(min_ratio), int(accumulation)

    def __call__(self, iteration):
        ops = keras.ops
        step = ops.cast(ops.floor_divide(ops.cast(iteration, "int64"), self.accumulation),
                        "float32")
        warmup = ops.cast(max(self.warmup_steps, 1), "float32")
        rising = self.peak * ops.minimum(step + 1.0, warmup) / warmup
        span = max(self.decay_steps - self.warmup_steps, 1)
        progress = ops.clip((step - self.warmup_steps) / span, 0.0, 1.0)
        floor = self.peak * self.min_ratio
        decaying = floor + (self.peak - floor) * 0.5 * (1.0 + ops.cos(math.pi * progress))
        return ops.where(step < self.warmup_steps, rising, decaying)

    def get_config(self):
        return {"peak": self.peak, "warmup_steps": self.warmup_steps,
                "decay_steps": self.decay_steps, "min_ratio": self.min_ratio,
                "accumulation": self.accumulation}
