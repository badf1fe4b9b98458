"""Benchmark: `tfpar train`'s job against plain Keras training of the same GPT.

In one process, on the same byte-level windows of the embedded corpus, it
measures the steady-state tokens/s of

  A. plain Keras: `tfpar.models.gpt` compiled with AdamW and `fit` on the
     batches, no strategy, no callbacks (what a user would write by hand);
  B. `tfpar.train.run` on `tfpar.OneDevice()`: the same model and batch, plus
     what the job adds (warm-up/cosine schedule, global-norm clipping, dense
     embedding gradients, the checkpoint and TensorBoard callbacks, the
     throughput callback), ratio B / A (goal: >= 0.9);
  C. `tfpar.train.run` on `tfpar.DataParallel()` over the simulated devices,
     ratio C / B. The devices share the host's cores: this is the cost of
     replicas and all-reduces on one CPU, not a speed-up.

Usage::

    python bench/train.py [--devices 4] [--steps 200] [--rounds 2]

Plain Keras is timed after a warm-up fit of `--steps` / 2 steps; the job
times its training batches after its first (tracing) one, leaving out
evaluation and checkpoints (`tfpar.train.Throughput`).
"""

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def plain_keras(shape, data_dir, batch, steps):
    import keras
    import tensorflow as tf

    import tfpar
    from tfpar.data import corpus, text

    # The same input pipeline as the job (the input is not what is compared).
    windows = text.lm_windows(text.tfds_documents(corpus.DEFAULT_DATASET, "train", data_dir),
                              text.ByteTokenizer(), shape.seq_len, shuffle_documents=True)
    batches = text.lm_batches(windows, tf.distribute.get_strategy(), global_batch_size=batch,
                              train=True)
    model = tfpar.models.gpt(shape)
    model.compile(optimizer=keras.optimizers.AdamW(3e-3), loss=tfpar.models.lm_loss())
    warmup = steps // 2
    model.fit(batches, epochs=1, steps_per_epoch=warmup, verbose=0)
    start = time.perf_counter()
    model.fit(batches, epochs=1, steps_per_epoch=steps, verbose=0)
    return steps * batch * shape.seq_len / (time.perf_counter() - start)


def tfpar_job(strategy, shape, data_dir, batch, steps):
    import tfpar

    with tempfile.TemporaryDirectory() as out:
        config = tfpar.train.TrainConfig(
            output_dir=out, data_dir=data_dir, layers=shape.layers, hidden=shape.hidden,
            heads=shape.heads, seq_len=shape.seq_len, global_batch_size=batch,
            train_steps=steps, eval_every=steps // 2, eval_batches=1, sample_tokens=1)
        summary = tfpar.train.run(config, strategy)
    return summary["tokens_per_second"]


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--devices", type=int, default=4)
    parser.add_argument("--steps", type=int, default=200, help="an even number")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--batch", type=int, default=32)
    args = parser.parse_args()

    import tfpar

    tfpar.simulate_devices(args.devices)
    from tfpar.data import corpus

    data_dir = tempfile.mkdtemp(prefix="tfpar-bench-")
    corpus.prepare(corpus.DEFAULT_DATASET, data_dir)
    shape = tfpar.models.GPTConfig(layers=2, hidden=64, heads=4, vocab=256, seq_len=64)
    plain, job, data = [], [], []
    for _ in range(args.rounds):
        plain.append(plain_keras(shape, data_dir, args.batch, args.steps))
        job.append(tfpar_job(tfpar.OneDevice(), shape, data_dir, args.batch, args.steps))
        data.append(tfpar_job(tfpar.DataParallel(), shape, data_dir, args.batch, args.steps))
    a, b, c = (statistics.median(v) for v in (plain, job, data))
    report = {
        "python": platform.python_version(), "cores": os.cpu_count(),
        "model": "GPT 2x64, context 64", "global_batch": args.batch, "steps": args.steps,
        "plain_keras_tokens_per_s": a, "tfpar_train_one_device_tokens_per_s": b,
        f"tfpar_train_data_parallel_{args.devices}_tokens_per_s": c,
        "ratio_tfpar_train_to_plain_keras": b / a,
        "ratio_data_parallel_to_one_device": c / b,
    }
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
