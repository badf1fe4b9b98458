"""Reference models: the GPT that `tfpar train` trains and the strategies are tested on.

`shapes` (GPTConfig, the presets, parameter and FLOP counts; HubConfig, the
keras-hub families' shapes) is pure Python; `transformer` (`gpt()`, its
layers, `lm_loss()`) builds the Keras model and loads TensorFlow on first use;
`hub` builds keras-hub families (Llama, Gemma, Qwen, GPT-2) as causal LMs for
`tfpar train --model=keras_hub:<family>`.
"""

import importlib

_LAZY = {"GPTConfig": "shapes", "SIZES": "shapes", "config": "shapes", "HubConfig": "shapes",
         "PositionEmbedding": "transformer", "TransformerBlock": "transformer",
         "gpt": "transformer", "lm_loss": "transformer"}

_SUBMODULES = ("hub", "shapes", "transformer", "flags")

__all__ = sorted(_LAZY)


def __getattr__(name):
    if name in _SUBMODULES:
        return importlib.import_module(f"tfpar.models.{name}")
    if name in _LAZY:
        return getattr(importlib.import_module(f"tfpar.models.{_LAZY[name]}"), name)
    raise AttributeError(f"module 'tfpar.models' has no attribute {name!r}")
