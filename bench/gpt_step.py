"""The seconds per `fit` step of the reference GPT under a strategy (shared by bench scripts).

Imports no device set-up: each bench script simulates its own device count
before TensorFlow starts, then calls `step_time`.
"""

import time

import keras
import numpy as np
import tensorflow as tf

import tfpar


def step_time(strategy, size: str, batch: int, steps: int, warmup: int) -> float:
    """Mean seconds per step of `steps` AdamW steps of GPT `size` on random tokens,
    after `warmup` steps that trace the step (strategy None: plain Keras on /cpu:0)."""
    cfg = tfpar.models.config(size)
    tokens = np.random.RandomState(0).randint(
        0, cfg.vocab, size=(batch * (steps + warmup), cfg.seq_len + 1)).astype("int32")
    x, y = tokens[:, :-1], tokens[:, 1:]
    scope = strategy.scope() if strategy is not None else tf.device("/cpu:0")
    with scope:
        keras.utils.set_random_seed(0)
        model = tfpar.models.gpt(size)
        model.compile(optimizer=keras.optimizers.AdamW(1e-3), loss=tfpar.models.lm_loss(),
                      jit_compile=False)
    model.fit(x[: batch * warmup], y[: batch * warmup], batch_size=batch, verbose=0)
    start = time.perf_counter()
    model.fit(x[batch * warmup:], y[batch * warmup:], batch_size=batch, verbose=0)
    return (time.perf_counter() - start) / steps
