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

import dataclasses

import keras


@dataclasses.dataclass(frozen=True)
class GPTConfig:
    """The shape of a GPT model.

    Attributes:
      layers, hidden, heads: transformer depth, width, attention heads.
      vocab: vocabulary size (256 for byte-level text).
      seq_len: the longest context (number of position embeddings).
      mlp_ratio: MLP width over hidden width.
      dropout: dropout rate inside blocks.
    """

    layers: int = 2
    hidden: int = 64
    heads: int = 4
    vocab: int = 256
    seq_len: int = 64
    mlp_ratio: int = 4
    dropout: float = 0.0

    def __post_init__(self):
        for name in ("layers", "hidden", "heads", "vocab", "seq_len", "mlp_ratio"):
            if getattr(self, name) < 1:
                raise ValueError(f"GPTConfig {name}={getattr(self, name)}: must be >= 1.")
        if self.hidden % self.heads:
            raise ValueError(
                f"GPTConfig hidden={self.hidden} is not divisible by heads={self.heads}; "
                "the head size is hidden / heads."
            )

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    @property
    def num_parameters(self) -> int:
        """Exact parameter count of the model `gpt()` builds."""
        h, f = self.hidden, self.hidden * self.mlp_ratio
        attention = 4 * (h * h + h)  # query, key, value, output (+ biases)
        mlp = h * f + f + f * h + h
        block = attention + mlp + 2 * 2 * h  # two LayerNorms
        return (self.vocab * h + self.seq_len * h + self.layers * block + 2 * h
                + h * self.vocab + self.vocab)


# Published shapes: GPT-2 (Radford et al., 2019), GPT-3 (Brown et al., 2020).
# The 50257-token BPE vocabulary is padded to 50304 = 393 x 128, as Megatron
# does (--make-vocab-size-divisible-by): a vocabulary-split embedding needs a
# size that divides by the model axis, and multiples of 128 suit the hardware.
SIZES = {
    "tiny": GPTConfig(layers=2, hidden=64, heads=4, seq_len=64),
    "mini": GPTConfig(layers=4, hidden=128, heads=4, seq_len=128),
    "gpt2-small": GPTConfig(layers=12, hidden=768, heads=12, vocab=50304, seq_len=1024),
    "gpt2-medium": GPTConfig(layers=24, hidden=1024, heads=16, vocab=50304, seq_len=1024),
    "gpt2-large": GPTConfig(layers=36, hidden=1280, heads=20, vocab=50304, seq_len=1024),
    "gpt2-xl": GPTConfig(layers=48, hidden=1600, heads=25, vocab=50304, seq_len=1024),
    "gpt3-1.3b": GPTConfig(layers=24, hidden=2048, heads=16, vocab=50304, seq_len=2048),
    "gpt3-6.7b": GPTConfig(layers=32, hidden=4096, heads=32, vocab=50304, seq_len=2048),
    "gpt3-13b": GPTConfig(layers=40, hidden=5120, heads=40, vocab=50304, seq_len=2048),
    "gpt3-175b": GPTConfig(layers=96, hidden=12288, heads=96, vocab=50304, seq_len=2048),
}


def config(size: str | GPTConfig) -> GPTConfig:
    if isinstance(size, GPTConfig):
        return size
    if size not in SIZES:
        raise ValueError(f"GPT size {size!r}: use one of {list(SIZES)} or a GPTConfig.")
    return SIZES[size]


@keras.saving.register_keras_serializable(package="tfpar")
class TransformerBlock(keras.layers.Layer):
    """Pre-LN block: x + attn(ln_1(x)), then x + mlp(ln_2(x)), causal attention."""

    def __init__(self, hidden, heads, mlp_ratio=4, dropout=0.0, **kwargs):
        super().__init__(**kwargs)
        self.hidden, self.heads, self.mlp_ratio, self.dropout = hidden, heads, mlp_ratio, dropout
        self.ln_1 = keras.layers.LayerNormalization(epsilon=1e-5, name="ln_1")
        self.attention = keras.layers.MultiHeadAttention(
            heads, hidden // heads, dropout=dropout, name="attention")
        self.ln_2 = keras.layers.LayerNormalization(epsilon=1e-5, name="ln_2")
        self.mlp_up = keras.layers.Dense(hidden * mlp_ratio, activation="gelu", name="mlp_up")
        self.mlp_down = keras.layers.Dense(hidden, name="mlp_down")
        self.drop = keras.layers.Dropout(dropout)

    def build(self, input_shape):
        self.ln_1.build(input_shape)
        self.attention.build(input_shape, input_shape)
        self.ln_2.build(input_shape)
        self.mlp_up.build(input_shape)
        self.mlp_down.build((*input_shape[:-1], self.hidden * self.mlp_ratio))

    def call(self, x, training=False):
        h = self.ln_1(x)
        x = x + self.attention(h, h, use_causal_mask=True, training=training)
        h = self.mlp_down(self.mlp_up(self.ln_2(x)))
        return x + self.drop(h, training=training)

    def get_config(self):
        return {**super().get_config(), "hidden": self.hidden, "heads": self.heads,
                "mlp_ratio": self.mlp_ratio, "dropout": self.dropout}


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


def gpt(size: str | GPTConfig = "tiny", name: str = "gpt") -> keras.Model:
    """Builds the reference GPT (a functional model of named blocks)."""
    cfg = config(size)
    tokens = keras.Input((None,), dtype="int32", name="tokens")
    x = keras.layers.Embedding(
        cfg.vocab, cfg.hidden, name="token_embedding",
        embeddings_initializer=keras.initializers.RandomNormal(stddev=0.02))(tokens)
    x = x + PositionEmbedding(cfg.seq_len, cfg.hidden, name="position_embedding")(tokens)
    for i in range(cfg.layers):
        x = TransformerBlock(cfg.hidden, cfg.heads, cfg.mlp_ratio, cfg.dropout,
                             name=f"block_{i}")(x)
    x = keras.layers.LayerNormalization(epsilon=1e-5, name="ln_f")(x)
    logits = keras.layers.Dense(cfg.vocab, name="lm_head", dtype="float32")(x)
    return keras.Model(tokens, logits, name=name)


def lm_loss():
    """Next-token cross-entropy on logits (targets are the inputs shifted by one)."""
    return keras.losses.SparseCategoricalCrossentropy(from_logits=True)
