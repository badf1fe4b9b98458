"""keras-hub language models for `tfpar train --model=keras_hub:<family>`.

One family name maps to one keras-hub backbone (GPT-2, Llama, Gemma, Qwen),
built from a tfpar shape with random initialisation (no preset is
downloaded), and wrapped as the causal LM that `tfpar train` trains: int32
token ids [batch, seq] in, logits [batch, seq, vocab] out, the loss
`tfpar.models.lm_loss()` as for the reference GPT.

A keras-hub backbone takes a dict `{"token_ids", "padding_mask"}`; the
wrapper feeds it an all-ones padding mask (every window is real text) and
projects the hidden states back onto the vocabulary with the backbone's own
token embedding reversed, as keras-hub's `CausalLM` classes do (tied for
GPT-2, Gemma and Qwen, Llama's separate `reverse_embeddings`)::

    tokens -> ones_like ------------┐
    tokens -> backbone({token_ids, padding_mask}) -> token_embedding(reverse=True) -> logits

The shape is the shape flags' (`--layers --hidden --heads --seq_len`);
each family gets a small default (2 layers x 64 hidden x 4 heads, context 64)
so a run on CPUs takes seconds. Attention is multi-head (as many key/value
heads as query heads). The MLP width is derived: GPT-2's 4 x hidden; the
gated MLPs of Llama, Gemma and Qwen 8/3 x hidden rounded up to a multiple of
64 (Llama's rule: the same parameters as an ungated 4 x hidden MLP).

Example::

    config = tfpar.models.hub.config("keras_hub:llama", vocab=256, layers=4)
    model = tfpar.models.hub.causal_lm(config)       # keras.Model: tokens -> logits
    model.compile(optimizer="adamw", loss=tfpar.models.lm_loss())
    model(np.zeros((2, 16), "int32")).shape           # (2, 16, 256)

The names and the shape are pure Python (`tfpar train`'s flags check them
without TensorFlow); `causal_lm` and `layout_map` import keras-hub.
"""

from __future__ import annotations

import dataclasses
import importlib.util

PREFIX = "keras_hub:"
# The backbone class of each family, in keras_hub.models.
BACKBONES = {"gpt2": "GPT2Backbone", "llama": "LlamaBackbone", "gemma": "GemmaBackbone",
             "qwen": "QwenBackbone"}
FAMILIES = tuple(BACKBONES)
INSTALL = "pip install -e '.[cpu,hub]' && pip install --no-deps 'keras-hub==0.32.*'"


class HubModelError(ValueError):
    """A `keras_hub:<family>` model that cannot be built; the message says why and the fix."""


def is_hub(model: str | None) -> bool:
    """Whether a --model value names a keras-hub family (`keras_hub:llama`)."""
    return isinstance(model, str) and model.startswith(PREFIX)


def family_of(model: str, check_installed: bool = True) -> str:
    """The family of `keras_hub:<family>`; raises HubModelError naming the value
    and the fix when the family is unknown or keras-hub is not installed (found
    with `importlib.util.find_spec`, without importing it)."""
    family = model[len(PREFIX):] if is_hub(model) else model
    if family not in BACKBONES:
        raise HubModelError(
            f"--model={model}: unknown keras-hub family {family!r}; use one of "
            f"{', '.join(PREFIX + f for f in FAMILIES)}.")
    if check_installed and importlib.util.find_spec("keras_hub") is None:
        raise HubModelError(f"--model={model}: keras-hub is not installed; install it with "
                            f"{INSTALL} (BUILD_NOTES.md, keras-hub).")
    return family


def mlp_width(family: str, hidden: int) -> int:
    """The MLP's inner width: 4 x hidden (GPT-2), else 8/3 x hidden rounded up to 64."""
    if family == "gpt2":
        return 4 * hidden
    return -(-(8 * hidden) // (3 * 64)) * 64


@dataclasses.dataclass(frozen=True)
class HubConfig:
    """The shape of a keras-hub causal LM (`causal_lm` builds it).

    Attributes:
      family: "gpt2", "llama", "gemma" or "qwen".
      layers, hidden, heads: decoder blocks, width, attention heads (query and
        key/value alike).
      vocab: vocabulary size (the tokenizer's, padded to a multiple of 128 by
        `TrainConfig`).
      seq_len: the context the job trains on (GPT-2's position embeddings; the
        RoPE families have no limit, the job still trains and samples at it).
      intermediate: the MLP's inner width (default `mlp_width(family, hidden)`).
      dropout: keras-hub's dropout rate in the blocks.
    """

    family: str
    layers: int = 2
    hidden: int = 64
    heads: int = 4
    vocab: int = 256
    seq_len: int = 64
    intermediate: int = 0
    dropout: float = 0.0

    def __post_init__(self):
        family_of(self.family, check_installed=False)
        for name in ("layers", "hidden", "heads", "vocab", "seq_len"):
            if getattr(self, name) < 1:
                raise HubModelError(f"--{name}={getattr(self, name)}: must be >= 1.")
        if self.hidden % self.heads:
            raise HubModelError(
                f"--hidden={self.hidden} is not divisible by --heads={self.heads}; the head "
                "size is hidden / heads.")
        if not self.intermediate:
            object.__setattr__(self, "intermediate", mlp_width(self.family, self.hidden))

    @property
    def model(self) -> str:
        return PREFIX + self.family

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    def describe(self) -> str:
        return (f"keras-hub {BACKBONES[self.family]} {self.layers} layers x {self.hidden} "
                f"hidden x {self.heads} heads, MLP {self.intermediate}")


def config(model: str, **shape) -> HubConfig:
    """The HubConfig of `keras_hub:<family>` (or a bare family name), with `shape`
    (layers, hidden, heads, vocab, seq_len, dropout) over the family's default."""
    return HubConfig(family=family_of(model, check_installed=False), **shape)


# ------------------------------------------------------------ building (keras-hub)
def _keras_hub():
    try:
        import keras_hub
    except ImportError as e:
        raise HubModelError(f"keras-hub cannot be imported ({e}); install it with "
                            f"{INSTALL} (BUILD_NOTES.md, keras-hub).") from None
    return keras_hub


def backbone(config: HubConfig):
    """The keras-hub backbone of `config`, randomly initialised."""
    models = _keras_hub().models
    c = config
    common = dict(vocabulary_size=c.vocab, num_layers=c.layers, hidden_dim=c.hidden,
                  dropout=c.dropout, name="backbone")
    if c.family == "gpt2":
        return models.GPT2Backbone(num_heads=c.heads, intermediate_dim=c.intermediate,
                                   max_sequence_length=c.seq_len, **common)
    heads = dict(num_query_heads=c.heads, num_key_value_heads=c.heads)
    if c.family == "gemma":
        # Gemma's intermediate_dim counts both gated halves (each is intermediate_dim / 2).
        return models.GemmaBackbone(intermediate_dim=2 * c.intermediate, head_dim=c.head_dim,
                                    **heads, **common)
    cls = models.LlamaBackbone if c.family == "llama" else models.QwenBackbone
    return cls(intermediate_dim=c.intermediate, **heads, **common)


def causal_lm(config: HubConfig, name: str | None = None):
    """A functional keras.Model: int32 tokens [batch, seq] -> float32 logits [batch, seq, vocab]."""
    import keras

    net = backbone(config)
    tokens = keras.Input((None,), dtype="int32", name="tokens")
    hidden = net({"token_ids": tokens, "padding_mask": keras.ops.ones_like(tokens)})
    logits = net.token_embedding(hidden, reverse=True)
    # float32 logits under mixed precision, as the reference GPT's lm_head.
    logits = keras.layers.Activation("linear", dtype="float32", name="logits")(logits)
    return keras.Model(tokens, logits, name=name or f"{config.family}_lm")


def layout_map(config: HubConfig, mesh):
    """keras-hub's own `Backbone.get_layout_map(mesh)` for the family, or None
    where keras-hub has none (GPT-2: tfpar's megatron preset knows its names)."""
    cls = getattr(_keras_hub().models, BACKBONES[config.family])
    if "get_layout_map" not in vars(cls):
        return None
    return cls.get_layout_map(mesh, model_parallel_dim_name="model",
                              data_parallel_dim_name="batch")


# ------------------------------------------------------------ accounting
def lookup_only_parameters(model) -> int:
    """Parameters only ever looked up, never multiplied: GPT-2's position
    embeddings, and an untied token embedding (Llama: the LM head is
    `token_embedding/reverse_embeddings`)."""
    paths = {w.path: w for w in model.weights}
    lookup = [w for p, w in paths.items() if "position_embedding" in p]
    untied = [p for p in paths if p.endswith("token_embedding/reverse_embeddings")]
    for p in untied:
        lookup.append(paths[p[:-len("reverse_embeddings")] + "embeddings"])
    return sum(int(_size(w.shape)) for w in lookup)


def _size(shape) -> int:
    total = 1
    for d in shape:
        total *= int(d)
    return total


def training_flops_per_token(config: HubConfig, model) -> float:
    """Model FLOPs of one training token (forward + backward), as in MFU.

    The same accounting as `GPTConfig.training_flops_per_token`, from the
    built model's parameter count N: 6 per parameter that a matmul uses
    (lookup-only tables left out), plus attention's score and value products
    over the full context, 12 x layers x hidden x seq_len:

        6 * (N - lookup-only parameters) + 12 * L * h * s

    Norm scales and biases are counted as matmul parameters (a fraction of a
    percent of N).
    """
    n = model.count_params() - lookup_only_parameters(model)
    return 6.0 * n + 12.0 * config.layers * config.hidden * config.seq_len
