"""Keras's own distribution API (`keras.distribution`) on the TensorFlow backend.

Keras 3 implements `keras.distribution.DataParallel` and `ModelParallel`
for JAX only: on TensorFlow its `distribution_lib` is a prototype and a
script that sets one trains unsharded on one device. With `enable()`, the
distribution a script sets becomes a tfpar strategy, so the script written
for JAX runs unchanged:

    import keras, tfpar
    tfpar.enable_keras_distribution()          # the one tfpar line (a no-op on JAX)

    mesh = keras.distribution.DeviceMesh((2, 2), ["batch", "model"],
                                         devices=keras.distribution.list_devices())
    layout_map = keras.distribution.LayoutMap(mesh)
    layout_map[".*dense.*kernel"] = (None, "model")
    keras.distribution.set_distribution(
        keras.distribution.ModelParallel(layout_map=layout_map, batch_dim_name="batch"))
    model = build_model()                      # no strategy scope
    model.compile(...); model.fit(x, y, batch_size=64); model.save("m.keras")

| Keras distribution | tfpar strategy |
| --- | --- |
| `DataParallel(devices=... or device_mesh=...)` | `TensorParallel` on that mesh, weights replicated (DTensor data parallelism) |
| `ModelParallel(layout_map=..., batch_dim_name=...)` | `TensorParallel(layout_map.device_mesh, layout_map, batch_axis=batch_dim_name)` |

Both are DTensor programs, as both are SPMD programs over a mesh on JAX.
Variables created while a distribution is set live on its mesh; `fit`,
`evaluate`, `predict` and `save` then work as under `TensorParallel`. The
strategy is made once per distribution object. A tfpar strategy's own
`scope()` still wins inside it.
"""

from __future__ import annotations

_strategies: dict[int, tuple[object, object]] = {}  # id(distribution) -> (distribution, strategy)


def strategy_for(distribution):
    """The tfpar strategy that runs a Keras `Distribution` (made once per object)."""
    import keras

    from tfpar.strategies.tensor.tensor_parallel import TensorParallel

    known = _strategies.get(id(distribution))
    if known is not None and known[0] is distribution:
        return known[1]
    if isinstance(distribution, keras.distribution.ModelParallel):
        layout_map = distribution._layout_map
        strategy = TensorParallel(layout_map.device_mesh, layout_map,
                                  batch_axis=distribution.batch_dim_name)
    elif isinstance(distribution, keras.distribution.DataParallel):
        strategy = TensorParallel(distribution.device_mesh, "replicated",
                                  batch_axis=distribution.batch_dim_name)
    else:
        raise TypeError(
            f"keras distribution {type(distribution).__name__}: tfpar runs DataParallel and "
            "ModelParallel on TensorFlow; use one of them, or a tfpar strategy's scope().")
    _strategies[id(distribution)] = (distribution, strategy)
    return strategy


def _current():
    import keras

    distribution = keras.distribution.distribution()
    return None if distribution is None else strategy_for(distribution)


def enable() -> None:
    """Makes `keras.distribution.set_distribution` work on the TensorFlow backend.

    A no-op on other backends, where Keras implements the API itself.
    """
    import keras

    if keras.backend.backend() != "tensorflow":
        return
    from tfpar import compat
    from tfpar.strategies import registry

    compat.configure_dtensor()
    compat.apply_keras_fixes()
    registry.follow_keras_distribution(_current)


def disable() -> None:
    """Stops following the Keras distribution (variables are created as Keras makes them)."""
    from tfpar.strategies import registry

    registry.follow_keras_distribution(None)

