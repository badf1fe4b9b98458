"""keras-hub causal LMs (GPT-2, Llama, Gemma, Qwen, Mistral) under tfpar's strategies.

Each model is built from a tiny config (no preset is downloaded), trained
12 AdamW steps on the same batches, and compared with the exact
single-device run (dense Embedding gradients), every weight within 1e-5.
The padding mask pads the last positions of half the rows, so a stage or a
shard that dropped it would train differently.

Needs keras-hub (`pip install -e '.[hub]' && pip install --no-deps
'keras-hub==0.32.*'`, see BUILD_NOTES.md); skips without it.

The table runs in processes of its own (tests/test_keras_hub.py starts
`pytest tests/keras_hub_table.py -k COLUMN`), so that the in-process part of
the suite (`-m "not multiprocess"`) stays fast; run it directly with
`pytest tests/keras_hub_table.py` (add `-s` for each row's max |dw|).
"""

import keras
import numpy as np
import pytest

import tfpar
from consistency_cases import TENSOR_PARALLEL_LEARNING_RATE
from tfpar import compat
from tfpar.strategies.tensor import layouts
from tfpar.strategies.tensor.tensor_parallel import use_dense_gradients

keras_hub = pytest.importorskip(
    "keras_hub", reason="keras-hub is not installed: pip install -e '.[hub]' && "
                        "pip install --no-deps 'keras-hub==0.32.*' (BUILD_NOTES.md, keras-hub)")

pytestmark = pytest.mark.hub

# The table's columns, each run in one process by tests/test_keras_hub.py.
COLUMNS = {"tensor": "megatron or tensor_parallel or gathering or sharded",
           "data_and_pipeline": "data_parallel or pipeline"}

STEPS, BATCH, T, VOCAB = 12, 16, 16, 64
TOLERANCE = 1e-5


def _gpt2():
    return keras_hub.models.GPT2CausalLM(keras_hub.models.GPT2Backbone(
        vocabulary_size=VOCAB, num_layers=2, num_heads=2, hidden_dim=32, intermediate_dim=64,
        dropout=0.0, max_sequence_length=T), preprocessor=None)


def _llama():
    return keras_hub.models.LlamaCausalLM(keras_hub.models.LlamaBackbone(
        vocabulary_size=VOCAB, num_layers=2, num_query_heads=4, num_key_value_heads=2,
        hidden_dim=32, intermediate_dim=64), preprocessor=None)


def _gemma():
    return keras_hub.models.GemmaCausalLM(keras_hub.models.GemmaBackbone(
        vocabulary_size=VOCAB, num_layers=2, num_query_heads=2, num_key_value_heads=2,
        hidden_dim=32, intermediate_dim=64, head_dim=16), preprocessor=None)


def _qwen():
    return keras_hub.models.QwenCausalLM(keras_hub.models.QwenBackbone(
        vocabulary_size=VOCAB, num_layers=2, num_query_heads=4, num_key_value_heads=2,
        hidden_dim=32, intermediate_dim=64), preprocessor=None)


def _mistral():
    return keras_hub.models.MistralCausalLM(keras_hub.models.MistralBackbone(
        vocabulary_size=VOCAB, num_layers=2, num_query_heads=4, num_key_value_heads=2,
        hidden_dim=32, intermediate_dim=64), preprocessor=None)


MODELS = {"gpt2": _gpt2, "llama": _llama, "gemma": _gemma, "qwen": _qwen, "mistral": _mistral}


def data():
    rng = np.random.RandomState(0)
    ids = rng.randint(1, VOCAB, size=(STEPS * BATCH, T + 1)).astype("int32")
    mask = np.ones((STEPS * BATCH, T), dtype="int32")
    mask[::2, -3:] = 0  # right padding: every query still sees its own position
    return {"token_ids": ids[:, :-1], "padding_mask": mask}, ids[:, 1:]


def train(strategy, name):
    x, y = data()
    with strategy.scope():
        keras.utils.set_random_seed(0)
        model = MODELS[name]()
        model.compile(optimizer=keras.optimizers.AdamW(TENSOR_PARALLEL_LEARNING_RATE),
                      loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        use_dense_gradients(model.optimizer)  # the exact update, as TensorParallel uses
    model.fit(x, y, batch_size=BATCH, epochs=1, shuffle=False, verbose=0)
    return model


def by_path(model):
    return {w.path: np.asarray(v) for w, v in zip(model.weights, model.get_weights())}


def max_abs_diff(a, b):
    """Over every weight but the attention key biases (exact gradient 0; see
    tests/test_exact_sparse.py). Printed for `pytest -s`: b's strategy, a's name."""
    wa, wb = by_path(a), by_path(b)
    assert sorted(wa) == sorted(wb)
    diff = max(float(np.max(np.abs(wa[k] - wb[k]))) for k in wa if not k.endswith("key/bias"))
    strategy = tfpar.strategies.strategy_for(b)
    print(f"\n{a.name} {getattr(strategy, 'kind', type(strategy).__name__)}: "
          f"max |dw| {diff:.1e}")
    return diff


_exact = {}


def exact(name):
    """The single-device run of `name` (dense Embedding gradients), once per module."""
    if name not in _exact:
        _exact[name] = train(tfpar.OneDevice(), name)
    return _exact[name]


@pytest.fixture(scope="module", autouse=True)
def forget_exact_runs():
    yield
    _exact.clear()


# TensorParallel first: TensorFlow 2.21 cannot build a 4-device mesh after a smaller one.
@pytest.mark.parametrize("name", sorted(MODELS))
def test_megatron_preset_shards_every_matrix_but_the_position_embedding(name):
    mesh = keras.distribution.DeviceMesh((2, 2), ("batch", "model"))
    layout_map = layouts.megatron(mesh)
    model = MODELS[name]()
    unsharded = []
    for w in model.weights:
        keys = layouts.matching_keys(layout_map, w.path)
        assert len(keys) <= 1, (w.path, keys)
        axes = layout_map[keys[0]].axes if keys else (None,) * len(w.shape)
        layouts.check_axes(w.path, w.shape, axes, {"batch": 2, "model": 2})
        if len(w.shape) >= 2 and "model" not in axes:
            unsharded.append(w.path)
    assert unsharded == (["position_embedding/embeddings"] if name == "gpt2" else [])


# Mistral's weights are Llama's (it adds a sliding-window mask, which nothing
# splits): it keeps the preset check above, and trains in the rows that have
# both (README.md's table was measured on all five).
TRAINED = sorted(set(MODELS) - {"mistral"})


@pytest.mark.parametrize("name", TRAINED)
def test_tensor_parallel_megatron_matches_one_device(name):
    strategy = tfpar.TensorParallel("batch:2,model:2", "megatron")
    model = train(strategy, name)
    assert any("model" in axes for _, axes in strategy.variables.values())
    assert max_abs_diff(exact(name), model) <= TOLERANCE


# keras-hub 0.32's MistralBackbone has no get_layout_map.
BACKBONES = {"gemma": "GemmaBackbone", "llama": "LlamaBackbone", "qwen": "QwenBackbone"}


def own_layout_map(name):
    """The backbone's `get_layout_map` for a 2x2 mesh: weights on `model` and `batch`."""
    mesh = keras.distribution.DeviceMesh((2, 2), ("batch", "model"),
                                         devices=[f"CPU:{i}" for i in range(4)])
    return getattr(keras_hub.models, BACKBONES[name]).get_layout_map(mesh)


@pytest.mark.parametrize("name", sorted(BACKBONES))
def test_tensor_parallel_with_the_backbones_own_layout_map_matches_one_device(name):
    strategy = tfpar.TensorParallel("batch:2,model:2", own_layout_map(name))
    model = train(strategy, name)
    on_both = [p for p, (_, axes) in strategy.variables.items()
               if {"batch", "model"} <= set(axes) and not p.startswith("adamw/")]
    assert any("feedforward" in p or "ffw" in p for p in on_both)
    assert max_abs_diff(exact(name), model) <= TOLERANCE


def test_without_gathering_on_read_llamas_own_layout_map_fails_in_dtensor(monkeypatch):
    strategy = tfpar.TensorParallel("batch:2,model:2", own_layout_map("llama"))
    compat.remove_keras_fixes("gather_on_read")
    monkeypatch.setattr(compat, "apply_keras_fixes", lambda: None)  # the scope would reinstall it
    try:
        with pytest.raises(Exception, match="Contracting dimension for matmul"):
            train(strategy, "llama")
    finally:
        monkeypatch.undo()
        compat.apply_keras_fixes()


# Llama: the family the 2-D layout is known for (torchtitan); Qwen's map is the same shape.
@pytest.mark.parametrize("name", ["llama"])
def test_sharded_fsdp_x_tp_with_the_backbones_own_layout_map_matches_one_device(name):
    strategy = tfpar.ShardedDataParallel(fsdp=2, zero_stage=3, tp=2,
                                         layout_map=own_layout_map(name))
    model = train(strategy, name)
    stored = [axes for p, (_, axes) in strategy.variables.items() if not p.startswith("adamw/")]
    assert sum("batch" in axes for axes in stored) > len(stored) // 2
    assert max_abs_diff(exact(name), model) <= TOLERANCE


@pytest.mark.parametrize("stage", [3])
def test_sharded_zero_stages_on_four_devices_match_one_device_llama(stage):
    strategy = tfpar.ShardedDataParallel(fsdp=4, zero_stage=stage)
    model = train(strategy, "llama")
    report = strategy.memory_report(model)
    divided = report["optimizer_bytes_per_device"] / (2 * report["parameter_bytes_total"])
    assert divided < 0.3  # a quarter, but for what does not split four ways
    assert max_abs_diff(exact("llama"), model) <= TOLERANCE


# DataParallel (MirroredStrategy) does not look inside the model: two families
# with different attention (learned positions; RoPE with grouped queries) stand
# for the five (all five passed when the table was measured, README.md).
@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_data_parallel_matches_one_device(name):
    assert max_abs_diff(exact(name), train(tfpar.DataParallel(), name)) <= TOLERANCE


SECOND_BLOCK = {"gemma": "decoder_block_1"}  # the others: transformer_layer_1


@pytest.mark.parametrize("name", TRAINED)
def test_pipeline_cut_between_transformer_blocks_matches_one_device(name):
    block = SECOND_BLOCK.get(name, "transformer_layer_1")
    strategy = tfpar.Pipeline(split_points=[block], microbatches=4)
    model = train(strategy, name)
    first, last = (stage.spec for stage in strategy.stages)
    assert last.layer_names[0] == block and first.layer_names[0] == "token_embedding"
    # The hidden state and the padding mask cross the cut; the token embedding is
    # called in both stages (the tied LM head, or Llama's untied one in the same layer).
    assert [t.dtype for t in last.inputs] == ["float32", "int32"]
    assert "token_embedding" in last.layer_names
    assert max_abs_diff(exact(name), model) <= TOLERANCE
