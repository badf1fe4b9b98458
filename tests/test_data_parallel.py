"""One-host strategies: the plain Keras pattern, and numbers equal to one device."""

import keras
import numpy as np
import pytest
import tensorflow as tf

import tfpar
from tfpar.devices import DeviceConfigError

GLOBAL_BATCH = 32


def data(n=256, seed=42):
    rng = np.random.RandomState(seed)
    x = rng.normal(size=(n, 16)).astype("float32")
    y = np.tanh(x @ rng.normal(size=(16, 4))).astype("float32")
    return x, y


def build(strategy, seed=7):
    with strategy.scope():
        model = keras.Sequential([keras.Input((16,)), keras.layers.Dense(32, activation="tanh"),
                                  keras.layers.Dense(4)])
        rng = np.random.RandomState(seed)
        model.set_weights([rng.normal(scale=0.3, size=w.shape).astype("float32")
                           for w in model.get_weights()])
        model.compile(optimizer=keras.optimizers.AdamW(1e-2, weight_decay=1e-3),
                      loss="mse", metrics=["mae"])
    return model


def fit(strategy, epochs=3):
    x, y = data()
    model = build(strategy)
    ds = tfpar.data.from_arrays((x, y), strategy, global_batch_size=GLOBAL_BATCH)
    val = tfpar.data.from_arrays(data(64, seed=1), strategy, global_batch_size=GLOBAL_BATCH,
                                 drop_remainder=False)
    history = model.fit(ds, epochs=epochs, validation_data=val, verbose=0)
    return model, history


def max_abs_diff(a, b):
    return max(float(np.max(np.abs(u - v))) for u, v in zip(a, b))


@pytest.fixture(scope="module")
def baseline():
    return fit(tfpar.OneDevice())


def test_data_parallel_on_4_devices_matches_one_device_after_24_adamw_steps(baseline):
    single, single_history = baseline
    model, history = fit(tfpar.DataParallel())
    assert model.distribute_strategy.num_replicas_in_sync == 4
    assert int(model.optimizer.iterations.numpy()) == 24
    diff = max_abs_diff(single.get_weights(), model.get_weights())
    assert diff <= 1e-5, diff
    # Training moved the weights far more than the tolerance: the check has teeth.
    assert max_abs_diff(build(tfpar.OneDevice()).get_weights(), model.get_weights()) > 1e-2
    np.testing.assert_allclose(history.history["loss"], single_history.history["loss"], rtol=1e-5)
    np.testing.assert_allclose(history.history["val_mae"], single_history.history["val_mae"],
                               rtol=1e-5)


@pytest.mark.parametrize("all_reduce", ["reduce_to_one", "hierarchical_copy"])
def test_every_local_all_reduce_gives_the_same_training(baseline, all_reduce):
    model, _ = fit(tfpar.DataParallel(all_reduce=all_reduce), epochs=3)
    assert max_abs_diff(baseline[0].get_weights(), model.get_weights()) <= 1e-5


def test_two_strategies_in_one_process_train_different_models():
    """MirroredStrategy's shared collective keys would collide (tfpar.compat): the
    second strategy's all-reduces would mix in the first's, or hang."""
    x = np.random.RandomState(0).normal(size=(64, 3)).astype("float32")
    for width in (5, 2):
        trained = []
        for strategy in (tfpar.DataParallel(), tfpar.OneDevice()):
            keras.utils.set_random_seed(width)
            with strategy.scope():
                model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(width)])
                model.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse")
            initial = model.get_weights()
            model.fit(x, x[:, :1].repeat(width, axis=1), batch_size=16, epochs=2, verbose=0)
            trained.append(model.get_weights())
        assert max_abs_diff(trained[0], trained[1]) <= 1e-6, width
        assert max_abs_diff(initial, trained[1]) > 1e-2  # training moved them


def test_nccl_all_reduce_on_cpus_is_refused():
    with pytest.raises(ValueError, match="needs GPUs"):
        tfpar.DataParallel(all_reduce="nccl")


def test_unknown_all_reduce_is_refused():
    with pytest.raises(ValueError, match=r"all_reduce='fast'\): use one of"):
        tfpar.DataParallel(all_reduce="fast")


def test_evaluate_and_predict_match_one_device(baseline):
    single = baseline[0]
    strategy = tfpar.DataParallel()
    model = build(strategy)
    model.set_weights(single.get_weights())
    x, y = data(100, seed=3)  # 100: a partial last batch on purpose
    np.testing.assert_allclose(model.predict(x, batch_size=GLOBAL_BATCH, verbose=0),
                               single.predict(x, batch_size=GLOBAL_BATCH, verbose=0), atol=1e-6)
    ours = model.evaluate(x, y, batch_size=GLOBAL_BATCH, verbose=0, return_dict=True)
    theirs = single.evaluate(x, y, batch_size=GLOBAL_BATCH, verbose=0, return_dict=True)
    assert ours["mae"] == pytest.approx(theirs["mae"], rel=1e-5)


def test_save_and_load_round_trip_to_a_plain_model(baseline, tmp_path):
    model, _ = fit(tfpar.DataParallel(), epochs=1)
    x, _ = data(40, seed=5)
    expected = model.predict(x, verbose=0)
    model.save(tmp_path / "m.keras")
    model.save_weights(tmp_path / "m.weights.h5")
    plain = keras.models.load_model(tmp_path / "m.keras")
    np.testing.assert_allclose(plain.predict(x, verbose=0), expected, atol=1e-6)
    again = build(tfpar.DataParallel(), seed=99)
    again.load_weights(tmp_path / "m.weights.h5")
    np.testing.assert_allclose(again.predict(x, verbose=0), expected, atol=1e-6)


def test_model_checkpoint_callback_writes_under_data_parallel(tmp_path):
    strategy = tfpar.DataParallel()
    model = build(strategy)
    x, y = data()
    path = tmp_path / "ckpt-{epoch}.weights.h5"
    model.fit(x, y, batch_size=GLOBAL_BATCH, epochs=2, verbose=0,
              callbacks=[keras.callbacks.ModelCheckpoint(str(path), save_weights_only=True)])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt-1.weights.h5", "ckpt-2.weights.h5"]


@pytest.fixture
def policy():
    yield
    keras.mixed_precision.set_global_policy("float32")


def test_mixed_float16_gets_dynamic_loss_scaling_and_trains(policy):
    tfpar.set_precision("mixed_float16")
    strategy = tfpar.DataParallel()
    model = build(strategy)
    assert model.layers[0].compute_dtype == "float16"
    assert model.layers[0].kernel.dtype == "float32"
    assert isinstance(model.optimizer, keras.optimizers.LossScaleOptimizer)
    x, y = data()
    history = model.fit(x, y, batch_size=GLOBAL_BATCH, epochs=3, verbose=0)
    assert history.history["loss"][-1] < 0.7 * history.history["loss"][0]


def test_mixed_bfloat16_trains_without_loss_scaling(policy):
    tfpar.set_precision("mixed_bfloat16")
    model = build(tfpar.DataParallel())
    assert model.layers[0].compute_dtype == "bfloat16"
    assert not isinstance(model.optimizer, keras.optimizers.LossScaleOptimizer)
    x, y = data()
    history = model.fit(x, y, batch_size=GLOBAL_BATCH, epochs=3, verbose=0)
    assert history.history["loss"][-1] < 0.7 * history.history["loss"][0]


def test_unknown_precision_is_refused():
    with pytest.raises(ValueError, match="precision='fp8'"):
        tfpar.set_precision("fp8")


def test_simulate_devices_after_tensorflow_started_names_the_fix():
    tf.constant(1.0)  # TensorFlow is running (conftest made 4 devices)
    assert len(tfpar.simulate_devices(4)) == 4  # same count: a no-op
    with pytest.raises(DeviceConfigError, match="already initialized with 4 CPU"):
        tfpar.simulate_devices(2)


def test_simulate_devices_rejects_non_positive_counts():
    with pytest.raises(DeviceConfigError, match="positive integer"):
        tfpar.simulate_devices(0)
