"""Mechanism of `TensorParallel`: a weight sharded on the batch axis is gathered where a layer reads it.

A LayoutMap may shard weights on the batch axis too (FSDP/ZeRO-3 style:
keras-hub's `get_layout_map` puts `model` on one dimension and `batch` on
another). DTensor then runs the model's matmuls on weights split over the
axis that also splits the batch, which it cannot do ("Contracting dimension
for matmul has sharding dimension batch for the left input and model for the
right input ... not supported", Llama and Qwen), or does by splitting the
activations instead of the weights. Keras has no hook to read a variable
differently inside a layer, so while a layer call is traced under a mesh
strategy, reading a DVariable sharded on the strategy's batch axis returns it
relaid out with that axis replicated (one all-gather; its gradient is
reduce-scattered back to the variable's layout). Outside layer calls (the
optimizer's update, the gradient tape's sources, checkpoints) the variable
is read as it is stored, so each device keeps only its shard of the weight
and of its optimizer state.

Measured (tests/keras_hub_table.py): keras-hub Llama and Qwen with their own
`get_layout_map` on a 2x2 mesh train within 1e-5 of one device; without
this patch the first step fails with the error above.
"""

import tensorflow as tf
from tensorflow.experimental import dtensor

from tfpar.compat.patch import Patch


def _gathered(layout: dtensor.Layout, axis: str) -> dtensor.Layout | None:
    """`layout` with `axis` replicated, or None when `axis` shards nothing."""
    specs = list(layout.sharding_specs)
    if axis not in specs:
        return None
    return dtensor.Layout([dtensor.UNSHARDED if s == axis else s for s in specs], layout.mesh)


def _in_layer_call() -> bool:
    from keras.src.backend.common import global_state  # private, pinned

    return global_state.get_global_attribute("current_call_ctx") is not None


def _patched_value(upstream):
    def value(self):
        read = upstream(self)
        layout = getattr(self, "_layout", None)
        if not isinstance(layout, dtensor.Layout) or not tf.inside_function() \
                or not _in_layer_call():
            return read
        from tfpar.strategies import registry

        axis = getattr(registry.current(), "batch_axis", None)
        target = _gathered(layout, axis) if axis is not None else None
        if target is None:
            return read
        return dtensor.relayout(read, target)

    value._tfpar_upstream = upstream
    return property(value)


def _variable_class():
    from keras.src.backend.tensorflow.core import Variable  # private, pinned

    return Variable


def _install():
    cls = _variable_class()
    cls.value = _patched_value(cls.value.fget)


def _uninstall():
    cls = _variable_class()
    upstream = cls.value.fget._tfpar_upstream
    del cls.value  # the inherited property (KerasVariable.value) again
    assert cls.value.fget is upstream


PATCH = Patch("gather_on_read", "mechanism",
              "Keras has no hook to read a variable differently inside a layer; DTensor cannot "
              "contract a dimension sharded on the batch axis against the model axis",
              _install, _uninstall,
              requires=("keras.src.backend.tensorflow.core:Variable.value",
                        "keras.src.backend.common.global_state:get_global_attribute"))
