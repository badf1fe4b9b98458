"""The two models of the consistency matrix, their data and their comparison.

Shared by tests/test_consistency.py (in-process rows) and
tests/workers/consistency_worker.py (the MultiWorker row), so that every
row trains the same model from the same initial weights on the same batches.
Importing it runs no TensorFlow op (MultiWorker must start first).
"""

import keras
import numpy as np

import tfpar

STEPS, BATCH = 12, 16
LEARNING_RATE = 1e-2
TOLERANCE = 1e-5
# The GPT runs whose tensor-parallel matmuls sum in another order than one
# device's (TensorParallel, FSDP x TP, Keras's ModelParallel layouts) train
# at 1e-3. Adam divides each gradient by its own scale, so summation-order
# rounding becomes a weight difference proportional to the learning rate:
# 1.04e-5, 3.1e-6 and 1.0e-6 after 12 steps at 1e-2, 3e-3 and 1e-3 on one
# CPU (the kernels a CPU picks decide the order; on another the same 1e-2
# run was 8e-6). An error of the distribution itself (a missing or doubled
# reduction, an inexact sparse update) moves a weight by about the learning
# rate per step, 100 times the tolerance at 1e-3.
TENSOR_PARALLEL_LEARNING_RATE = 1e-3

# Small enough to trace fast; 4 heads so that a 4-way model axis splits them.
GPT = tfpar.models.GPTConfig(layers=1, hidden=32, heads=4, vocab=64, seq_len=16)


def gpt_data():
    rng = np.random.RandomState(0)
    # 40 distinct tokens in 256 per batch: every token repeats, so the
    # Embedding's sparse gradient has duplicate rows (tfpar's fix sums them).
    tokens = rng.randint(0, 40, size=(STEPS * BATCH, GPT.seq_len + 1)).astype("int32")
    return tokens[:, :-1], tokens[:, 1:]


def gpt():
    return tfpar.models.gpt(GPT)


def cnn(synchronized=True):
    """A convolution, synchronized BatchNormalization, a classifier head.

    The convolution has no bias: BatchNormalization subtracts the batch mean,
    so a bias before it has an exact gradient of 0, and Adam would turn
    rounding noise into steps of about the learning rate (as for attention
    key biases, see `max_abs_diff`).
    """
    return keras.Sequential(name="cnn", layers=[
        keras.Input((8, 8, 3)),
        keras.layers.Conv2D(8, 3, padding="same", use_bias=False, name="conv"),
        keras.layers.BatchNormalization(synchronized=synchronized, name="bn"),
        keras.layers.ReLU(),
        keras.layers.GlobalAveragePooling2D(),
        keras.layers.Dense(4, name="head"),
    ])


def cnn_data():
    rng = np.random.RandomState(0)
    x = rng.normal(size=(STEPS * BATCH, 8, 8, 3)).astype("float32")
    return x, rng.randint(0, 4, size=(STEPS * BATCH,)).astype("int32")


CASES = {"gpt": (gpt, gpt_data), "cnn": (cnn, cnn_data)}


def initial_weights(case):
    """The weights every row starts from (seeded Keras initializers, one device)."""
    keras.utils.set_random_seed(0)
    return CASES[case][0]().get_weights()


def loss():
    return keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def compiled(case, initial, build=None):
    """The model of `case` with the given initial weights, compiled with AdamW.

    Call it inside the strategy's scope.
    """
    model = (build or CASES[case][0])()
    model.set_weights(initial)
    model.compile(optimizer=keras.optimizers.AdamW(LEARNING_RATE), loss=loss())
    return model


def by_path(model):
    return {w.path: np.asarray(v) for w, v in zip(model.weights, model.get_weights())}


def max_abs_diff(a, b):
    """Largest |a - b| over every weight (trainable or not), by path; `a` and `b`
    are models or {path: array}.

    The attention key biases are left out: softmax is invariant to them, so
    their exact gradient is 0 and Adam turns rounding noise into steps of
    about the learning rate (see tests/test_exact_sparse.py).
    """
    a = a if isinstance(a, dict) else by_path(a)
    b = b if isinstance(b, dict) else by_path(b)
    assert sorted(a) == sorted(b)
    return max(float(np.max(np.abs(a[k] - b[k]))) for k in a if not k.endswith("key/bias"))


def train_lm(strategy, shape, recompute="none", steps=12, batch=16, global_clipnorm=None):
    """A GPT of `shape` trained `steps` AdamW steps under `strategy` on fixed random
    tokens, with the exact (dense) Embedding update: the sharded tests' run."""
    from tfpar.strategies.tensor.tensor_parallel import use_dense_gradients

    tokens = np.random.RandomState(0).randint(
        0, shape.vocab, size=(steps * batch, shape.seq_len + 1)).astype("int32")
    with strategy.scope():
        keras.utils.set_random_seed(0)
        model = tfpar.models.gpt(shape, recompute=recompute)
        model.compile(optimizer=keras.optimizers.AdamW(TENSOR_PARALLEL_LEARNING_RATE,
                                                       global_clipnorm=global_clipnorm),
                      loss=tfpar.models.lm_loss())
        use_dense_gradients(model.optimizer)
    model.fit(tokens[:, :-1], tokens[:, 1:], batch_size=batch, epochs=1, shuffle=False,
              verbose=0)
    return model
