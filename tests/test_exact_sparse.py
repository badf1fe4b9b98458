"""Exact Embedding updates: duplicate rows of a sparse gradient are summed before the optimizer.

Keras 3 on TensorFlow squares an IndexedSlices gradient row by row in Adam
(g1^2 + g2^2 for a token seen twice, instead of (g1 + g2)^2). tfpar's fix
(`tfpar.compat.sum_duplicate_rows`) makes the sparse update equal the dense
(exact) one, on one device and under data parallelism.
"""

import keras
import numpy as np
import pytest
import tensorflow as tf

import tfpar
from consistency_cases import max_abs_diff
from tfpar import compat
from tfpar.compat.sum_duplicate_rows import sum_duplicate_rows
from tfpar.strategies.tensor.tensor_parallel import use_dense_gradients

STEPS, BATCH, SEQ = 12, 16, 32
SHAPE = tfpar.models.GPTConfig(layers=2, hidden=32, heads=2, vocab=64, seq_len=SEQ)


def tokens(seed=0):
    rng = np.random.RandomState(seed)
    # 40 distinct tokens in 512 per batch: every token repeats many times.
    x = rng.randint(0, 40, size=(STEPS * BATCH, SEQ + 1)).astype("int32")
    return x[:, :-1], x[:, 1:]


def train(strategy, dense=False, **optimizer_options):
    x, y = tokens()
    with strategy.scope():
        keras.utils.set_random_seed(0)
        model = tfpar.models.gpt(SHAPE)
        model.compile(optimizer=keras.optimizers.AdamW(1e-2, **optimizer_options),
                      loss=tfpar.models.lm_loss())
        if dense:
            use_dense_gradients(model.optimizer)
    model.fit(tfpar.data.from_arrays((x, y), strategy, global_batch_size=BATCH), epochs=1,
              verbose=0)
    return model


@pytest.fixture(autouse=True)
def fixes_applied():
    compat.apply_keras_fixes()
    yield
    compat.apply_keras_fixes()


@pytest.fixture(scope="module")
def exact():
    compat.apply_keras_fixes()
    return train(tfpar.OneDevice(), dense=True)


def test_summing_duplicate_rows_keeps_the_gradient_and_drops_the_repeats():
    g = tf.IndexedSlices(tf.constant([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]]),
                         tf.constant([3, 1, 3]), tf.constant([5, 2]))
    summed = sum_duplicate_rows(g)
    assert sorted(summed.indices.numpy().tolist()) == [1, 3]
    np.testing.assert_array_equal(tf.convert_to_tensor(summed), tf.convert_to_tensor(g))
    dense = tf.ones((2, 2))
    assert sum_duplicate_rows(dense) is dense


def test_keras_sparse_adam_without_the_fix_drifts_from_the_exact_update(exact):
    strategy = tfpar.OneDevice()  # installs the fixes; the test then takes one out
    compat.remove_keras_fixes("sum_duplicate_rows")
    assert max_abs_diff(exact, train(strategy)) > 1e-3


def test_one_device_sparse_update_equals_the_dense_one(exact):
    assert max_abs_diff(exact, train(tfpar.OneDevice())) <= 1e-5


def test_data_parallel_sparse_update_equals_one_device_dense(exact):
    # The all-reduce of IndexedSlices concatenates every replica's rows: more repeats.
    assert max_abs_diff(exact, train(tfpar.DataParallel())) <= 1e-5


def test_global_norm_clipping_measures_the_summed_gradient():
    clip = {"global_clipnorm": 0.05}
    dense = train(tfpar.OneDevice(), dense=True, **clip)
    assert max_abs_diff(dense, train(tfpar.OneDevice(), **clip)) <= 1e-5
