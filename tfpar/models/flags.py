"""absl flags that name a GPT shape: a size preset, and per-dimension overrides.

`tfpar train` and `tfpar plan` both read them::

    --model=gpt3-175b                       # a preset (tfpar.models.SIZES)
    --model=mini --layers=8 --seq_len=256   # a preset, changed
    --layers=24 --hidden=2048 --heads=16 --vocab=50304 --seq_len=2048
    --model=keras_hub:llama --layers=4      # tfpar train: a keras-hub family (tfpar.models.hub)

`define_model_flags(fv)` defines them on a FlagValues;
`config_from_flags(flag_values=fv)` reads the shape once they are parsed::

    fv = flags.FlagValues()
    define_model_flags(fv)
    fv(["prog", "--model=mini", "--layers=8"])
    config_from_flags(flag_values=fv).layers    # 8

No TensorFlow is imported here.
"""

from __future__ import annotations

import dataclasses

from absl import flags

from tfpar.flags import flag_group
from tfpar.models import shapes
from tfpar.models.shapes import SIZES, GPTConfig

SHAPE_FLAGS = ("layers", "hidden", "heads", "vocab", "seq_len")
_SHAPE_HELP = {
    "layers": "GPT: transformer blocks.",
    "hidden": "GPT: hidden width (d_model).",
    "heads": "GPT: attention heads (must divide --hidden).",
    "vocab": "GPT: vocabulary size (plan only; tfpar train takes it from the tokenizer).",
    "seq_len": "GPT: context length in tokens.",
}


@flag_group
def define_model_flags(fv: flags.FlagValues) -> None:
    """--model and the shape flags (--layers, --hidden, --heads, --vocab, --seq_len)."""
    flags.DEFINE_string("model", None,
                        f"GPT size preset: {', '.join(SIZES)} (train default: demo); or, for "
                        "tfpar train, a keras-hub model with random weights: "
                        f"{', '.join(shapes.HUB_PREFIX + f for f in shapes.HUB_BACKBONES)} (needs keras-hub). "
                        "The shape flags override its dimensions.", flag_values=fv)
    for name in SHAPE_FLAGS:
        flags.DEFINE_integer(name, None, _SHAPE_HELP[name], flag_values=fv)
    flags.register_validator("model", _known_model, flag_values=fv)
    flags.register_multi_flags_validator(list(SHAPE_FLAGS), _positive_shape, flag_values=fv)


def _known_model(value) -> bool:
    if shapes.is_hub(value):
        try:
            shapes.hub_family(value, check_installed=False)  # tfpar train checks the install
        except shapes.HubModelError as e:
            raise flags.ValidationError(str(e)) from e
    elif value is not None and value not in SIZES:
        raise flags.ValidationError(
            f"--model={value}: use one of {', '.join(SIZES)}, or give --layers/--hidden/"
            f"--heads/--vocab/--seq_len (tfpar train also takes "
            f"{', '.join(shapes.HUB_PREFIX + f for f in shapes.HUB_BACKBONES)}).")
    return True


def _positive_shape(values) -> bool:
    for name in SHAPE_FLAGS:
        if values[name] is not None and values[name] < 1:
            raise flags.ValidationError(f"--{name}={values[name]}: must be >= 1.")
    return True


def config_from_flags(default: str | None = None, flag_values: flags.FlagValues = flags.FLAGS,
                      **fixed) -> GPTConfig:
    """The GPT shape the flags give: --model (else `default`) with the shape
    flags applied, then `fixed` (values the caller decides, e.g. the vocab).

    Raises ValueError naming what is missing when there is no preset and not
    every dimension is given, or when the shape is inconsistent.
    """
    f = flag_values
    name = f.model or default
    if shapes.is_hub(name):
        raise ValueError(f"--model={name}: a keras-hub model has no GPT shape to reason "
                         f"about here; give a GPT preset ({', '.join(SIZES)}) or --layers/"
                         "--hidden/--heads/--vocab/--seq_len.")
    given = {n: f[n].value for n in SHAPE_FLAGS if f[n].value is not None}
    given.update(fixed)
    if name is None:
        missing = [f"--{n}" for n in SHAPE_FLAGS if n not in given]
        if missing:
            raise ValueError(f"no --model preset, so {', '.join(missing)} must be given "
                             f"(or use --model={next(iter(SIZES))} ... {list(SIZES)[-1]}).")
        return GPTConfig(**given)
    return dataclasses.replace(SIZES[name], **given)
