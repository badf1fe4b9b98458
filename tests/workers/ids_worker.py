"""Iterates a tfpar input pipeline exactly as `model.fit` does and records the
example ids each replica of this worker receives (for the exactly-once tests)."""

import json
import os

from absl import app, flags

import tfpar
from tfpar import flags as tfpar_flags  # noqa: F401

flags.DEFINE_string("out", None, "Write ids here, suffixed with the rank.")
flags.DEFINE_integer("examples", 100, "Dataset size.")
flags.DEFINE_integer("batch", 8, "Global batch.")
flags.DEFINE_bool("drop_remainder", False, "Drop the last partial global batch.")
flags.DEFINE_enum("source", "arrays", ["arrays", "one_file", "files"], "Input source.")
FLAGS = flags.FLAGS


def main(argv):
    import numpy as np
    import tensorflow as tf

    strategy = tfpar.from_flags()
    ids = np.arange(FLAGS.examples, dtype="int64")
    kwargs = dict(global_batch_size=FLAGS.batch, drop_remainder=FLAGS.drop_remainder)
    if FLAGS.source == "arrays":
        ds = tfpar.data.from_arrays(ids, strategy, shuffle=True, seed=3, **kwargs)
    else:
        # Text files of ids, written by the test (one file, or one per worker or more).
        pattern = os.path.join(os.path.dirname(FLAGS.out), "ids-*.txt")
        ds = tfpar.data.from_files(pattern, strategy, reader=tf.data.TextLineDataset,
                                   parse=lambda line: tf.strings.to_number(line, tf.int64),
                                   **kwargs)
    seen = []
    steps = 0
    for batch in strategy.experimental_distribute_dataset(ds):
        steps += 1
        for local in strategy.experimental_local_results(batch):
            seen.extend(int(i) for i in local.numpy())
    with open(f"{FLAGS.out}.rank{strategy.worker_index}.json", "w") as f:
        json.dump({"ids": seen, "steps": steps}, f)


if __name__ == "__main__":
    app.run(main)
