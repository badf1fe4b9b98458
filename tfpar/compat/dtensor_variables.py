"""Mechanism of `TensorParallel` and `Pipeline`: Keras variables created by a tfpar strategy.

Keras 3's TensorFlow backend has no DTensor support (keras-team/keras#18473;
keras/src/backend/tensorflow/distribution_lib.py is a prototype) and no hook
to create a variable elsewhere. Inside the scope of a strategy of
`tfpar.strategies.registry`, the TF backend Variable is created by that
strategy (`strategy.initialize_variable`): a DVariable with the layout
`TensorParallel` resolves from the variable's Keras path, or a variable the
pipeline later moves to its stage's device.

Reading a sharded DVariable to NumPy (get_weights, save_weights,
model.save) fails with "Trying to copy a non-single-device and
non-replicated DTensor": it is gathered to a replicated layout first
(every client of a multi-client mesh takes part). Assigning host values
(set_weights, load_weights) lays them out on the variable's mesh first.
"""

import tensorflow as tf
from tensorflow.experimental import dtensor

from tfpar.compat.patch import Patch

_METHODS = ("_initialize", "numpy", "__array__", "_direct_assign")


def to_layout(value, layout: dtensor.Layout):
    """A host tensor -> a DTensor with `layout` (every process passes the whole value)."""
    value = dtensor.copy_to_mesh(value, dtensor.Layout.replicated(layout.mesh, layout.rank))
    if layout.is_fully_replicated():
        return value
    return dtensor.relayout(value, layout)


def initial_value(keras_variable, value):
    """A Keras variable's initial value (a tensor, or an initializer's callable)
    as a tensor of the variable's dtype, made outside any traced function."""
    with tf.init_scope():
        if callable(value):
            value = value()
        return tf.cast(tf.convert_to_tensor(value), keras_variable._dtype)


def new_dvariable(keras_variable, value, layout: dtensor.Layout) -> dtensor.DVariable:
    """The DVariable behind `keras_variable`: `value` (a host tensor) laid out as
    `layout`, with the Keras variable's name, trainability, aggregation and
    synchronization (every tfpar strategy makes its DVariables here)."""
    with tf.init_scope():
        return dtensor.DVariable(
            to_layout(value, layout), trainable=keras_variable.trainable,
            name=keras_variable.name,
            aggregation=keras_variable._map_aggregation(keras_variable.aggregation),
            synchronization=keras_variable._map_synchronization(keras_variable.synchronization))


def gather(value):
    """A DTensor of any layout -> its whole value on this host (a collective on a mesh)."""
    layout = dtensor.fetch_layout(value)
    if not layout.is_fully_replicated():
        value = dtensor.relayout(value, dtensor.Layout.replicated(layout.mesh, layout.rank))
    return dtensor.unpack(value)[0]


def is_dvariable(variable) -> bool:
    return isinstance(getattr(variable, "_value", None), dtensor.DVariable)


def _patched(upstream):
    def _initialize(self, value):
        from tfpar.strategies import registry

        strategy = registry.current()
        if strategy is None:
            return upstream["_initialize"](self, value)
        strategy.initialize_variable(self, value, upstream["_initialize"])

    def numpy(self):
        if not is_dvariable(self):
            return upstream["numpy"](self)
        return gather(self._value.read_value()).numpy()

    def __array__(self, dtype=None, *args, **kwargs):
        if not is_dvariable(self):
            return upstream["__array__"](self, dtype, *args, **kwargs)
        value = self.numpy()
        return value.astype(dtype) if dtype is not None else value

    def _direct_assign(self, value):
        if is_dvariable(self) and tf.executing_eagerly() and not dtensor.is_dtensor(value):
            value = to_layout(tf.cast(value, self._value.dtype), dtensor.fetch_layout(self._value))
        return upstream["_direct_assign"](self, value)

    return {"_initialize": _initialize, "numpy": numpy, "__array__": __array__,
            "_direct_assign": _direct_assign}


def _variable_class():
    from keras.src.backend.tensorflow.core import Variable  # private, pinned

    return Variable


def _install():
    cls = _variable_class()
    cls._tfpar_upstream = {name: getattr(cls, name) for name in _METHODS}
    for name, method in _patched(cls._tfpar_upstream).items():
        setattr(cls, name, method)


def _uninstall():
    cls = _variable_class()
    for name, method in cls._tfpar_upstream.items():
        setattr(cls, name, method)


PATCH = Patch("dtensor_variables", "mechanism",
              "no variable-creation hook in Keras 3 (keras-team/keras#18473)", _install, _uninstall,
              requires=tuple(f"keras.src.backend.tensorflow.core:Variable.{m}" for m in _METHODS))
