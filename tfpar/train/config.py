"""What a `tfpar train` run is told: `TrainConfig`, checked when it is made.

Pure Python (no TensorFlow), so the absl flags are checked against the same
rules when they are parsed, before anything starts.
"""

from __future__ import annotations

import dataclasses
import os

from tfpar import recompute
from tfpar.data import bpe
from tfpar.models import shapes
from tfpar.models.shapes import SIZES, GPTConfig, config as gpt_shape
from tfpar.train.sample import SamplingError, check_sampling

# Vocabularies are padded to a multiple of this (Megatron's practice): a
# vocabulary-split embedding needs a size the model axis divides.
VOCAB_MULTIPLE = 128


class TrainConfigError(ValueError):
    """A training setting that cannot work; the message says which and how to fix it."""


@dataclasses.dataclass
class TrainConfig:
    """Everything `tfpar train` needs besides the strategy (see `tfpar train --help`)."""

    model: str = "demo"  # a GPT preset (tfpar.models.SIZES) or "keras_hub:<family>"
    layers: int | None = None
    hidden: int | None = None
    heads: int | None = None
    seq_len: int | None = None
    dropout: float = 0.0
    recompute: str = "none"  # tfpar.recompute.MODES
    dataset: str = "python_stdlib"  # tfpar.data.corpus.DEFAULT_DATASET
    data_dir: str | None = None
    text_key: str = "text"
    text_files: str | None = None
    train_split: str = "train"
    eval_split: str = "validation"
    download: bool = False
    tokenizer: str = "bpe:4096"
    global_batch_size: int = 32
    train_steps: int = 130
    eval_every: int = 65
    eval_batches: int = 8
    learning_rate: float = 3e-3
    warmup_steps: int = 20
    lr_decay_steps: int | None = None
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.1
    clip_norm: float = 1.0
    grad_accum_steps: int = 1
    seed: int = 0
    deterministic: bool = False
    output_dir: str = "runs/gpt"
    async_checkpoint: bool = True
    sample_tokens: int = 200
    sample_prompt: str = "def"  # BPE tokens carry their leading space: " name("
    temperature: float = 0.8
    top_k: int = 40
    peak_tflops: float | None = None

    def __post_init__(self):
        def need(condition, message):
            if not condition:
                raise TrainConfigError(message)

        for name in ("train_steps", "eval_every", "eval_batches", "global_batch_size",
                     "grad_accum_steps"):
            need(getattr(self, name) >= 1, f"--{name}={getattr(self, name)}: must be >= 1.")
        fitting = self.train_steps - self.train_steps % self.eval_every or self.eval_every
        need(self.train_steps % self.eval_every == 0,
             f"--train_steps={self.train_steps} is not a multiple of --eval_every="
             f"{self.eval_every} (the run evaluates and checkpoints every --eval_every steps); "
             f"use e.g. --train_steps={fitting}.")
        decay = self.lr_decay_steps or self.train_steps
        need(0 <= self.warmup_steps <= decay,
             f"--warmup_steps={self.warmup_steps}: must be between 0 and the decay steps "
             f"({decay}).")
        need(self.learning_rate > 0, f"--learning_rate={self.learning_rate}: must be > 0.")
        need(0 <= self.min_lr_ratio <= 1, f"--min_lr_ratio={self.min_lr_ratio}: must be in [0, 1].")
        need(self.clip_norm >= 0, f"--clip_norm={self.clip_norm}: must be >= 0 (0: no clipping).")
        need(0 <= self.dropout < 1, f"--dropout={self.dropout}: must be in [0, 1).")
        try:
            recompute.check(self.recompute, self.dropout)
        except recompute.RecomputeError as e:
            raise TrainConfigError(f"--{e}") from e
        need(self.sample_tokens >= 0, f"--sample_tokens={self.sample_tokens}: must be >= 0.")
        try:  # the end-of-run sample's settings: refused now, not after training
            check_sampling(self.temperature, self.top_k, top_p=1.0)
        except SamplingError as e:
            raise TrainConfigError(f"--{e}") from None
        self._check_model()
        if self.tokenizer.startswith(bpe.PREFIX):
            try:
                bpe.parse_vocab(self.tokenizer)
            except ValueError as e:
                raise TrainConfigError(str(e)) from None
        need(not self.tokenizer.endswith(".json") or os.path.isfile(self.tokenizer),
             f"--tokenizer={self.tokenizer!r}: no such file; give the path of a saved "
             "tokenizer.json (a tfpar train output dir has one), or bpe:VOCAB to train one.")

    def _check_model(self):
        if not shapes.is_hub(self.model):
            if self.model not in SIZES:
                raise TrainConfigError(
                    f"--model={self.model}: use one of {', '.join(SIZES)}, or "
                    f"{', '.join(shapes.HUB_PREFIX + f for f in shapes.HUB_BACKBONES)}.")
            return
        try:
            self.model_config(VOCAB_MULTIPLE)  # the family and the shape
            if self.recompute != "none":
                raise TrainConfigError(
                    f"--recompute={self.recompute}: tfpar recomputes the reference GPT's own "
                    f"blocks; {self.model} runs keras-hub's layers as they are: use "
                    "--recompute=none with it.")
            shapes.hub_family(self.model)  # keras-hub installed (found, not imported)
        except shapes.HubModelError as e:
            raise TrainConfigError(str(e)) from None

    def _overrides(self) -> dict:
        return {k: getattr(self, k) for k in ("layers", "hidden", "heads", "seq_len")
                if getattr(self, k) is not None}

    @staticmethod
    def padded_vocab(vocab_size: int) -> int:
        return -(-vocab_size // VOCAB_MULTIPLE) * VOCAB_MULTIPLE

    def gpt_config(self, vocab_size: int) -> GPTConfig:
        """The GPT's shape: the size preset, overridden by the shape flags."""
        base = gpt_shape(self.model)
        return dataclasses.replace(base, vocab=self.padded_vocab(vocab_size),
                                   dropout=self.dropout, **self._overrides())

    def model_config(self, vocab_size: int) -> GPTConfig | shapes.HubConfig:
        """The model's shape: `gpt_config`, or for `keras_hub:<family>` the family's
        default shape overridden by the shape flags (`tfpar.models.shapes.HubConfig`)."""
        if not shapes.is_hub(self.model):
            return self.gpt_config(vocab_size)
        return shapes.hub_config(self.model, vocab=self.padded_vocab(vocab_size), dropout=self.dropout,
                          **self._overrides())
