"""`ParallelDims`: every parallel degree of a training job, in one object.

A job spreads a model over `world_size = pp x dp x fsdp x tp` devices:

| degree | field | what it splits | mesh axis |
| --- | --- | --- | --- |
| pipeline | `pp` | the model's layers into stages | `pipeline` |
| data (replicated) | `dp` | each batch; every replica holds the whole model | `batch` |
| sharded data (ZeRO/FSDP) | `fsdp` | each batch, and the weights and optimizer state | `fsdp` |
| tensor | `tp` | one layer's weights (Megatron column/row, heads, vocabulary) | `model` |

The mesh orders its axes outermost to innermost as large-scale trainers do
(Megatron-core, torchtitan): pipeline, data, sharded data, tensor. Devices
next to each other (one node, NVLink) then form the tensor groups, whose
all-reduces run every layer; data-parallel gradients cross nodes once per
step; pipeline stages exchange only activations.

Everything in tfpar asks this object: `tfpar.plan` ranks `ParallelDims`,
`tfpar.strategies.build(dims)` turns one into a strategy, `from_flags()`
reads one from `--dp/--fsdp/--tp/--pp` (or the shorthands `--strategy`,
`--mesh`, `--pipeline_stages`), and every strategy's `describe()` and the
`summary.json` of `tfpar train` report one. Nobody re-derives degrees.

Pure Python: no TensorFlow is imported.

Example::

    >>> dims = ParallelDims(dp=2, tp=2)
    >>> dims.world_size, dims.strategy_kind(), dims.mesh_spec()
    (4, 'tensor', 'batch:2,model:2')
    >>> ParallelDims(pp=4, dp=2, microbatches=8).flags()
    ['--dp=2', '--pp=4', '--microbatches=8', '--schedule=1f1b']
"""

from __future__ import annotations

import dataclasses

# Degree field -> mesh axis name, outermost first. "batch" and "model" are
# Keras's own names (keras.distribution, keras-hub layout maps), so a
# LayoutMap written for Keras's ModelParallel applies to tfpar's meshes.
MESH_AXES = {"pp": "pipeline", "dp": "batch", "fsdp": "fsdp", "tp": "model"}
DEGREE_NAMES = {"pp": "pipeline", "dp": "data", "fsdp": "sharded data", "tp": "tensor"}


class ParallelDimsError(ValueError):
    """Parallel degrees that cannot work; the message names each degree and the fix."""


@dataclasses.dataclass(frozen=True)
class ParallelDims:
    """The parallel degrees of one job, and the pipeline's micro-batching.

    Attributes:
      dp: data-parallel replicas (each holds the whole model, or its stage or
        tensor shard); gradients are all-reduced between them.
      fsdp: sharded-data-parallel degree (ZeRO-3/FSDP: weights, gradients
        and optimizer state split over it; each batch too).
      tp: tensor-parallel degree (the "model" mesh axis).
      pp: pipeline stages.
      microbatches: micro-batches per batch and pipeline replica (pp > 1).
      schedule: the pipeline schedule, a name from
        `tfpar.strategies.pipeline.schedules.SCHEDULES` ("gpipe", "1f1b",
        "interleaved_1f1b", "zb_h1", "zbv").
      virtual_stages: V, model stages per pipeline device (the model is cut
        into pp x V stages). None: the schedule's own (2 for "interleaved_1f1b"
        and "zbv", else 1).
      zero_stage: what the fsdp devices split (fsdp > 1): 1 the optimizer
        state, 2 also the gradients, 3 also the weights (FSDP).
    """

    dp: int = 1
    fsdp: int = 1
    tp: int = 1
    pp: int = 1
    microbatches: int = 1
    schedule: str = "1f1b"
    virtual_stages: int | None = None
    zero_stage: int = 3

    def __post_init__(self):
        for name in ("dp", "fsdp", "tp", "pp", "microbatches"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ParallelDimsError(
                    f"{name}={value!r}: every parallel degree is a whole number >= 1 "
                    f"(1 turns that dimension off).")
        if self.zero_stage not in (1, 2, 3):
            raise ParallelDimsError(
                f"zero_stage={self.zero_stage!r}: use 1 (optimizer state sharded), 2 (+ "
                "gradients) or 3 (+ weights, FSDP).")
        from tfpar.strategies.pipeline import schedules  # pure: the one registry

        if self.schedule not in schedules.SCHEDULES:
            raise ParallelDimsError(f"schedule={self.schedule!r}: use one of "
                                    f"{list(schedules.SCHEDULES)}.")
        if self.virtual_stages is None:
            object.__setattr__(self, "virtual_stages",
                               schedules.default_virtual_stages(self.schedule))
        v = self.virtual_stages
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise ParallelDimsError(f"virtual_stages={v!r}: stages per pipeline device is a "
                                    "whole number >= 1.")
        reason = schedules.virtual_stages_error(self.schedule, v)
        if reason:
            raise ParallelDimsError(reason + ".")
        if self.pp > 1:
            reason = schedules.get(self.schedule, v).check(self.pp, self.microbatches)
            if reason:
                raise ParallelDimsError(reason)

    # ----------------------------------------------------------- the degrees
    @property
    def world_size(self) -> int:
        """Devices the job needs: pp x dp x fsdp x tp."""
        return self.pp * self.dp * self.fsdp * self.tp

    def coordinates(self, device: int) -> dict[str, int]:
        """Where the job's `device`-th device sits: its pipeline stage, data
        replica, sharded-data group position and tensor shard.

        The order is Megatron's: pipeline outermost, then data, sharded data,
        and tensor innermost (a tensor group is consecutive devices, so it
        stays within a node). tfpar's stage meshes (`stage_devices`), tensor
        meshes ("batch:dp*fsdp,model:tp", row-major) and HSDP groups place
        devices this way.

            >>> ParallelDims(pp=2, dp=2, tp=2).coordinates(5)
            {'pp': 1, 'dp': 0, 'fsdp': 0, 'tp': 1}
        """
        if not 0 <= device < self.world_size:
            raise ParallelDimsError(f"device {device}: the job has devices 0..{self.world_size - 1}.")
        out = {}
        for name in ("tp", "fsdp", "dp", "pp"):
            device, out[name] = divmod(device, getattr(self, name))
        return {name: out[name] for name in ("pp", "dp", "fsdp", "tp")}

    @property
    def batch_shards(self) -> int:
        """How many ways each batch is split: dp x fsdp (the replicas in sync)."""
        return self.dp * self.fsdp

    @property
    def dp_enabled(self) -> bool:
        return self.dp > 1

    @property
    def fsdp_enabled(self) -> bool:
        return self.fsdp > 1

    @property
    def tp_enabled(self) -> bool:
        return self.tp > 1

    @property
    def pp_enabled(self) -> bool:
        return self.pp > 1

    def validate(self, devices: int) -> "ParallelDims":
        """Checks that the degrees use exactly `devices` devices; returns self."""
        if self.world_size != devices:
            factors = " x ".join(f"{DEGREE_NAMES[k]} {getattr(self, k)}" for k in MESH_AXES)
            fix = self._fix_for(devices)
            raise ParallelDimsError(
                f"{factors} = {self.world_size} devices, but the job has {devices}. The "
                f"product of the degrees (--pp x --dp x --fsdp x --tp) must equal the device "
                f"count{fix}.")
        return self

    def _fix_for(self, devices: int) -> str:
        others = self.world_size // self.dp
        if devices % others == 0:
            return f": e.g. --dp={devices // others}"
        return ": change the degrees, or the devices (--num_simulated_devices on CPU)"

    # ---------------------------------------------------- what tfpar runs
    def unsupported(self) -> str | None:
        """Why this tfpar release cannot run these degrees, or None if it can."""
        if self.fsdp_enabled and self.pp_enabled and (self.dp_enabled or self.zero_stage < 3):
            why = (f"dp={self.dp} x fsdp={self.fsdp}" if self.dp_enabled
                   else f"zero_stage={self.zero_stage}")
            return (f"a pipeline shards its stages at ZeRO stage 3 over every data device "
                    f"of a stage (fsdp), not with {why}; use --fsdp={self.dp * self.fsdp} "
                    "--zero_stage=3 without --dp")
        if self.fsdp_enabled and self.dp_enabled and (self.tp_enabled or self.zero_stage < 3):
            return (f"replicas of sharded groups (dp={self.dp} x fsdp={self.fsdp}, HSDP) run "
                    f"at ZeRO stage 3 without tensor parallelism, not with zero_stage="
                    f"{self.zero_stage}, tp={self.tp}; use --zero_stage=3 without --tp, or "
                    f"shard over every device (--fsdp={self.dp * self.fsdp})")
        return None

    def process_stages(self, processes: int) -> tuple[int, int]:
        """How a pipeline of tensor-parallel or sharded stages sits on
        `processes` processes, each running its own stage's mesh
        (`tfpar.strategies.pipeline.process_stages`): (R, the processes that
        hold each stage as data-parallel replicas; the data-parallel devices
        inside each process). Process k*R + r holds replica r of pipeline
        device k, on dp/R x fsdp x tp devices of its own.

            >>> ParallelDims(dp=16, tp=8, pp=8).process_stages(128)  # GPT-3 175B
            (16, 1)
        """
        per_stage = processes // self.pp if processes % self.pp == 0 else 0
        if not per_stage or self.dp % per_stage:
            raise ParallelDimsError(
                f"{self}: tensor-parallel or sharded stages across processes put one "
                f"pipeline stage in each process, or one data-parallel replica of it, so pp "
                f"must divide the {processes} processes and dp must divide by the processes "
                f"per stage ({processes} / pp). Use e.g. --pp={processes} (or --pp="
                f"{processes} / k with --dp a multiple of k), and --dp/--tp/--fsdp over each "
                "process's devices; or run without --tp/--fsdp, where data-parallel "
                "pipelines may span processes freely.")
        return per_stage, self.dp // per_stage

    def check_runnable(self) -> "ParallelDims":
        """Raises ParallelDimsError if this release cannot run these degrees; returns self."""
        reason = self.unsupported()
        if reason:
            raise ParallelDimsError(reason + ".")
        return self

    def strategy_kind(self, multi_process: bool = False) -> str:
        """The tfpar strategy that runs these degrees: one_device, data,
        multi_worker, sharded, tensor or pipeline (checked with `check_runnable`).
        A pipeline whose stages are tensor-parallel (tp x pp, x dp) is a
        pipeline of stage meshes."""
        self.check_runnable()
        if self.pp_enabled:
            return "pipeline"
        if self.fsdp_enabled:
            return "sharded"
        if self.tp_enabled:
            return "tensor"
        if multi_process:
            return "multi_worker"
        return "data" if self.dp_enabled else "one_device"

    # ----------------------------------------------------------- the mesh
    def mesh_shape(self) -> dict[str, int]:
        """{mesh axis: size} in mesh order, for the axes in use (a batch axis always)."""
        return {axis: getattr(self, field) for field, axis in MESH_AXES.items()
                if getattr(self, field) > 1 or axis == "batch"}

    def mesh_spec(self, pipeline_axis: bool = False) -> str:
        """The tensor strategy's mesh as tfpar writes it ("batch:2,model:2"): always a
        batch and a model axis; no pipeline axis (each stage has its own mesh)
        unless `pipeline_axis`."""
        shape = self.mesh_shape()
        if not pipeline_axis:
            shape.pop("pipeline", None)
        if self.fsdp_enabled:
            # One axis splits the batch and the sharded state: DTensor lays out a
            # tensor dimension over one mesh axis, and Keras's and keras-hub's
            # layout maps call the axis that shards weights with the batch "batch".
            shape.pop("fsdp")
            shape["batch"] = self.dp * self.fsdp
        shape["model"] = self.tp
        return ",".join(f"{axis}:{size}" for axis, size in shape.items())

    @classmethod
    def from_mesh(cls, spec: str | dict[str, int], **kwargs) -> "ParallelDims":
        """Degrees from a mesh: "batch:2,model:2" -> ParallelDims(dp=2, tp=2)."""
        if isinstance(spec, str):
            names, sizes = _parse_axes(spec)
            spec = dict(zip(names, sizes))
        by_axis = {axis: field for field, axis in MESH_AXES.items()}
        unknown = [a for a in spec if a not in by_axis]
        if unknown:
            raise ParallelDimsError(
                f"mesh axes {unknown}: tfpar's mesh axes are {list(by_axis)} "
                "(pipeline, data, sharded data, tensor).")
        return cls(**{by_axis[a]: int(n) for a, n in spec.items()}, **kwargs)

    # ------------------------------------------------------------ reporting
    def flags(self) -> list[str]:
        """The degree flags that give these dims (degrees of 1 left out)."""
        out = [f"--{k}={getattr(self, k)}" for k in ("dp", "fsdp", "tp", "pp")
               if getattr(self, k) > 1]
        if self.fsdp_enabled and self.zero_stage != 3:
            out.append(f"--zero_stage={self.zero_stage}")
        if self.pp_enabled:
            out += [f"--microbatches={self.microbatches}", f"--schedule={self.schedule}"]
            if self.virtual_stages != _default_virtual_stages(self.schedule):
                out.append(f"--virtual_stages={self.virtual_stages}")
        return out

    def describe(self) -> dict:
        """A JSON-ready dict (what summary.json and `describe()` report): the
        degrees, and only the settings that apply (the ZeRO stage where fsdp
        shards, the schedule where there is a pipeline)."""
        values = dataclasses.asdict(self) | {"world_size": self.world_size}
        if not self.fsdp_enabled:
            del values["zero_stage"]
        if not self.pp_enabled:
            for name in ("microbatches", "schedule", "virtual_stages"):
                del values[name]
        return values

    def layout(self, devices: int | None = None, device_type: str = "", processes: int = 1) -> str:
        """One line for people: "dp 4 x tp 1 x pp 1 on 4 CPU devices".

        dp, tp and pp always; fsdp (with its ZeRO stage) where it shards; the
        schedule and micro-batches of a pipeline.
        """
        parts = [f"dp {self.dp}"]
        if self.fsdp_enabled:
            parts.append(f"fsdp {self.fsdp} (ZeRO-{self.zero_stage})")
        parts += [f"tp {self.tp}", f"pp {self.pp}"]
        text = " x ".join(parts)
        if self.pp_enabled:
            text += (f" ({self.schedule}, {self.microbatches} micro-batches, "
                     f"{self.virtual_stages} stage(s) per device)")
        if devices is not None:
            text += f" on {devices} {device_type + ' ' if device_type else ''}device" \
                    + ("s" if devices != 1 else "")
        if processes > 1:
            text += f" in {processes} processes"
        return text

    @classmethod
    def from_dict(cls, values: dict) -> "ParallelDims":
        """The inverse of `describe()` (extra keys such as world_size are checked)."""
        fields = {f.name for f in dataclasses.fields(cls)}
        dims = cls(**{k: v for k, v in values.items() if k in fields})
        extra = set(values) - fields - {"world_size"}
        if extra:
            raise ParallelDimsError(f"unknown parallel degree(s) {sorted(extra)}; known: "
                                    f"{sorted(fields)}.")
        if "world_size" in values and values["world_size"] != dims.world_size:
            raise ParallelDimsError(f"world_size={values['world_size']} does not match the "
                                    f"degrees' product {dims.world_size}.")
        return dims

    def __str__(self):
        text = " x ".join(f"{k} {getattr(self, k)}" for k in ("pp", "dp", "fsdp", "tp")
                          if getattr(self, k) > 1) or "one device"
        return text + (f" (ZeRO-{self.zero_stage})" if self.fsdp_enabled else "")


def _default_virtual_stages(schedule: str) -> int:
    from tfpar.strategies.pipeline.schedules import default_virtual_stages

    return default_virtual_stages(schedule)


def _parse_axes(spec: str) -> tuple[tuple[str, ...], tuple[int, ...]]:
    from tfpar.strategies.tensor.mesh import MeshError, parse_mesh  # pure parsing

    try:
        return parse_mesh(spec)
    except MeshError as e:
        raise ParallelDimsError(str(e)) from e

