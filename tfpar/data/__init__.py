"""Input pipelines for distributed training (global batches, correct sharding).

The pipelines (`distributed`) load TensorFlow on first use, so that the
pure parts (`bpe`'s spec parsing, which `tfpar train`'s flags check when
they are parsed) import without it.
"""

import importlib

_LAZY = ("batch_for", "from_arrays", "from_files", "from_tfds", "num_workers",
         "resolve_global_batch_size")

__all__ = list(_LAZY)


def __getattr__(name):
    if name in _LAZY:
        return getattr(importlib.import_module("tfpar.data.distributed"), name)
    raise AttributeError(f"module 'tfpar.data' has no attribute {name!r}")
