"""`tfpar train --model=keras_hub:<family>`: keras-hub models through the main job.

The family table (`tfpar.models.hub`) builds each backbone from a tiny shape
and wraps it as tokens -> logits; the job trains, resumes and writes its
outputs as for the reference GPT; the pipeline splitter cuts the wrapper
between decoder blocks; under TensorParallel the backbone's own
`get_layout_map` lays it out. The CLI tests (`multiprocess`) train under
data, tensor and pipeline parallelism from flags.

Needs keras-hub (`pip install -e '.[cpu,hub]' && pip install --no-deps
'keras-hub==0.32.*'`, see BUILD_NOTES.md); skips without it. Marked `hub`.
"""

import json
import shutil

import keras
import numpy as np
import pytest
import tensorflow as tf

import tfpar
from conftest import tfpar_cli
from tfpar.data import corpus, text
from tfpar.models import hub
from tfpar.strategies.pipeline import split
from tfpar.train import TrainConfig, TrainConfigError
from tfpar.train import job

keras_hub = pytest.importorskip(
    "keras_hub", reason="keras-hub is not installed: pip install -e '.[cpu,hub]' && "
                        "pip install --no-deps 'keras-hub==0.32.*' (BUILD_NOTES.md, keras-hub)")

pytestmark = pytest.mark.hub

VOCAB, SEQ = 256, 16


def tiny(family, **shape):
    return hub.config(hub.PREFIX + family, vocab=VOCAB, seq_len=SEQ, **shape)


# ------------------------------------------------------------ the family table
@pytest.mark.parametrize("family", hub.FAMILIES)
def test_each_family_maps_token_ids_to_logits_over_the_vocabulary(family):
    model = hub.causal_lm(tiny(family))
    tokens = np.random.RandomState(0).randint(0, VOCAB, size=(3, SEQ)).astype("int32")
    logits = model(tokens)
    assert tuple(logits.shape) == (3, SEQ, VOCAB) and logits.dtype == "float32"
    # Causal: the first position's logits do not depend on later tokens.
    changed = tokens.copy()
    changed[:, 1:] = (changed[:, 1:] + 1) % VOCAB
    np.testing.assert_allclose(model(changed)[:, 0], logits[:, 0], atol=1e-5)


# Parameters looked up but never multiplied: Llama's untied input embedding
# (its LM head is reverse_embeddings), GPT-2's position embeddings.
LOOKUP_ONLY = {"llama": VOCAB * 64, "gpt2": SEQ * 64, "gemma": 0, "qwen": 0}


@pytest.mark.parametrize("family", hub.FAMILIES)
def test_flops_per_token_are_6_per_matmul_parameter_plus_attention(family):
    config = tiny(family)
    model = hub.causal_lm(config)
    assert hub.lookup_only_parameters(model) == LOOKUP_ONLY[family]
    expected = 6 * (model.count_params() - LOOKUP_ONLY[family]) + 12 * 2 * 64 * SEQ
    assert hub.training_flops_per_token(config, model) == expected


def test_the_shape_flags_size_the_backbone_and_the_mlp_width_is_derived():
    llama = tiny("llama", layers=3, hidden=96, heads=6)
    backbone = hub.causal_lm(llama).get_layer("backbone")
    assert (backbone.num_layers, backbone.hidden_dim, backbone.num_query_heads,
            backbone.num_key_value_heads, backbone.intermediate_dim) == (3, 96, 6, 6, 256)
    assert tiny("gpt2", hidden=96).intermediate == 384  # 4 x hidden, ungated
    # Gemma's intermediate_dim counts both gated halves.
    assert hub.backbone(tiny("gemma")).intermediate_dim == 2 * 192


def test_the_pipeline_cuts_the_wrapper_between_decoder_blocks():
    model = hub.causal_lm(tiny("llama", layers=4))
    first, second = split.plan(model, split_points=["transformer_layer_2"])
    assert first.layer_names[0] == "token_embedding"  # then ones_like (named by Keras)
    assert first.layer_names[2:] == ["transformer_layer_0", "transformer_layer_1"]
    # The all-ones padding mask, made from the tokens in stage 0, is passed on.
    hidden, mask = second.inputs
    assert hidden.dtype == "float32" and mask.dtype == "int32"
    assert second.layer_names[-2:] == ["token_embedding", "logits"]  # the untied LM head


# ------------------------------------------------------------------ the job
@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("tfds"))
    corpus.prepare(corpus.DEFAULT_DATASET, path)
    return path


def settings(data_dir, output_dir, **overrides):
    """A short run of a 1-block Llama: epochs of 4 optimizer steps of 16 windows of 32 bytes."""
    values = dict(model="keras_hub:llama", output_dir=str(output_dir), data_dir=data_dir,
                  tokenizer="bytes", layers=1, seq_len=32, global_batch_size=16,
                  train_steps=8, eval_every=4,
                  eval_batches=2, warmup_steps=2, lr_decay_steps=12, sample_tokens=8)
    values.update(overrides)
    return TrainConfig(**values)


@pytest.fixture(scope="module")
def two_epochs(data_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("llama")
    return out, tfpar.train.run(settings(data_dir, out), tfpar.OneDevice())


def test_the_job_trains_a_keras_hub_llama_and_lowers_the_validation_loss(two_epochs):
    _, summary = two_epochs
    assert summary["final_val_loss"] < 0.85 * summary["initial_val_loss"], summary
    assert summary["resumed_from_step"] == 0 and summary["steps"] == 8


def test_the_summary_records_the_family_and_shape(two_epochs):
    out, summary = two_epochs
    written = json.loads((out / "summary.json").read_text())
    assert written["model"] == "keras_hub:llama"
    assert written["model_config"] == {"family": "llama", "layers": 1, "hidden": 64, "heads": 4,
                                       "vocab": 256, "seq_len": 32, "intermediate": 192,
                                       "dropout": 0.0}
    model = hub.causal_lm(hub.HubConfig(**written["model_config"]))
    assert written["parameters"] == model.count_params()
    assert written["flops_per_token"] == hub.training_flops_per_token(
        hub.HubConfig(**written["model_config"]), model)


def test_model_keras_is_the_trained_model_and_gives_the_final_validation_loss(two_epochs,
                                                                             data_dir):
    out, summary = two_epochs
    model = keras.saving.load_model(str(out / "model.keras"))
    assert model.predict(np.zeros((1, 32), "int32"), verbose=0).shape == (1, 32, 256)
    config = settings(data_dir, out)
    _, val_windows, _ = job.text_windows(config, job.load_tokenizer(config), 32)
    val = text.lm_batches(val_windows, tfpar.OneDevice(), global_batch_size=16, train=False,
                          eval_batches=2)
    # A known length, as the job gives it (otherwise Keras averages over one more step).
    val = val.apply(tf.data.experimental.assert_cardinality(2))
    model.compile(loss=tfpar.models.lm_loss())
    loss = model.evaluate(val, verbose=0, return_dict=True)["loss"]
    assert abs(loss - summary["final_val_loss"]) < 1e-4, (loss, summary["final_val_loss"])
    assert (out / "sample.txt").read_text().startswith("def")


def test_a_rerun_with_more_steps_resumes_from_the_checkpoint(two_epochs, data_dir,
                                                             tmp_path_factory):
    out, first = two_epochs
    resumed_dir = tmp_path_factory.mktemp("resumed")
    for name in ("checkpoint", "train_state.json"):  # a copy: the other tests read `out`
        (shutil.copytree if (out / name).is_dir() else shutil.copyfile)(
            out / name, resumed_dir / name)
    resumed = tfpar.train.run(settings(data_dir, resumed_dir, train_steps=12), tfpar.OneDevice())
    assert resumed["resumed_from_step"] == 8 and resumed["steps"] == 12
    assert resumed["initial_val_loss"] == first["initial_val_loss"]
    assert resumed["final_val_loss"] < first["final_val_loss"]
    state = json.loads((resumed_dir / "train_state.json").read_text())
    assert [step for step, _ in state["val_losses"]] == [0, 4, 8, 12]


def test_a_checkpoint_of_another_family_is_refused_with_the_fix(two_epochs, data_dir):
    out, _ = two_epochs
    with pytest.raises(TrainConfigError, match="'family': 'llama'.*give a new --output_dir"):
        tfpar.train.run(settings(data_dir, out, model="keras_hub:gemma"), tfpar.OneDevice())


def test_under_tensor_parallel_the_backbones_own_layout_map_lays_it_out(data_dir):
    strategy = tfpar.TensorParallel("batch:1,model:4")  # megatron, the flag's default
    config = settings(data_dir, "unused", hidden=64, heads=4)
    job._compiled_model(config, config.model_config(256), strategy)
    assert strategy.layouts == "LlamaBackbone.get_layout_map"
    assert strategy.variables["transformer_layer_0/feedforward_gate_dense/kernel"][1] == (
        "batch", "model")  # keras-hub's (data_dim, model_dim), not megatron's (None, "model")


# ------------------------------------------------------------------- the CLI
SHORT = ["--model=keras_hub:llama", "--tokenizer=bytes", "--train_steps=20", "--eval_every=10", "--eval_batches=2",
         "--global_batch_size=16", "--seq_len=32", "--warmup_steps=5", "--sample_tokens=20"]


@pytest.mark.multiprocess
@pytest.mark.parametrize("strategy, details", [
    (["--strategy=data", "--num_simulated_devices=2"], {"dp": 2}),
    (["--strategy=tensor", "--mesh=batch:1,model:2", "--num_simulated_devices=2"], {"tp": 2}),
    (["--pp=2", "--microbatches=2", "--num_simulated_devices=2"], {"pp": 2}),
], ids=["data", "tensor", "pipeline"])
def test_tfpar_train_trains_a_keras_hub_model_under_each_strategy(strategy, details, data_dir,
                                                                   tmp_path):
    result = tfpar_cli("train", *strategy, f"--data_dir={data_dir}", f"--output_dir={tmp_path}",
                       *SHORT, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert {k: summary["dims"][k] for k in details} == details
    assert summary["model"] == "keras_hub:llama"
    assert summary["final_val_loss"] < 0.75 * summary["initial_val_loss"]
    if "tp" in details:
        assert summary["layouts"] == "LlamaBackbone.get_layout_map"
    if "pp" in details:
        assert summary["strategy_details"]["stages"] == 2
