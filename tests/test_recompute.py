"""Activation recomputation: the same training, less memory kept for the backward.

Equivalence in-process under every strategy; the memory figure in a fresh
process, where TensorFlow's BFC allocator on CPU (TF_CPU_ALLOCATOR_USE_BFC)
reports the peak bytes of a step.
"""

import json
import sys

import keras
import numpy as np
import pytest

import tfpar
from consistency_cases import TENSOR_PARALLEL_LEARNING_RATE, TOLERANCE, max_abs_diff
from conftest import run
from tfpar.recompute import RecomputeError
from tfpar.strategies.tensor.tensor_parallel import use_dense_gradients

STEPS, BATCH = 12, 16
SHAPE = tfpar.models.GPTConfig(layers=2, hidden=32, heads=2, vocab=64, seq_len=16)


def data():
    rng = np.random.RandomState(0)
    x = rng.randint(0, SHAPE.vocab, size=(STEPS * BATCH, SHAPE.seq_len + 1)).astype("int32")
    return x[:, :-1], x[:, 1:]


def train(strategy, recompute):
    x, y = data()
    with strategy.scope():
        keras.utils.set_random_seed(0)
        model = tfpar.models.gpt(SHAPE, recompute=recompute)
        model.compile(optimizer=keras.optimizers.AdamW(TENSOR_PARALLEL_LEARNING_RATE),
                      loss=tfpar.models.lm_loss())
        use_dense_gradients(model.optimizer)
    model.fit(x, y, batch_size=BATCH, epochs=1, shuffle=False, verbose=0)
    return model


@pytest.fixture(scope="module")
def exact():
    return train(tfpar.OneDevice(), "none")


STRATEGIES = {
    "tensor 2x2": lambda: tfpar.TensorParallel("batch:2,model:2"),
    "one device": tfpar.OneDevice,
    "data": tfpar.DataParallel,
    "pipeline 2": lambda: tfpar.Pipeline(stages=2, microbatches=4),
}


def test_the_reference_moved_far_beyond_the_tolerance(exact):
    keras.utils.set_random_seed(0)
    initial = tfpar.models.gpt(SHAPE)
    assert max_abs_diff(initial, exact) > 100 * TOLERANCE


# Selective recomputation under one device and tensor parallelism (Megatron's
# pairing); the data-parallel and pipeline strategies wrap the same blocks the
# same way, and run full recomputation only (the suite's time).
CASES = [(s, "full") for s in STRATEGIES] + [("one device", "selective"),
                                             ("tensor 2x2", "selective")]


@pytest.mark.parametrize("strategy, mode", CASES)
def test_recomputation_trains_like_keeping_activations(exact, strategy, mode):
    assert max_abs_diff(exact, train(STRATEGIES[strategy](), mode)) <= TOLERANCE


def test_a_bad_mode_and_recomputation_with_dropout_are_refused():
    with pytest.raises(RecomputeError, match=r"recompute='most': use one of"):
        tfpar.models.TransformerBlock(32, 2, recompute="most")
    with pytest.raises(RecomputeError, match="dropout=0.1.*other dropout masks"):
        tfpar.models.TransformerBlock(32, 2, dropout=0.1, recompute="full")


PEAK = """
import json, os, sys
os.environ["TF_CPU_ALLOCATOR_USE_BFC"] = "true"
import keras, numpy as np, tensorflow as tf, tfpar
from tfpar.models import GPTConfig
mode = sys.argv[1]
shape = GPTConfig(layers=4, hidden=256, heads=4, vocab=256, seq_len=512)
model = tfpar.models.gpt(shape, recompute=mode)
model.compile(optimizer=keras.optimizers.AdamW(1e-3), loss=tfpar.models.lm_loss())
x = np.random.RandomState(0).randint(0, 256, size=(4, 513)).astype("int32")
model.train_on_batch(x[:, :-1], x[:, 1:])             # trace, build the slots
tf.config.experimental.reset_memory_stats("CPU:0")
base = tf.config.experimental.get_memory_info("CPU:0")["current"]
model.train_on_batch(x[:, :-1], x[:, 1:])
print(json.dumps({"peak": tf.config.experimental.get_memory_info("CPU:0")["peak"] - base}))
"""


@pytest.mark.multiprocess
def test_recomputation_cuts_the_activation_peak_of_a_step_at_sequence_512():
    peaks = {}
    for mode in ("none", "selective", "full"):
        result = run([sys.executable, "-c", PEAK, mode], timeout=300, check=True)
        peaks[mode] = json.loads(result.stdout.strip().splitlines()[-1])["peak"]
    assert peaks["full"] <= 0.5 * peaks["none"], peaks
    assert peaks["full"] < peaks["selective"] < peaks["none"], peaks
