"""The pipeline runner: a Keras model's stages on their devices, trained by `model.fit`.

`Pipeline` is a tfpar strategy. Build and compile the model under its
scope, as with every other strategy; the first `fit`, `evaluate` or
`predict` splits the model into stages (`tfpar.strategies.pipeline.split`), moves each
stage's variables to its device, and runs every step as one `tf.function`
in which:

- the batch is cut into M micro-batches (`tfpar.strategies.pipeline.microbatch`);
- the model is cut into K*V stages (V virtual stages per device for the
  interleaved and ZB-V schedules), placed on the K devices as the schedule
  says (`Schedule.device_of`);
- each device runs its actions in the order of the schedule
  (`tfpar.strategies.pipeline.schedules`), each action under `tf.device` and
  a control dependency on the device's previous action: inside one function
  TensorFlow's executor runs whatever is ready, so without them a device
  would run any micro-batch whose input exists and the schedule (and its
  memory bound) would be lost;
- each forward records its own `GradientTape`, and each backward asks it
  for the stage's gradients given the next stage's input gradient
  (`output_gradients`), so the backward runs on the stage's device too.
  Zero-bubble schedules split the backward in two actions (see
  `_input_gradients` and `_weight_gradients`);
- gradients are accumulated densely over micro-batches (and summed over
  replicas in the hybrid), each micro-batch loss weighted 1/(R*M): the
  gradient of the mean loss over the whole batch, exactly;
- one optimizer step follows, and metrics are computed once over the
  whole batch's predictions.

The model stays an ordinary Keras model: `get_weights`, `save`,
`save_weights` and `load_weights` work as usual, and a saved model loads
without tfpar.

Example::

    tfpar.simulate_devices(4)
    strategy = tfpar.Pipeline(stages=4, microbatches=8, schedule="1f1b")
    with strategy.scope():
        model = tfpar.models.gpt("tiny")
        model.compile(optimizer=keras.optimizers.AdamW(1e-3), loss=tfpar.models.lm_loss())
    model.fit(tokens, targets, batch_size=64, epochs=1)
    strategy.stages    # [StageSpec(layers=[token_embedding, ...], device=...), ...]
"""

from __future__ import annotations

import contextlib
import logging

import keras
import numpy as np
import tensorflow as tf

from tfpar import compat
from tfpar.strategies.pipeline import microbatch, schedules, split
from tfpar.strategies.pipeline.stage_meshes import StageMeshes, stage_devices
from tfpar.strategies.pipeline.schedules import BACKWARD, FORWARD
from tfpar.strategies.pipeline.timeline import Timeline
from tfpar.parallel_dims import ParallelDims
from tfpar.strategies import registry
from tfpar.strategies.base import StrategyBase, variable_bytes_per_device
from tfpar.strategies.tensor.mesh import BATCH_AXIS

log = logging.getLogger("tfpar")


class PipelineConfigError(ValueError):
    """A Pipeline was asked for something it cannot do."""


class Stage:
    """What runs on one device: a contiguous run of the model's operations."""

    def __init__(self, spec: split.StageSpec, devices: list[str], is_last: bool,
                 rank: int = 0, layer_outputs: list | None = None):
        self.spec, self.index, self.is_last = spec, spec.index, is_last
        self.rank = rank  # the device's position in the pipeline (0 .. K-1)
        self.devices = devices  # one per replica; replica 0's holds the variables
        self.model = keras.Model(spec.inputs, spec.outputs, name=f"stage_{spec.index}")
        # For a split backward: the stage also returns the output of every
        # operation that has trainable weights (see `_input_gradients`).
        self.weighted = []  # (operation, its output KerasTensors)
        if layer_outputs is not None:
            self.weighted = [(op, outs) for op, outs in zip(spec.operations, layer_outputs)
                             if getattr(op, "trainable_weights", None)]
            flat_out = keras.tree.flatten(spec.outputs)
            # A Keras model cannot list one tensor twice among its outputs.
            unique, self._where = list(flat_out), []
            for _, outs in self.weighted:
                for t in outs:
                    if not any(t is u for u in unique):
                        unique.append(t)
                    self._where.append(next(i for i, u in enumerate(unique) if u is t))
            self.model = keras.Model(spec.inputs, unique, name=f"stage_{spec.index}")
            self._num_outputs = len(flat_out)
        seen = set()
        self.trainable_variables = []
        self.variables = []
        for op in spec.operations:
            for v in getattr(op, "variables", ()):
                if id(v) not in seen:
                    seen.add(id(v))
                    self.variables.append(v)
                    if v.trainable and any(v is w for w in op.trainable_weights):
                        self.trainable_variables.append(v)

    @property
    def device(self) -> str:
        return self.devices[0]

    def __call__(self, inputs, training):
        """(the stage's output, [outputs of each weighted operation] or None)."""
        result = self.model(inputs, training=training)
        if not self.weighted:
            return result, None
        result = keras.tree.flatten(result)
        out = keras.tree.pack_sequence_as(self.spec.outputs, result[:self._num_outputs])
        where = iter(self._where)
        return out, [[result[next(where)] for _ in outs] for _, outs in self.weighted]

    def __repr__(self):
        return (f"Stage({self.index}, layers={self.spec.layer_names}, device={self.device!r}, "
                f"parameters={self.spec.parameters})")


class Pipeline(StrategyBase):
    """Pipeline parallelism: consecutive blocks of a model on consecutive devices.

    Args:
      stages: K, the number of stages (cuts balance the parameter counts,
        or `costs`). Default: as many as `devices` (per replica) or local
        devices allow.
      split_points: names of the layers that begin stages 1..K*V-1, instead.
      microbatches: M; each batch is cut into M equal micro-batches (a batch
        that M does not divide uses M's largest divisor that does).
      virtual_stages: V, stages per device (the model is cut into K*V):
        for "interleaved_1f1b" (default 2) and "zbv" (always 2).
      schedule: "1f1b" (default: GPipe's bubble, at most K micro-batches stashed),
        "gpipe", "interleaved_1f1b" (bubble V times smaller; M a multiple of K),
        "zb_h1" (backward split in input and weight gradients: a third of
        1F1B's bubble), "zbv" (V shape, split backward: bubble near zero), or
        a `tfpar.strategies.pipeline.Schedule`.
      devices: K*R device names (replica-major) or R lists of K. Default:
        the first K*R local GPUs, else logical CPUs. Remote devices
        ("/job:worker/replica:0/task:1/device:CPU:0", after
        `tf.config.experimental_connect_to_cluster`) put stages on other hosts.
      replicas: R, data-parallel copies of the pipeline (the hybrid): each
        gets 1/R of every batch; gradients are summed onto the devices of
        replica 0, which hold the variables. With `tensor_parallel`, the
        batch axis of every stage's mesh instead.
      tensor_parallel: T > 1 makes each stage tensor-parallel over T devices
        (and data-parallel over R): stage k runs on the DTensor mesh
        "batch:R,model:T" of devices k*R*T .. (k+1)*R*T-1, its weights split
        by `layout_map` (`tfpar.strategies.pipeline.stage_meshes`).
      fsdp: F > 1 shards each stage's weights, gradients and optimizer state
        over F data devices of its mesh (ZeRO-3 / FSDP inside the stage; the
        mesh is "batch:F,model:T"): a layer's read all-gathers its weight, the
        backward reduce-scatters the gradient. Not with `replicas`.
      layout_map: the stages' LayoutMap preset ("megatron") or a callable
        keras DeviceMesh -> LayoutMap (e.g. a keras-hub backbone's
        `get_layout_map`), with `tensor_parallel`.
      costs: {layer name: cost} to balance by instead of parameter counts.
      record_timeline: record every action's span (`self.timeline`; with a
        process_group, rank 0's has every process's, one lane each).
      process_group: a `tfpar.cluster.process_group.ProcessGroup` of K
        processes: stage k lives in process k, on that process's own
        `devices` (its mesh "batch:replicas*fsdp,model:tensor_parallel");
        every process runs the same script and `fit`, and runs its own
        stage's actions (`tfpar.strategies.pipeline.process_stages`).

    The model is built and compiled under `scope()`; its first use splits
    it. Models the splitter cannot cut raise `PipelineSplitError` saying why.

    Example::

        strategy = tfpar.Pipeline(split_points=["block_2"], microbatches=4)
        with strategy.scope():
            model = tfpar.models.gpt("mini")
            model.compile(optimizer="adamw", loss=tfpar.models.lm_loss())
        model.fit(x, y, batch_size=32)
    """

    kind = "pipeline"

    def __init__(self, stages: int | None = None, split_points=None, microbatches: int = 1,
                 schedule="1f1b", devices=None, replicas: int = 1, costs: dict | None = None,
                 record_timeline: bool = False, virtual_stages: int | None = None,
                 tensor_parallel: int = 1, layout_map="megatron", fsdp: int = 1,
                 process_group=None):
        try:
            self.schedule = schedules.get(schedule, virtual_stages)
        except ValueError as e:
            raise PipelineConfigError(str(e)) from e
        v = self.schedule.virtual_stages
        if split_points is not None and isinstance(split_points, str):
            split_points = [p for p in split_points.split(",") if p]
        if split_points:
            pieces = len(split_points) + 1
            if pieces % v or stages not in (None, 0, pieces // v):
                how = ("give K-1 split points for K stages" if v == 1 else
                       f"give K*V-1 split points for K devices of V={v} stages each")
                raise PipelineConfigError(
                    f"stages={stages}, virtual_stages={v} but split_points="
                    f"{list(split_points)} make {pieces} stages; {how}.")
            stages = pieces // v
        if stages is not None and stages < 0:
            raise PipelineConfigError(f"stages={stages}: must be >= 1 (or 0/None: one per device).")
        if not isinstance(microbatches, int) or microbatches < 1:
            raise PipelineConfigError(f"microbatches={microbatches!r}: must be an integer >= 1.")
        if not isinstance(replicas, int) or replicas < 1:
            raise PipelineConfigError(f"replicas={replicas!r}: must be an integer >= 1.")
        if not isinstance(tensor_parallel, int) or tensor_parallel < 1:
            raise PipelineConfigError(
                f"tensor_parallel={tensor_parallel!r}: must be an integer >= 1.")
        if not isinstance(fsdp, int) or fsdp < 1:
            raise PipelineConfigError(f"fsdp={fsdp!r}: must be an integer >= 1.")
        if fsdp > 1 and replicas > 1:
            raise PipelineConfigError(
                f"replicas={replicas} x fsdp={fsdp}: a pipeline's stages shard their weights "
                f"over every data device of the stage; use fsdp={replicas * fsdp} (replicas=1).")
        self.split_points = list(split_points) if split_points else None
        self.num_microbatches = microbatches
        self.replicas = replicas
        self.fsdp = fsdp
        self.tensor_parallel = tensor_parallel
        # The mesh axis whose weight shards a layer's read gathers
        # (`tfpar.compat.gather_on_read`): ZeRO-3 inside each stage.
        self.batch_axis = BATCH_AXIS if fsdp > 1 else None
        self.costs = costs
        self.stage_meshes: StageMeshes | None = None
        self.processes = None  # ProcessStages, with a process_group
        if process_group is not None:
            from tfpar.strategies.pipeline.process_stages import (ProcessStages,
                                                                  use_local_meshes)

            if self.schedule.split_backward:
                raise PipelineConfigError(
                    f"schedule={self.schedule.name!r} with a process_group: a split backward "
                    "differentiates inside each stage's layers, but a process runs its stage "
                    "as one compiled function, whose tape sees only its inputs and output. "
                    "Use \"1f1b\", \"gpipe\" or \"interleaved_1f1b\".")
            stages = stages or process_group.size
            use_local_meshes()
            data = replicas * fsdp
            flat = _flat_devices(devices, 1, data * tensor_parallel)
            self.stage_meshes = StageMeshes([flat], data, tensor_parallel, layout_map,
                                            shard_weights=fsdp > 1)
            self.processes = ProcessStages(process_group, self.stage_meshes, stages)
            # One lane: pipeline device k is process k*R + r of this replica r;
            # the other processes' devices are theirs to name.
            self.devices = [[flat[0] if k == self.processes.device else
                             f"<process {self.processes.peer(k)}>" for k in range(stages)]]
        elif tensor_parallel > 1 or fsdp > 1:
            if record_timeline:
                raise PipelineConfigError(
                    "record_timeline=True with tensor_parallel or fsdp > 1: the timeline's "
                    "markers are Python calls, which DTensor programs cannot run. Record the "
                    "timeline of the same schedule on device stages.")
            data = replicas * fsdp
            flat = _flat_devices(devices, stages, data * tensor_parallel)
            rows = stage_devices(flat, len(flat) // (data * tensor_parallel),
                                 data, tensor_parallel)
            self.stage_meshes = StageMeshes(rows, data, tensor_parallel, layout_map,
                                            shard_weights=fsdp > 1)
            # One lane: the mesh of stage k is named by its first device.
            self.devices = [[row[0] for row in rows]]
        else:
            self.devices = _resolve_devices(devices, stages or None, replicas)
        self.num_stages = len(self.devices[0])  # K: devices per replica
        reason = self.schedule.check(self.num_stages, microbatches)
        if reason:
            raise PipelineConfigError(reason)
        if record_timeline and self.spans_processes and self.processes is None:
            raise PipelineConfigError(
                "record_timeline=True with stages on other processes' devices: the "
                "timeline's markers are Python calls, which run only in this process. Record "
                "the timeline of the same schedule on this process's devices.")
        self.timeline = Timeline() if record_timeline else None
        if self.timeline is not None and self.processes is not None:
            # Rank 0's timeline gathers every process's spans, one lane each.
            group = self.processes.group
            for rank in range(group.size):
                device, replica = divmod(rank, self.processes.replicas)
                self.timeline.devices[(replica, device)] = f"process {rank}"
        elif self.timeline is not None:
            for r, row in enumerate(self.devices):
                for s, device in enumerate(row):
                    self.timeline.devices[(r, s)] = device
        self.stages: list[Stage] = []
        self._warned: set[str] = set()

    # -------------------------------------------------------------- identity
    @property
    def num_replicas_in_sync(self) -> int:
        """Data-parallel replicas: a global batch must divide by it."""
        return self.replicas * self.fsdp * self._process_replicas

    @property
    def _process_replicas(self) -> int:
        # With a process group: the processes that hold each stage (R).
        return 1 if self.processes is None else self.processes.replicas

    @property
    def dims(self) -> ParallelDims:
        return ParallelDims(dp=self.replicas * self._process_replicas, fsdp=self.fsdp,
                            tp=self.tensor_parallel,
                            pp=self.num_stages,
                            microbatches=self.num_microbatches, schedule=self.schedule.name,
                            virtual_stages=self.schedule.virtual_stages)

    @property
    def spans_processes(self) -> bool:
        """Whether stages live on other processes' devices (a pipeline across
        processes): their loss is a lost peer (`tfpar.callbacks`)."""
        if self.processes is not None:
            return True
        return any(d.startswith("/job:") and not d.startswith("/job:localhost")
                   for d in self._devices())

    @property
    def num_workers(self) -> int:
        return 1 if self.processes is None else self.processes.group.size

    @property
    def worker_index(self) -> int:
        return 0 if self.processes is None else self.processes.rank

    def any_worker(self, flag: bool) -> bool:
        if self.processes is None:
            return bool(flag)
        return self.processes.group.any(flag)

    def gather_weights(self, model) -> None:
        """With a process group: rank 0's model becomes the whole current model
        (every process calls it; `Model.save` and tfpar's checkpoints do)."""
        if self.processes is not None and getattr(model, "_tfpar_pipeline_stages", None):
            self.processes.gather_weights(model)

    def _devices(self) -> list[str]:
        if self.stage_meshes is not None:
            return [str(d) for mesh in self.stage_meshes.meshes for d in mesh.local_devices()]
        return [d for row in self.devices for d in row]

    @property
    def _lanes(self) -> int:
        # Replicas the runner drives itself: with stage meshes, the data-parallel
        # replicas are each mesh's batch axis, inside every action.
        return 1 if self.stage_meshes is not None else self.replicas

    def describe(self) -> dict:
        return super().describe() | {
            "stages": self.num_stages, "microbatches": self.num_microbatches,
            "schedule": self.schedule.name, "virtual_stages": self.schedule.virtual_stages,
            "tensor_parallel": self.tensor_parallel, "fsdp": self.fsdp,
            "split": [s.spec.layer_names for s in self.stages] or None}

    # ----------------------------------------------------------------- scope
    @contextlib.contextmanager
    def scope(self):
        """Models built and compiled inside are trained by this pipeline."""
        compat.apply_keras_fixes()
        with registry.entered(self):
            yield self

    def initialize_variable(self, keras_variable, value, upstream) -> None:
        """The registry protocol: variables start on the default device and are
        moved to their stage's device when the model is first split (with stage
        meshes, those made after the split go straight to their mesh)."""
        if self.processes is not None and self.stages and not isinstance(value, tf.Variable):
            self.processes.initialize_variable(keras_variable, value, upstream)
        elif self.stage_meshes is not None and self.stages and not isinstance(value, tf.Variable):
            self.stage_meshes.initialize_variable(keras_variable, value, upstream)
        else:
            upstream(keras_variable, value)
        registry.tag(keras_variable, self)

    # ----------------------------------------------------------------- split
    def prepare(self, model: keras.Model) -> list[Stage]:
        """Splits `model` and moves each stage's variables to its device (once)."""
        if getattr(model, "_tfpar_pipeline_stages", None) is not None:
            return model._tfpar_pipeline_stages
        if model.jit_compile:
            # XLA cannot compile a function whose resources sit on several
            # devices ("Trying to access resource ... located in device ...").
            log.warning("tfpar Pipeline: jit_compile=%s is turned off; XLA cannot compile "
                        "steps that span devices.", model.jit_compile)
        model.jit_compile = False
        specs = split.plan(model, num_stages=self.num_stages * self.schedule.virtual_stages,
                           split_points=self.split_points, costs=self.costs)
        for spec in specs:
            for op in spec.operations:
                if getattr(op, "activity_regularizer", None) is not None:
                    raise split.PipelineSplitError(
                        f"layer {op.name!r} has an activity regularizer: its loss is made in "
                        f"stage {spec.index} but the loss is computed on the last stage, so "
                        "its gradient would be lost. Remove it, or use a weight regularizer.")
        graph = split.graph_of(model)
        stages = []
        for i, spec in enumerate(specs):
            rank = self.schedule.device_of(spec.index, self.num_stages)
            outputs = ([split.node_of(graph, op).outputs for op in spec.operations]
                       if self.schedule.split_backward else None)
            stages.append(Stage(spec, [row[rank] for row in self.devices], i == len(specs) - 1,
                                rank=rank, layer_outputs=outputs))
        if self.processes is not None:
            self._check_for_meshes(model)
            self.processes.place(stages, model)
        elif self.stage_meshes is not None:
            self._check_for_meshes(model)
            self.stage_meshes.place_stages(stages, model)
        else:
            for stage in stages:
                for v in stage.variables:
                    compat.place_variable(v, stage.device)
        model._tfpar_pipeline_stages = stages
        self.stages = stages
        if model.optimizer is not None and not model.optimizer.built:
            # Slots are made now, next to their (moved) variables.
            with tf.init_scope(), registry.entered(self):
                if self.processes is not None:
                    self.processes.build_optimizer(model)
                else:
                    model.optimizer.build(model.trainable_variables)
        return stages

    def _check_for_meshes(self, model):
        optimizer = model.optimizer
        if optimizer is not None:
            self.stage_meshes.check_optimizer(optimizer)
            if optimizer.built:
                raise PipelineConfigError(
                    "the optimizer was built before the pipeline split the model; with "
                    "tensor_parallel its slots must be made on each stage's mesh. Compile "
                    "under strategy.scope() and let the first fit build it.")
        if model.losses:
            raise PipelineConfigError(
                "the model has weight regularizers: their loss terms would be added on the "
                "last stage's mesh while their weights live on other stages' meshes. Remove "
                "them (use the optimizer's weight_decay), or run without tensor_parallel.")

    # ---------------------------------------------------------------- memory
    def memory_report(self, model: keras.Model) -> dict:
        """Bytes per device of parameters, gradients and optimizer state, per stage.

        Splits the model first if it is not split yet (variables and their
        slots then sit on their stage's device). The top-level figures are
        the fullest device's; `per_device` has every stage's.
        """
        stages = self.prepare(model)
        weights = {id(v) for v in model.weights}
        per_device = {}
        ranks = ([self.processes.rank] if self.processes is not None
                 else sorted({stage.rank for stage in stages}))
        for rank in ranks:
            on = [st for st in stages if st.rank == rank]
            device = on[0].device
            variables = list({id(v): v for st in on for v in st.variables}.values())
            trainable = list({id(v): v for st in on for v in st.trainable_variables}.values())
            held = {v.value.device for v in variables}
            optimizer = [v for v in getattr(model.optimizer, "variables", ())
                         if id(v) not in weights and self._holds(rank, held, v)]
            per_device[device] = {
                "parameter_bytes_per_device": variable_bytes_per_device(variables),
                "gradient_bytes_per_device": variable_bytes_per_device(trainable),
                "optimizer_bytes_per_device": variable_bytes_per_device(optimizer)}
        fullest = max(per_device.values(), key=lambda r: sum(r.values()))
        # The whole model (sharded stage weights counted whole, not per device).
        total = sum(int(np.prod(v.shape)) * np.dtype(v.dtype).itemsize for v in model.weights)
        return {**fullest, "parameter_bytes_total": total, "per_device": per_device}

    def _holds(self, rank, devices, variable) -> bool:
        """Whether pipeline device `rank` (`devices`, or its stage mesh) holds `variable`."""
        if self.stage_meshes is None:
            return variable.value.device in devices
        layout = getattr(variable, "_layout", None)
        mesh = self.stage_meshes.meshes[0 if self.processes is not None else rank]
        held_on = getattr(layout, "mesh", None)  # None: a host copy (another process's slot)
        return held_on is not None and held_on == mesh

    # --------------------------------------------------------- step functions
    def step_function(self, model, kind: str):
        """The registry protocol: Keras's "train", "test" or "predict" function."""
        stages = self.prepare(model)
        if self.processes is not None:
            return self.processes.step_function(self, model, stages, kind)
        # No autograph, as Keras's own step functions (do_not_convert): the
        # schedule is Python over static structure, and converting it cost a
        # third of the trace of an 8-stage GPT pipeline.
        compiled = tf.function(
            lambda data, m: self._step(model, stages, data, m, kind), reduce_retracing=True,
            autograph=False)

        meshes = self.stage_meshes
        if meshes is not None:
            # Micro-batches are cut and packed onto their meshes on the host
            # (DTensor cannot split a batch-sharded tensor); variables a step
            # creates while it is traced (metric state) go to the last mesh.
            def call(data):
                m = self._microbatches_for(data, kind)
                with registry.entered(self):
                    return compiled(meshes.pack_microbatches(data, m), m)
        else:
            def call(data):
                return compiled(data, self._microbatches_for(data, kind))

        if kind == "predict":
            def predict(data):
                to_host = meshes.to_host if meshes is not None else (lambda t: t)
                return microbatch.merge([to_host(call(batch)) for batch in data])
            return predict

        def run_batch(data):
            if self.timeline is not None and kind == "train":
                self.timeline.next_step()
            return call(data)

        # Logs leave the meshes once per host loop, not every step.
        return registry.host_loop(model, run_batch,
                                  None if meshes is None else meshes.to_host)

    def step_graph(self, model, data, kind: str = "train"):
        """The TensorFlow graph of one step on the batch `data` (as `fit` passes
        it: (x, y) or (x, y, sample_weight)), for inspecting what a step runs.

        Each action's ops sit under the name scope `action_scope(action)`
        ("F3_stage1": the forward of micro-batch 3 on model stage 1; replicas
        of the device hybrid add "_replica1"...). With stage meshes this is
        the function DTensor splits into one program per mesh.

        Example::

            graph = strategy.step_graph(model, (x[:16], y[:16]))
            [op.name for op in graph.get_operations() if op.name.startswith("B0_stage1/")]
        """
        if self.processes is not None:
            raise PipelineConfigError(
                "step_graph with a process_group: each process runs its own actions, one "
                "function per action; there is no single step graph.")
        stages = self.prepare(model)
        m = self._microbatches_for(data, kind)
        function = tf.function(lambda d, n: self._step(model, stages, d, n, kind),
                               autograph=False)
        with registry.entered(self):
            if self.stage_meshes is not None:
                data = self.stage_meshes.pack_microbatches(data, m)
            return function.get_concrete_function(data, m).graph

    def profile_step(self, model, x, y=None, sample_weight=None):
        """One training step on (x, y) under TensorFlow's profiler, as a `Timeline`
        of its actions: the timeline of runs whose stages are DTensor meshes
        (tensor-parallel or sharded), which `record_timeline` cannot time. One
        track per stage mesh. Train once before (tracing is not profiled);
        schedules with a split backward are refused
        (`tfpar.strategies.pipeline.profile`).

        Example::

            model.fit(x, y, batch_size=16, epochs=1)
            timeline = strategy.profile_step(model, x[:16], y[:16])
            timeline.order()[(0, 1)]      # ['F0@1', 'B0@1', 'F1@1', ...] under 1F1B
            timeline.save_chrome_trace("three_d.json")
        """
        from tfpar.strategies.pipeline.profile import profile_step

        if self.processes is not None:
            raise PipelineConfigError(
                "profile_step with a process_group: the other stages run in other processes; "
                "profile the same layout on one host.")

        return profile_step(self, model, x, y, sample_weight)

    def _microbatches_for(self, data, kind) -> int:
        rows = microbatch.rows_of(data)
        if rows % self.replicas:
            raise PipelineConfigError(
                f"a batch of {rows} rows cannot be split over {self.replicas} pipeline "
                f"replicas; use batch sizes that divide by {self.replicas}.")
        m = microbatch.count_for(rows // self.replicas, self.num_microbatches)
        if m != self.num_microbatches and kind == "train" and "partial" not in self._warned:
            self._warned.add("partial")
            log.warning("tfpar Pipeline: a training batch of %d rows per replica does not split "
                        "into %d micro-batches; it runs as %d. Use a batch size that divides "
                        "by microbatches x replicas.", rows // self.replicas,
                        self.num_microbatches, m)
        return m

    def _step(self, model, stages, data, m, kind):
        meshes = self.stage_meshes
        R, K, C = self._lanes, self.num_stages, len(stages)
        if meshes is None:
            x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
            parts = microbatch.split((x, y, sample_weight), R * m)
        else:  # micro-batches packed on their meshes (x: the first, y: the last)
            parts = data
            x = None
            y, sample_weight = (None if parts[0][i] is None else
                                microbatch.merge([p[i] for p in parts]) for i in (1, 2))
        training = kind == "train"
        if training and self.schedule.check(K, m):
            raise PipelineConfigError(
                f"a training batch runs as {m} micro-batches: "
                + self.schedule.check(K, m) + " Use a batch size that divides by "
                f"microbatches x replicas ({self.num_microbatches} x {R}).")
        split_backward = training and self.schedule.split_backward
        weight = 1.0 / (R * m)
        order = self.schedule.creation_order(K, m, forward_only=not training)
        record = self.timeline is not None and training
        last_device = stages[-1].device
        # Weight regularizers add to the loss on the last stage: there the weight
        # gradients also need the loss itself, not only the layers' outputs.
        regularized = training and bool(model.losses)

        outputs, losses = {}, []
        variable_index = {id(v): i for i, v in enumerate(model.trainable_variables)}
        sums = [dict() for _ in range(R)]  # replica -> {variable index: gradient sum}

        def accumulate(r, sources, grads):
            """Adds `grads` to replica r's sums; returns the sums it changed (the
            action's last ops: the device's next action waits for them)."""
            changed = []
            for v, g in zip(sources, grads):
                if g is None:
                    continue
                i = variable_index[id(v)]
                sums[r][i] = g if i not in sums[r] else sums[r][i] + g
                changed.append(sums[r][i])
            return changed

        for r in range(R):
            acts, tapes, targets, inputs, input_grads = {}, {}, {}, {}, {}
            layer_outputs, pending = {}, {}
            after = [[] for _ in range(K)]  # the previous action of each device
            for action in order:
                s, mb = action.stage, action.microbatch
                stage = stages[s]
                xb, yb, wb = parts[r * m + mb]
                key = (r, stage.rank, mb, action.kind, s)
                reads = [(r, stages[d.stage].rank, d.microbatch, d.kind, d.stage)
                         for d in schedules.dependencies(action, C, split_backward)]
                with tf.name_scope(action_scope(action, r)), \
                        self._on(stage, r, after[stage.rank]):
                    if action.kind == FORWARD:
                        inp = xb if s == 0 else acts[(r, s - 1, mb)]
                        if meshes is not None:
                            if s > 0:
                                inp = meshes.send(inp, stages[s - 1].rank, stage.rank)
                            inp = meshes.after(inp, after[stage.rank])
                        inp = tf.nest.map_structure(_identity, inp)
                        if record and s == 0 and mb == 0:  # the step begins
                            inp = self.timeline.mark(inp, key, begin=True)
                        tape = (tf.GradientTape(persistent=split_backward) if training
                                else _no_tape())
                        with tape:
                            if training and s > 0:
                                # A stage may receive model inputs next to the hidden
                                # state (a padding mask): only floats have gradients.
                                tape.watch([t for t in tf.nest.flatten(inp)
                                            if t.dtype.is_floating])
                            out, per_layer = stage(inp, training=training)
                            loss = None
                            if stage.is_last and kind != "predict":
                                loss = model._compute_loss(x=xb, y=yb, y_pred=out,
                                                           sample_weight=wb, training=training)
                                target = model.optimizer.scale_loss(loss) * weight \
                                    if training else None
                        raw_out = out
                        done = [out] if loss is None else [out, loss]
                        if record:
                            done = self.timeline.mark(done, key, begin=False, after=reads)
                        out = done[0]
                        weighted_loss = None
                        if loss is not None:
                            weighted_loss = done[1] * weight
                            losses.append(weighted_loss)
                        acts[(r, s, mb)] = out
                        if stage.is_last:
                            outputs[(r, mb)] = out
                        if training:
                            tapes[(s, mb)], inputs[(s, mb)] = tape, inp
                            layer_outputs[(s, mb)] = per_layer
                            # The tape's own tensor: a timeline marker is not differentiable.
                            targets[(s, mb)] = target if stage.is_last else raw_out
                        # Every output that leaves the action, the weighted loss too:
                        # the device's next action waits for all of them.
                        after[stage.rank] = [t for t in tf.nest.flatten(done) + [weighted_loss]
                                             if t is not None]
                    elif action.kind == BACKWARD:
                        upstream = None if stage.is_last else input_grads.pop((s + 1, mb))
                        if meshes is not None:
                            if upstream is None:  # the loss's own seed carries the order
                                upstream = tf.ones_like(targets[(s, mb)])
                            else:
                                upstream = meshes.send(upstream, stages[s + 1].rank, stage.rank)
                            upstream = meshes.after(upstream, after[stage.rank])
                        # Everything the stage received: the hidden state, and model
                        # inputs such as a padding mask that cross the cut with it.
                        received = tf.nest.flatten(inputs[(s, mb)]) if s > 0 else []
                        if split_backward:
                            grads = _input_gradients(
                                stage, tapes[(s, mb)], targets[(s, mb)], received,
                                layer_outputs[(s, mb)], upstream)
                        else:
                            sources = _sources(model, stage)
                            grads = tapes.pop((s, mb)).gradient(
                                targets.pop((s, mb)), sources + received,
                                output_gradients=upstream)
                            grads = [None if g is None else _dense(g) for g in grads]
                        if record:
                            grads = self.timeline.mark(grads, key, begin=False, after=reads)
                        if s > 0:
                            input_grads[(s, mb)] = (grads[:len(received)] if split_backward
                                                    else grads[len(sources):])
                            del inputs[(s, mb)]
                        if split_backward:
                            # For W: the gradients of the loss w.r.t. each layer's output.
                            pending[(s, mb)] = (upstream, grads[len(received):])
                            after[stage.rank] = [g for g in grads if g is not None]
                        else:
                            after[stage.rank] = accumulate(r, sources, grads) + [
                                g for g in grads[len(sources):] if g is not None]
                        del acts[(r, s, mb)]
                    else:  # WEIGHT
                        upstream, layer_grads = pending.pop((s, mb))
                        if meshes is not None:
                            layer_grads = meshes.after(layer_grads, after[stage.rank])
                        sources, grads = _weight_gradients(
                            model, stage, tapes.pop((s, mb)), targets.pop((s, mb)),
                            layer_outputs.pop((s, mb)), layer_grads,
                            full=stage.is_last and regularized)
                        if record:
                            grads = self.timeline.mark(grads, key, begin=False, after=reads)
                        after[stage.rank] = accumulate(r, sources, grads)

        with self._on_device(last_device):
            y_pred = microbatch.merge([outputs[(r, mb)] for r in range(R) for mb in range(m)])
        if kind == "predict":
            return y_pred
        with self._on_device(last_device):
            total = tf.add_n(losses)
        if training and meshes is not None:
            stage_of = {id(v): st.rank for st in stages for v in st.trainable_variables}
            grads = [sums[0].get(i) for i in range(len(model.trainable_variables))]
            meshes.apply_gradients(model.optimizer, grads, model.trainable_variables, stage_of)
        elif training:
            owner = {id(v): st.device for st in stages for v in st.trainable_variables}
            grads = []
            for i, v in enumerate(model.trainable_variables):
                parts_of_v = [sums[r][i] for r in range(R) if i in sums[r]]
                if not parts_of_v:
                    grads.append(None)
                    continue
                with tf.device(owner.get(id(v), last_device)):
                    # The hybrid's all-reduce: replica sums meet on the owner device,
                    # and every replica reads the updated variable from there.
                    grads.append(parts_of_v[0] if len(parts_of_v) == 1 else tf.add_n(parts_of_v))
            model.optimizer.apply(grads, model.trainable_variables)
        if model._loss_tracker is not None:
            rows = microbatch_rows(x if meshes is None else y_pred)
            model._loss_tracker.update_state(total, sample_weight=rows)
        return model.compute_metrics(x, y, y_pred, sample_weight=sample_weight)

    def _on(self, stage, replica, previous):
        """Where an action runs, after its device's previous action: under
        tf.device and a control dependency for device stages; nothing for
        stage meshes (DTensor places by layout and drops control
        dependencies: the order rides on the action's inputs, see
        `StageMeshes.after`)."""
        if self.stage_meshes is not None:
            return contextlib.nullcontext()
        stack = contextlib.ExitStack()
        stack.enter_context(tf.device(stage.devices[replica]))
        stack.enter_context(tf.control_dependencies(previous))
        return stack

    def _on_device(self, device):
        return contextlib.nullcontext() if self.stage_meshes is not None else tf.device(device)


def _sources(model, stage) -> list:
    """The variables a stage's backward differentiates."""
    sources = list(stage.trainable_variables)
    if stage.is_last:
        # Weight regularizers of every stage are part of the loss computed
        # here: their gradients come from this tape.
        sources += [v for v in model.trainable_variables
                    if not any(v is w for w in stage.trainable_variables)]
    return sources


# The split backward (ZB-H1, ZBV). Keras layers have no separate input- and
# weight-gradient functions, so both come from the stage's forward tape
# (persistent, so it can be asked twice), through the outputs h_i of the
# stage's layers that have weights:
#
#   B: one call, dL/d[input, h_1, ..., h_n] given dL/d(output). It walks the
#      stage's backward chain once; the ops that would give weight gradients
#      (MatMul's second product, the bias sums, ...) have no consumer and are
#      pruned from the function, so B costs only the input-gradient chain.
#   W: per layer, d h_i / d(weights of layer i) given dL/dh_i (kept from B).
#      Only layer i's own ops are walked: the chain through the other layers
#      is not recomputed. A layer's weights reach the loss only through its
#      output (shared layers cannot be split), so the sum over layers is the
#      stage's weight gradient, the same as one full backward.
#
# The forward activations the tape saved stay alive until W: the stash
# counts them until then. Within layer i, W re-derives the few elementwise
# gradients it shares with B (an activation's derivative, a LayerNorm's
# normalisation), a small cost next to the products it computes.


def _input_gradients(stage, tape, target, received, layer_outputs, upstream):
    """B: [dL/d each received tensor, dL/dh for each weighted layer's outputs]."""
    flat = [t for outs in layer_outputs for t in outs]
    wrt = list(received) + flat
    grads = tape.gradient(target, wrt, output_gradients=upstream)
    return [None if g is None else _dense(g) for g in grads]


def _weight_gradients(model, stage, tape, target, layer_outputs, layer_grads, full):
    """W: (variables, their gradients) of one stage and micro-batch."""
    if full:
        # The loss holds weight-regularization terms: differentiate it whole.
        sources = _sources(model, stage)
        grads = tape.gradient(target, sources)
        return sources, [None if g is None else _dense(g) for g in grads]
    sources, grads = [], []
    it = iter(layer_grads)
    for (op, _), outs in zip(stage.weighted, layer_outputs):
        dh = [next(it) for _ in outs]
        kept = [(h, g) for h, g in zip(outs, dh) if g is not None]
        weights = list(op.trainable_weights)
        if not kept:
            continue
        got = tape.gradient([h for h, _ in kept], weights,
                            output_gradients=[g for _, g in kept])
        sources += weights
        grads += [None if g is None else _dense(g) for g in got]
    return sources, grads


def action_scope(action, replica: int = 0) -> str:
    """The name scope of an action's ops in a step's graph: "F3_stage1", "W0_stage2_replica1"."""
    return (f"{action.kind}{action.microbatch}_stage{action.stage}"
            + (f"_replica{replica}" if replica else ""))


def microbatch_rows(x):
    return tf.shape(next(t for t in tf.nest.flatten(x) if t is not None))[0]


def _identity(t):
    return None if t is None else tf.identity(t)


def _dense(g):
    # Embedding gradients are IndexedSlices: they cannot be added to each other,
    # and Adam treats repeated rows differently from their sum; the dense sum is
    # the exact gradient of the whole batch.
    return tf.convert_to_tensor(g) if isinstance(g, tf.IndexedSlices) else g


@contextlib.contextmanager
def _no_tape():
    yield None


def _flat_devices(devices, stages, per_stage) -> list[str]:
    """Stage meshes' devices: the given ones, or the first K*per_stage local ones."""
    if devices is not None:
        flat = [d for row in devices for d in (row if isinstance(row, (list, tuple)) else [row])]
        if len(flat) % per_stage or (stages and len(flat) != stages * per_stage):
            raise PipelineConfigError(
                f"devices={flat}: {len(flat)} devices do not make "
                f"{stages or 'K'} stages of {per_stage} (replicas x tensor_parallel); give "
                "exactly stages x replicas x tensor_parallel devices.")
        return flat
    gpus = [d.name for d in tf.config.list_logical_devices("GPU")]
    cpus = [d.name for d in tf.config.list_logical_devices("CPU")]
    local = gpus if len(gpus) >= (stages or 2) * per_stage else cpus
    stages = stages or len(local) // per_stage
    if stages < 1 or len(local) < stages * per_stage:
        need = max(stages, 1) * per_stage
        raise PipelineConfigError(
            f"stages={stages} of {per_stage} devices (replicas x tensor_parallel) needs "
            f"{need} devices; this process has {len(local)} ({'GPU' if local is gpus else 'CPU'}). "
            f"On a CPU, split it first: tfpar.simulate_devices({need}) "
            f"(--num_simulated_devices={need}).")
    return local[:stages * per_stage]


def _resolve_devices(devices, stages, replicas) -> list[list[str]]:
    if devices is not None:
        flat = [d for row in devices for d in (row if isinstance(row, (list, tuple)) else [row])]
        if stages is None:
            if len(flat) % replicas:
                raise PipelineConfigError(
                    f"{len(flat)} devices do not split over replicas={replicas}; give "
                    "stages x replicas devices.")
            stages = len(flat) // replicas
        if len(flat) != stages * replicas:
            raise PipelineConfigError(
                f"devices={flat}: {len(flat)} devices for stages={stages} x replicas={replicas} "
                f"= {stages * replicas}; give exactly one device per stage and replica.")
        return [flat[r * stages:(r + 1) * stages] for r in range(replicas)]
    gpus = [d.name for d in tf.config.list_logical_devices("GPU")]
    cpus = [d.name for d in tf.config.list_logical_devices("CPU")]
    local = gpus if len(gpus) >= max(2, (stages or 0) * replicas) else cpus
    if stages is None:
        stages = max(1, len(local) // replicas)
    need = stages * replicas
    if len(local) < need:
        raise PipelineConfigError(
            f"stages={stages} x replicas={replicas} need {need} devices; this host has "
            f"{len(gpus)} GPU(s) and {len(cpus)} CPU device(s). On a CPU, split it first: "
            f"tfpar.simulate_devices({need}) (flag --num_simulated_devices={need}), or pass "
            "devices=[...].")
    return [local[r * stages:(r + 1) * stages] for r in range(replicas)]
