"""Tensor (model) parallelism for Keras 3 on TensorFlow, through DTensor layouts.

Every Keras variable created under `TensorParallel.scope()` (layer weights,
optimizer slots, the iteration counter, metric state, seed-generator state)
becomes a `dtensor.DVariable` on the mesh, split as the LayoutMap says (the
rest replicated). Optimizer slots follow their variable's layout. Models
compiled in the scope train with the usual `fit`/`evaluate`/`predict`: tfpar
swaps in step functions that pack each batch onto the mesh, split on the
batch axis, and run the step as one DTensor SPMD program, in which DTensor
inserts the all-reduces that tensor parallelism needs.

Example::

    tfpar.simulate_devices(4)
    strategy = tfpar.TensorParallel("batch:2,model:2", "megatron")
    with strategy.scope():
        model = tfpar.models.gpt("tiny")
        model.compile(optimizer=keras.optimizers.AdamW(1e-3), loss=...)
    model.fit(dataset, epochs=1)

Keras's own `keras.distribution.ModelParallel` runs only on JAX; a LayoutMap
written for it works here unchanged.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import warnings

import keras
import tensorflow as tf
from tensorflow.experimental import dtensor

from tfpar import compat
from tfpar.compat import dtensor_variables
from tfpar.compat.dtensor_variables import gather, to_layout
from tfpar.parallel_dims import ParallelDims
from tfpar.strategies.tensor import layouts
from tfpar.strategies.tensor.mesh import BATCH_AXIS, MeshError, build_mesh, client_id, num_clients, parse_mesh
from tfpar.strategies import registry
from tfpar.strategies.base import StrategyBase

log = logging.getLogger("tfpar")


def current() -> "TensorParallel | None":
    """The TensorParallel whose scope is active in this thread, if any."""
    strategy = registry.current()
    return strategy if isinstance(strategy, TensorParallel) else None


class TensorParallel(StrategyBase):
    """Splits weights over the "model" axis of a device mesh, batches over "batch".

    Args:
      mesh: "batch:2,model:2", or a `keras.distribution.DeviceMesh`.
      layout_map: a `keras.distribution.LayoutMap` (regex on variable paths
        -> axes), or a preset name: "megatron" (default) or "replicated".
      batch_axis: the mesh axis that splits batches.
      num_local_devices: devices per process for multi-client meshes on CPU
        (`--num_simulated_devices`).

    Attributes:
      mesh: the `dtensor.Mesh`.
      num_replicas_in_sync: the batch-axis size (a global batch must divide by it).
      layouts: the preset the layout map came from ("megatron", "replicated"),
        or "custom" for a LayoutMap given in code.
    """

    kind = "tensor"

    def __init__(self, mesh="batch:1,model:1", layout_map="megatron", batch_axis: str = BATCH_AXIS,
                 num_local_devices: int | None = None):
        compat.configure_dtensor()
        if isinstance(mesh, keras.distribution.DeviceMesh):
            names, sizes = tuple(mesh.axis_names), tuple(mesh.shape)
        else:
            names, sizes = parse_mesh(mesh)
        if batch_axis not in names:
            raise MeshError(
                f"mesh axes {list(names)} have no batch axis {batch_axis!r}; add it "
                f"(size 1 for pure tensor parallelism), e.g. 'batch:1,model:{math.prod(sizes)}'."
            )
        self.mesh = build_mesh(names, sizes, num_local_devices=num_local_devices)
        self.mesh_shape = dict(zip(names, sizes))
        self.batch_axis = batch_axis
        self.keras_mesh = keras.distribution.DeviceMesh(
            sizes, names, devices=[f"{self.mesh.device_type()}:{i}" for i in range(math.prod(sizes))])
        # A preset covers many layer types, most of which a model lacks; only a
        # LayoutMap written for this model is checked for keys that match nothing.
        self._check_unmatched = not isinstance(layout_map, str)
        self.layouts = layout_map if isinstance(layout_map, str) else "custom"
        if isinstance(layout_map, str):
            layout_map = layouts.preset(layout_map, self.keras_mesh)
        if not isinstance(layout_map, keras.distribution.LayoutMap):
            raise layouts.LayoutError(
                f"layout_map={layout_map!r}: give a keras.distribution.LayoutMap or one of "
                f"{list(layouts.PRESETS)}."
            )
        self.layout_map = layout_map
        self._matched: set[str] = set()
        self._warned_unmatched = False
        self.variables: dict[str, tuple[tuple[int, ...], tuple]] = {}  # path -> (shape, axes)

    # -------------------------------------------------------------- identity
    @property
    def num_replicas_in_sync(self) -> int:
        return self.mesh_shape[self.batch_axis]

    @property
    def num_workers(self) -> int:
        return num_clients()

    @property
    def worker_index(self) -> int:
        return client_id()

    @property
    def dims(self) -> ParallelDims:
        tensor = math.prod(n for a, n in self.mesh_shape.items() if a != self.batch_axis)
        return ParallelDims(dp=self.num_replicas_in_sync, tp=tensor)

    def _devices(self) -> list[str]:
        return [str(d) for d in self.mesh.local_devices()]

    def describe(self) -> dict:
        return super().describe() | {"mesh": dict(self.mesh_shape)}

    def local_batch_rows(self, global_batch_size: int) -> tuple[int, int]:
        """[start, stop) rows of each global batch that this process feeds: all of
        them on one process; with several clients, the rows of the batch shards
        its devices hold."""
        shards = sorted({loc[self.batch_axis] for loc in self.mesh.local_device_locations()})
        if shards != list(range(shards[0], shards[-1] + 1)):
            raise MeshError(
                f"this process's devices hold batch shards {shards}, which are not "
                "contiguous; order the mesh so each process holds a contiguous range."
            )
        per_shard = global_batch_size // self.num_replicas_in_sync
        return shards[0] * per_shard, (shards[-1] + 1) * per_shard

    def any_worker(self, flag: bool) -> bool:
        """True on every client if `flag` is set on any (a sum over the mesh).

        Each local device contributes this client's flag to a tensor sharded
        over every mesh axis; summing it is one all-reduce across clients.
        Every client must call it at the same point (PreemptionCheckpoint
        does, after each batch): it is a collective like a training step, so
        a client that is gone makes it fail with UnavailableError, which
        PreemptionCheckpoint turns into exit code 211. Measured on 2 clients
        x 2 CPU devices: SIGTERM to client 1 alone stops both after the same
        batch (tests/test_tensor_parallel_faults.py).
        """
        if self.num_workers == 1:
            return bool(flag)
        names = list(self.mesh.dim_names)
        layout = dtensor.Layout(names, self.mesh)
        one = tf.constant(1.0 if flag else 0.0, tf.float32, shape=[1] * len(names))
        votes = dtensor.pack([one] * len(self.mesh.local_devices()), layout)
        total = dtensor.unpack(dtensor.relayout(
            tf.reduce_sum(votes), dtensor.Layout.replicated(self.mesh, 0)))[0]
        return float(total) > 0

    # ----------------------------------------------------------------- scope
    @contextlib.contextmanager
    def scope(self):
        """Variables created inside live on the mesh; models compiled inside train on it."""
        compat.apply_keras_fixes()
        try:
            with registry.entered(self):
                yield self
        finally:
            self._warn_unmatched()

    def _warn_unmatched(self):
        if self._warned_unmatched or not self.variables or not self._check_unmatched:
            return
        unmatched = [k for k in self.layout_map if k not in self._matched]
        if unmatched:
            self._warned_unmatched = True
            warnings.warn(
                f"tfpar TensorParallel: layout keys {unmatched} matched no variable; "
                "check them against the variable paths (model.weights[i].path).",
                stacklevel=3,
            )

    # ------------------------------------------------------------- variables
    def use_layout_map(self, layout_map: keras.distribution.LayoutMap, name: str = "custom"):
        """Lays out the variables still to be created with `layout_map` (written for
        `self.keras_mesh`), e.g. a keras-hub backbone's `get_layout_map`, once
        the model is known. Raises LayoutError once variables exist on the mesh."""
        if self.variables:
            raise layouts.LayoutError(
                f"TensorParallel: {len(self.variables)} variables already live on the mesh "
                f"with the {self.layouts!r} layouts; give the layout map {name!r} before "
                "building the model (or to TensorParallel(mesh, layout_map)).")
        self.layout_map, self.layouts = layout_map, name
        self._check_unmatched, self._matched = True, set()

    def layout_for(self, path: str, shape) -> dtensor.Layout:
        """The DTensor layout of the variable at `path` (validated)."""
        keys = layouts.matching_keys(self.layout_map, path)
        if len(keys) > 1:
            raise layouts.LayoutError(
                f"variable {path!r} matches several layout keys {keys}; make them exclusive."
            )
        rank = len(shape)
        if not keys:
            axes = (None,) * rank
        else:
            self._matched.add(keys[0])
            axes = layouts.check_axes(path, shape, self.layout_map[keys[0]].axes, self.mesh_shape)
        self.variables[path] = (tuple(int(d) for d in shape), axes)
        return dtensor.Layout([a if a is not None else dtensor.UNSHARDED for a in axes], self.mesh)

    def initialize_variable(self, keras_variable, value, upstream) -> None:
        """The registry protocol: every Keras variable created in scope comes here."""
        if isinstance(value, tf.Variable):
            return upstream(keras_variable, value)
        keras_variable._value = self.create_variable(keras_variable, value)

    def variable_layout(self, keras_variable, shape) -> dtensor.Layout:
        """The layout of a Keras variable being created: an optimizer slot
        follows its variable (whose layout Keras passes as `_layout`), any
        other variable takes the LayoutMap's."""
        reference = keras_variable._layout
        if isinstance(reference, dtensor.Layout):
            self.variables[keras_variable.path] = (
                tuple(int(d) for d in shape),
                tuple(None if s == dtensor.UNSHARDED else s for s in reference.sharding_specs))
            return reference
        layout = self.layout_for(keras_variable.path, shape)
        keras_variable._layout = layout
        return layout

    def create_variable(self, keras_variable, value) -> dtensor.DVariable:
        """Makes the DVariable behind a Keras variable (called from tfpar.compat)."""
        value = dtensor_variables.initial_value(keras_variable, value)
        layout = self.variable_layout(keras_variable, value.shape)
        registry.tag(keras_variable, self)  # how a model finds its strategy
        return dtensor_variables.new_dvariable(keras_variable, value, layout)

    # ------------------------------------------------------------------ data
    def pack_batch(self, batch):
        """A host batch -> DTensors split on the batch axis.

        Each process passes its own part of the global batch: all of it on one
        process; with several clients, the rows for the batch shards its
        devices hold (`tfpar.data` produces exactly that).
        """
        locations = self.mesh.local_device_locations()
        shards = sorted({loc[self.batch_axis] for loc in locations})

        def pack(x):
            if x is None:
                return None
            x = tf.convert_to_tensor(x)
            if x.shape.rank == 0:
                return to_layout(x, dtensor.Layout.replicated(self.mesh, 0))
            rows = int(x.shape[0])
            if rows % len(shards):
                raise ValueError(
                    f"a batch of {rows} rows cannot be split over the {len(shards)} batch "
                    f"shard(s) of this process (mesh {self.mesh_shape}); use batch sizes that "
                    f"divide by {self.num_replicas_in_sync} (drop_remainder=True for training)."
                )
            parts = tf.split(x, len(shards))
            components = [parts[shards.index(loc[self.batch_axis])] for loc in locations]
            layout = dtensor.Layout.batch_sharded(self.mesh, self.batch_axis, x.shape.rank)
            return dtensor.pack(components, layout)

        return tf.nest.map_structure(pack, batch)

    def to_host(self, value):
        """A DTensor (any layout) -> the whole tensor on this host."""
        if value is None or not _is_dtensor(value):
            return value
        return gather(value)

    # --------------------------------------------------------------- models
    def step_function(self, model, kind: str):
        """The registry protocol: Keras's "train", "test" or "predict" function."""
        if kind == "predict":
            return self._make_predict_function(model)
        return self._make_function(model, model.train_step if kind == "train" else model.test_step)

    def _make_function(self, model, step_function):
        """Keras's train/test function, with each batch packed onto the mesh.

        Keras runs `steps_per_execution` steps in one graph loop that pulls
        batches from the iterator inside the graph; a DTensor program needs
        its inputs on the mesh, so batches are pulled and packed on the host
        and each step is one compiled SPMD call. Variables created while a
        step is traced (optimizer slots, metric state) are created in scope.
        """
        _warn_if_jit(model)
        if model.optimizer is not None:
            use_dense_gradients(model.optimizer)
        # No autograph, as Keras's own step functions (do_not_convert).
        compiled = tf.function(step_function, reduce_retracing=True, autograph=False)

        def run_batch(data):
            with self.scope():
                return compiled(self.pack_batch(data))

        return registry.host_loop(model, run_batch,
                                  lambda outputs: tf.nest.map_structure(self.to_host, outputs))

    def _make_predict_function(self, model):
        _warn_if_jit(model)
        compiled = tf.function(model.predict_step, reduce_retracing=True, autograph=False)

        def function(data):
            outputs = []
            for batch in data:
                rows = _rows(batch)
                padded, pad = self._pad(batch, rows)
                with self.scope():
                    result = tf.nest.map_structure(self.to_host, compiled(self.pack_batch(padded)))
                outputs.append(tf.nest.map_structure(lambda t: t[: rows], result) if pad else result)
            return tf.nest.map_structure(lambda *t: tf.concat(t, axis=0), *outputs)

        return function

    def _pad(self, batch, rows):
        """Pads a partial prediction batch to a multiple of the batch shards."""
        shards = len({loc[self.batch_axis] for loc in self.mesh.local_device_locations()})
        pad = -rows % shards
        if not pad:
            return batch, 0

        def pad_one(x):
            if x is None or tf.convert_to_tensor(x).shape.rank == 0:
                return x
            x = tf.convert_to_tensor(x)
            return tf.concat([x, tf.repeat(x[-1:], pad, axis=0)], axis=0)

        return tf.nest.map_structure(pad_one, batch), pad

    # ---------------------------------------------------------------- memory
    def memory_report(self, model: keras.Model) -> dict:
        """Per-device bytes of parameters, gradients and optimizer state, from the
        real variables (a sharded one counts its local component)."""
        return super().memory_report(model) | {"model_axis_size": self.mesh_shape.get("model", 1)}


def strategy_of(model) -> "TensorParallel | None":
    """The TensorParallel a model's weights live on, if any."""
    strategy = registry.strategy_of(model)
    return strategy if isinstance(strategy, TensorParallel) else None


_jit_warned = False


def _warn_if_jit(model):
    global _jit_warned
    if model.jit_compile is True and not _jit_warned:
        _jit_warned = True
        log.warning("tfpar TensorParallel: jit_compile=True is ignored; DTensor SPMD steps "
                    "run without XLA here.")


def _rows(batch):
    first = next(t for t in tf.nest.flatten(batch) if t is not None)
    return int(tf.convert_to_tensor(first).shape[0])


def _is_dtensor(value) -> bool:
    if isinstance(value, dtensor.DVariable):
        return True
    try:
        return tf.executing_eagerly() and dtensor.is_dtensor(value)
    except (TypeError, ValueError, AttributeError):
        return False


def use_dense_gradients(optimizer) -> None:
    """Makes `optimizer` turn IndexedSlices gradients (Embedding) into dense ones.

    DTensor cannot lay out the scatter updates of sparse gradients
    (ResourceScatterSub has no layout propagation), so TensorParallel models
    always use dense ones. They are also the exact gradient: Keras's Adam
    squares an IndexedSlices gradient slice by slice, so a row looked up twice
    in a batch gets g1^2 + g2^2 in its second moment instead of (g1 + g2)^2.
    A single-device run compared with a tensor-parallel one must use this too.
    """
    optimizer.apply = _densify(optimizer.apply)


def _densify(apply):
    if getattr(apply, "_tfpar_densified", False):
        return apply

    @functools.wraps(apply)
    def wrapped(grads, *args, **kwargs):
        grads = [tf.convert_to_tensor(g) if isinstance(g, tf.IndexedSlices) else g for g in grads]
        return apply(grads, *args, **kwargs)

    wrapped._tfpar_densified = True
    return wrapped
