"""Tensor (model) parallelism through DTensor layouts.

- `mesh`: device meshes ("batch:2,model:2"), single- and multi-client (pure
  parsing; TensorFlow only to build one);
- `layouts`: which weight is split on which mesh axis (the "megatron" preset);
- `tensor_parallel`: `TensorParallel`, the strategy.
"""

import importlib

_LAZY = {"TensorParallel": "tensor_parallel", "MeshError": "mesh", "parse_mesh": "mesh",
         "LayoutError": "layouts"}
_SUBMODULES = ("layouts", "mesh", "tensor_parallel")

__all__ = sorted(_LAZY) + list(_SUBMODULES)


def __getattr__(name):
    if name in _LAZY:
        return getattr(importlib.import_module(f"tfpar.strategies.tensor.{_LAZY[name]}"), name)
    if name in _SUBMODULES:
        return importlib.import_module(f"tfpar.strategies.tensor.{name}")
    raise AttributeError(f"module 'tfpar.strategies.tensor' has no attribute {name!r}")
