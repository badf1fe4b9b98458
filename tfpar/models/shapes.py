"""The shapes of tfpar's reference GPT, and what follows from a shape alone;
and the shapes of the keras-hub families `tfpar train` also trains.

Pure Python (no TensorFlow): `tfpar plan` reasons about GPT-3-sized models
from these numbers without building anything, and the flags of `tfpar train`
check a `--model=keras_hub:<family>` without importing keras-hub.
`tfpar.models.gpt(config)` builds the Keras model of a `GPTConfig`,
`tfpar.models.hub.causal_lm(config)` that of a `HubConfig`.
"""

from __future__ import annotations

import dataclasses
import importlib.util


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

    def layer_parameters(self) -> list[tuple[str, int]]:
        """(layer name, parameter count) of the model's top-level layers, in the
        order the pipeline splitter sees them (`tfpar.strategies.pipeline.split.operations`).
        The add of the two embeddings is a layer without parameters."""
        h, f = self.hidden, self.hidden * self.mlp_ratio
        block = 4 * (h * h + h) + h * f + f + f * h + h + 4 * h
        return ([("token_embedding", self.vocab * h), ("position_embedding", self.seq_len * h),
                 ("add", 0)]
                + [(f"block_{i}", block) for i in range(self.layers)]
                + [("ln_f", 2 * h), ("lm_head", h * self.vocab + self.vocab)])

    def pipeline_cuts(self) -> list[int]:
        """Positions i in `layer_parameters()` after which a stage may end: one
        computed tensor crosses there, with model inputs (after the token
        embedding, whose output and the tokens cross; after the embeddings'
        add, each block, ln_f)."""
        return [0] + list(range(2, self.layers + 4))

    def training_flops_per_token(self) -> float:
        """Model FLOPs of one training token (forward + backward), as in MFU.

        6 per parameter of every matmul (2 forward, 4 backward; embedding
        lookups are not matmuls), plus attention's score and value products
        over the full context: 2 x 2 x seq_len x hidden forward per layer, x3
        with the backward (the PaLM accounting; the causal half is counted,
        as Keras computes it).
        """
        h, f = self.hidden, self.hidden * self.mlp_ratio
        matmul = self.layers * (4 * h * h + 2 * h * f) + h * self.vocab
        return 6.0 * matmul + 12.0 * self.layers * self.seq_len * h


# Published shapes: GPT-2 (Radford et al., 2019), GPT-3 (Brown et al., 2020).
# The 50257-token BPE vocabulary is padded to 50304 = 393 x 128, as Megatron
# does (--make-vocab-size-divisible-by): a vocabulary-split embedding needs a
# size that divides by the model axis, and multiples of 128 suit the hardware.
SIZES = {
    "tiny": GPTConfig(layers=2, hidden=64, heads=4, seq_len=64),
    "mini": GPTConfig(layers=4, hidden=128, heads=4, seq_len=128),
    # The default of `tfpar train`: on 2 CPU cores it learns visibly in 3 minutes
    # at about 45% MFU (the sweep: BUILD_NOTES.md, "The default run").
    "demo": GPTConfig(layers=4, hidden=256, heads=4, seq_len=128),
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


# ------------------------------------------------------------ keras-hub families
HUB_PREFIX = "keras_hub:"
# Each family's backbone class in keras_hub.models (tfpar.models.hub builds them).
HUB_BACKBONES = {"gpt2": "GPT2Backbone", "llama": "LlamaBackbone", "gemma": "GemmaBackbone",
                 "qwen": "QwenBackbone"}
HUB_INSTALL = "pip install -e '.[cpu,hub]' && pip install --no-deps 'keras-hub==0.32.*'"


class HubModelError(ValueError):
    """A `keras_hub:<family>` model that cannot be built; the message says why and the fix."""


def is_hub(model) -> bool:
    """Whether a --model value names a keras-hub family (`keras_hub:llama`)."""
    return isinstance(model, str) and model.startswith(HUB_PREFIX)


def hub_family(model: str, check_installed: bool = True) -> str:
    """The family of `keras_hub:<family>` (or of a bare family name).

    Raises HubModelError naming the value and the fix when the family is
    unknown or, with `check_installed`, keras-hub is not installed (found with
    `importlib.util.find_spec`, not imported).
    """
    family = model[len(HUB_PREFIX):] if is_hub(model) else model
    if family not in HUB_BACKBONES:
        raise HubModelError(
            f"--model={model}: unknown keras-hub family {family!r}; use one of "
            f"{', '.join(HUB_PREFIX + f for f in HUB_BACKBONES)}.")
    if check_installed and importlib.util.find_spec("keras_hub") is None:
        raise HubModelError(f"--model={model}: keras-hub is not installed; install it with "
                            f"{HUB_INSTALL} (BUILD_NOTES.md, keras-hub).")
    return family


def hub_mlp_width(family: str, hidden: int) -> int:
    """The MLP's inner width: GPT-2's 4 x hidden; the gated MLPs of Llama, Gemma
    and Qwen 8/3 x hidden rounded up to a multiple of 64 (Llama's rule: the
    parameters of an ungated 4 x hidden MLP)."""
    if family == "gpt2":
        return 4 * hidden
    return -(-(8 * hidden) // (3 * 64)) * 64


@dataclasses.dataclass(frozen=True)
class HubConfig:
    """The shape of a keras-hub causal LM (`tfpar.models.hub.causal_lm` builds it).

    Attributes:
      family: "gpt2", "llama", "gemma" or "qwen".
      layers, hidden, heads: decoder blocks, width, attention heads (as many
        key/value heads as query heads).
      vocab: vocabulary size (the tokenizer's, padded to a multiple of 128 by
        `TrainConfig`).
      seq_len: the context the job trains on (GPT-2's position embeddings; the
        RoPE families have no limit, the job still trains and samples at it).
      intermediate: the MLP's inner width (default `hub_mlp_width`).
      dropout: keras-hub's dropout rate in the blocks.

    The defaults are a small model (2 x 64, 4 heads, context 64) that trains in
    seconds on CPUs, for every family.
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
        hub_family(self.family, check_installed=False)
        for name in ("layers", "hidden", "heads", "vocab", "seq_len"):
            if getattr(self, name) < 1:
                raise HubModelError(f"--{name}={getattr(self, name)}: must be >= 1.")
        if self.hidden % self.heads:
            raise HubModelError(
                f"--hidden={self.hidden} is not divisible by --heads={self.heads}; the head "
                "size is hidden / heads.")
        if not self.intermediate:
            object.__setattr__(self, "intermediate", hub_mlp_width(self.family, self.hidden))

    @property
    def model(self) -> str:
        """The --model value: keras_hub:<family>."""
        return HUB_PREFIX + self.family

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    def describe(self) -> str:
        return (f"keras-hub {HUB_BACKBONES[self.family]} {self.layers} layers x {self.hidden} "
                f"hidden x {self.heads} heads, MLP {self.intermediate}")


def hub_config(model: str, **shape) -> HubConfig:
    """The HubConfig of `keras_hub:<family>` (or a bare family name), `shape`
    (layers, hidden, heads, vocab, seq_len, dropout) over the defaults."""
    return HubConfig(family=hub_family(model, check_installed=False), **shape)
