"""Input pipelines for distributed training (global batches, correct sharding).

`distributed` (and TensorFlow) loads on first use of its names, so the pure
submodules (`bpe`, reached from `tfpar train`'s flags) import without it.
"""

import importlib

_LAZY = ("batch_for", "from_arrays", "from_files", "from_tfds", "num_workers",
         "resolve_global_batch_size")

_SUBMODULES = ("bpe", "corpus", "distributed", "text")

__all__ = list(_LAZY)


def __getattr__(name):
    if name in _SUBMODULES:
        return importlib.import_module(f"tfpar.data.{name}")
    if name in _LAZY:
        return getattr(importlib.import_module("tfpar.data.distributed"), name)
    raise AttributeError(f"module 'tfpar.data' has no attribute {name!r}")
