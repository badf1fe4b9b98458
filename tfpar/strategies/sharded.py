"""Sharded data parallelism (ZeRO stages 1-3, FSDP), on a DTensor mesh.

Every data-parallel replica of `DataParallel` holds the whole model, its
gradients and both AdamW moments: 16 bytes per fp32 parameter on every
device. `ShardedDataParallel` splits what each stage says over the `fsdp`
devices, the same devices that split each batch:

| stage | sharded over the N devices | bytes per parameter per device |
| --- | --- | --- |
| 1 (ZeRO-1, Megatron's distributed optimizer) | optimizer state | 4 + 4 + 8/N |
| 2 (ZeRO-2) | + gradients | 4 + 12/N |
| 3 (ZeRO-3, FSDP) | + weights | 16/N |

How each stage runs in DTensor (one SPMD program per step; the mesh is
"batch:N,model:tp", the batch axis splitting both the batch and the state):

- stage 1: weights replicated; each optimizer slot laid out on the batch
  axis (its largest dimension that divides by N). The update computes each
  device's slice of the moments from the all-reduced gradient, and DTensor
  all-gathers the weight delta into the replicated weight.
- stage 2: also the gradient is relaid out to the slot's sharded layout
  before the optimizer reads it (DTensor's all-reduce then slice: each
  device keeps only its shard of the gradient for the update).
- stage 3: the weights themselves are stored sharded on the batch axis;
  a layer reading one inside its call gets it all-gathered
  (`tfpar.compat.gather_on_read`), and the gradient of that gather is the
  reduce-scatter back to the shard. With `--recompute=full` each block's
  forward runs again in the backward, so its weights are gathered again
  there and the gathered copies live for one block at a time (FSDP's
  reshard-after-forward); without recomputation they are kept from the
  forward to the backward (FSDP2's `reshard_after_forward=False`).

Weights whose dimensions do not divide by N (small biases, LayerNorms of odd
width) stay replicated, as in DeepSpeed's and FSDP's padding-free modes;
`memory_report` counts them as they are.

With `dp > 1` (HSDP, stage 3 only): the weights and the optimizer state are
sharded within groups of `fsdp` consecutive devices and replicated across
the `dp` groups, as torchtitan's and FSDP2's hybrid sharding does. DTensor
lays one tensor dimension over one mesh axis, so the batch (split over all
dp x fsdp devices) and the state (split over fsdp of them) cannot share a
mesh: the state lives on a second mesh over the same devices,
"replica:dp,shard:fsdp" (`storage_mesh`), where a layer's read gathers it
within its group before it is copied, whole, to the compute mesh; the
gradient returns the same way and the optimizer updates each shard there.

With `tp > 1` the mesh also has a "model" axis: the LayoutMap's tensor
parallel split (Megatron by default) and the ZeRO split on the batch axis
combine on different dimensions of the same weight (FSDP x TP, the 2-D
layout of keras-hub's `get_layout_map` and torchtitan's large runs).

Example::

    tfpar.simulate_devices(4)
    strategy = tfpar.ShardedDataParallel(fsdp=4, zero_stage=3)
    with strategy.scope():
        model = tfpar.models.gpt("tiny", recompute="full")
        model.compile(optimizer=keras.optimizers.AdamW(1e-3), loss=tfpar.models.lm_loss())
    model.fit(dataset)
    strategy.memory_report(model)["parameter_bytes_per_device"]  # a quarter
"""

from __future__ import annotations

import functools

import keras
import tensorflow as tf
from tensorflow.experimental import dtensor

from tfpar.parallel_dims import ParallelDims, ParallelDimsError
from tfpar.strategies.base import _dtype_name
from tfpar.strategies.tensor.mesh import build_mesh
from tfpar.strategies.tensor.tensor_parallel import TensorParallel

ZERO_STAGES = (1, 2, 3)


class ShardedDataParallel(TensorParallel):
    """Data parallelism with the optimizer state, gradients and weights split (ZeRO/FSDP).

    Args:
      fsdp: devices that split the sharded state (and each batch; default:
        every local device, divided by `tp` and `dp`).
      zero_stage: 1 (optimizer state), 2 (+ gradients) or 3 (+ weights: FSDP).
      dp: replicas of the sharded group (HSDP; stage 3, tp 1): each batch is
        split over dp x fsdp devices.
      tp: tensor-parallel degree (the mesh's "model" axis), for FSDP x TP.
      layout_map: the tensor-parallel LayoutMap or preset; default "megatron"
        when tp > 1, else "replicated". A LayoutMap that already uses the
        batch axis (keras-hub's `get_layout_map`) keeps its own split there.
      num_local_devices: devices per process for multi-client meshes on CPU.
    """

    kind = "sharded"

    def __init__(self, fsdp: int | None = None, zero_stage: int = 3, *, dp: int = 1,
                 tp: int = 1, layout_map=None, num_local_devices: int | None = None):
        if zero_stage not in ZERO_STAGES:
            raise ParallelDimsError(
                f"zero_stage={zero_stage!r}: use 1 (optimizer state sharded), 2 (+ gradients) "
                "or 3 (+ weights, FSDP).")
        if fsdp is None:
            from tfpar.devices import local_devices
            from tfpar.strategies.tensor.mesh import num_clients

            fsdp = max(1, len(local_devices()) * num_clients() // (tp * dp))
        ParallelDims(dp=dp, fsdp=fsdp, tp=tp, zero_stage=zero_stage).check_runnable()
        self.zero_stage = zero_stage
        self.replicas = dp
        super().__init__(f"batch:{dp * fsdp},model:{tp}",
                         layout_map or ("megatron" if tp > 1 else "replicated"),
                         num_local_devices=num_local_devices)
        # HSDP's second mesh, over the same devices in the same order: group r
        # holds devices r*fsdp ... r*fsdp + fsdp - 1 (consecutive: one node).
        self.storage_mesh = build_mesh(("replica", "shard"), (dp, fsdp),
                                       num_local_devices=num_local_devices) if dp > 1 else None

    @property
    def dims(self) -> ParallelDims:
        return ParallelDims(dp=self.replicas, fsdp=self.num_replicas_in_sync // self.replicas,
                            tp=self.mesh_shape["model"], zero_stage=self.zero_stage)

    def describe(self) -> dict:
        return super().describe() | {"zero_stage": self.zero_stage}

    # ------------------------------------------------------------- layouts
    def sharded(self, layout: dtensor.Layout, shape) -> dtensor.Layout:
        """`layout` with the batch axis added (`shard_on_axis`)."""
        return shard_on_axis(layout, shape, self.batch_axis)

    def variable_layout(self, keras_variable, shape) -> dtensor.Layout:
        """Stage 3 stores trainable weights sharded; stages 1-2 shard only the
        optimizer slots (a slot arrives with its variable's layout)."""
        is_slot = isinstance(keras_variable._layout, dtensor.Layout)
        if self.storage_mesh is not None and not is_slot and (
                keras_variable.trainable or _creating_optimizer_variable()):
            # HSDP: the weights, and every optimizer variable (their update must
            # not mix meshes), live on the storage mesh; slots follow their weight.
            layout = self._storage_layout(shape, shard=keras_variable.trainable)
            keras_variable._layout = layout
            self.variables[keras_variable.path] = (
                tuple(int(d) for d in shape),
                tuple(None if s == dtensor.UNSHARDED else s for s in layout.sharding_specs))
            return layout
        layout = super().variable_layout(keras_variable, shape)
        if self.storage_mesh is not None:
            return layout
        if is_slot or (self.zero_stage == 3 and keras_variable.trainable):
            layout = self.sharded(layout, shape)
            keras_variable._layout = layout
            self.variables[keras_variable.path] = (
                tuple(int(d) for d in shape),
                tuple(None if s == dtensor.UNSHARDED else s for s in layout.sharding_specs))
        return layout

    def _storage_layout(self, shape, shard: bool) -> dtensor.Layout:
        """HSDP: replicated over the groups, split within one on the largest
        dimension that divides by fsdp (or whole, when none does or `shard` is off)."""
        n = self.storage_mesh.dim_size("shard")
        specs = [dtensor.UNSHARDED] * len(shape)
        free = [i for i, d in enumerate(shape) if int(d) % n == 0 and int(d) >= n]
        if shard and free:
            specs[max(free, key=lambda i: (int(shape[i]), -i))] = "shard"
        return dtensor.Layout(specs, self.storage_mesh)

    def gradient_layout(self, variable) -> dtensor.Layout:
        """Where the gradient of `variable` lives for the update: its shard from
        stage 2 on, else the variable's own layout."""
        layout = variable._layout  # set when the variable was created on the mesh
        if self.storage_mesh is not None and layout.mesh == self.storage_mesh:
            return layout
        if self.zero_stage >= 2:
            return self.sharded(layout, variable.shape)
        return layout

    # --------------------------------------------------------------- steps
    def _make_function(self, model, step_function):
        if self.zero_stage == 2 and model.optimizer is not None:
            shard_gradients(model.optimizer, self)
        return super()._make_function(model, step_function)

    # -------------------------------------------------------------- memory
    def memory_report(self, model: keras.Model) -> dict:
        """Per-device bytes; gradients counted in the layout the update keeps them."""
        report = super().memory_report(model)
        report["gradient_bytes_per_device"] = sum(
            _local_bytes(self.gradient_layout(v), v) for v in model.trainable_weights)
        return report | {"zero_stage": self.zero_stage, "fsdp": self.dims.fsdp,
                         "dp": self.replicas}


def shard_on_axis(layout: dtensor.Layout, shape, axis: str) -> dtensor.Layout:
    """`layout` with mesh axis `axis` added on the largest free dimension that
    divides by its size: ZeRO's split of one weight (`layout` itself when no
    dimension divides, or when `layout` already uses `axis`, as a keras-hub
    LayoutMap's own FSDP split does)."""
    specs = list(layout.sharding_specs)
    n = layout.mesh.dim_size(axis)
    if n == 1 or axis in specs:
        return layout
    free = [i for i, s in enumerate(specs)
            if s == dtensor.UNSHARDED and int(shape[i]) % n == 0 and int(shape[i]) >= n]
    if not free:
        return layout
    specs[max(free, key=lambda i: (int(shape[i]), -i))] = axis
    return dtensor.Layout(specs, layout.mesh)


def _creating_optimizer_variable() -> bool:
    """Whether the variable being created is an optimizer's (Keras creates them
    in the optimizer's name scope, with the optimizer as its caller)."""
    from keras.src.backend.common import global_state  # private, pinned

    stack = global_state.get_global_attribute("name_scope_stack") or []
    return any(isinstance(scope.caller, keras.optimizers.Optimizer) for scope in stack)


def _local_bytes(layout: dtensor.Layout, variable) -> int:
    import numpy as np

    shape = [int(d) // (layout.mesh.dim_size(s) if s != dtensor.UNSHARDED else 1)
             for d, s in zip(variable.shape, layout.sharding_specs)]
    return int(np.prod(shape)) * np.dtype(_dtype_name(variable)).itemsize


def shard_gradients(optimizer, strategy: ShardedDataParallel) -> None:
    """Makes `optimizer.apply` lay each gradient out as the ZeRO-2 shard first.

    Keras computes the gradient of a replicated weight replicated (DTensor
    all-reduces it); relaid out to the slot's sharded layout, each device
    keeps only the slice its optimizer shard updates.
    """
    apply = optimizer.apply
    if getattr(apply, "_tfpar_sharded_gradients", False):
        return

    @functools.wraps(apply)
    def wrapped(grads, trainable_variables=None, *args, **kwargs):
        variables = (trainable_variables if trainable_variables is not None
                     else optimizer._trainable_variables)
        grads = [g if g is None else _relayout(g, v._layout, strategy.gradient_layout(v))
                 for g, v in zip(grads, variables)]
        return apply(grads, trainable_variables, *args, **kwargs)

    wrapped._tfpar_sharded_gradients = True
    optimizer.apply = wrapped


def _relayout(value, computed: dtensor.Layout, kept: dtensor.Layout):
    """`value` pinned first to the layout it was computed in, then sliced to `kept`.

    DTensor propagates layouts both ways: a bare relayout to the sharded layout
    pushes the batch-axis sharding back into the ops that compute the gradient,
    which fails there ("'tf.Tile' op requires input.shape[0] (16) * 1 to be equal
    to output.shape[0] (4)", a broadcast's gradient). Pinning the computed
    layout keeps the backward as it is: all-reduce, then each device's slice.
    """
    value = dtensor.relayout(tf.convert_to_tensor(value), computed)
    return dtensor.relayout(value, kept)
