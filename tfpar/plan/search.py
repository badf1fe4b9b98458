"""Which parallel configuration fits, and which is fastest.

`recommend(work, hardware)` tries every data x tensor x pipeline split of the
devices (the data devices replicated, or, without a pipeline, sharded at
ZeRO stage 1, 2 or 3) with every power-of-two micro-batch, drops the ones that cannot
work (a tensor degree that does not divide the heads, the MLP or the
vocabulary; more stages than the model has cut points; a batch that does not
split), prices the rest with `tfpar.plan.cost`, rejects those that do not fit
in memory, and ranks the others by estimated step time (ties: fewer
model-parallel devices, then the lowest ZeRO stage, then larger micro-batches).

Example::

    work = Workload(tfpar.models.SIZES["gpt3-175b"], global_batch=1536, recompute="full")
    plan = recommend(work, Hardware(devices=1024))        # 8-GPU A100-80GB nodes
    plan.best.dims            # ParallelDims(dp=16, tp=8, pp=8, microbatches=96)
    plan.best.micro_batch     # 1 sequence per micro-batch
    plan.best.tfpar_flags     # '--dp=16 --tp=8 --pp=8 ...', or None: tfpar cannot run it
"""

from __future__ import annotations

import dataclasses

from tfpar.plan import cost
from tfpar.parallel_dims import ParallelDims, ParallelDimsError
from tfpar.plan.cost import GIB, Hardware, Workload
from tfpar.strategies.pipeline.schedules import get as get_schedule

MICRO_BATCHES = (1, 2, 4, 8, 16, 32, 64, 128)


class PlanError(ValueError):
    """Nothing can run: the message says what would have to change."""


@dataclasses.dataclass
class Candidate:
    dims: ParallelDims  # the degrees (and the pipeline's micro-batches)
    micro_batch: int  # sequences per micro-batch
    microbatches: int  # per replica and step: pipeline micro-batches or accumulation steps
    memory: dict
    time: dict
    fits: bool
    tfpar_flags: str | None  # how tfpar runs it, if it can

    def as_dict(self) -> dict:
        return {"dims": self.dims.describe(), "data": self.dims.dp, "fsdp": self.dims.fsdp,
                "zero_stage": self.dims.zero_stage if self.dims.fsdp_enabled else 0,
                "tensor": self.dims.tp,
                "pipeline": self.dims.pp, "micro_batch_size": self.micro_batch,
                "microbatches": self.microbatches, "fits": self.fits,
                "memory_bytes": {k: v for k, v in self.memory.items() if k != "stage"},
                "fullest_stage": self.memory["stage"], **self.time,
                "tfpar_flags": self.tfpar_flags}


@dataclasses.dataclass
class Plan:
    work: Workload
    hardware: Hardware
    candidates: list[Candidate]  # ranked: fitting ones first, fastest first
    skipped: list[str]  # layouts that cannot work at all, and why
    reasons: list[str]

    @property
    def best(self) -> Candidate | None:
        return self.candidates[0] if self.candidates and self.candidates[0].fits else None


def _divisors(n: int) -> list[int]:
    return [i for i in range(1, n + 1) if n % i == 0]


def tfpar_flags(dims: ParallelDims, micro_batch: int, microbatches: int,
                hw: Hardware, reduce_dtype: str = "float32") -> str | None:
    """The `tfpar train` flags that run `dims`, or None if tfpar cannot.

    The degree flags are `ParallelDims.flags()`, so the plan and the runtime
    share one vocabulary; the global batch is the sequences of one optimizer
    step (with a pipeline: all its micro-batches; without one, the rest of the
    batch is gradient accumulation).
    """
    if dims.unsupported() is not None:
        return None
    if dims.pp_enabled and (dims.tp > 1 or dims.fsdp > 1) \
            and dims.world_size > hw.devices_per_node and not _runs_as_process_stages(dims, hw):
        return None
    per_step = dims.batch_shards * micro_batch
    extra = []
    if dims.pp_enabled:
        per_step *= microbatches
    elif microbatches > 1:
        extra.append(f"--grad_accum_steps={microbatches}")
    if reduce_dtype != "float32" and cost.compresses_gradients(dims) and dims.dp > 1:
        extra.append(f"--reduce_dtype={reduce_dtype}")
    return " ".join(dims.flags() + [f"--global_batch_size={per_step}"] + extra)


def _runs_as_process_stages(dims: ParallelDims, hw: Hardware) -> bool:
    """Whether a pipeline of tensor-parallel or sharded stages wider than a node
    runs with one process per node, each process running one stage's mesh (or
    one data-parallel replica's share of it) on the node's devices
    (`tfpar.strategies.pipeline.process_stages`; a split backward does not)."""
    n = hw.devices_per_node
    if dims.world_size % n or get_schedule(dims.schedule, dims.virtual_stages).split_backward:
        return False
    try:
        _, local_dp = dims.process_stages(dims.world_size // n)
    except ParallelDimsError:
        return False
    return local_dp * dims.fsdp * dims.tp == n


def recommend(work: Workload, hw: Hardware, runnable_only: bool = False) -> Plan:
    """Every workable layout, priced and ranked; see the module docstring."""
    model = work.model
    f = model.hidden * model.mlp_ratio
    max_stages = len(model.pipeline_cuts()) + 1
    candidates, skipped = [], []
    for t in _divisors(hw.devices):
        if model.heads % t or f % t or model.vocab % t:
            skipped.append(f"tensor={t}: does not divide the {model.heads} heads, the MLP "
                           f"width {f} or the vocabulary {model.vocab}")
            continue
        for p in _divisors(hw.devices // t):
            v = get_schedule(work.schedule).virtual_stages if p > 1 else 1
            if p * v > max_stages:
                skipped.append(f"pipeline={p}: the model has {max_stages - 1} places to cut"
                               + (f" ({p} x {v} virtual stages)" if v > 1 else ""))
                continue
            d = hw.devices // (t * p)
            if work.global_batch % d:
                skipped.append(f"data={d}: does not divide the global batch {work.global_batch}")
                continue
            for b in MICRO_BATCHES:
                if work.global_batch % (d * b):
                    continue
                m = work.global_batch // (d * b)
                try:
                    # Without a pipeline, the schedule is the default's, as
                    # the runtime reports it (`tfpar train --plan` compares).
                    dims = ParallelDims(dp=d, tp=t, pp=p, microbatches=m if p > 1 else 1,
                                        **({"schedule": work.schedule} if p > 1 else {}))
                except ParallelDimsError as e:  # e.g. interleaving needs M % K == 0
                    skipped.append(f"pipeline={p}, micro-batch {b}: {e}")
                    continue
                # The data devices replicated (dp), or sharded at each ZeRO stage
                # (fsdp); in a pipeline, at ZeRO-3 (what tfpar's stage meshes run).
                variants = [dims]
                if d > 1 and p == 1:
                    variants += [ParallelDims(fsdp=d, tp=t, zero_stage=z) for z in (1, 2, 3)]
                elif d > 1:
                    variants.append(dataclasses.replace(dims, dp=1, fsdp=d, zero_stage=3))
                for dims in variants:
                    mem = cost.memory(work, dims, b)
                    flags = tfpar_flags(dims, b, m, hw, work.reduce_dtype)
                    if runnable_only and flags is None:
                        continue
                    candidates.append(Candidate(dims, b, m, mem, cost.step(work, dims, b, hw),
                                                mem["total"] <= hw.usable_bytes, flags))
    # Ties go to fewer model-parallel devices, then to the lowest ZeRO stage (the
    # least sharding that fits: DeepSpeed's advice), then to larger micro-batches.
    candidates.sort(key=lambda c: (not c.fits, round(c.time["step_s"], 6),
                                   c.dims.tp * c.dims.pp,
                                   c.dims.zero_stage if c.dims.fsdp_enabled else 0,
                                   -c.micro_batch))
    plan = Plan(work, hw, candidates, skipped, [])
    plan.reasons = _reasons(plan)
    return plan


def _gib(n: float) -> str:
    return f"{n / GIB:.1f} GiB"


def _reasons(plan: Plan) -> list[str]:
    best, hw, work = plan.best, plan.hardware, plan.work
    if best is None:
        if not plan.candidates:
            return ["no layout divides this model, batch and device count"]
        smallest = min(plan.candidates, key=lambda c: c.memory["total"])
        dims = smallest.dims
        return [f"nothing fits in {_gib(hw.usable_bytes)} usable per device "
                f"({hw.memory_gib:g} GiB x {cost.USABLE_FRACTION}); the smallest need is "
                f"{_gib(smallest.memory['total'])} (data={dims.dp}, tensor={dims.tp}, "
                f"pipeline={dims.pp}, micro-batch {smallest.micro_batch}): use more devices, "
                "devices with more memory, a shorter context, or --recompute=full"]
    dims, mem = best.dims, best.memory
    reasons = []
    state = mem["weights"] + mem["gradients"] + mem["optimizer"]
    if dims.tp == 1 and dims.pp == 1:
        reasons.append(f"the whole model's weights, gradients and AdamW state ({_gib(state)}) "
                       f"and activations ({_gib(mem['activations'])}) fit on one device: pure "
                       "data parallelism needs only one gradient all-reduce per step")
    else:
        if dims.tp > 1:
            where = ("within one node" if dims.tp <= hw.devices_per_node
                     else "across nodes")
            reasons.append(f"tensor={dims.tp} {where}: its 4 all-reduces per layer and "
                           "micro-batch need the fastest links "
                           f"({hw.intra_node_gbps:g} GB/s in a node vs {hw.inter_node_gbps:g} "
                           "GB/s between nodes)")
        if dims.pp > 1:
            reasons.append(f"pipeline={dims.pp}: stages exchange only one activation per "
                           f"micro-batch, so they can span nodes; {best.microbatches} "
                           f"micro-batches keep the bubble at {best.time['bubble']:.1%} "
                           f"(the ideal of the {work.schedule} schedule)")
        smaller = [c for c in plan.candidates
                   if c.dims.tp * c.dims.pp < dims.tp * dims.pp]
        if smaller and not any(c.fits for c in smaller):
            leanest = min(smaller, key=lambda c: c.memory["total"])
            reasons.append(f"fewer model-parallel devices do not fit: the best needs "
                           f"{_gib(leanest.memory['total'])} per device "
                           f"(tensor={leanest.dims.tp}, pipeline={leanest.dims.pp})"
                           f" > {_gib(hw.usable_bytes)} usable")
    reasons.append(f"data={dims.dp}: the remaining devices, each replica on "
                   f"{best.micro_batch * best.microbatches} sequences per step "
                   f"(micro-batch {best.micro_batch} x {best.microbatches})")
    reasons.append(f"fullest device: {_gib(mem['total'])} of {_gib(hw.usable_bytes)} usable "
                   f"(weights+gradients+AdamW {_gib(state)}, activations "
                   f"{_gib(mem['activations'])})")
    if work.recompute != "none":
        reasons.append(f"assumes {work.recompute} activation recomputation (tfpar train "
                       f"--recompute={work.recompute}; Megatron-LM's published runs recompute)")
    if best.tfpar_flags is None:
        runnable = next((c for c in plan.candidates if c.fits and c.tfpar_flags), None)
        best_runnable = f"; the best it can run: {runnable.tfpar_flags}" if runnable else ""
        reasons.append("tfpar cannot run this layout yet (tensor-parallel or sharded "
                       "stages across hosts run one stage's mesh per node, without a split "
                       "backward)" + best_runnable)
    return reasons
