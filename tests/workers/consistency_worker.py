"""The MultiWorker row of the consistency matrix (tests/test_consistency.py).

Run under `tfpar launch --nproc 2 -- python consistency_worker.py
--strategy=multi_worker --init_dir=D --out=D`: trains the matrix's GPT and
its CNN with synchronized BatchNormalization from the initial weights in
D/initial_{case}.npz, and writes each rank's final weights (by path) to
D/{case}.rank{i}.npz. One launch covers both models.
"""

import sys
from pathlib import Path

from absl import app, flags

import tfpar
from tfpar import flags as tfpar_flags  # noqa: F401  (defines the strategy flags)

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: the shared cases

flags.DEFINE_string("init_dir", None, "Directory holding initial_{case}.npz.")
flags.DEFINE_string("out", None, "Directory for {case}.rank{i}.npz.")
FLAGS = flags.FLAGS


def main(argv):
    strategy = tfpar.from_flags()  # first: MultiWorker starts before any TensorFlow op
    import numpy as np

    import consistency_cases as cases

    for case in ("gpt", "cnn"):
        saved = np.load(Path(FLAGS.init_dir) / f"initial_{case}.npz")
        initial = [saved[f"arr_{i}"] for i in range(len(saved.files))]
        with strategy.scope():
            model = cases.compiled(case, initial)
        x, y = cases.CASES[case][1]()
        dataset = tfpar.data.from_arrays((x, y), strategy, global_batch_size=cases.BATCH)
        model.fit(dataset, epochs=1, verbose=0)
        assert int(model.optimizer.iterations.numpy()) == cases.STEPS
        np.savez(Path(FLAGS.out) / f"{case}.rank{strategy.worker_index}.npz",
                 **cases.by_path(model))
    print(f"rank {strategy.worker_index} done", flush=True)


if __name__ == "__main__":
    app.run(main)
