"""Mechanism of `TensorParallel`: tensors a model builds itself join the mesh.

A model that makes a tensor of its own and feeds it to a layer — positions
from `keras.ops.arange(seq_len)` into an Embedding (nanoGPT), a causal
mask, a rotary table — hands that layer a regular tensor next to weights
that are DTensors. Inside a traced step DTensor lays such constants out
itself (replicated); called eagerly (building a model by calling it on a
batch inside the scope), the op fails: "The op/function SelectV2 got a
regular tensor for input 0 (shape [16]) but was expecting a DTensor". While
a mesh strategy is current, an eager layer call copies its tensor arguments
onto the mesh (replicated) and runs traced, as a step would.
"""

import functools

import keras
import numpy as np
import tensorflow as tf
from tensorflow.experimental import dtensor

from tfpar.compat.dtensor_variables import to_layout
from tfpar.compat.patch import Patch


def _on_mesh(mesh):
    def convert(value):
        if isinstance(value, np.ndarray):
            value = tf.convert_to_tensor(value)
        if isinstance(value, tf.Tensor) and not dtensor.is_dtensor(value):
            return to_layout(value, dtensor.Layout.replicated(mesh, value.shape.rank))
        return value

    return convert


def _placing_call(upstream):
    @functools.wraps(upstream)
    def __call__(self, *args, **kwargs):
        from tfpar.strategies import registry

        mesh = getattr(registry.current(), "mesh", None)
        if mesh is None or not tf.executing_eagerly() or any(
                isinstance(t, keras.KerasTensor) for t in tf.nest.flatten((args, kwargs))):
            return upstream(self, *args, **kwargs)  # traced already, or building a graph
        args = tf.nest.map_structure(_on_mesh(mesh), args)
        kwargs = tf.nest.map_structure(_on_mesh(mesh), kwargs)
        # Traced, the call's own tensors (a causal mask made inside attention)
        # are laid out by DTensor; run eagerly, each such op would fail.
        # Variables a first call creates are made under tf.init_scope by the
        # strategy, as when a step builds the model.
        return tf.function(lambda *a: upstream(self, *a, **kwargs))(*args)

    __call__._tfpar_upstream = upstream
    return __call__


def _install():
    keras.layers.Layer.__call__ = _placing_call(keras.layers.Layer.__call__)


def _uninstall():
    keras.layers.Layer.__call__ = keras.layers.Layer.__call__._tfpar_upstream


PATCH = Patch("dtensor_layer_inputs", "mechanism",
              "Keras layers have no hook to place their inputs on a DTensor mesh",
              _install, _uninstall, requires=("keras:layers.Layer.__call__",))
