"""The cost model of one parallel configuration: memory, communication, time.

A configuration trains a GPT (`tfpar.models.GPTConfig`) on `devices` =
data x tensor x pipeline devices, each optimizer step on `global_batch`
sequences cut into micro-batches of `micro_batch` sequences:
`microbatches` = global_batch / (data x micro_batch) per data-parallel
replica (pipeline micro-batches, or gradient-accumulation steps when there
is no pipeline).

Memory per device (the largest stage's device):

- weights, gradients, optimizer state: the parameters a device holds are
  those of its pipeline stage (cut exactly where `tfpar.Pipeline` cuts, by
  `tfpar.strategies.pipeline.balance`), the tensor-split ones divided by the tensor
  degree as tfpar's "megatron" layouts split them (attention by heads, the
  MLP's column/row pair, vocabulary-split embedding and LM head), the rest
  (LayerNorms, position embeddings, row-parallel biases) whole. Keras keeps
  float32 variables under mixed precision too: 4 bytes of weights, 4 of
  gradients and 8 of AdamW moments per parameter, plus 4 for gradient
  accumulators when a replica accumulates micro-batches without a pipeline;
- activations: per layer and micro-batch, s*b*h*(10 + 24/t + 5*a*s/(h*t))
  bytes at 16 bits (Korthikanti et al., 2022, tensor parallel without
  sequence parallelism; x2 in float32), times the micro-batches a device
  holds at once under the schedule (its `peak_stash`, in stages of 1/V of
  the device's layers: 1F1B K - stage, GPipe M, ZB-H1 K, ...), plus the
  float32 logits on the last stage. With full recomputation a layer keeps
  only its input (2 bytes x s*b*h) and one layer's activations are rebuilt
  at a time; with selective recomputation a layer drops the attention core
  (the 5*a*s/(h*t) term), as `tfpar.recompute` implements both;
- sharded data parallelism (`fsdp` devices, `ShardedDataParallel`): ZeRO-1
  divides the optimizer state by fsdp, ZeRO-2 also the gradients, ZeRO-3 also
  the weights, and ZeRO-3 adds the gathered weights in use: one block's with
  full recomputation (gathered again for its backward), else every gathered
  weight of the device (kept from the forward to the backward).

Time per step: the model's FLOPs (`training_flops_per_token`, x4/3 with
full recomputation, + the attention core's forward with selective) at `efficiency` x peak, stretched by the pipeline bubble of
the schedule (`Schedule.bubble_fraction`: its ideal timing with equal
forward, input- and weight-gradient costs; (K-1)/(M+K-1) for GPipe and
1F1B), plus communication that is not overlapped: tensor-parallel
all-reduces (4 per layer and micro-batch), pipeline sends (each
micro-batch's activation forward and its gradient back) and the
data-parallel gradient all-reduce after the backward (in float32, or 16 bits
with `reduce_dtype`; as tf.distribute does
it; with fsdp: the gradient reduce-scatter (ZeRO-2/3) or all-reduce
(ZeRO-1), the all-gather of the updated weights (ZeRO-1/2) or of the weights
in the forward, and again in a recomputed backward (ZeRO-3)). Devices are
ordered tensor-fastest, then data, then pipeline (as
Megatron-LM does): a group whose devices fit in one node uses the node's
bandwidth, else the network's.
"""

from __future__ import annotations

import dataclasses
import functools
import math

from tfpar.models.shapes import GPTConfig
from tfpar.parallel_dims import ParallelDims
from tfpar.strategies.base import ring_all_reduce_bytes
from tfpar.strategies.pipeline.balance import balanced_cuts
from tfpar.strategies.pipeline.schedules import get as get_schedule

GIB = 2 ** 30
# Part of a device's memory a plan may fill: the rest is left to the
# framework (CUDA context, allocator fragmentation, temporary buffers).
USABLE_FRACTION = 0.9
WEIGHT_BYTES, GRADIENT_BYTES, ADAM_BYTES, ACCUMULATOR_BYTES = 4, 4, 8, 4
REDUCE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}  # a gradient element on the wire


@dataclasses.dataclass(frozen=True)
class Hardware:
    """The devices a job may use.

    Bandwidths are per device and direction, in GB/s (1e9 bytes/s): within a
    node (NVLink) and between nodes (each device's share of the network).
    """

    devices: int
    devices_per_node: int = 8
    memory_gib: float = 80.0
    peak_tflops: float = 312.0
    intra_node_gbps: float = 300.0
    inter_node_gbps: float = 25.0
    efficiency: float = 0.5

    def __post_init__(self):
        for name in ("devices", "devices_per_node", "memory_gib", "peak_tflops",
                     "intra_node_gbps", "inter_node_gbps"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name}={getattr(self, name)}: must be > 0.")
        if not 0 < self.efficiency <= 1:
            raise ValueError(f"efficiency={self.efficiency}: must be in (0, 1].")

    @property
    def usable_bytes(self) -> float:
        return self.memory_gib * GIB * USABLE_FRACTION


# Per-device figures of common accelerators: memory (GiB), dense peak TFLOP/s
# at 16 bits and in float32 (TF32 where the hardware has it), NVLink GB/s
# per direction, and the usual network share per GPU (GB/s) of their
# clusters (A100: 200 Gb/s HDR, H100: 400 Gb/s NDR, V100: 100 Gb/s EDR).
ACCELERATORS = {
    "a100-40gb": {"memory_gib": 40, "tflops16": 312, "tflops32": 156, "intra": 300, "inter": 25},
    "a100-80gb": {"memory_gib": 80, "tflops16": 312, "tflops32": 156, "intra": 300, "inter": 25},
    "h100-80gb": {"memory_gib": 80, "tflops16": 989, "tflops32": 494, "intra": 450, "inter": 50},
    "v100-32gb": {"memory_gib": 32, "tflops16": 125, "tflops32": 15.7, "intra": 150,
                  "inter": 12.5},
}


@dataclasses.dataclass(frozen=True)
class Workload:
    """What is trained: a GPT shape, the global batch (sequences per step), precision."""

    model: GPTConfig
    global_batch: int
    precision: str = "mixed_bfloat16"
    schedule: str = "1f1b"
    recompute: str = "none"  # tfpar.recompute.MODES
    reduce_dtype: str = "float32"  # the data-parallel gradient all-reduce (--reduce_dtype)

    def __post_init__(self):
        from tfpar.recompute import MODES

        if self.recompute not in MODES:
            raise ValueError(f"recompute={self.recompute!r}: use one of {list(MODES)}.")
        if self.reduce_dtype not in REDUCE_BYTES:
            raise ValueError(f"reduce_dtype={self.reduce_dtype!r}: use one of "
                             f"{list(REDUCE_BYTES)}.")
        if self.global_batch < 1:
            raise ValueError(f"global_batch={self.global_batch}: must be >= 1.")
        if self.precision not in ("float32", "mixed_bfloat16", "mixed_float16"):
            raise ValueError(f"precision={self.precision!r}: float32, mixed_bfloat16 or "
                             "mixed_float16.")

    @property
    def activation_bytes(self) -> int:
        return 4 if self.precision == "float32" else 2

    def recompute_flops_per_token(self) -> float:
        """FLOPs per token that recomputation adds to `training_flops_per_token`."""
        m = self.model
        if self.recompute == "full":  # the forward again: 1/3 of forward + backward
            return m.training_flops_per_token() / 3
        if self.recompute == "selective":  # scores and context again: 2 matmuls of s x h
            return 4 * m.seq_len * m.hidden * m.layers
        return 0.0


def microbatches(work: Workload, dims: ParallelDims, micro_batch: int) -> int:
    """Micro-batches of `micro_batch` sequences per data-parallel replica and step
    (pipeline micro-batches, or gradient-accumulation steps without a pipeline)."""
    return work.global_batch // (dims.batch_shards * micro_batch)


# ------------------------------------------------------------------ memory
def split_parameters(model: GPTConfig) -> list[tuple[str, int, int]]:
    """(layer, parameters split over the tensor axis, parameters kept whole) per
    layer, in `GPTConfig.layer_parameters()` order, as the megatron preset lays
    them out (tfpar.strategies.tensor.layouts)."""
    h, f, v = model.hidden, model.hidden * model.mlp_ratio, model.vocab
    # q, k, v (kernels and biases); the output kernel; the MLP's up; its down kernel.
    block_split = 3 * (h * h + h) + h * h + (h * f + f) + f * h
    block_whole = h + h + 4 * h  # out bias, down bias, two LayerNorms
    rows = {"token_embedding": (v * h, 0), "position_embedding": (0, model.seq_len * h),
            "add": (0, 0), "ln_f": (0, 2 * h), "lm_head": (h * v + v, 0)}
    result = []
    for name, total in model.layer_parameters():
        split, whole = rows.get(name, (block_split, block_whole))
        assert split + whole == total, (name, split, whole, total)
        result.append((name, split, whole))
    return result


@functools.lru_cache(maxsize=None)
def stages(model: GPTConfig, pipeline: int) -> list[list[int]]:
    """Layer indices of each pipeline stage: the cuts `tfpar.Pipeline` makes
    (stages balanced by parameter count)."""
    weights = [float(n) for _, n in model.layer_parameters()]
    cuts = balanced_cuts(weights, model.pipeline_cuts(), pipeline)
    bounds = [-1] + cuts + [len(weights) - 1]
    return [list(range(bounds[i] + 1, bounds[i + 1] + 1)) for i in range(pipeline)]


@functools.lru_cache(maxsize=None)
def stage_parameters(model: GPTConfig, tensor: int, pipeline: int) -> list[float]:
    """Parameters one device of each stage holds."""
    rows = split_parameters(model)
    return [sum(rows[i][1] / tensor + rows[i][2] for i in layers)
            for layers in stages(model, pipeline)]


def variable_bytes(model: GPTConfig, tensor: int = 1, pipeline: int = 1) -> list[float]:
    """Per stage: one device's bytes of weights and AdamW moments (its
    variables), as `TensorParallel.memory_report` and the stage devices of
    `tfpar.Pipeline` measure them."""
    return [n * (WEIGHT_BYTES + ADAM_BYTES) for n in stage_parameters(model, tensor, pipeline)]


def activation_bytes_per_layer(work: Workload, micro_batch: int, tensor: int) -> float:
    m, s, b, t = work.model, work.model.seq_len, micro_batch, tensor
    core = 0 if work.recompute == "selective" else 5 * m.heads * s / (m.hidden * t)
    per_16bit = s * b * m.hidden * (10 + 24 / t + core)
    return per_16bit * work.activation_bytes / 2


def memory(work: Workload, dims: ParallelDims, micro_batch: int) -> dict:
    """Bytes on the fullest device: weights, gradients, optimizer, activations, total."""
    model, t, p = work.model, dims.tp, dims.pp
    m = microbatches(work, dims, micro_batch)
    params = stage_parameters(model, t, p)
    layers = stages(model, p)
    # Micro-batches' worth of a device's activations: peak_stash counts stages of
    # 1/V of the device's layers.
    v = schedule_of(work, dims).virtual_stages if p > 1 else 1
    in_flight = [n / v for n in _peak_stash(work.schedule, v, p, m)] if p > 1 else [1]
    per_layer = activation_bytes_per_layer(work, micro_batch, t)
    tokens = model.seq_len * micro_batch
    accumulate = p == 1 and m > 1
    rows = []
    for s, stage_layers in enumerate(layers):
        blocks = sum(1 for i in stage_layers if model.layer_parameters()[i][0].startswith("block_"))
        full = work.recompute == "full"
        stash = work.activation_bytes * tokens * model.hidden if full else per_layer
        held = blocks * stash
        if s == p - 1:  # float32 logits and their softmax, split over the vocabulary
            held += 2 * 4 * tokens * model.vocab / t
        act = in_flight[s] * held + (per_layer if full and blocks else 0)
        shard = zero_divisors(dims)
        weights = params[s] * WEIGHT_BYTES / shard["weights"]
        gradients = params[s] * GRADIENT_BYTES / shard["gradients"]
        optimizer = params[s] * (ADAM_BYTES + (ACCUMULATOR_BYTES if accumulate else 0)) \
            / shard["optimizer"]
        gathered = 0.0
        if shard["weights"] > 1:  # ZeRO-3: the weights gathered for use
            block = max(params[s] / max(blocks, 1), 0) if full else params[s]
            gathered = block * WEIGHT_BYTES
        rows.append({"stage": s, "weights": weights, "gradients": gradients,
                     "optimizer": optimizer, "gathered": gathered, "activations": act,
                     "total": weights + gradients + optimizer + gathered + act})
    return max(rows, key=lambda r: r["total"])


def compresses_gradients(dims: ParallelDims) -> bool:
    """Whether tfpar's runtime can all-reduce these degrees' gradients in 16 bits
    (`--reduce_dtype`: the data and multi-worker strategies)."""
    return not (dims.fsdp_enabled or dims.tp_enabled or dims.pp_enabled)


def zero_divisors(dims: ParallelDims) -> dict[str, int]:
    """What each kind of state is divided by under the ZeRO stage of `dims`
    (`ShardedDataParallel`: stage 1 the optimizer state, 2 + gradients, 3 + weights)."""
    n, stage = dims.fsdp, dims.zero_stage if dims.fsdp_enabled else 0
    return {"optimizer": n if stage >= 1 else 1, "gradients": n if stage >= 2 else 1,
            "weights": n if stage >= 3 else 1}


def schedule_of(work: Workload, dims: ParallelDims):
    """The pipeline schedule a configuration runs (from the one registry)."""
    return get_schedule(work.schedule, dims.virtual_stages)


@functools.lru_cache(maxsize=None)
def _peak_stash(schedule: str, virtual_stages: int, stages: int, microbatches: int) -> list[int]:
    return get_schedule(schedule, virtual_stages).peak_stash(stages, microbatches)


@functools.lru_cache(maxsize=None)
def _bubble(schedule: str, virtual_stages: int, stages: int, microbatches: int) -> float:
    return get_schedule(schedule, virtual_stages).bubble_fraction(stages, microbatches)


# --------------------------------------------------------------------- time
def _ring_all_reduce(size_bytes: float, group: int, gbps: float) -> float:
    return 0.0 if group == 1 else 2 * (group - 1) / group * size_bytes / (gbps * 1e9)


def step(work: Workload, dims: ParallelDims, micro_batch: int, hw: Hardware) -> dict:
    """Seconds per optimizer step (compute, bubble, communication) and bytes sent per device."""
    model, d, t, p, b = work.model, dims.batch_shards, dims.tp, dims.pp, micro_batch
    m = microbatches(work, dims, micro_batch)
    tokens = work.global_batch * model.seq_len
    model_flops = tokens * model.training_flops_per_token()
    flops = model_flops + tokens * work.recompute_flops_per_token()
    peak = hw.peak_tflops * 1e12
    compute = flops / (hw.devices * peak * hw.efficiency)
    bubble = _bubble(work.schedule, dims.virtual_stages, p, m) if p > 1 else 0.0
    pipelined = compute / (1 - bubble)

    node = hw.devices_per_node

    def bandwidth(span: int) -> float:  # devices a group spans, consecutive in the order
        return hw.intra_node_gbps if span <= node else hw.inter_node_gbps

    activation = model.seq_len * b * model.hidden * work.activation_bytes
    layers_per_stage = math.ceil(model.layers / p)
    # The recomputed forward of a full block all-reduces again (2 per layer).
    all_reduces = (6 if work.recompute == "full" else 4) * layers_per_stage * m
    tp_bytes = all_reduces * (2 * (t - 1) / t * activation if t > 1 else 0.0)
    tp_time = all_reduces * _ring_all_reduce(activation, t, bandwidth(t))
    pp_bytes = 2 * m * activation if p > 1 else 0.0
    pp_time = pp_bytes / (bandwidth(t * d * p) * 1e9) if p > 1 else 0.0
    gradient = max(stage_parameters(model, t, p)) * GRADIENT_BYTES
    # The same arithmetic as DataParallel.communication_report; tfpar compresses
    # the all-reduce of the tf.distribute strategies only (pure data parallelism).
    wire = REDUCE_BYTES[work.reduce_dtype] if compresses_gradients(dims) else GRADIENT_BYTES
    dp_bytes = ring_all_reduce_bytes(max(stage_parameters(model, t, p)) * wire, d)
    if dims.fsdp_enabled:
        # All-gathers and reduce-scatters move (n-1)/n of the bytes; an all-reduce 2(n-1)/n.
        share = (d - 1) / d * gradient
        gathers = 1 if dims.zero_stage < 3 else (2 if work.recompute == "full" else 1)
        dp_bytes = (2 if dims.zero_stage == 1 else 1) * share + gathers * share
    dp_time = dp_bytes / (bandwidth(t * d) * 1e9) if d > 1 else 0.0
    total = pipelined + tp_time + pp_time + dp_time
    return {"compute_s": compute, "bubble": bubble, "tensor_comm_s": tp_time,
            "pipeline_comm_s": pp_time, "data_comm_s": dp_time, "step_s": total,
            "comm_bytes": tp_bytes + pp_bytes + dp_bytes, "tokens_per_s": tokens / total,
            "mfu": model_flops / (total * hw.devices * peak)}
