"""tfpar's Keras classes are registered whenever Keras is loaded after `import tfpar`.

A model that `tfpar train` saved (`model.keras`) names its layers by their
registered names ("tfpar>PositionEmbedding"), and Keras resolves those only
from classes whose modules have run. `import tfpar` loads no TensorFlow (the
launcher and the cluster tools start instantly), so it cannot import those
modules itself; instead the modules below are imported right after `keras`
is, or at once when Keras is loaded already. Then::

    import tfpar, keras
    model = keras.saving.load_model("runs/gpt/model.keras")
"""

from __future__ import annotations

import importlib
import importlib.abc
import sys

# The modules whose classes a saved tfpar model or optimizer names.
MODULES = ("tfpar.models.transformer", "tfpar.models.hub", "tfpar.train.schedule")


def register() -> None:
    for name in MODULES:
        importlib.import_module(name)


class _AfterKeras(importlib.abc.MetaPathFinder):
    """Finds nothing itself; wraps the loader of `keras` so `register` runs after it."""

    def find_spec(self, fullname, path, target=None):
        if fullname != "keras":
            return None
        sys.meta_path.remove(self)
        from importlib.util import find_spec

        spec = find_spec("keras")
        if spec is None or spec.loader is None:
            return spec
        loader = spec.loader
        upstream = loader.exec_module

        def exec_module(module):
            upstream(module)
            register()

        loader.exec_module = exec_module
        return spec


def register_when_keras_loads() -> None:
    if "keras" in sys.modules:
        # Keras is loaded: registering now costs only tfpar's model modules.
        register()
    elif not any(isinstance(finder, _AfterKeras) for finder in sys.meta_path):
        sys.meta_path.insert(0, _AfterKeras())
