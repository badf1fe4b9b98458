"""absl flags that name a GPT shape: a size preset, and per-dimension overrides.

`tfpar train` and `tfpar plan` both read them::

    --model=gpt3-175b                       # a preset (tfpar.models.SIZES)
    --model=mini --layers=8 --seq_len=256   # a preset, changed
    --layers=24 --hidden=2048 --heads=16 --vocab=50304 --seq_len=2048

No TensorFlow is imported here.
"""

from __future__ import annotations

import dataclasses

from absl import flags

from tfpar.models.shapes import SIZES, GPTConfig

FLAGS = flags.FLAGS


def _define(define, name, *args, **kwargs):
    if name not in FLAGS:
        define(name, *args, **kwargs)


_define(flags.DEFINE_string, "model", None,
        f"GPT size preset: {', '.join(SIZES)} (train default: tiny). The shape flags "
        "below override its dimensions.")
_define(flags.DEFINE_integer, "layers", None, "GPT: transformer blocks.")
_define(flags.DEFINE_integer, "hidden", None, "GPT: hidden width (d_model).")
_define(flags.DEFINE_integer, "heads", None, "GPT: attention heads (must divide --hidden).")
_define(flags.DEFINE_integer, "vocab", None,
        "GPT: vocabulary size (plan only; tfpar train takes it from the tokenizer).")
_define(flags.DEFINE_integer, "seq_len", None, "GPT: context length in tokens.")

SHAPE_FLAGS = ("layers", "hidden", "heads", "vocab", "seq_len")


def _known_model(value) -> bool:
    if value is not None and value not in SIZES:
        raise flags.ValidationError(f"--model={value}: use one of {', '.join(SIZES)}, or "
                                    "give --layers/--hidden/--heads/--vocab/--seq_len.")
    return True


def _positive_shape(values) -> bool:
    for name in SHAPE_FLAGS:
        if values[name] is not None and values[name] < 1:
            raise flags.ValidationError(f"--{name}={values[name]}: must be >= 1.")
    return True


flags.register_validator("model", _known_model)
flags.register_multi_flags_validator(list(SHAPE_FLAGS), _positive_shape)


def config_from_flags(default: str | None = None, **fixed) -> GPTConfig:
    """The GPT shape the flags give: --model (else `default`) with the shape
    flags applied, then `fixed` (values the caller decides, e.g. the vocab).

    Raises ValueError naming what is missing when there is no preset and not
    every dimension is given, or when the shape is inconsistent.
    """
    name = FLAGS.model or default
    given = {n: FLAGS[n].value for n in SHAPE_FLAGS if FLAGS[n].value is not None}
    given.update(fixed)
    if name is None:
        missing = [f"--{n}" for n in SHAPE_FLAGS if n not in given]
        if missing:
            raise ValueError(f"no --model preset, so {', '.join(missing)} must be given "
                             f"(or use --model={next(iter(SIZES))} ... {list(SIZES)[-1]}).")
        return GPTConfig(**given)
    return dataclasses.replace(SIZES[name], **given)
