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

Each gather is also made to wait for the input of the layer that reads the
weight (a data dependency on one element of it: DTensor drops control
dependencies between pure ops). Without it, TensorFlow's executor runs every
all-gather as soon as the step starts, since a gather depends only on its
variable, and every gathered weight is alive at once: ZeRO-3's peak then
holds a whole model's worth of gathered weights. With it, a layer's weights
are gathered when the layer runs and, under recomputation, gathered again
when its backward runs (`tf.recompute_grad` makes the recomputed forward
wait for the incoming gradient the same way), as FSDP does.

Measured (tests/keras_hub_table.py): keras-hub Llama and Qwen with their own
`get_layout_map` on a 2x2 mesh train within 1e-5 of one device; without
this patch the first step fails with the error above.
"""

import functools
import threading

import tensorflow as tf
from tensorflow.experimental import dtensor

from tfpar.compat.patch import Patch

_calls = threading.local()  # the inputs of the layer calls being traced, innermost last


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

        strategy = registry.current()
        storage = getattr(strategy, "storage_mesh", None)
        if storage is not None and layout.mesh == storage:
            return _gathered_across(read, layout, strategy.mesh)
        axis = getattr(strategy, "batch_axis", None)
        target = _gathered(layout, axis) if axis is not None else None
        if target is None:
            return read
        return dtensor.relayout(_after(read, _current_input()), target)

    value._tfpar_upstream = upstream
    return property(value)


def _gathered_across(read, layout: dtensor.Layout, compute: dtensor.Mesh):
    """A weight stored on another mesh over the same devices (HSDP's, sharded
    within groups): gathered there, then copied whole to the compute mesh. Only
    replicated tensors cross meshes; the gradient comes back the same way (a
    copy, then each device's slice)."""
    rank = layout.rank
    anchor = _current_input()
    if anchor is not None and anchor.shape.rank:
        zero = dtensor.copy_to_mesh(_zero_after(anchor), dtensor.Layout.replicated(layout.mesh, 0))
        read = read + tf.cast(zero, read.dtype)
    full = dtensor.relayout(read, dtensor.Layout.replicated(layout.mesh, rank))
    return dtensor.copy_to_mesh(full, dtensor.Layout.replicated(compute, rank))


def _zero_after(anchor):
    """An exact 0.0 that depends on `anchor` (see `_after`)."""
    element = tf.reduce_min(tf.stop_gradient(anchor)[..., :1])
    return tf.where(tf.equal(element, element), 0.0, float("nan"))


def _current_input():
    stack = getattr(_calls, "inputs", None)
    return stack[-1] if stack else None


def _after(value, anchor):
    """`value`, made to wait for `anchor` by a data dependency (adds an exact 0).

    The 0 comes from `where(e == e, 0, nan)` on one element of each row of
    `anchor`, as `tf.recompute_grad` does, so no rewrite folds it away; the
    anchor is behind stop_gradient, so the backward gains nothing.
    """
    if anchor is None or anchor.shape.rank is None or anchor.shape.rank == 0:
        return value
    return value + tf.cast(_zero_after(anchor), value.dtype)


def _first_tensor(args):
    for item in tf.nest.flatten(args):
        if isinstance(item, tf.Tensor) and item.dtype != tf.resource:
            return item
    return None


def _recording_call(upstream):
    @functools.wraps(upstream)
    def __call__(self, *args, **kwargs):
        if not tf.inside_function():
            return upstream(self, *args, **kwargs)
        stack = _calls.__dict__.setdefault("inputs", [])
        stack.append(_first_tensor(args))
        try:
            return upstream(self, *args, **kwargs)
        finally:
            stack.pop()

    __call__._tfpar_upstream = upstream
    return __call__


def _variable_class():
    from keras.src.backend.tensorflow.core import Variable  # private, pinned

    return Variable


def _operation_class():
    from keras.src.ops.operation import Operation  # private, pinned

    return Operation


def _install():
    cls = _variable_class()
    cls.value = _patched_value(cls.value.fget)
    # Operation.__call__, which Layer.__call__ ends in: the layer is built by
    # then, and Layer.__call__ itself is dtensor_layer_inputs' to wrap.
    operation = _operation_class()
    operation.__call__ = _recording_call(operation.__call__)


def _uninstall():
    cls = _variable_class()
    upstream = cls.value.fget._tfpar_upstream
    del cls.value  # the inherited property (KerasVariable.value) again
    assert cls.value.fget is upstream
    operation = _operation_class()
    operation.__call__ = operation.__call__._tfpar_upstream


PATCH = Patch("gather_on_read", "mechanism",
              "Keras has no hook to read a variable differently inside a layer; DTensor cannot "
              "contract a dimension sharded on the batch axis against the model axis",
              _install, _uninstall,
              requires=("keras.src.backend.tensorflow.core:Variable.value",
                        "keras.src.ops.operation:Operation.__call__",
                        "keras.src.backend.common.global_state:get_global_attribute"))
