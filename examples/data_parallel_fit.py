"""Data-parallel `model.fit` on real text, with tfpar's strategy flags.

A byte-level next-character model trained on the Python standard library's
own source files (real text that every Python installation has: no
download). The script is the plain Keras pattern; the flags pick the
strategy, so the same file runs on one device, on N simulated or real local
devices, or on many workers::

    python examples/data_parallel_fit.py --num_simulated_devices=4
    python examples/data_parallel_fit.py --strategy=one_device
    tfpar launch --nproc 2 -- python examples/data_parallel_fit.py

It resumes from its backup if interrupted (run it again), writes a
checkpoint per epoch from the chief only, and saves the final model.
"""

import json
import os
import time

from absl import app, flags, logging

import tfpar
from tfpar import flags as tfpar_flags  # defines --strategy, --global_batch_size, ...

flags.DEFINE_string("output_dir", "/tmp/tfpar-example", "Checkpoints, backup and model go here.")
flags.DEFINE_integer("epochs", 3, "Training epochs.")
flags.DEFINE_integer("steps_per_epoch", 60, "Optimizer steps per epoch.")
flags.DEFINE_integer("seq_len", 64, "Bytes of context per example.")
flags.DEFINE_integer("corpus_bytes", 2_000_000, "Bytes of standard-library source to read.")
FLAGS = flags.FLAGS


def stdlib_corpus(max_bytes):
    """The standard library's source files (tfpar's embedded corpus), concatenated."""
    from tfpar.data.corpus import stdlib_files

    chunks, total = [], 0
    for _, path in stdlib_files():
        if total >= max_bytes:
            break
        with open(path, "rb") as f:
            chunks.append(f.read())
        total += len(chunks[-1])
    return b"".join(chunks)[:max_bytes]


def windows(corpus, seq_len, strategy, batch, train):
    import numpy as np
    import tensorflow as tf

    data = np.frombuffer(corpus, dtype=np.uint8).astype("int32")
    split = int(len(data) * 0.9)
    data = data[:split] if train else data[split:]
    n = (len(data) - 1) // seq_len
    x = data[: n * seq_len].reshape(n, seq_len)
    y = data[1: n * seq_len + 1].reshape(n, seq_len)
    return tfpar.data.from_arrays((x, y), strategy, global_batch_size=batch,
                                  shuffle=train, seed=0, repeat=train)


def build_model(seq_len):
    import keras

    inputs = keras.Input((seq_len,), dtype="int32")
    h = keras.layers.Embedding(256, 64)(inputs)
    # Causal convolutions: each position sees only the bytes before it.
    for dilation in (1, 2, 4, 8):
        h = h + keras.layers.Conv1D(64, 3, padding="causal", dilation_rate=dilation,
                                    activation="gelu")(h)
        h = keras.layers.LayerNormalization()(h)
    logits = keras.layers.Dense(256, dtype="float32")(h)
    return keras.Model(inputs, logits)


def main(argv):
    import keras

    strategy = tfpar.from_flags()
    batch = tfpar_flags.global_batch_size(strategy, default=64)
    logging.info("strategy %s", strategy.describe())
    corpus = stdlib_corpus(FLAGS.corpus_bytes)
    train = windows(corpus, FLAGS.seq_len, strategy, batch, train=True)
    val = windows(corpus, FLAGS.seq_len, strategy, batch, train=False)

    with strategy.scope():
        model = build_model(FLAGS.seq_len)
        model.compile(
            optimizer=keras.optimizers.AdamW(3e-3, weight_decay=0.01),
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
            metrics=["accuracy"],
        )
    os.makedirs(FLAGS.output_dir, exist_ok=True)
    callbacks = [
        # Also saves on SIGTERM (Kubernetes preemption) and exits 210 to be restarted.
        tfpar.callbacks.PreemptionCheckpoint(os.path.join(FLAGS.output_dir, "backup")),
        keras.callbacks.ModelCheckpoint(
            os.path.join(FLAGS.output_dir, "ckpt-{epoch}.weights.h5"), save_weights_only=True),
    ]
    initial = model.evaluate(val, steps=10, verbose=0, return_dict=True)
    start = time.time()
    model.fit(train, epochs=FLAGS.epochs, steps_per_epoch=FLAGS.steps_per_epoch,
              validation_data=val, validation_steps=10, callbacks=callbacks,
              verbose=2)
    seconds = time.time() - start
    final = model.evaluate(val, steps=10, verbose=0, return_dict=True)
    model.save(os.path.join(FLAGS.output_dir, "model.keras"))
    summary = {
        "strategy": strategy.kind,
        "replicas": strategy.num_replicas_in_sync,
        "global_batch_size": batch,
        "initial_val_loss": initial["loss"],
        "final_val_loss": final["loss"],
        "bytes_per_second": FLAGS.epochs * FLAGS.steps_per_epoch * batch * FLAGS.seq_len / seconds,
    }
    if strategy.is_chief:
        with open(os.path.join(FLAGS.output_dir, "summary.json"), "w") as f:
            json.dump(summary, f, indent=2)
    print(json.dumps(summary))


if __name__ == "__main__":
    app.run(main)
