"""Keras's distribution API (`keras.distribution`) runs on TensorFlow through tfpar.

The script is written as for JAX: set a distribution, build, compile, fit,
save; no strategy scope. Its result must equal the same script with no
distribution (one device, exact Embedding updates) within 1e-5.
"""

import keras
import numpy as np
import pytest
from tensorflow.experimental import dtensor

import tfpar
from consistency_cases import TENSOR_PARALLEL_LEARNING_RATE, max_abs_diff
from tfpar.strategies import keras_distribution

STEPS, BATCH = 12, 16
SHAPE = tfpar.models.GPTConfig(layers=2, hidden=32, heads=2, vocab=64, seq_len=16)


def data():
    rng = np.random.RandomState(0)
    x = rng.randint(0, SHAPE.vocab, size=(STEPS * BATCH, SHAPE.seq_len + 1)).astype("int32")
    return x[:, :-1], x[:, 1:]


def script(distribution=None):
    """The user's script, unchanged between backends."""
    keras.distribution.set_distribution(distribution)
    try:
        keras.utils.set_random_seed(0)
        model = tfpar.models.gpt(SHAPE)
        model.compile(optimizer=keras.optimizers.AdamW(TENSOR_PARALLEL_LEARNING_RATE),
                      loss=tfpar.models.lm_loss())
        x, y = data()
        model.fit(x, y, batch_size=BATCH, epochs=1, shuffle=False, verbose=0)
        return model
    finally:
        keras.distribution.set_distribution(None)


def model_parallel():
    mesh = keras.distribution.DeviceMesh((2, 2), ["batch", "model"],
                                         devices=keras.distribution.list_devices()[:4])
    layout_map = keras.distribution.LayoutMap(mesh)
    layout_map[".*mlp_up/kernel"] = (None, "model")
    layout_map[".*mlp_down/kernel"] = ("model", None)
    layout_map[".*token_embedding/embeddings"] = ("model", None)
    return keras.distribution.ModelParallel(layout_map=layout_map, batch_dim_name="batch")


@pytest.fixture(scope="module", autouse=True)
def bridge():
    tfpar.enable_keras_distribution()
    yield
    keras_distribution.disable()


@pytest.fixture(scope="module")
def single():
    return script(None)


def test_model_parallel_shards_the_layout_maps_weights_and_matches_one_device(single, tmp_path):
    model = script(model_parallel())
    up = next(w for w in model.weights if w.path.endswith("mlp_up/kernel"))
    assert isinstance(up.value, dtensor.DVariable)
    assert dtensor.fetch_layout(up.value).sharding_specs == [dtensor.UNSHARDED, "model"]
    assert max_abs_diff(single, model) <= 1e-5
    model.save(tmp_path / "m.keras")  # saves as a plain Keras model
    loaded = keras.saving.load_model(tmp_path / "m.keras")
    assert max_abs_diff(model, loaded) == 0.0


def test_data_parallel_replicates_the_weights_splits_the_batch_and_matches_one_device(single):
    model = script(keras.distribution.DataParallel(devices=keras.distribution.list_devices()[:4]))
    strategy = tfpar.strategies.strategy_for(model)
    assert strategy.kind == "tensor" and strategy.mesh_shape == {"batch": 4}
    assert max_abs_diff(single, model) <= 1e-5


def test_without_a_distribution_variables_stay_plain(single):
    assert not any(isinstance(w.value, dtensor.DVariable) for w in single.weights)


def test_a_distribution_tfpar_cannot_run_is_refused_with_the_choices():
    from keras.src.distribution.distribution_lib import Distribution  # no public name

    class Other(Distribution):
        def get_data_layout(self, data_shape):
            return None

        def get_variable_layout(self, variable):
            return None

        def get_tensor_layout(self, path):
            return None

    mesh = keras.distribution.DeviceMesh((4,), ["batch"], devices=keras.distribution.list_devices()[:4])
    with pytest.raises(TypeError, match="tfpar runs DataParallel and ModelParallel"):
        keras_distribution.strategy_for(Other(mesh))
