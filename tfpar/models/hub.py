"""keras-hub language models for `tfpar train --model=keras_hub:<family>`.

Each family (`FAMILIES`: GPT-2, Llama, Gemma, Qwen) maps to one keras-hub
backbone, built from a tfpar shape (`HubConfig`: the shape flags `--layers
--hidden --heads --seq_len`, the tokenizer's vocabulary, the MLP width
derived) with random initialisation: no preset is downloaded. `causal_lm`
wraps it as the model `tfpar train` trains, with the same interface as the
reference GPT: int32 token ids [batch, seq] in, float32 logits [batch, seq,
vocab] out, loss `tfpar.models.lm_loss()`.

A keras-hub backbone takes a dict `{"token_ids", "padding_mask"}`; the
wrapper feeds it an all-ones padding mask (every training window is real
text) and projects the hidden states onto the vocabulary with the backbone's
own token embedding reversed, as keras-hub's `CausalLM` classes do (tied for
GPT-2, Gemma and Qwen; Llama's separate `reverse_embeddings`)::

    tokens -> ones_like ---------------┐
    tokens -> backbone({token_ids, padding_mask}) -> token_embedding(reverse=True) -> logits

The pipeline splitter inlines the backbone and cuts between its decoder
blocks; the padding mask, made from the tokens alone, crosses each cut with
the hidden state (`tfpar.strategies.pipeline.split`).

Example::

    config = tfpar.models.hub.config("keras_hub:llama", vocab=256, layers=4)
    model = tfpar.models.hub.causal_lm(config)
    model.compile(optimizer="adamw", loss=tfpar.models.lm_loss())
    model(np.zeros((2, 16), "int32")).shape           # (2, 16, 256)

    model.save("lm.keras")                            # HubCausalLM: import tfpar.models.hub
    keras.saving.load_model("lm.keras")               # before loading it

The family names and shapes are pure Python (`tfpar.models.shapes`, re-exported
here), so `tfpar train`'s flags check them without TensorFlow or keras-hub.
"""

from __future__ import annotations

import keras

from tfpar.models.shapes import (HUB_BACKBONES as BACKBONES, HUB_INSTALL as INSTALL,  # noqa: F401
                                 HUB_PREFIX as PREFIX, HubConfig, HubModelError,
                                 hub_config as config, hub_family as family_of, is_hub)

FAMILIES = tuple(BACKBONES)


def _keras_hub():
    try:
        import keras_hub
    except ImportError as e:
        raise HubModelError(f"keras-hub cannot be imported ({e}); install it with {INSTALL} "
                            "(BUILD_NOTES.md, keras-hub).") from None
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


@keras.saving.register_keras_serializable(package="tfpar")
class HubCausalLM(keras.Model):
    """A keras-hub backbone as a causal LM on token ids (a functional model).

    Its config is the backbone's, as keras-hub's own `CausalLM` does: the LM
    head is the backbone's token embedding called again, a layer two nested
    functional models share, which Keras's functional config would load as
    two separate layers.
    """

    def __init__(self, backbone, **kwargs):
        tokens = keras.Input((None,), dtype="int32", name="tokens")
        hidden = backbone({"token_ids": tokens, "padding_mask": keras.ops.ones_like(tokens)})
        logits = backbone.token_embedding(hidden, reverse=True)
        # float32 logits under mixed precision, as the reference GPT's lm_head.
        logits = keras.layers.Activation("linear", dtype="float32", name="logits")(logits)
        super().__init__(tokens, logits, **kwargs)
        self.backbone = backbone

    def get_config(self):
        return {"backbone": keras.saving.serialize_keras_object(self.backbone),
                "name": self.name, "trainable": self.trainable}

    @classmethod
    def from_config(cls, config, custom_objects=None):
        _keras_hub()  # registers the backbone classes
        config = dict(config)
        net = keras.saving.deserialize_keras_object(config.pop("backbone"),
                                                    custom_objects=custom_objects)
        return cls(net, **config)


def causal_lm(config: HubConfig, name: str | None = None) -> HubCausalLM:
    """The family's backbone, randomly initialised, as tokens [b, s] -> logits [b, s, vocab]."""
    return HubCausalLM(backbone(config), name=name or f"{config.family}_lm")


def layout_map(config: HubConfig, mesh: keras.distribution.DeviceMesh):
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
    embeddings, and an untied input embedding (Llama's LM head is
    `token_embedding/reverse_embeddings`)."""
    paths = {w.path: w for w in model.weights}
    lookup = [w for p, w in paths.items() if "position_embedding" in p]
    for p in paths:
        if p.endswith("token_embedding/reverse_embeddings"):
            lookup.append(paths[p[:-len("reverse_embeddings")] + "embeddings"])
    return sum(_size(w.shape) for w in lookup)


def _size(shape) -> int:
    total = 1
    for d in shape:
        total *= int(d)
    return total


def training_flops_per_token(config: HubConfig, model) -> float:
    """Model FLOPs of one training token (forward + backward), as in MFU.

    The accounting of `GPTConfig.training_flops_per_token`, from the built
    model's parameter count N: 6 per parameter a matmul uses (2 forward, 4
    backward; lookup-only tables left out), plus attention's score and value
    products over the full context, 2 x 2 x seq_len x hidden forward per
    layer, x3 with the backward:

        6 * (N - lookup-only parameters) + 12 * layers * hidden * seq_len

    Norm scales and biases count as matmul parameters (well under 1% of N).
    """
    n = model.count_params() - lookup_only_parameters(model)
    return 6.0 * n + 12.0 * config.layers * config.hidden * config.seq_len
