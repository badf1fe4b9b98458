"""How the pipeline splitter cuts nested models, carries model inputs, and places tied layers."""

import keras
import numpy as np

from tfpar.strategies.pipeline import split


class Block(keras.layers.Layer):
    """A block that reads the padding mask, as keras-hub's decoder blocks do."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.dense = keras.layers.Dense(8)

    def call(self, x, padding_mask=None):
        return x + self.dense(x) * keras.ops.expand_dims(keras.ops.cast(padding_mask, x.dtype), -1)


class TiedEmbedding(keras.layers.Embedding):
    """keras-hub's ReversibleEmbedding in short: reverse=True is the LM head."""

    def call(self, x, reverse=False):
        if reverse:
            return keras.ops.matmul(x, keras.ops.transpose(self.embeddings))
        return super().call(x)

    def compute_output_spec(self, x, reverse=False):
        if reverse:
            return keras.KerasTensor((*x.shape[:-1], self.input_dim), "float32")
        return super().compute_output_spec(x)


def causal_lm():
    """A functional backbone nested in a functional task model with a tied head,
    built as keras-hub builds its CausalLMs."""
    ids = keras.Input((4,), dtype="int32", name="token_ids")
    mask = keras.Input((4,), dtype="int32", name="padding_mask")
    embedding = TiedEmbedding(16, 8, name="token_embedding")
    x = embedding(ids)
    for i in range(3):
        x = Block(name=f"block_{i}")(x, padding_mask=mask)
    x = keras.layers.LayerNormalization(name="ln_f")(x)
    backbone = keras.Model({"token_ids": ids, "padding_mask": mask}, x, name="backbone")
    logits = embedding(backbone(backbone.input), reverse=True)
    return keras.Model(backbone.input, logits, name="lm"), embedding


def test_a_nested_backbone_is_inlined_and_cut_between_its_blocks():
    model, _ = causal_lm()
    names = [op.name for op in split.operations(model)]
    assert names == ["token_embedding", "block_0", "block_1", "block_2", "ln_f",
                     "token_embedding"]
    assert [names[i + 1] for i in split.valid_cuts(model)] == [
        "block_0", "block_1", "block_2", "ln_f", "token_embedding"]


def test_the_padding_mask_crosses_every_cut_with_the_hidden_state():
    model, _ = causal_lm()
    first, second = split.plan(model, split_points=["block_2"])
    assert first.layer_names == ["token_embedding", "block_0", "block_1"]
    hidden, mask = second.inputs
    assert hidden.dtype == "float32" and mask.dtype == "int32" and mask.name == "padding_mask"
    assert first.outputs == second.inputs


def test_the_flat_graph_computes_what_the_model_computes():
    model, _ = causal_lm()
    x = {"token_ids": np.arange(8).reshape(2, 4) % 16,
         "padding_mask": np.array([[1, 1, 1, 0], [1, 1, 0, 0]])}
    np.testing.assert_allclose(split.graph_of(model)(x), model(x), atol=1e-6)


def test_a_tied_embedding_belongs_to_the_first_and_the_last_stage():
    model, embedding = causal_lm()
    specs = split.plan(model, split_points=["block_1", "block_2"])
    assert [embedding in s.operations for s in specs] == [True, False, True]
    assert [s.layer_names for s in specs] == [
        ["token_embedding", "block_0"], ["block_1"], ["block_2", "ln_f", "token_embedding"]]
