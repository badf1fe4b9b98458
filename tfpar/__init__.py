"""tfpar: distributed training for Keras 3 on TensorFlow.

One training script, unchanged, runs on one device, data-parallel over local
devices, or multi-worker, chosen by flags::

    import keras, tfpar
    from absl import app

    def main(argv):
        strategy = tfpar.from_flags()     # --strategy, --num_simulated_devices, ...
        with strategy.scope():
            model = build_model()
            model.compile(optimizer=keras.optimizers.AdamW(1e-3), loss="mse")
        model.fit(dataset, epochs=3)

    app.run(main)

Heavy modules (TensorFlow) load on first use, so that `tfpar launch` and the
cluster tools start instantly.
"""

import importlib

__version__ = "0.1.0"

_LAZY = {
    "simulate_devices": "tfpar.devices",
    "OneDevice": "tfpar.strategies",
    "DataParallel": "tfpar.strategies",
    "MultiWorker": "tfpar.strategies",
    "TensorParallel": "tfpar.strategies",
    "ShardedDataParallel": "tfpar.strategies",
    "Pipeline": "tfpar.strategies",
    "ParallelDims": "tfpar.parallel_dims",
    "from_flags": "tfpar.flags",
    "enable_keras_distribution": "tfpar.strategies.keras_distribution:enable",
    "set_precision": "tfpar.precision",
}

_SUBMODULES = ("callbacks", "cluster", "compat", "data", "devices", "exit_codes", "flags",
               "k8s", "launch", "memory", "models", "parallel_dims", "plan", "precision", "recompute",
               "strategies", "train")

__all__ = sorted(_LAZY) + list(_SUBMODULES) + ["__version__"]


def __getattr__(name):
    if name in _LAZY:
        module, _, attribute = _LAZY[name].partition(":")
        return getattr(importlib.import_module(module), attribute or name)
    if name in _SUBMODULES:
        return importlib.import_module(f"tfpar.{name}")
    raise AttributeError(f"module 'tfpar' has no attribute {name!r}")


def _register_keras_objects():
    from tfpar import _keras_objects

    _keras_objects.register_when_keras_loads()


_register_keras_objects()
