"""A pipeline whose stages live in different processes (run under `tfpar launch`).

Without --tp/--fsdp every rank but 0 serves its devices and exits when rank 0
ends (`tfpar.flags.from_flags`, as `tfpar train` does); with them every rank
trains its own stage. Rank 0 trains a 2-block
GPT for --steps AdamW steps under the pipeline the flags ask for, then the
exact single-device run on its own CPU, and prints one JSON line: max |dw|,
the strategy's dims and devices, and a checkpoint of the pipelined model
loaded into a plain model. With --steps large it prints "training" first
(the fault tests stop or kill a stage process then).
"""

import json
import sys
import tempfile
from pathlib import Path

import keras
from absl import app, flags

import tfpar
from tfpar import flags as tfpar_flags

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from consistency_cases import max_abs_diff, train_lm  # noqa: E402

flags.DEFINE_integer("steps", 10, "AdamW steps.")
FLAGS = flags.FLAGS

SHAPE = tfpar.models.GPTConfig(layers=2, hidden=32, heads=4, vocab=64, seq_len=16)
BATCH = 16


def main(argv):
    del argv
    strategy = tfpar_flags.from_flags()  # ranks > 0 serve and exit here
    if FLAGS.steps > 50:
        print("training", flush=True)
    model = train_lm(strategy, SHAPE, steps=FLAGS.steps, batch=BATCH)
    path = Path(tempfile.mkdtemp()) / "pipeline.weights.h5"
    # Every process saves (with stages run by their own processes, the save
    # gathers them to rank 0 first); rank 0 writes and compares.
    model.save_weights(path)
    if not strategy.is_chief:
        return
    exact = train_lm(tfpar.OneDevice(), SHAPE, steps=FLAGS.steps, batch=BATCH)
    keras.utils.set_random_seed(0)
    start = tfpar.models.gpt(SHAPE)
    plain = tfpar.models.gpt(SHAPE)
    plain.load_weights(path)
    print(json.dumps({
        "max_abs_diff": max_abs_diff(exact, model), "moved": max_abs_diff(exact, start),
        "plain_from_pipeline": max_abs_diff(model, plain), "dims": strategy.dims.describe(),
        "devices": strategy.describe()["devices"],
        "variable_devices": sorted({v.value.device for v in model.trainable_variables})}))


if __name__ == "__main__":
    app.run(main)
