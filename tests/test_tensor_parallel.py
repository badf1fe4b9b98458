"""TensorParallel: Keras 3 models on DTensor meshes, equal to one device."""

import os
import warnings

import keras
import numpy as np
import pytest
import tensorflow as tf
from tensorflow.experimental import dtensor

import tfpar
from tfpar.strategies.tensor.layouts import LayoutError
from tfpar.strategies.tensor.mesh import MeshError
from tfpar.strategies.tensor.tensor_parallel import use_dense_gradients

MESHES = ["batch:1,model:4", "batch:2,model:2", "batch:4,model:1"]


def mlp():
    return keras.Sequential([keras.Input((16,)),
                             keras.layers.Dense(32, activation="tanh", name="mlp_up"),
                             keras.layers.Dense(8, name="mlp_down")])


def mlp_data(n=256):
    rng = np.random.RandomState(42)
    x = rng.normal(size=(n, 16)).astype("float32")
    return x, np.tanh(x @ rng.normal(size=(16, 8))).astype("float32")


def gpt():
    return tfpar.models.gpt(tfpar.models.GPTConfig(layers=2, hidden=32, heads=4, seq_len=16))


def gpt_data(n=160):
    tokens = np.random.RandomState(42).randint(0, 256, size=(n, 17)).astype("int32")
    return tokens[:, :-1], tokens[:, 1:]


def initialize(model, seed=7):
    """Deterministic weights, the same whatever the strategy (LayerNorm scales at 1)."""
    rng = np.random.RandomState(seed)
    model.set_weights([
        (np.ones(v.shape) if v.path.endswith("gamma") else rng.normal(scale=0.1, size=v.shape))
        .astype("float32") for v in model.weights])
    return model


def compiled(build, optimizer="adamw", metrics=("mae",), loss="mse", lr=1e-2):
    model = initialize(build())
    optimizers = {
        # Adam moves every weight by about lr per step whatever its gradient, so
        # float32 rounding differences between layouts grow with lr: 1e-3 for
        # the Transformer keeps them well under the 1e-5 tolerance.
        "adamw": lambda: keras.optimizers.AdamW(lr, weight_decay=1e-2),
        "sgd": lambda: keras.optimizers.SGD(0.1),
        "momentum": lambda: keras.optimizers.SGD(0.02, momentum=0.9),
    }
    model.compile(optimizer=optimizers[optimizer](), loss=loss, metrics=list(metrics))
    return model


def train(model, x, y, batch, epochs=1):
    model.fit(x, y, batch_size=batch, epochs=epochs, verbose=0, shuffle=False)
    return model


def reference(build, x, y, batch, epochs=1, **kwargs):
    model = compiled(build, **kwargs)
    use_dense_gradients(model.optimizer)  # the exact gradient, as TensorParallel uses
    return train(model, x, y, batch, epochs)


def tensor_parallel(mesh, build, x, y, batch, epochs=1, layout_map="megatron", **kwargs):
    strategy = tfpar.TensorParallel(mesh, layout_map)
    with strategy.scope():
        model = compiled(build, **kwargs)
    return strategy, train(model, x, y, batch, epochs)


def max_abs_diff(a, b):
    return max(float(np.max(np.abs(u - v))) for u, v in zip(a.get_weights(), b.get_weights()))


@pytest.fixture(scope="module")
def mlp_reference():
    x, y = mlp_data()
    return reference(mlp, x, y, batch=32, epochs=3)


@pytest.fixture(scope="module")
def gpt_reference():
    x, y = gpt_data()
    return reference(gpt, x, y, batch=8, loss=tfpar.models.lm_loss(), metrics=["accuracy"],
                     lr=1e-3)


@pytest.mark.parametrize("mesh", MESHES)
def test_mlp_matches_one_device_after_24_adamw_steps(mesh, mlp_reference):
    x, y = mlp_data()
    strategy, model = tensor_parallel(mesh, mlp, x, y, batch=32, epochs=3)
    assert int(model.optimizer.iterations.numpy()) == 24
    assert max_abs_diff(model, mlp_reference) <= 1e-5
    assert max_abs_diff(initialize(mlp()), mlp_reference) > 1e-2  # training moved the weights


@pytest.mark.parametrize("mesh", MESHES)
def test_gpt_transformer_matches_one_device_after_20_adamw_steps(mesh, gpt_reference):
    x, y = gpt_data()
    strategy, model = tensor_parallel(mesh, gpt, x, y, batch=8, loss=tfpar.models.lm_loss(),
                                      metrics=["accuracy"], lr=1e-3)
    assert int(model.optimizer.iterations.numpy()) == 20
    assert max_abs_diff(model, gpt_reference) <= 1e-5
    assert max_abs_diff(initialize(gpt()), gpt_reference) > 5e-3  # training moved the weights
    axes = {strategy.variables[v.path][1] for v in model.weights}
    if "model:1" not in mesh:  # the megatron preset really split the model
        assert {(None, "model"), ("model", None), (None, "model", None), ("model", None, None)} <= axes


@pytest.mark.multiprocess
@pytest.mark.parametrize("combine, lost", [("0", False), ("1", True)])
def test_dtensor_all_reduce_combining_loses_adam_updates_so_tfpar_turns_it_off(combine, lost):
    """TensorFlow's default (1) silently drops optimizer updates on a 2x2 mesh."""
    import sys

    from conftest import WORKERS, run

    result = run([sys.executable, str(WORKERS / "dtensor_combine_check.py"),
                  f"--combine_all_reduces={combine}"], check=True)
    diff = float(result.stdout.split("max_abs_diff ")[1].split()[0])
    assert (diff > 1e-3) if lost else (diff <= 1e-5), diff


@pytest.mark.parametrize("optimizer", ["sgd", "momentum"])
def test_sgd_with_and_without_momentum_trains_embeddings(optimizer):
    x, y = gpt_data(48)
    expected = reference(gpt, x, y, batch=8, optimizer=optimizer, loss=tfpar.models.lm_loss(),
                         metrics=())
    _, model = tensor_parallel("batch:2,model:2", gpt, x, y, batch=8, optimizer=optimizer,
                               loss=tfpar.models.lm_loss(), metrics=())
    assert max_abs_diff(model, expected) <= 1e-5


def test_every_keras_variable_lives_on_the_mesh():
    x, y = mlp_data(64)
    strategy, model = tensor_parallel("batch:2,model:2", mlp, x, y, batch=32)
    variables = (model.weights + model.optimizer.variables + model.metrics_variables)
    assert len(variables) > 10
    for v in variables:
        assert isinstance(v._value, dtensor.DVariable), v.path
        assert dtensor.fetch_layout(v._value).mesh == strategy.mesh
    # Optimizer slots follow their variable's layout.
    kernel = model.get_layer("mlp_up").kernel
    slots = [v for v in model.optimizer.variables if "mlp_up_kernel" in v.path]
    assert len(slots) == 2
    for slot in slots:
        assert dtensor.fetch_layout(slot._value) == dtensor.fetch_layout(kernel._value)


def test_sharded_components_are_exactly_one_over_the_model_axis():
    x, y = gpt_data(16)
    strategy, model = tensor_parallel("batch:1,model:4", gpt, x, y, batch=8,
                                      loss=tfpar.models.lm_loss(), metrics=())
    up = model.get_layer("block_0").mlp_up.kernel
    components = dtensor.unpack(up._value.read_value())
    assert len(components) == 4
    assert all(c.shape == (32, 32) for c in components)  # (32, 128) / 4 on the output side
    np.testing.assert_array_equal(np.concatenate([c.numpy() for c in components], axis=1),
                                  up.numpy())
    report = strategy.memory_report(model)
    sharded = sum(int(np.prod(v.shape)) * 4 for v in model.weights
                  if strategy.variables[v.path][1] != (None,) * len(v.shape))
    replicated = report["parameter_bytes_total"] - sharded
    assert report["parameter_bytes_per_device"] == replicated + sharded // 4
    # AdamW: two slots per weight, each laid out like it, plus the step
    # counter (int64) and the learning rate (float32).
    assert report["optimizer_bytes_per_device"] == 2 * report["parameter_bytes_per_device"] + 12


def test_fit_with_steps_per_execution_validation_and_callbacks(tmp_path):
    x, y = mlp_data()
    strategy = tfpar.TensorParallel("batch:2,model:2")
    with strategy.scope():
        model = initialize(mlp())
        model.compile(optimizer=keras.optimizers.AdamW(1e-2, weight_decay=1e-2), loss="mse",
                      metrics=["mae"], steps_per_execution=3)
    history = model.fit(
        x, y, batch_size=32, epochs=3, verbose=0, shuffle=False,
        validation_data=mlp_data(64),
        callbacks=[keras.callbacks.ModelCheckpoint(str(tmp_path / "e{epoch}.weights.h5"),
                                                   save_weights_only=True),
                   tfpar.callbacks.BackupAndRestore(str(tmp_path / "backup"),
                                                    delete_checkpoint=False)])
    assert int(model.optimizer.iterations.numpy()) == 24
    assert len(history.history["val_mae"]) == 3
    assert history.history["loss"][-1] < history.history["loss"][0]
    assert (tmp_path / "e3.weights.h5").exists()
    assert (tmp_path / "backup" / "training_metadata.json").exists()
    expected = reference(mlp, x, y, batch=32, epochs=3)
    assert max_abs_diff(model, expected) <= 1e-5  # steps_per_execution changes nothing


def test_evaluate_and_predict_match_one_device(mlp_reference):
    strategy = tfpar.TensorParallel("batch:2,model:2")
    with strategy.scope():
        model = compiled(mlp)
    model.set_weights(mlp_reference.get_weights())
    x, y = mlp_data(101)  # 101 rows: a partial last batch, padded for the mesh
    np.testing.assert_allclose(model.predict(x, batch_size=32, verbose=0),
                               mlp_reference.predict(x, batch_size=32, verbose=0), atol=1e-5)
    x, y = x[:96], y[:96]
    ours = model.evaluate(x, y, batch_size=32, verbose=0, return_dict=True)
    theirs = mlp_reference.evaluate(x, y, batch_size=32, verbose=0, return_dict=True)
    assert ours["mae"] == pytest.approx(theirs["mae"], rel=1e-5)


@pytest.fixture(scope="module")
def sharded_gpt():
    """A trained GPT on a 2x2 mesh, shared by the saving tests (they only read it)."""
    x, y = gpt_data(32)
    return tensor_parallel("batch:2,model:2", gpt, x, y, batch=8, loss=tfpar.models.lm_loss(),
                           metrics=())


def test_sharded_weights_load_into_a_plain_model_and_back(tmp_path, sharded_gpt):
    strategy, model = sharded_gpt
    x, _ = gpt_data(8)
    expected = model.predict(x, verbose=0)
    model.save_weights(tmp_path / "tp.weights.h5")
    plain = gpt()
    plain.load_weights(tmp_path / "tp.weights.h5")
    np.testing.assert_allclose(plain.predict(x, verbose=0), expected, atol=1e-5)
    # ... and a plain checkpoint into a sharded model.
    plain.save_weights(tmp_path / "plain.weights.h5")
    with strategy.scope():
        again = gpt()
    again.load_weights(tmp_path / "plain.weights.h5")
    again.compile(loss=tfpar.models.lm_loss())
    np.testing.assert_allclose(again.predict(x, verbose=0), expected, atol=1e-5)


def test_sharded_model_saves_as_keras_archive_for_serving(tmp_path, sharded_gpt):
    _, model = sharded_gpt
    x, _ = gpt_data(8)
    model.save(tmp_path / "tp.keras")
    plain = keras.models.load_model(tmp_path / "tp.keras", compile=False)
    np.testing.assert_allclose(plain.predict(x, verbose=0), model.predict(x, verbose=0), atol=1e-5)


def test_tf_train_checkpoint_restores_a_sharded_model_into_a_plain_one(tmp_path, sharded_gpt):
    _, model = sharded_gpt
    x, _ = gpt_data(8)
    path = tf.train.Checkpoint(model=model).write(str(tmp_path / "ckpt"))
    plain = gpt()
    tf.train.Checkpoint(model=plain).read(path).expect_partial()
    np.testing.assert_allclose(plain.predict(x, verbose=0), model.predict(x, verbose=0), atol=1e-5)


def test_layout_that_does_not_divide_names_variable_shape_and_layout():
    strategy = tfpar.TensorParallel("batch:1,model:4")
    with pytest.raises(LayoutError) as e, strategy.scope():
        keras.Sequential([keras.Input((16,)), keras.layers.Dense(30, name="mlp_up")])
    message = str(e.value)
    assert "mlp_up/kernel'" in message and "(16, 30)" in message and "(None, 'model')" in message
    assert "30 is not divisible by mesh axis 'model' of size 4" in message


def test_mesh_larger_than_the_devices_is_refused():
    with pytest.raises(MeshError, match="needs 8 CPU devices, but this process has 4"):
        tfpar.TensorParallel("batch:4,model:2")


def test_layout_map_for_another_mesh_is_refused_on_its_unknown_axis():
    other = keras.distribution.DeviceMesh((2, 2), ("batch", "tensor"), devices=["cpu:0"] * 4)
    layout_map = keras.distribution.LayoutMap(other)
    layout_map[".*mlp_up/kernel"] = (None, "tensor")
    strategy = tfpar.TensorParallel("batch:2,model:2", layout_map)
    with pytest.raises(LayoutError, match="unknown mesh axis 'tensor'; the mesh has"), \
            strategy.scope():
        mlp()


def test_layout_key_that_matches_nothing_warns():
    strategy = tfpar.TensorParallel("batch:2,model:2", keras.distribution.LayoutMap(
        keras.distribution.DeviceMesh((2, 2), ("batch", "model"), devices=["cpu:0"] * 4)))
    strategy.layout_map[".*mlp_up/kernel"] = (None, "model")
    strategy.layout_map["encoder/.*/kernel"] = (None, "model")
    with pytest.warns(UserWarning, match=r"\['encoder/\.\*/kernel'\] matched no variable"):
        with strategy.scope():
            mlp()


def test_mesh_without_a_batch_axis_is_refused():
    with pytest.raises(MeshError, match="no batch axis 'batch'"):
        tfpar.TensorParallel("model:4")


def test_batch_that_does_not_split_over_the_batch_axis_is_refused():
    strategy = tfpar.TensorParallel("batch:4,model:1")
    with strategy.scope():
        model = compiled(mlp)
    x, y = mlp_data(30)
    with pytest.raises(ValueError, match="a batch of 30 rows cannot be split over the 4"):
        model.fit(x, y, batch_size=30, verbose=0)


@pytest.mark.multiprocess
def test_two_processes_form_one_2x2_mesh_and_match_one_device(tmp_path):
    """tfpar launch sets DTENSOR_*; each process feeds its half of every global batch."""
    from conftest import launched_mlp_diff

    diff, report = launched_mlp_diff(tmp_path, "--strategy=tensor", "--mesh=batch:2,model:2",
                                     "--num_simulated_devices=2")
    assert diff <= 1e-5
    assert report == {**report, "steps": 24, "workers": 2, "replicas": 2, "strategy": "tensor"}


def test_dropout_seed_generator_state_lives_on_the_mesh_and_trains():
    strategy = tfpar.TensorParallel("batch:2,model:2")
    with strategy.scope():
        model = keras.Sequential([keras.Input((16,)), keras.layers.Dense(32, name="mlp_up"),
                                  keras.layers.Dropout(0.5), keras.layers.Dense(8, name="mlp_down")])
        model.compile(optimizer=keras.optimizers.AdamW(1e-2), loss="mse")
    x, y = mlp_data(64)
    state = model.layers[1].seed_generator.state
    before = state.numpy()
    history = model.fit(x, y, batch_size=16, epochs=3, verbose=0)
    assert isinstance(state._value, dtensor.DVariable)
    # One draw per training step (3 epochs of 4 batches), each a new dropout mask.
    np.testing.assert_array_equal(state.numpy() - before, [0, 12])
    assert history.history["loss"][-1] < history.history["loss"][0]


@pytest.mark.multiprocess
def test_a_mesh_wider_than_the_first_is_refused_instead_of_hanging():
    """TensorFlow 2.21 deadlocks on a 2-device mesh followed by a 4-device one."""
    import sys

    from conftest import run

    script = ("import tfpar; tfpar.simulate_devices(4)\n"
              "tfpar.TensorParallel('batch:1,model:2')\n"
              "try:\n    tfpar.TensorParallel('batch:2,model:2')\n"
              "except tfpar.strategies.tensor.mesh.MeshError as e:\n    print('refused:', e)\n")
    result = run([sys.executable, "-c", script], timeout=120, check=True)
    assert "refused:" in result.stdout and "more than the 2 of this process's first mesh" \
        in result.stdout
