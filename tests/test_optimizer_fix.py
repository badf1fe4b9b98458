"""Gradient clipping and accumulation under tf.distribute: after the all-reduce (compat fix 6).

Keras 3.15 clips and accumulates each replica's partial gradient before the
all-reduce: clipping then silently trains differently from one device, and
accumulation fails to trace. With tfpar's fix both equal one device.
"""

import keras
import numpy as np
import pytest
import tensorflow as tf

import tfpar
from tfpar import compat

STEPS = 24


def data(n=STEPS * 32, seed=3):
    rng = np.random.RandomState(seed)
    x = rng.normal(size=(n, 16)).astype("float32")
    return x, np.tanh(x @ rng.normal(size=(16, 4))).astype("float32")


def train(strategy, **optimizer_options):
    x, y = data()
    with strategy.scope():
        model = keras.Sequential([keras.Input((16,)), keras.layers.Dense(32, activation="tanh"),
                                  keras.layers.Dense(4)])
        rng = np.random.RandomState(7)
        model.set_weights([rng.normal(scale=0.5, size=w.shape).astype("float32")
                           for w in model.get_weights()])
        model.compile(optimizer=keras.optimizers.AdamW(1e-2, **optimizer_options), loss="mse")
    model.fit(tfpar.data.from_arrays((x, y), strategy, global_batch_size=32), epochs=1,
              verbose=0)
    return model


def max_abs_diff(a, b):
    return max(float(np.max(np.abs(u - v))) for u, v in zip(a.get_weights(), b.get_weights()))


@pytest.fixture(autouse=True)
def fixes_applied():
    compat.apply_keras_fixes()
    yield
    compat.apply_keras_fixes()


CLIPPING = {"global_clipnorm": 0.05}


def test_global_norm_clipping_on_4_replicas_matches_one_device():
    single = train(tfpar.OneDevice(), **CLIPPING)
    # The clip binds: without it training ends elsewhere.
    assert max_abs_diff(single, train(tfpar.OneDevice())) > 1e-2
    assert max_abs_diff(single, train(tfpar.DataParallel(), **CLIPPING)) <= 1e-5


def test_without_the_fix_each_replica_clips_its_own_gradient_and_training_drifts():
    single = train(tfpar.OneDevice(), **CLIPPING)
    strategy = tfpar.DataParallel()  # installs the fixes; the test then takes one out
    compat.remove_keras_fixes("reduce_before_apply")
    drifted = train(strategy, **CLIPPING)
    assert max_abs_diff(single, drifted) > 1e-3


def test_gradient_accumulation_on_4_replicas_matches_one_device():
    options = {"gradient_accumulation_steps": 3, **CLIPPING}
    single = train(tfpar.OneDevice(), **options)
    model = train(tfpar.DataParallel(), **options)
    assert int(model.optimizer.iterations.numpy()) == STEPS // 3
    assert max_abs_diff(single, model) <= 1e-5


def test_without_the_fix_gradient_accumulation_fails_under_a_strategy():
    strategy = tfpar.DataParallel()
    compat.remove_keras_fixes("reduce_before_apply")
    with pytest.raises(RuntimeError, match="merge_call"):
        train(strategy, gradient_accumulation_steps=2)


def test_strategies_without_replicas_keep_upstream_keras():
    # No tf.distribute replica context: the fix steps aside (same numbers as before).
    x = tf.constant([[1.0, 2.0]])
    variable = keras.Variable([[0.5], [0.5]])
    optimizer = keras.optimizers.SGD(0.1, global_clipnorm=1.0)
    with tf.GradientTape() as tape:
        loss = tf.reduce_sum(tf.matmul(x, variable.value) ** 2)
    optimizer.apply(tape.gradient(loss, [variable.value]), [variable])
    grad = np.array([[2 * 1.5 * 1.0], [2 * 1.5 * 2.0]])
    expected = 0.5 - 0.1 * grad / max(1.0, np.linalg.norm(grad))
    np.testing.assert_allclose(variable.numpy(), expected, rtol=1e-6)
