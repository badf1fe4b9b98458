"""tfpar's reference GPT: a decoder-only Transformer in plain Keras 3.

Pre-LayerNorm blocks (attention, then an MLP with GELU), learned position
embeddings, an untied LM head. Layer names follow the conventions the
tensor-parallel "megatron" preset and the pipeline splitter rely on:

    token_embedding, position_embedding,
    block_{i}/{ln_1, attention, ln_2, mlp_up, mlp_down},
    ln_f, lm_head

Sizes range from "tiny" (tests, CPUs) to GPT-3's 175B (for planning; building
one needs the memory for it).

Example::

    model = tfpar.models.gpt("tiny")          # or gpt(GPTConfig(layers=4, ...))
    model.compile(optimizer="adamw", loss=tfpar.models.lm_loss())
"""

from __future__ import annotations

import keras

from tfpar import recompute as tfpar_recompute
from tfpar.models.shapes import SIZES, GPTConfig, config  # noqa: F401  (re-exported)


@keras.saving.register_keras_serializable(package="tfpar")
class TransformerBlock(keras.layers.Layer):
    """Pre-LN block: x + attn(ln_1(x)), then x + mlp(ln_2(x)), causal attention.

    `recompute`: "none", "selective" (the attention is computed again in the
    backward instead of keeping its scores) or "full" (the whole block is):
    see `tfpar.recompute`.
    """

    def __init__(self, hidden, heads, mlp_ratio=4, dropout=0.0, recompute="none", **kwargs):
        super().__init__(**kwargs)
        self.hidden, self.heads, self.mlp_ratio, self.dropout = hidden, heads, mlp_ratio, dropout
        self.recompute = tfpar_recompute.check(recompute, dropout)
        # The block's own policy, not the global one: a model saved in mixed
        # precision loads with its bfloat16 blocks whole under any global policy.
        policy = self.dtype_policy
        self.ln_1 = keras.layers.LayerNormalization(epsilon=1e-5, name="ln_1", dtype=policy)
        self.attention = keras.layers.MultiHeadAttention(
            heads, hidden // heads, dropout=dropout, name="attention", dtype=policy)
        self.ln_2 = keras.layers.LayerNormalization(epsilon=1e-5, name="ln_2", dtype=policy)
        self.mlp_up = keras.layers.Dense(hidden * mlp_ratio, activation="gelu", name="mlp_up",
                                         dtype=policy)
        self.mlp_down = keras.layers.Dense(hidden, name="mlp_down", dtype=policy)
        self.drop = keras.layers.Dropout(dropout, dtype=policy)

    def build(self, input_shape):
        self.ln_1.build(input_shape)
        self.attention.build(input_shape, input_shape)
        self.ln_2.build(input_shape)
        self.mlp_up.build(input_shape)
        self.mlp_down.build((*input_shape[:-1], self.hidden * self.mlp_ratio))

    def call(self, x, training=False):
        if self.recompute == "full":
            return tfpar_recompute.wrap(lambda h: self._forward(h, training))(x)
        return self._forward(x, training)

    def _forward(self, x, training):
        h = self.ln_1(x)

        def attend(h):
            return self.attention(h, h, use_causal_mask=True, training=training)

        if self.recompute == "selective":
            attend = tfpar_recompute.wrap(attend)
        x = x + attend(h)
        h = self.mlp_down(self.mlp_up(self.ln_2(x)))
        return x + self.drop(h, training=training)

    def get_config(self):
        return {**super().get_config(), "hidden": self.hidden, "heads": self.heads,
                "mlp_ratio": self.mlp_ratio, "dropout": self.dropout,
                "recompute": self.recompute}


@keras.saving.register_keras_serializable(package="tfpar")
class PositionEmbedding(keras.layers.Layer):
    """Looks up a learned embedding for each position of a token batch.

    Called on the token ids (B, T); returns (B, T, hidden). It is a per-token
    lookup rather than "x + table[None, :T]": on DTensor meshes (TF 2.21) the
    gradient of that broadcast add crashes the runtime, while a lookup has
    the same value and a well-supported gradient.
    """

    def __init__(self, seq_len, hidden, **kwargs):
        super().__init__(**kwargs)
        self.seq_len, self.hidden = seq_len, hidden

    def build(self, input_shape):
        self.embeddings = self.add_weight(
            shape=(self.seq_len, self.hidden), name="embeddings",
            initializer=keras.initializers.RandomNormal(stddev=0.02))

    def call(self, tokens):
        positions = keras.ops.cumsum(keras.ops.ones_like(tokens), axis=1) - 1
        return keras.ops.take(self.embeddings, positions, axis=0)

    def get_config(self):
        return {**super().get_config(), "seq_len": self.seq_len, "hidden": self.hidden}


def gpt(size: str | GPTConfig = "tiny", name: str = "gpt", recompute: str = "none") -> keras.Model:
    """Builds the reference GPT (a functional model of named blocks).

    `recompute`: activation recomputation of every block, "none",
    "selective" or "full" (`tfpar.recompute`).
    """
    cfg = config(size)
    tokens = keras.Input((None,), dtype="int32", name="tokens")
    x = keras.layers.Embedding(
        cfg.vocab, cfg.hidden, name="token_embedding",
        embeddings_initializer=keras.initializers.RandomNormal(stddev=0.02))(tokens)
    x = x + PositionEmbedding(cfg.seq_len, cfg.hidden, name="position_embedding")(tokens)
    for i in range(cfg.layers):
        x = TransformerBlock(cfg.hidden, cfg.heads, cfg.mlp_ratio, cfg.dropout,
                             recompute=recompute, name=f"block_{i}")(x)
    x = keras.layers.LayerNormalization(epsilon=1e-5, name="ln_f")(x)
    logits = keras.layers.Dense(cfg.vocab, name="lm_head", dtype="float32")(x)
    return keras.Model(tokens, logits, name=name)


def lm_loss():
    """Next-token cross-entropy on logits (targets are the inputs shifted by one)."""
    return keras.losses.SparseCategoricalCrossentropy(from_logits=True)
