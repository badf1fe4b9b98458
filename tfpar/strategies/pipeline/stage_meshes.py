"""Pipeline stages that are tensor- and data-parallel: one DTensor mesh per stage.

With `Pipeline(stages=K, tensor_parallel=T, replicas=D)` the job runs on
K x D x T devices, ordered pipeline-outermost, then data, then tensor (as
Megatron-core and torchtitan order them, so that the tensor groups, which
all-reduce in every layer, are neighbouring devices):

    devices 0 .. D*T-1        stage 0's mesh "batch:D,model:T"
    devices D*T .. 2*D*T-1    stage 1's mesh
    ...

Each stage's weights are DTensor variables on its stage's mesh, split by the
same LayoutMap `TensorParallel` uses ("megatron" by default); each
micro-batch is split over the mesh's batch axis. The runner
(`tfpar.strategies.pipeline.runner`) drives the stages exactly as it drives
device stages (the same schedules, per-stage tapes, dense gradient
accumulation, one optimizer step); this module holds what differs, each
forced by what DTensor does (measured, BUILD_NOTES "3-D parallelism"):

- **Sending between stages** (`send`): `dtensor.copy_to_mesh` copies only
  replicated tensors between meshes, so an activation (or its gradient) is
  relaid out to replicated on its mesh, copied, and split again on the
  receiver's batch axis.
- **Schedule order** (`after`): DTensor drops `tf.control_dependencies`
  between pure ops when it splits a function into per-mesh programs, so the
  device stages' way of holding a device to its schedule would vanish. Each
  action's input instead takes a data dependency on the device's previous
  action: a scalar that is always 0 (`is_nan(s) & is_finite(s)`, false for
  every s, NaN and inf included) computed from that action's output, added
  to the input. Grappler cannot fold it, and a data edge cannot be dropped.
- **Micro-batches** are cut on the host and packed onto their meshes before
  the step (`pack_microbatches`): DTensor cannot `tf.split` a batch-sharded
  tensor.
- **The optimizer step** (`apply_gradients`): one Keras optimizer updates
  variables of K meshes, but every op must have all its inputs on one mesh,
  and Adam reads the step counter and the learning rate in each variable's
  update. The counter and learning rate live on the last stage's mesh (with
  the loss and metrics); every other mesh gets a copy of both, made at the
  start of the step, and the optimizer is applied mesh by mesh with those
  copies in place of its own. A `global_clipnorm` is one norm over every
  mesh's gradients (`_clip_by_global_norm`), as Keras takes it on one device.
- **The first mesh** of the process spans every device
  (`mesh.span_every_device_first`): TensorFlow 2.21 hangs when a mesh
  larger than the process's first one runs its first op, so small stage
  meshes built first would hang a later full-size `TensorParallel`.

Example::

    tfpar.simulate_devices(8)
    strategy = tfpar.Pipeline(stages=2, tensor_parallel=2, replicas=2, microbatches=4)
    with strategy.scope():
        model = tfpar.models.gpt("tiny")
        model.compile(optimizer=keras.optimizers.AdamW(1e-3), loss=tfpar.models.lm_loss())
    model.fit(x, y, batch_size=16)
    strategy.stage_meshes.meshes[1]  # the dtensor.Mesh of stage 1: devices 4..7
"""

from __future__ import annotations

import contextlib

import keras
import tensorflow as tf
from tensorflow.experimental import dtensor

from tfpar import compat
from tfpar.compat import dtensor_variables
from tfpar.compat.dtensor_variables import gather, to_layout
from tfpar.strategies.sharded import shard_on_axis
from tfpar.strategies.tensor import layouts
from tfpar.strategies.tensor import mesh as mesh_lib
from tfpar.strategies.tensor.mesh import BATCH_AXIS, MODEL_AXIS, MeshError


class StageMeshError(ValueError):
    """A pipeline of tensor-parallel stages asked for something it cannot run."""


class StageMeshes:
    """The meshes of a pipeline's K stages and what crosses between them.

    Args:
      devices: K lists of D*T device names (stage-major, batch-major inside).
      data: D, the batch axis of every stage mesh.
      tensor: T, the model axis.
      layout_map: a preset name ("megatron", "replicated"), a
        `keras.distribution.LayoutMap` over the "batch"/"model" axes (as for
        `TensorParallel`), or a callable `keras.distribution.DeviceMesh` ->
        LayoutMap (a keras-hub backbone's `get_layout_map`).
    """

    def __init__(self, devices: list[list[str]], data: int, tensor: int, layout_map="megatron",
                 shard_weights: bool = False):
        compat.configure_dtensor()
        self.data, self.tensor = data, tensor
        self.shard_weights = shard_weights
        device_type = "GPU" if "GPU" in devices[0][0].upper() else "CPU"
        mesh_lib.span_every_device_first(device_type, data * tensor)
        self.meshes = [dtensor.create_mesh([(BATCH_AXIS, data), (MODEL_AXIS, tensor)],
                                           devices=list(row), device_type=device_type)
                       for row in devices]
        keras_meshes = [keras.distribution.DeviceMesh(
            (data, tensor), (BATCH_AXIS, MODEL_AXIS),
            devices=[f"{device_type}:{i}" for i in range(data * tensor)]) for _ in devices]
        if isinstance(layout_map, str):
            self.layout_maps = [layouts.preset(layout_map, m) for m in keras_meshes]
        elif isinstance(layout_map, keras.distribution.LayoutMap):
            # Its axes are mesh-axis names: one map serves every stage's mesh.
            self.layout_maps = [layout_map] * len(keras_meshes)
        elif callable(layout_map):
            self.layout_maps = [layout_map(m) for m in keras_meshes]
        else:
            raise layouts.LayoutError(
                f"layout_map={layout_map!r}: give a preset name {list(layouts.PRESETS)}, a "
                "keras.distribution.LayoutMap, or a function of a DeviceMesh that returns one.")
        self.mirrors: dict | None = None  # mesh -> (step counter, learning rate) copies
        # The mesh of the model's last stage, which computes the loss: the
        # last device's, except in V-shaped schedules (ZBV), where it is the first's.
        self.loss_index = len(self.meshes) - 1

    @property
    def last(self):
        """The mesh that computes the loss and holds the optimizer's step counter."""
        return self.meshes[self.loss_index]

    # ------------------------------------------------------------ variables
    def layout(self, stage: int, path: str, shape) -> dtensor.Layout:
        """The layout of a weight of `stage` (the LayoutMap's, checked against the mesh)."""
        layout_map = self.layout_maps[stage]
        keys = layouts.matching_keys(layout_map, path)
        if len(keys) > 1:
            raise layouts.LayoutError(
                f"variable {path!r} matches several layout keys {keys}; make them exclusive.")
        axes = ((None,) * len(shape) if not keys else layouts.check_axes(
            path, shape, layout_map[keys[0]].axes, {BATCH_AXIS: self.data, MODEL_AXIS: self.tensor}))
        return dtensor.Layout([a or dtensor.UNSHARDED for a in axes], self.meshes[stage])

    def place(self, variable, layout: dtensor.Layout) -> None:
        """Re-creates the tf.Variable behind a Keras variable as a DVariable with `layout`."""
        with tf.init_scope():
            value = tf.convert_to_tensor(variable._value.read_value())
        variable._value = dtensor_variables.new_dvariable(variable, value, layout)
        variable._layout = layout  # optimizer slots made later follow it

    def place_stages(self, stages, model) -> None:
        """Moves each stage's variables onto its mesh, everything else (the
        optimizer's step counter and learning rate, loss and metric state)
        onto the last stage's mesh, where the loss is computed."""
        self.loss_index = stages[-1].rank
        where = {}
        for k, stage in enumerate(stages):
            for v in stage.variables:
                if id(v) in where and where[id(v)] != stage.rank:
                    raise StageMeshError(
                        f"weight {v.path!r} is used by stages {where[id(v)]} and {stage.rank} "
                        "(a tied embedding?); with tensor-parallel stages a weight must "
                        "belong to one stage. Untie it, or cut the model so that both uses "
                        "fall in one stage (split_points).")
                where[id(v)] = stage.rank
        placed = set()
        for stage in stages:
            for v in stage.variables:
                if id(v) not in placed:
                    placed.add(id(v))
                    layout = self.layout(stage.rank, v.path, v.shape)
                    if self.shard_weights and v.trainable:
                        # ZeRO-3 inside the stage: each of its data devices keeps a
                        # shard (its slots follow), gathered where a layer reads it.
                        layout = shard_on_axis(layout, v.shape, BATCH_AXIS)
                    self.place(v, layout)
        optimizer = model.optimizer
        others = list(getattr(optimizer, "variables", ()))
        for metric in model.metrics:
            others += list(metric.variables)
        for v in others:
            if id(v) not in placed and not dtensor_variables.is_dvariable(v):
                placed.add(id(v))
                self.place(v, dtensor.Layout.replicated(self.last, len(v.shape)))

    def initialize_variable(self, keras_variable, value, upstream) -> None:
        """A variable created after the split (optimizer slots, metric state):
        a slot follows its weight's layout; the rest is replicated on the last mesh."""
        layout = keras_variable._layout
        value = dtensor_variables.initial_value(keras_variable, value)
        if not isinstance(layout, dtensor.Layout):
            layout = dtensor.Layout.replicated(self.last, value.shape.rank)
            keras_variable._layout = layout
        keras_variable._value = dtensor_variables.new_dvariable(keras_variable, value, layout)

    # ------------------------------------------------------------------ data
    def pack(self, value, stage: int):
        """A host tensor -> a DTensor on `stage`'s mesh, split on the batch axis."""
        if value is None:
            return None
        value = tf.convert_to_tensor(value)
        mesh = self.meshes[stage]
        if value.shape.rank == 0:
            return to_layout(value, dtensor.Layout.replicated(mesh, 0))
        if int(value.shape[0]) % self.data:
            raise StageMeshError(
                f"a micro-batch of {int(value.shape[0])} rows cannot be split over the "
                f"{self.data} data-parallel replicas of each stage; use a batch size that "
                f"divides by microbatches x {self.data}.")
        return to_layout(value, dtensor.Layout.batch_sharded(mesh, BATCH_AXIS, value.shape.rank))

    def pack_microbatches(self, data, num: int) -> list:
        """[(x, y, sample_weight) of micro-batch i]: x on the first mesh, y and
        sample_weight on the last (where the loss is computed)."""
        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
        cut = lambda t: [None] * num if t is None else tf.split(tf.convert_to_tensor(t), num)
        xs = [cut(t) for t in tf.nest.flatten(x)]
        ys = [cut(t) for t in tf.nest.flatten(y)]
        ws = [cut(t) for t in tf.nest.flatten(sample_weight)]
        first, last = 0, self.loss_index
        return [(tf.nest.pack_sequence_as(x, [self.pack(p[i], first) for p in xs]),
                 tf.nest.pack_sequence_as(y, [self.pack(p[i], last) for p in ys]),
                 tf.nest.pack_sequence_as(sample_weight, [self.pack(p[i], last) for p in ws]))
                for i in range(num)]

    def send(self, value, source: int, target: int):
        """An activation or gradient of stage mesh `source` -> the same tensor on `target`'s."""
        if source == target:
            return value

        def one(t):
            if t is None:
                return None
            rank = t.shape.rank
            t = dtensor.relayout(t, dtensor.Layout.replicated(self.meshes[source], rank))
            t = dtensor.copy_to_mesh(t, dtensor.Layout.replicated(self.meshes[target], rank))
            if rank == 0:
                return t
            return dtensor.relayout(
                t, dtensor.Layout.batch_sharded(self.meshes[target], BATCH_AXIS, rank))

        return tf.nest.map_structure(one, value)

    def to_host(self, value):
        """Step outputs (DTensors on a mesh) -> host tensors."""
        def one(t):
            if isinstance(t, tf.Tensor) and tf.executing_eagerly() and dtensor.is_dtensor(t):
                return gather(t)
            return t
        return tf.nest.map_structure(one, value)

    # ------------------------------------------------------------ ordering
    @staticmethod
    def after(value, previous):
        """`value`, data-dependent on `previous` (every output of the device's
        previous action), so the executor cannot start this action's
        dependent ops before that action ended: its last op is one of them."""
        previous = [t for t in tf.nest.flatten(previous) if t is not None]
        if not previous or value is None:
            return value
        # Every output, not one: an action's outputs end at different times,
        # and an order on the smallest one let the next backward end before
        # the previous one did (a profiled interleaved 1F1B step on a loaded
        # machine). Each sum reads its tensor once, as the gradient
        # accumulation does; on a sharded tensor it is a scalar all-reduce
        # inside the stage's mesh.
        s = tf.stop_gradient(tf.add_n([tf.reduce_sum(tf.cast(t, tf.float32))
                                       for t in previous]))
        never = tf.logical_and(tf.math.is_nan(s), tf.math.is_finite(s))

        def one(t):
            if t is None or not (t.dtype.is_floating or t.dtype.is_integer):
                return t
            return t + tf.cast(never, t.dtype)

        return tf.nest.map_structure(one, value)

    # ------------------------------------------------------------ optimizer
    def check_optimizer(self, optimizer) -> None:
        if isinstance(optimizer, keras.optimizers.LossScaleOptimizer):
            raise StageMeshError(
                "a LossScaleOptimizer (mixed_float16) is not supported with tensor-parallel "
                "pipeline stages: its loss scale would have to be shared by every stage's "
                "mesh. Use mixed_bfloat16 (no loss scaling) or float32.")
        for attribute, why in (("gradient_accumulation_steps", "accumulate micro-batches "
                                "instead (microbatches=)"), ("use_ema", "train without EMA")):
            if getattr(optimizer, attribute, None):
                raise StageMeshError(
                    f"optimizer {attribute}={getattr(optimizer, attribute)!r} is not supported "
                    f"with tensor-parallel pipeline stages; {why}.")

    def _mirrors(self, optimizer):
        if self.mirrors is None:
            mirrors = {}
            for k, mesh in enumerate(self.meshes):
                if k == self.loss_index:
                    continue
                with tf.init_scope():
                    counter = keras.Variable(0, dtype=optimizer.iterations.dtype,
                                             trainable=False, name=f"iterations_on_stage_{k}")
                    rate = keras.Variable(0.0, dtype="float32", trainable=False,
                                          name=f"learning_rate_on_stage_{k}")
                for v in (counter, rate):
                    self.place(v, dtensor.Layout.replicated(mesh, 0))
                mirrors[k] = (counter, rate)
            self.mirrors = mirrors
        return self.mirrors

    def apply_gradients(self, optimizer, grads, variables, stage_of) -> None:
        """One optimizer step over variables of every stage mesh.

        `stage_of[id(v)]` is the mesh index of each variable. The loss's mesh
        holds the optimizer's own step counter (and learning rate); the other
        meshes apply first, with copies of both taken before the loss mesh's
        apply increments the counter.
        """
        mirrors = self._mirrors(optimizer)
        last = self.loss_index
        if optimizer.global_clipnorm and not optimizer.clipnorm:
            grads = self._clip_by_global_norm(grads, variables, stage_of,
                                              optimizer.global_clipnorm)
        counter = optimizer._iterations
        rate = optimizer._learning_rate
        rate_is_variable = isinstance(rate, keras.Variable)
        # The global norm is taken above, over every mesh; per mesh it must not
        # be taken again.
        with _swapped(optimizer, "global_clipnorm", None):
            for k in [i for i in range(len(self.meshes)) if i != last] + [last]:
                pairs = [(g, v) for g, v in zip(grads, variables) if stage_of[id(v)] == k]
                if not pairs:
                    continue
                if k == last:
                    optimizer.apply([g for g, _ in pairs], [v for _, v in pairs])
                    continue
                copy_counter, copy_rate = mirrors[k]
                copy_counter.assign(self.send(counter.value, last, k))
                with _swapped(optimizer, "_iterations", copy_counter):
                    if rate_is_variable:
                        copy_rate.assign(self.send(rate.value, last, k))
                        with _swapped(optimizer, "_learning_rate", copy_rate):
                            optimizer.apply([g for g, _ in pairs], [v for _, v in pairs])
                    else:  # a float, or a schedule of the (swapped) counter
                        optimizer.apply([g for g, _ in pairs], [v for _, v in pairs])

    def _clip_by_global_norm(self, grads, variables, stage_of, clip_norm):
        """Keras's `clip_by_global_norm` over gradients on several meshes: each
        mesh sums its squares, the sums meet on the loss's mesh, and the
        scale goes back to every mesh."""
        last = self.loss_index
        sums = []
        for k in range(len(self.meshes)):
            mine = [g for g, v in zip(grads, variables) if g is not None and stage_of[id(v)] == k]
            if mine:
                squares = tf.add_n([tf.reduce_sum(tf.square(g)) for g in mine])
                sums.append(self.send(squares, k, last))
        norm = tf.sqrt(tf.add_n(sums))
        # As Keras: a no-op for a finite norm below clip_norm, NaN for a non-finite one.
        scale = clip_norm * tf.minimum(1.0 / norm, 1.0 / clip_norm) + (norm - norm)
        scales = {k: self.send(scale, last, k) for k in range(len(self.meshes))}
        return [None if g is None else g * tf.cast(scales[stage_of[id(v)]], g.dtype)
                for g, v in zip(grads, variables)]


@contextlib.contextmanager
def _swapped(obj, attribute, value):
    saved = getattr(obj, attribute)
    setattr(obj, attribute, value)
    try:
        yield
    finally:
        setattr(obj, attribute, saved)


def stage_devices(devices: list[str], stages: int, data: int, tensor: int) -> list[list[str]]:
    """K lists of D*T devices from a flat list, pipeline-outermost."""
    per = data * tensor
    if len(devices) < stages * per:
        raise MeshError(
            f"pipeline {stages} x data {data} x tensor {tensor} needs {stages * per} devices; "
            f"this process has {len(devices)}. On a CPU: tfpar.simulate_devices("
            f"{stages * per}) (--num_simulated_devices={stages * per}).")
    return [devices[k * per:(k + 1) * per] for k in range(stages)]
