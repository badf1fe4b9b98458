"""Keras models as users write them train under TensorParallel and Pipeline.

A nanoGPT-style GPT builds its own positions with `keras.ops.arange` in
`call`, as a subclassed model (built by its first step) or as a functional
model with a position layer. Each must match one device (exact Embedding
updates) within 1e-5 after 12 AdamW steps.
"""

import keras
import numpy as np
import pytest
from keras import ops

import tfpar
from consistency_cases import max_abs_diff
from tfpar.strategies.tensor.tensor_parallel import use_dense_gradients

STEPS, BATCH, T, VOCAB, D = 12, 16, 16, 64, 32


class NanoGPT(keras.Model):
    """The nanoGPT pattern: token + position embeddings, positions from ops.arange."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.wte = keras.layers.Embedding(VOCAB, D, name="wte")
        self.wpe = keras.layers.Embedding(T, D, name="wpe")
        self.block = tfpar.models.TransformerBlock(D, 2, 4, 0.0, name="block_0")
        self.ln_f = keras.layers.LayerNormalization(name="ln_f")
        self.lm_head = keras.layers.Dense(VOCAB, name="lm_head")

    def call(self, idx):
        positions = ops.arange(0, ops.shape(idx)[1], dtype="int32")
        x = self.wte(idx) + self.wpe(positions)
        return self.lm_head(self.ln_f(self.block(x)))


class TokenAndPosition(keras.layers.Layer):
    """The same embeddings as one layer, for a functional model."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.wte = keras.layers.Embedding(VOCAB, D, name="wte")
        self.wpe = keras.layers.Embedding(T, D, name="wpe")

    def call(self, idx):
        return self.wte(idx) + self.wpe(ops.arange(0, ops.shape(idx)[1], dtype="int32"))


def functional_gpt(name="gpt"):
    idx = keras.Input((T,), dtype="int32")
    x = TokenAndPosition(name="embed")(idx)
    for i in range(2):
        x = tfpar.models.TransformerBlock(D, 2, 4, 0.0, name=f"block_{i}")(x)
    x = keras.layers.LayerNormalization(name="ln_f")(x)
    return keras.Model(idx, keras.layers.Dense(VOCAB, name="lm_head")(x), name=name)


def data():
    rng = np.random.RandomState(0)
    x = rng.randint(0, VOCAB, size=(STEPS * BATCH, T + 1)).astype("int32")
    return x[:, :-1], x[:, 1:]


def train(strategy, build, call_first=False):
    x, y = data()
    with strategy.scope():
        keras.utils.set_random_seed(0)
        model = build(name="gpt")
        if call_first:
            model(x[:2])  # built eagerly inside the scope, on its own constants
        model.compile(optimizer=keras.optimizers.AdamW(1e-2),
                      loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        use_dense_gradients(model.optimizer)  # the exact update, as TensorParallel uses
    model.fit(x, y, batch_size=BATCH, epochs=1, shuffle=False, verbose=0)
    return model


@pytest.fixture(scope="module")
def single_subclassed():
    return train(tfpar.OneDevice(), NanoGPT)


@pytest.fixture(scope="module")
def single_functional():
    return train(tfpar.OneDevice(), functional_gpt)


@pytest.mark.parametrize("call_first", [False, True], ids=["built-by-fit", "built-eagerly"])
def test_nanogpt_subclassed_trains_tensor_parallel_like_one_device(single_subclassed, call_first):
    model = train(tfpar.TensorParallel("batch:2,model:2"), NanoGPT, call_first=call_first)
    assert tfpar.strategies.strategy_for(model).kind == "tensor"
    assert max_abs_diff(single_subclassed, model) <= 1e-5


def test_functional_gpt_with_arange_positions_trains_tensor_parallel_like_one_device(
        single_functional):
    model = train(tfpar.TensorParallel("batch:2,model:2"), functional_gpt)
    assert max_abs_diff(single_functional, model) <= 1e-5


def test_functional_gpt_with_arange_positions_trains_as_a_pipeline_like_one_device(
        single_functional):
    strategy = tfpar.Pipeline(stages=2, microbatches=4)
    model = train(strategy, functional_gpt)
    assert len(strategy.stages) == 2
    assert max_abs_diff(single_functional, model) <= 1e-5
