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


def add_arguments(parser) -> None:
    """The GPT step benchmarks' shared arguments: model size, batch, pipeline, rounds."""
    parser.add_argument("--size", default="mini", help="GPT size (tfpar.models.SIZES)")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--microbatches", type=int, default=4)
    parser.add_argument("--schedule", default="1f1b")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=2)


def summary(times: dict, args) -> dict:
    """The JSON of a run: per name (a list of seconds per step over rounds) the
    median step time, tokens/s and ratio to times["one_device"], and the machine."""
    import os
    import platform
    import statistics

    seq_len = tfpar.models.config(args.size).seq_len
    median = {k: statistics.median(v) for k, v in times.items()}
    return {
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                    "tensorflow": tf.__version__, "keras": keras.__version__},
        "size": args.size, "batch": args.batch, "microbatches": args.microbatches,
        "schedule": args.schedule,
        "step_time_s": median,
        "tokens_per_s": {k: args.batch * seq_len / t for k, t in median.items()},
        "step_time_ratio_to_one_device": {k: t / median["one_device"]
                                          for k, t in median.items()},
    }
