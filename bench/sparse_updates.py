"""Benchmark: exact sparse Embedding updates against dense ones and against Keras's own.

An AdamW step on one `Embedding(vocab, hidden)` whose gradient comes from a
batch of `tokens` token ids, three ways, in one run:

  keras   Keras 3 as it is: the IndexedSlices gradient applied row by row
          (inexact: a repeated token's second moment gets g1^2 + g2^2);
  tfpar   the same gradient with duplicate rows summed first
          (`tfpar.compat.sum_duplicate_rows`: exact, still sparse);
  dense   the gradient made dense first (exact; what TensorParallel uses,
          because DTensor cannot lay out scatter updates).

Keras's Adam updates both moments densely whatever the gradient's type, so
the sparse paths save the scatter of a vocab x hidden gradient, not the
moment updates; the figures say how much that is.

Usage::

    python bench/sparse_updates.py [--vocab 50304] [--hidden 256] [--tokens 4096] [--steps 30]
"""

import argparse
import json
import os
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def seconds_per_step(mode: str, vocab: int, hidden: int, tokens: int, steps: int) -> float:
    import keras
    import numpy as np
    import tensorflow as tf

    from tfpar import compat
    from tfpar.strategies.tensor.tensor_parallel import use_dense_gradients

    compat.apply_keras_fixes()
    if mode == "keras":
        compat.remove_keras_fixes("sum_duplicate_rows")
    keras.utils.set_random_seed(0)
    embedding = keras.layers.Embedding(vocab, hidden)
    embedding.build((None,))
    optimizer = keras.optimizers.AdamW(1e-3)
    optimizer.build(embedding.trainable_variables)
    if mode == "dense":
        use_dense_gradients(optimizer)
    # Zipf-like ids: a few tokens repeat often, as in text.
    rng = np.random.RandomState(0)
    ids = tf.constant(np.minimum(rng.zipf(1.2, size=tokens), vocab) - 1, tf.int32)

    @tf.function
    def step():
        with tf.GradientTape() as tape:
            loss = tf.reduce_sum(tf.square(embedding(ids)))
        grads = tape.gradient(loss, embedding.trainable_variables)
        optimizer.apply(grads, embedding.trainable_variables)

    step()  # trace
    start = time.perf_counter()
    for _ in range(steps):
        step()
    float(embedding.embeddings.numpy()[0, 0])  # wait for the last step
    result = (time.perf_counter() - start) / steps
    compat.apply_keras_fixes()
    return result


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vocab", type=int, default=50304)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--steps", type=int, default=30)
    args = parser.parse_args()
    times = {mode: seconds_per_step(mode, args.vocab, args.hidden, args.tokens, args.steps)
             for mode in ("keras", "tfpar", "dense")}
    report = {"vocab": args.vocab, "hidden": args.hidden, "tokens": args.tokens,
              "ms_per_step": {k: round(v * 1e3, 3) for k, v in times.items()},
              "tfpar_over_keras": round(times["tfpar"] / times["keras"], 3),
              "tfpar_over_dense": round(times["tfpar"] / times["dense"], 3)}
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
