"""Pipelines of tensor-parallel stages that live in different processes: one program per process.

`Pipeline(stages=K, tensor_parallel=T, process_group=group)` on K processes
puts stage k on process k's own devices, as a DTensor mesh "batch:D,model:T"
(tensor parallel inside the node, pipeline across nodes: the layout large
runs use). Every process runs the same script and the same `model.fit`;
each runs only its own stage's actions, in the schedule's order, and the
activations and gradients between neighbouring stages cross as messages of
a `tfpar.cluster.process_group.ProcessGroup`: multiple programs, multiple
data, as torch.distributed.pipelining and Megatron-core run pipelines.

Why not one program (measured, BUILD_NOTES "Pipelines across processes"):
a single controller cannot drive DTensor meshes on other processes' devices
(DTensor's functions are not registered remotely), DTensor copies between
meshes only of the same processes, and in a multi-client job the stage
meshes of different processes collide in their collective group keys. Each
process's own mesh, driven by that process, is the in-process 3-D runner's
stage mesh (`tfpar.strategies.pipeline.stage_meshes`) unchanged.

What one process does per batch (every process gets the whole batch):

- its actions (`Schedule.creation_order` filtered to its rank) run one by
  one: a forward calls the stage's compiled function under a
  `tf.GradientTape` kept until its backward (no recomputation: the tape
  holds the forward's activations, as the in-process runner's do); a
  forward's output is sent to the next stage's process, a backward's input
  gradient to the previous one's; a receive waits for its message (and
  fails at once when the peer is lost);
- gradients are accumulated densely over micro-batches (each loss weighted
  1/M), the stage's variables take one optimizer step;
- the process of the model's last stage computes the loss and metrics and
  sends the logs to every other process, so every process's `fit` reports
  (and its callbacks see) the same numbers.

Saving: a process holds only its own stages' current weights and optimizer
state. `gather_weights(model)` (a collective) sends every stage's to rank 0,
which then holds the whole model; `Model.save`/`save_weights` and tfpar's
checkpoint callbacks call it on every process before rank 0 writes, so a
checkpoint is the whole model and loads into a plain one. Every process
restores from it.

Example (run on every process under `tfpar launch --nproc 2`)::

    tfpar.simulate_devices(2)
    group = ProcessGroup.from_cluster(tfpar.cluster.Cluster.from_env())
    strategy = tfpar.Pipeline(stages=2, tensor_parallel=2, microbatches=4,
                              process_group=group)
    with strategy.scope():
        model = tfpar.models.gpt("tiny")
        model.compile(optimizer=keras.optimizers.AdamW(1e-3), loss=tfpar.models.lm_loss())
    model.fit(x, y, batch_size=16)           # the same x, y on every process
"""

from __future__ import annotations

import contextlib
import os
import time
import types

import keras
import numpy as np
import tensorflow as tf
from tensorflow.experimental import dtensor

from tfpar.compat import dtensor_variables
from tfpar.compat.dtensor_variables import gather
from tfpar.strategies import registry
from tfpar.strategies.pipeline import microbatch
from tfpar.strategies.pipeline.runner import PipelineConfigError
from tfpar.strategies.pipeline.schedules import BACKWARD, FORWARD
from tfpar.strategies.pipeline.timeline import Span
from tfpar.strategies.pipeline.stage_meshes import StageMeshError, _swapped
from tfpar.strategies.sharded import shard_on_axis
from tfpar.strategies.tensor.mesh import BATCH_AXIS


# What makes a process one client of a multi-client DTensor mesh (set by
# `tfpar launch` and the pods for TensorParallel). Here each process's mesh is
# its own: as a client of a shared one, its meshes would be named by the job
# ("/job:worker/task:0/...") and collide in their collective groups.
DTENSOR_CLIENT_VARIABLES = ("DTENSOR_JOBS", "DTENSOR_CLIENT_ID", "DTENSOR_NUM_CLIENTS",
                            "DTENSOR_JOB_NAME")


def use_local_meshes() -> None:
    """Makes this process's DTensor meshes its own (single-client), whatever the
    launcher exported; call it before the first mesh."""
    for name in DTENSOR_CLIENT_VARIABLES:
        os.environ.pop(name, None)


class ProcessStages:
    """This process's stages of a pipeline across processes, and what crosses to the others.

    Built by `Pipeline` when given a `process_group`; `meshes` is the
    `StageMeshes` of this process's one mesh.
    """

    def __init__(self, group, meshes, stages: int):
        if group.size % stages:
            raise PipelineConfigError(
                f"stages={stages} do not divide the {group.size} processes of the group: "
                "each stage is held by the same number of processes (its data-parallel "
                f"replicas). Use a number of stages that divides {group.size}.")
        self.group, self.meshes = group, meshes
        self.rank = group.rank
        # Processes are ordered pipeline-outermost, then data (as
        # `ParallelDims.coordinates` orders devices): process k*R + r holds
        # replica r of pipeline device k.
        self.replicas = group.size // stages  # R: processes per stage
        self.device, self.replica = divmod(self.rank, self.replicas)
        self.mine: list = []  # this process's stages
        self.owned: set[int] = set()  # ids of the variables this process trains
        self._building_slots = False
        self._logs: dict = {}

    # ------------------------------------------------------------ variables
    def place(self, stages, model) -> None:
        """This process's stages' variables onto its mesh; the optimizer's step
        counter and learning rate (and, on the loss's process, the metrics) too."""
        owner = {}
        for stage in stages:
            for v in stage.variables:
                if owner.setdefault(id(v), stage.rank) != stage.rank:
                    raise StageMeshError(
                        f"weight {v.path!r} is used by the stages of pipeline devices "
                        f"{owner[id(v)]} and {stage.rank} (a tied embedding?); a weight must "
                        "live in one process. Untie it, or cut the model so that both uses "
                        "fall in stages of one process (split_points).")
        self.mine = [s for s in stages if s.rank == self.device]
        for stage in self.mine:
            for v in stage.variables:
                if id(v) in self.owned:
                    continue
                self.owned.add(id(v))
                layout = self.meshes.layout(0, v.path, v.shape)
                if self.meshes.shard_weights and v.trainable:
                    layout = shard_on_axis(layout, v.shape, BATCH_AXIS)
                self.meshes.place(v, layout)
        others = list(getattr(model.optimizer, "variables", ()))
        if stages[-1].rank == self.device:
            for metric in model.metrics:
                others += list(metric.variables)
        else:
            # Keras's end-of-epoch logs are the model's own metric results
            # (`Trainer._get_metrics_result_or_logs`), which only the loss's
            # process computes: the others report the logs it sent.
            model.get_metrics_result = lambda: dict(self._logs)
        for v in others:
            if not dtensor_variables.is_dvariable(v):
                self.meshes.place(v, dtensor.Layout.replicated(self.meshes.last, len(v.shape)))

    def build_optimizer(self, model) -> None:
        """Slots of this process's weights on its mesh; of the others', host copies
        (rank 0 gathers into them to save the whole model)."""
        self._building_slots = True
        try:
            model.optimizer.build(model.trainable_variables)
        finally:
            self._building_slots = False

    def initialize_variable(self, keras_variable, value, upstream) -> None:
        layout = getattr(keras_variable, "_layout", None)
        if self._building_slots and not isinstance(layout, dtensor.Layout):
            upstream(keras_variable, value)  # the slot of another process's weight
        else:
            self.meshes.initialize_variable(keras_variable, value, upstream)

    def gather_weights(self, model) -> None:
        """Sends this process's weights and optimizer state to rank 0, which
        assigns them: afterwards rank 0's model is the whole current model.
        A collective: every process calls it."""
        weights = list(model.weights)
        optimizer = model.optimizer
        slots = list(getattr(optimizer, "variables", ()))
        shared = {id(getattr(optimizer, "_iterations", None)),
                  id(getattr(optimizer, "_learning_rate", None))}
        mine_w = [i for i, v in enumerate(weights) if id(v) in self.owned]
        mine_s = [i for i, v in enumerate(slots)
                  if id(v) not in shared and id(v) not in self.owned
                  and dtensor_variables.is_dvariable(v)]
        if self.rank == 0:
            for peer in range(self.replicas, self.group.size, self.replicas):
                values, meta = self.group.recv(peer, "gather")
                targets = ([weights[i] for i in meta["weights"]]
                           + [slots[i] for i in meta["slots"]])
                for variable, value in zip(targets, values):
                    variable.assign(value)
        elif self.replica == 0:  # the other replicas hold the same values
            values = [_host(weights[i]) for i in mine_w] + [_host(slots[i]) for i in mine_s]
            self.group.send(0, "gather", values, meta={"weights": mine_w, "slots": mine_s})

    # --------------------------------------------------------------- steps
    def step_function(self, pipeline, model, stages, kind: str):
        """Keras's train/test/predict function: this process's part of each batch."""
        training = kind == "train"
        # The stage and its loss are separate functions: a tape differentiates
        # a function call through all its outputs, and would feed the outputs
        # that do not reach the loss host zeros, which a DTensor function refuses.
        forward = {stage.index: tf.function(lambda inp, stage=stage: stage(inp, training)[0],
                                            autograph=False, reduce_retracing=True)
                   for stage in self.mine}
        loss_of = tf.function(
            lambda out, xb, yb, wb: model._compute_loss(x=xb, y=yb, y_pred=out, sample_weight=wb,
                                                        training=training),
            autograph=False, reduce_retracing=True)
        variables = [v for v in model.trainable_variables if id(v) in self.owned]
        stage_of = {id(v): 0 for v in variables}
        optimizer = model.optimizer

        def apply(grads, scale):
            # A global norm is taken over every process's gradients (`_clip_scale`).
            grads = [None if g is None else g * tf.cast(scale, g.dtype) for g in grads]
            with _swapped(optimizer, "global_clipnorm", None):
                self.meshes.apply_gradients(optimizer, grads, variables, stage_of)
        apply = tf.function(apply, autograph=False)
        squares = tf.function(
            lambda grads: tf.add_n([tf.reduce_sum(tf.square(tf.cast(g, tf.float32)))
                                    for g in grads if g is not None]), autograph=False)

        def finish(y, y_pred, sample_weight, total):
            if model._loss_tracker is not None:
                model._loss_tracker.update_state(total, sample_weight=tf.shape(
                    tf.nest.flatten(y_pred)[0])[0])
            return model.compute_metrics(None, y, y_pred, sample_weight=sample_weight)
        finish = tf.function(finish, autograph=False, reduce_retracing=True)

        # One call per backward adds its gradients to the sums (eager DTensor
        # adds cost a dispatch each: one per variable and micro-batch). An
        # Embedding's gradient comes as its (values, indices), summed per id
        # here (as `tf.convert_to_tensor` of IndexedSlices does): passed whole,
        # IndexedSlices make every call read their shape back from the mesh.
        def adder(stage):
            rows = [int(v.shape[0]) if len(v.shape) else 1 for v in stage.trainable_variables]

            def add(sums, grads):
                dense = [g if not isinstance(g, tuple) else
                         tf.math.unsorted_segment_sum(g[0], g[1], n) for g, n in zip(grads, rows)]
                return [g if a is None else (a if g is None else a + g)
                        for a, g in zip(sums, dense)]
            return tf.function(add, autograph=False)
        # One per stage (a process holds several under interleaved schedules):
        # each traces its own variables' structure once.
        add = {stage.index: adder(stage) for stage in self.mine}
        compiled = types.SimpleNamespace(forward=forward, loss_of=loss_of, apply=apply,
                                         squares=squares, finish=finish, variables=variables,
                                         add=add)

        def run(data):
            return self._run(pipeline, model, stages, data, kind, compiled)

        if kind == "predict":
            return lambda batches: microbatch.merge([run(b) for b in batches])

        return registry.host_loop(model, run)

    def _run(self, pipeline, model, stages, data, kind, compiled):
        """This process's actions on one batch; returns the batch's logs (or predictions)."""
        forward, loss_of, variables = compiled.forward, compiled.loss_of, compiled.variables
        group, meshes = self.group, self.meshes
        training = kind == "train"
        if kind == "predict":
            data = keras.utils.unpack_x_y_sample_weight(data)[0]
            x, y, sample_weight = data, None, None
        else:
            x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
        if self.replicas > 1:  # this replica's rows of the global batch
            x, y, sample_weight = (self._rows(t) for t in (x, y, sample_weight))
            data = x if kind == "predict" else (x, y, sample_weight)
        m = pipeline._microbatches_for(data, kind)
        K = pipeline.num_stages
        if training and pipeline.schedule.check(K, m):
            raise PipelineConfigError(
                f"a training batch runs as {m} micro-batches: " + pipeline.schedule.check(K, m)
                + f" Use a batch size that divides by microbatches ({pipeline.num_microbatches}).")
        # Each replica's micro-batch loss is a mean over its rows: weighted
        # 1/(R*M), the replicas' gradient sum is the whole batch's mean loss's.
        weight = 1.0 / (self.replicas * m)
        parts = microbatch.split((x, y, sample_weight), m)
        order = [a for a in pipeline.schedule.creation_order(K, m, forward_only=not training)
                 if stages[a.stage].rank == self.device]
        pack = lambda value: tf.nest.map_structure(lambda t: meshes.pack(t, 0), value)
        acts, tapes, targets, inputs, input_grads = {}, {}, {}, {}, {}
        outputs, losses = {}, []
        timeline = pipeline.timeline if training else None
        step = timeline.next_step() if timeline is not None else None
        spans = []  # (device, microbatch, kind, start, end, model stage)
        sums = {}  # stage -> its trainable variables' gradient sums

        def accumulate(s, grads):
            grads = [(g.values, g.indices) if isinstance(g, tf.IndexedSlices) else g
                     for g in grads]
            sums[s] = compiled.add[s](sums.get(s, [None] * len(grads)), grads)

        for action in order:
            s, mb = action.stage, action.microbatch
            stage = stages[s]
            xb, yb, wb = parts[mb]
            if action.kind == FORWARD:
                if s == 0:
                    inp = pack(xb)
                elif stages[s - 1].rank == self.device:
                    inp = acts.pop((s - 1, mb))
                else:
                    inp = self._receive(self.peer(stages[s - 1].rank), f"F{s - 1}.{mb}",
                                        stage.spec.inputs)
                began = time.perf_counter()
                tape = tf.GradientTape() if training else contextlib.nullcontext()
                with tape:
                    if training and s > 0:
                        tape.watch([t for t in tf.nest.flatten(inp) if t.dtype.is_floating])
                    out = forward[s](inp)
                    loss = target = None
                    if stage.is_last and kind != "predict":
                        loss = loss_of(out, pack(xb), pack(yb), pack(wb))
                    if training:
                        target = (model.optimizer.scale_loss(loss) * weight if stage.is_last
                                  else out)
                if loss is not None:
                    losses.append(loss * weight)
                if timeline is not None:
                    _wait_for(out)
                spans.append((stage.rank, mb, FORWARD, began, time.perf_counter(), s))
                if stage.is_last:
                    outputs[mb] = out
                elif stages[s + 1].rank == self.device:
                    acts[(s, mb)] = out
                else:
                    self._send(self.peer(stages[s + 1].rank), f"F{s}.{mb}", out)
                if training:
                    tapes[(s, mb)], inputs[(s, mb)], targets[(s, mb)] = tape, inp, target
            else:  # BACKWARD (split-backward schedules are refused)
                if stage.is_last:
                    upstream = None
                elif stages[s + 1].rank == self.device:
                    upstream = input_grads.pop((s + 1, mb))
                else:
                    upstream = self._receive(self.peer(stages[s + 1].rank), f"B{s + 1}.{mb}",
                                             stage.spec.outputs, gradients=True)
                began = time.perf_counter()
                received = tf.nest.flatten(inputs.pop((s, mb))) if s > 0 else []
                sources = list(stage.trainable_variables)
                grads = tapes.pop((s, mb)).gradient(
                    targets.pop((s, mb)), sources + received, output_gradients=upstream)
                accumulate(s, grads[:len(sources)])
                grads = grads[len(sources):]
                if timeline is not None:
                    _wait_for([sums[s], grads])
                spans.append((stage.rank, mb, BACKWARD, began, time.perf_counter(), s))
                if s > 0:
                    if stages[s - 1].rank == self.device:
                        input_grads[(s, mb)] = grads
                    else:
                        self._send(self.peer(stages[s - 1].rank), f"B{s}.{mb}", grads)

        if timeline is not None:
            self._record(timeline, step, spans)
        if training:
            summed = {id(v): g for st in self.mine if st.index in sums
                      for v, g in zip(st.trainable_variables, sums[st.index])}
            grads = self._sum_over_replicas([summed.get(id(v)) for v in variables])
            compiled.apply(grads, self._clip_scale(model.optimizer, grads, compiled.squares))
        last = stages[-1].rank
        # This replica's chain: the processes of every pipeline device but the last.
        chain = [self.peer(k) for k in range(K) if k != last]
        loss_group = [last * self.replicas + r for r in range(self.replicas)]
        if kind == "predict":
            if self.device == last:
                y_pred = meshes.to_host(microbatch.merge([outputs[mb] for mb in range(m)]))
                flat = self._concat_over(loss_group, "predict",
                                         [np.asarray(t) for t in tf.nest.flatten(y_pred)])
                for peer in chain:
                    group.send(peer, "predict", flat)
            else:
                flat, _ = group.recv(self.peer(last), "predict")
            # Keras's predict loop takes tensors.
            return tf.nest.pack_sequence_as(stages[-1].spec.outputs,
                                            [tf.constant(a) for a in flat])
        if self.device == last:
            y_pred = microbatch.merge([outputs[mb] for mb in range(m)])
            logs = compiled.finish(pack(y), y_pred, pack(sample_weight), tf.add_n(losses))
            logs = {k: float(np.asarray(gather(v) if dtensor.is_dtensor(v) else v))
                    for k, v in logs.items()}
            logs = self._mean_over(loss_group, logs)
            for peer in chain:
                group.send(peer, "logs", meta=logs)
        else:
            _, logs = group.recv(self.peer(last), "logs")
        self._logs = logs
        return logs

    def _record(self, timeline, step: int, spans: list) -> None:
        """Every process's spans of this step into rank 0's timeline. Each action
        is timed around its call, from when its input had arrived (CPU eager
        calls return when done); processes on one host share its monotonic
        clock, processes on different hosts each keep their own."""
        if self.rank != 0:
            self.group.send(0, "timeline", meta=spans)
            return
        every = {0: spans}
        for peer in range(1, self.group.size):
            every[peer] = self.group.recv(peer, "timeline")[1]
        timeline.add([Span(step, rank % self.replicas, device, mb, kind, start, end, model)
                      for rank, rows in every.items()
                      for device, mb, kind, start, end, model in rows])

    # ------------------------------------------------------------ replicas
    def peer(self, device: int) -> int:
        """The process of pipeline device `device` in this process's replica."""
        return device * self.replicas + self.replica

    def _rows(self, value):
        """This replica's rows of a global batch (its R-th share, in order)."""
        def one(t):
            if t is None:
                return None
            t = tf.convert_to_tensor(t)
            rows = int(t.shape[0])
            if rows % self.replicas:
                raise PipelineConfigError(
                    f"a batch of {rows} rows cannot be split over the {self.replicas} "
                    f"processes that hold each stage; use a batch size that divides by "
                    f"{self.replicas} x microbatches x the data devices of each process.")
            share = rows // self.replicas
            return t[self.replica * share:(self.replica + 1) * share]
        return tf.nest.map_structure(one, value)

    def _sum_over_replicas(self, grads):
        """The gradient sum over the R processes that hold this stage (data
        parallelism across processes). Each sends the distinct shards its
        devices hold (a DTensor's components that its layout splits) to the
        others, and every process adds them in replica order, so every
        replica steps with bit-identical gradients."""
        if self.replicas == 1:
            return grads
        plans, payload = [], []
        for g in grads:
            if g is None:
                plans.append(None)
                continue
            layout = dtensor.fetch_layout(g)
            components = dtensor.unpack(g)
            keys = [_shard_key(layout, i) for i in range(len(components))]
            first = {}
            for i, key in enumerate(keys):
                first.setdefault(key, i)
            plans.append((layout, keys, list(first)))
            payload += [np.asarray(components[i]) for i in first.values()]
        group = [self.device * self.replicas + r for r in range(self.replicas)]
        for peer in group:
            if peer != self.rank:
                self.group.send(peer, "grads", payload)
        parts = {peer: (payload if peer == self.rank else self.group.recv(peer, "grads")[0])
                 for peer in group}
        summed = [part.copy() for part in parts[group[0]]]
        for peer in group[1:]:
            for total, part in zip(summed, parts[peer]):
                total += part
        out, it = [], iter(summed)
        for plan in plans:
            if plan is None:
                out.append(None)
                continue
            layout, keys, distinct = plan
            value = {key: next(it) for key in distinct}
            out.append(dtensor.pack([value[key] for key in keys], layout))
        return out

    def _mean_over(self, ranks, logs: dict) -> dict:
        """The mean of every process's logs over `ranks` (the replicas of the
        loss's stage): exact for the loss and mean metrics, whose replicas
        average equal numbers of rows."""
        if len(ranks) == 1:
            return logs
        for peer in ranks:
            if peer != self.rank:
                self.group.send(peer, "replica_logs", meta=logs)
        every = [logs if peer == self.rank else self.group.recv(peer, "replica_logs")[1]
                 for peer in ranks]
        return {k: sum(one[k] for one in every) / len(every) for k in logs}

    def _concat_over(self, ranks, tag: str, flat: list) -> list:
        """Every replica's predictions, in replica (row) order."""
        if len(ranks) == 1:
            return flat
        for peer in ranks:
            if peer != self.rank:
                self.group.send(peer, tag + "_rows", flat)
        every = [flat if peer == self.rank else self.group.recv(peer, tag + "_rows")[0]
                 for peer in ranks]
        return [np.concatenate(parts) for parts in zip(*every)]

    def _clip_scale(self, optimizer, grads, squares) -> float:
        """Keras's global-norm clipping factor, the norm taken over every stage's
        gradients: each process sums its squares, the sums meet in every process."""
        clip_norm = optimizer.global_clipnorm
        if not clip_norm:
            return 1.0
        mine = [g for g in grads if g is not None]
        local = float(np.asarray(gather(squares(mine)))) if mine else 0.0
        # Every replica of a stage holds the same (summed) gradients: count them once.
        norm = float(np.sqrt(self.group.all_sum(local, tag="clip") / self.replicas))
        # As Keras: a no-op below clip_norm, NaN for a non-finite norm.
        with np.errstate(divide="ignore", invalid="ignore"):
            return float(clip_norm * min(1.0 / norm, 1.0 / clip_norm) + (norm - norm))

    # ------------------------------------------------------------ transport
    def _scatter(self, array: np.ndarray):
        """A received activation (or gradient) -> a DTensor on this process's mesh,
        split on its batch axis: each device's component packed directly."""
        meshes = self.meshes
        mesh = meshes.meshes[0]
        if array.ndim == 0:
            return meshes.pack(array, 0)
        if array.shape[0] % meshes.data:
            return meshes.pack(array, 0)  # raises, naming the rule
        rows = np.split(array, meshes.data)
        # Devices are batch-major: device b*T + t holds rows b.
        components = [rows[i // meshes.tensor] for i in range(meshes.data * meshes.tensor)]
        return dtensor.pack(components, dtensor.Layout.batch_sharded(mesh, BATCH_AXIS, array.ndim))

    def _send(self, peer: int, tag: str, value) -> None:
        flat = [None if t is None else (_assemble(t) if dtensor.is_dtensor(t) else np.asarray(t))
                for t in tf.nest.flatten(value)]
        self.group.send(peer, tag, flat)

    def _receive(self, peer: int, tag: str, structure, gradients: bool = False):
        flat, _ = self.group.recv(peer, tag)
        packed = [None if a is None else self._scatter(a) for a in flat]
        if gradients:
            return packed  # output_gradients: a flat list, as the tape flattens its target
        return tf.nest.pack_sequence_as(structure, packed)


def _wait_for(values) -> None:
    """Returns once `values` are computed: a DTensor function call may return
    before its devices finish, and a span must end when they have."""
    for t in tf.nest.flatten(values):
        if t is not None and dtensor.is_dtensor(t):
            dtensor.unpack(t)


def _assemble(value) -> np.ndarray:
    """A DTensor of this process's mesh -> its whole value, from its local
    components (no collective: one process holds every device of its mesh)."""
    layout = dtensor.fetch_layout(value)
    mesh, specs = layout.mesh, layout.sharding_specs
    sizes = [mesh.dim_size(name) for name in mesh.dim_names]
    pieces = {}
    for i, component in enumerate(dtensor.unpack(value)):
        coords = dict(zip(mesh.dim_names, np.unravel_index(i, sizes)))
        pieces.setdefault(tuple(0 if a == dtensor.UNSHARDED else int(coords[a]) for a in specs),
                          component)

    def build(prefix, dim):
        if dim == len(specs):
            return np.asarray(pieces[prefix])
        count = 1 if specs[dim] == dtensor.UNSHARDED else mesh.dim_size(specs[dim])
        parts = [build(prefix + (j,), dim + 1) for j in range(count)]
        return parts[0] if count == 1 else np.concatenate(parts, axis=dim)

    return build((), 0)


def _host(variable):
    """A Keras variable's value as a NumPy array (a DVariable's gathered from its mesh)."""
    if dtensor_variables.is_dvariable(variable):
        return np.asarray(gather(variable._value.read_value()))
    return np.asarray(variable.value)


def _shard_key(layout, component: int) -> tuple:
    """Which shard of a DTensor with `layout` local component `component`
    holds: its coordinates on the mesh axes the layout splits (components
    that differ only on the other axes are copies)."""
    mesh = layout.mesh
    sizes = [mesh.dim_size(name) for name in mesh.dim_names]
    coords = np.unravel_index(component, sizes)
    split = set(layout.sharding_specs) - {dtensor.UNSHARDED}
    return tuple(int(c) for c, name in zip(coords, mesh.dim_names) if name in split)
