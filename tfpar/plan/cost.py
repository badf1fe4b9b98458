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

Time per step. Achieved FLOP/s is not one constant fraction of the peak: it
rises with the width of the model and falls with the degrees that split it.
Per micro-batch, each device runs its stage's blocks forward, backward (twice
the forward) and, with full recomputation, forward again (selective: the
attention core again), and the LM head on the last stage:

- matmuls, each on its roofline: the slower of its FLOPs at `efficiency` x
  peak (`GEMM_EFFICIENCY`, 0.7: what a large 16-bit matmul sustains inside an
  A100 training step; from one 22B block measured on Selene, Korthikanti et
  al., 2022, Table 4) and the HBM traffic of its operands and result. A
  per-device matmul with few FLOPs per byte (a narrow hidden/t, a short context,
  the attention core's products over one head of 64-160) runs at the memory
  roof, far below the matmul rate;
- memory-bound kernels (LayerNorm, bias-GeLU, dropout, residual adds,
  softmax): they write each activation the block keeps for its backward
  (Korthikanti's s*b*h*(10 + 24/t + 5*a*s/(h*t)) bytes) and read it back, at
  `MEMORY_EFFICIENCY` x the HBM bandwidth. Per FLOP this is ~1/h + s/h^2 (and
  the LayerNorms and dropouts run whole on every tensor rank, without sequence
  parallelism): 50% on top of the matmul time of a 1.7B GPT, 6% at 1T. This is
  most of why efficiency rises with model size (Narayanan et al., 2021, Table
  1: 44% of peak at 1.7B, 52% at 1T);
- tensor-parallel all-reduces of each block's activation (2 forward, 2
  backward, 2 more with full recomputation, as Megatron-LM does), on the
  critical path, at NCCL's bus bandwidth (`NVLINK_EFFICIENCY` of NVLink within
  a node, `NETWORK_EFFICIENCY` of the network share beyond it): 5-18% of a
  step at tensor 2-8;
- pipeline sends: each micro-batch's activation forward and gradient back at
  each of a device's V stage boundaries, 1/t per tensor rank over the network
  and all-gathered over NVLink (Megatron's scatter/gather); a stage waits for
  its input, so they are not hidden.

The slowest stage sets the pace (the LM head's matmul and float32 loss make
the last stage longer), and the micro-batches are stretched by the bubble of
the schedule (`Schedule.bubble_fraction`: its ideal timing with equal
forward, input- and weight-gradient costs; (K-1)/(M+K-1) for GPipe and 1F1B,
(K-1)/(VM+K-1) interleaved). After them: the data-parallel gradient
all-reduce (float32, or 16 bits with `reduce_dtype` where tfpar's runtime
compresses it; as `DataParallel.communication_report` counts it) runs in
buckets during the last micro-batch's backward (PyTorch DDP) and only what
outlasts that backward adds to the step; with fsdp the gradient reduce-scatter
(ZeRO-2/3) or all-reduce (ZeRO-1), the all-gather of the updated weights
(ZeRO-1/2) or of the weights in the forward, and again in a recomputed
backward (ZeRO-3), all added; then AdamW's pass over the device's float32
variables at the HBM rate. Devices are ordered tensor-fastest, then data, then
pipeline (as Megatron-LM does): a group whose devices fit in one node uses the
node's bandwidth, else the network's.

Against the ten rows of Narayanan et al. (2021), Table 1 (1.7B on 32 A100s to
1T on 3072, with the authors' micro-batches and interleaving), the predicted
TFLOP/s per GPU is within 6% of every published figure
(tests/test_plan.py); the 1T step is 104.7 s against the published 102.6 s.
Not modelled: kernel launch latency, tile and wave quantization of a matmul
over the SMs, and overlap of tensor-parallel communication with compute.
"""

from __future__ import annotations

import dataclasses
import functools

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
# AdamW's step reads the weight, gradient and two moments, and writes back the
# weight and moments: float32 each.
OPTIMIZER_STEP_BYTES = 2 * (WEIGHT_BYTES + ADAM_BYTES) + GRADIENT_BYTES

# What a device sustains of its data sheet (module docstring, "Time"):
# - a large 16-bit matmul inside a training step: 0.7 of the dense peak
#   reproduces the measured forward and backward of one 22B GPT block on
#   Selene's A100s under this model (7.7 and 11.9 ms, tensor 8, micro-batch 4:
#   Korthikanti et al., 2022, Table 4; checked in tests/test_plan.py). One
#   best-shaped matmul alone reaches 0.86 at boost clock (268 of 312 TFLOP/s,
#   A100 SXM, CUDA 12.1: the "MAMF" table of Bekman's ml-engineering); a
#   training load runs at lower clocks and on the shapes a layer has.
GEMM_EFFICIENCY = 0.7
# - memory-bound kernels stream at about 90% of the HBM bandwidth (an A100
#   80GB's best kernels reach 1.80 of 2.04 TB/s: 88%, NVIDIA developer forum).
MEMORY_EFFICIENCY = 0.9
# - NCCL's all-reduce bus bandwidth: 200-210 of 300 GB/s over the NVLink of 8
#   A100s (nccl-tests issues #149, #178), and 85-96 of 100 GB/s over 4 HDR
#   200 Gb/s NICs shared by 8 A100s (nccl-tests issue #119).
NVLINK_EFFICIENCY = 0.7
NETWORK_EFFICIENCY = 0.9
# The memory-bound kernels of a block write each activation it keeps for the
# backward once and read it back once.
TRAFFIC_PER_KEPT_BYTE = 2


@dataclasses.dataclass(frozen=True)
class Hardware:
    """The devices a job may use.

    Bandwidths are per device and direction, in GB/s (1e9 bytes/s): of its own
    memory (HBM), within a node (NVLink) and between nodes (each device's share
    of the network). `efficiency` is the fraction of `peak_tflops` a large
    matmul sustains in a training step (`GEMM_EFFICIENCY`, measured on A100s);
    everything else the step does is modelled from the shapes (`step`).

    Example::

        Hardware(devices=1024)                                  # A100-80GB nodes of 8
        Hardware(devices=64, peak_tflops=989, memory_gbps=3350)  # H100s
    """

    devices: int
    devices_per_node: int = 8
    memory_gib: float = 80.0
    peak_tflops: float = 312.0
    intra_node_gbps: float = 300.0
    inter_node_gbps: float = 25.0
    efficiency: float = GEMM_EFFICIENCY
    memory_gbps: float = 2039.0

    def __post_init__(self):
        for name in ("devices", "devices_per_node", "memory_gib", "peak_tflops",
                     "intra_node_gbps", "inter_node_gbps", "memory_gbps"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name}={getattr(self, name)}: must be > 0.")
        if not 0 < self.efficiency <= 1:
            raise ValueError(f"efficiency={self.efficiency}: must be in (0, 1] (the fraction "
                             f"of peak a large matmul sustains; default {GEMM_EFFICIENCY}).")

    @property
    def usable_bytes(self) -> float:
        return self.memory_gib * GIB * USABLE_FRACTION


# Per-device figures of common accelerators (data sheets): memory (GiB) and its
# bandwidth (GB/s), dense peak TFLOP/s at 16 bits and in float32 (TF32 where
# the hardware has it), NVLink GB/s per direction, and the usual network share
# per GPU (GB/s) of their clusters (A100: 200 Gb/s HDR, H100: 400 Gb/s NDR,
# V100: 100 Gb/s EDR).
ACCELERATORS = {
    "a100-40gb": {"memory_gib": 40, "memory_gbps": 1555, "tflops16": 312, "tflops32": 156,
                  "intra": 300, "inter": 25},
    "a100-80gb": {"memory_gib": 80, "memory_gbps": 2039, "tflops16": 312, "tflops32": 156,
                  "intra": 300, "inter": 25},
    "h100-80gb": {"memory_gib": 80, "memory_gbps": 3350, "tflops16": 989, "tflops32": 494,
                  "intra": 450, "inter": 50},
    "v100-32gb": {"memory_gib": 32, "memory_gbps": 900, "tflops16": 125, "tflops32": 15.7,
                  "intra": 150, "inter": 12.5},
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
    rest, core = _kept_bytes(work, micro_batch, tensor)
    return rest + (0 if work.recompute == "selective" else core)


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
def _matmul_rate(hw: Hardware) -> float:
    return hw.peak_tflops * 1e12 * hw.efficiency


def _memory_rate(hw: Hardware) -> float:
    return hw.memory_gbps * 1e9 * MEMORY_EFFICIENCY


def _gemm_s(rows: float, cols: float, inner: float, hw: Hardware, itemsize: int,
            count: float = 1) -> float:
    """Seconds of `count` (rows x inner) @ (inner x cols) matmuls: the roofline, the
    slower of their arithmetic and the memory traffic of their operands and result."""
    flops = 2 * rows * cols * inner * count
    traffic = itemsize * (rows * inner + inner * cols + rows * cols) * count
    return max(flops / _matmul_rate(hw), traffic / _memory_rate(hw))


def _kept_bytes(work: Workload, micro_batch: int, tensor: int) -> tuple[float, float]:
    """Activation bytes one block keeps for its backward on one device without
    recomputation (Korthikanti et al., 2022): (the rest of the block, the attention
    core's scores, softmax and dropout)."""
    m, s, b, t = work.model, work.model.seq_len, micro_batch, tensor
    scale = work.activation_bytes / 2  # the counts are at 16 bits
    return (s * b * m.hidden * (10 + 24 / t) * scale,
            s * b * m.hidden * 5 * m.heads * s / (m.hidden * t) * scale)


def block_forward(work: Workload, micro_batch: int, tensor: int, hw: Hardware) -> dict:
    """Seconds of one transformer block's forward on one device of a tensor group.

    matmul_s: its four dense matmuls (q/k/v, output, the MLP's two, each on 1/t
    of the columns or rows) and core_matmul_s: the attention core's two,
    batched over the device's heads; memory_s: the memory-bound kernels of the
    rest of the block (LayerNorms, bias-GeLU, dropouts, residual adds) and
    core_memory_s: the core's (softmax, dropout). The core is what selective
    recomputation redoes.
    """
    m, s, b, t = work.model, work.model.seq_len, micro_batch, tensor
    h, f, x = m.hidden, m.hidden * m.mlp_ratio, work.activation_bytes
    tokens, heads = b * s, b * m.heads / t
    rest_bytes, core_bytes = _kept_bytes(work, micro_batch, tensor)
    return {
        "matmul_s": (_gemm_s(tokens, 3 * h / t, h, hw, x) + _gemm_s(tokens, h, h / t, hw, x)
                     + _gemm_s(tokens, f / t, h, hw, x) + _gemm_s(tokens, h, f / t, hw, x)),
        "core_matmul_s": (_gemm_s(s, s, m.head_dim, hw, x, heads)     # scores q k^T
                          + _gemm_s(s, m.head_dim, s, hw, x, heads)),  # probabilities v
        "memory_s": TRAFFIC_PER_KEPT_BYTE * rest_bytes / _memory_rate(hw),
        "core_memory_s": TRAFFIC_PER_KEPT_BYTE * core_bytes / _memory_rate(hw)}


def head_forward(work: Workload, micro_batch: int, tensor: int, hw: Hardware) -> dict:
    """Seconds of the LM head's forward on one device: its vocabulary-split matmul
    (matmul_s), and the float32 logits and softmax of the loss (memory_s)."""
    m, t = work.model, tensor
    tokens = micro_batch * m.seq_len
    return {"matmul_s": _gemm_s(tokens, m.vocab / t, m.hidden, hw, work.activation_bytes),
            "memory_s": TRAFFIC_PER_KEPT_BYTE * 2 * 4 * tokens * m.vocab / t
            / _memory_rate(hw)}


def microbatch_work(work: Workload, micro_batch: int, tensor: int, hw: Hardware) -> dict:
    """Seconds one device spends on one micro-batch, per layer kind: {"block": {matmul_s,
    memory_s, backward_s}, "lm_head": {...}}. The backward costs twice the forward; a
    fully recomputed block runs its forward again, a selective one its attention core.
    The embeddings are lookups (no time)."""
    block = block_forward(work, micro_batch, tensor, hw)
    head = head_forward(work, micro_batch, tensor, hw)
    matmul = block["matmul_s"] + block["core_matmul_s"]
    memory_bound = block["memory_s"] + block["core_memory_s"]
    again_matmul, again_memory = {
        "full": (matmul, memory_bound),
        "selective": (block["core_matmul_s"], block["core_memory_s"])}.get(work.recompute,
                                                                          (0.0, 0.0))
    return {"block": {"matmul_s": 3 * matmul + again_matmul,
                      "memory_s": 3 * memory_bound + again_memory,
                      "backward_s": 2 * (matmul + memory_bound) + again_matmul + again_memory},
            "lm_head": {"matmul_s": 3 * head["matmul_s"], "memory_s": 3 * head["memory_s"],
                        "backward_s": 2 * (head["matmul_s"] + head["memory_s"])}}


def _link_rate(hw: Hardware, span: int) -> float:
    """Bytes/s per device of a collective over `span` consecutive devices: NVLink
    within a node, the device's share of the network beyond it, as NCCL achieves them."""
    if span <= hw.devices_per_node:
        return hw.intra_node_gbps * 1e9 * NVLINK_EFFICIENCY
    return hw.inter_node_gbps * 1e9 * NETWORK_EFFICIENCY


def _ring_all_reduce(size_bytes: float, group: int, rate: float) -> float:
    return 0.0 if group == 1 else 2 * (group - 1) / group * size_bytes / rate


def step(work: Workload, dims: ParallelDims, micro_batch: int, hw: Hardware) -> dict:
    """Seconds per optimizer step and bytes sent per device; the module docstring says
    what each term models.

    Returns {compute_s (the slowest device's matmul_s + memory_s over the step),
    bubble, tensor_comm_s, pipeline_comm_s, data_comm_s (data_comm_exposed_s of it
    not hidden by the backward), optimizer_s, step_s, comm_bytes, tokens_per_s, mfu}.
    """
    model, d, t, p, b = work.model, dims.batch_shards, dims.tp, dims.pp, micro_batch
    m = microbatches(work, dims, micro_batch)
    v = dims.virtual_stages if p > 1 else 1
    tokens = work.global_batch * model.seq_len
    model_flops = tokens * model.training_flops_per_token()
    peak = hw.peak_tflops * 1e12

    # The pipeline goes at the pace of its slowest stage (the last one holds the LM head).
    kinds = [name if name == "lm_head" else "block" if name.startswith("block_") else None
             for name, _ in model.layer_parameters()]
    per_kind = microbatch_work(work, b, t, hw)

    def total(layers, key):
        return sum(per_kind[kinds[i]][key] for i in layers if kinds[i])

    slowest = max(stages(model, p),
                  key=lambda layers: total(layers, "matmul_s") + total(layers, "memory_s"))
    matmul, memory_bound = total(slowest, "matmul_s"), total(slowest, "memory_s")
    blocks = sum(1 for i in slowest if kinds[i] == "block")

    # Megatron's tensor-parallel blocks all-reduce twice in the forward and twice in
    # the backward (twice more when the forward is recomputed); nothing hides them.
    activation = model.seq_len * b * model.hidden * work.activation_bytes
    all_reduces = blocks * (6 if work.recompute == "full" else 4)
    tp_comm = all_reduces * _ring_all_reduce(activation, t, _link_rate(hw, t))
    tp_bytes = m * all_reduces * (2 * (t - 1) / t * activation if t > 1 else 0.0)

    # Each micro-batch's activation goes forward and its gradient back across each
    # stage boundary of a device (V of them when interleaved): every tensor rank sends
    # 1/t of it and the next stage's ranks all-gather it over NVLink (Megatron's
    # scatter/gather). A stage waits for its input: nothing hides the sends.
    pp_comm = pp_bytes = 0.0
    if p > 1:
        send = activation / t / _link_rate(hw, t * d * p)
        if t > 1:
            send += (t - 1) / t * activation / _link_rate(hw, t)
        pp_comm, pp_bytes = 2 * v * send, 2 * v * m * activation
    bubble = _bubble(work.schedule, dims.virtual_stages, p, m) if p > 1 else 0.0
    pipelined = m * (matmul + memory_bound + tp_comm + pp_comm) / (1 - bubble)

    params = max(stage_parameters(model, t, p))
    # The same arithmetic as DataParallel.communication_report; tfpar compresses
    # the all-reduce of the tf.distribute strategies only (pure data parallelism).
    wire = REDUCE_BYTES[work.reduce_dtype] if compresses_gradients(dims) else GRADIENT_BYTES
    dp_bytes = ring_all_reduce_bytes(params * wire, d)
    if dims.fsdp_enabled:
        # All-gathers and reduce-scatters move (n-1)/n of the bytes; an all-reduce 2(n-1)/n.
        share = (d - 1) / d * params * GRADIENT_BYTES
        gathers = 1 if dims.zero_stage < 3 else (2 if work.recompute == "full" else 1)
        dp_bytes = (2 if dims.zero_stage == 1 else 1) * share + gathers * share
        if p > 1:
            # A pipeline's stage meshes gather a stage's weights and reduce-scatter
            # its gradients for every micro-batch (tfpar keeps no gathered copy
            # between them).
            dp_bytes *= m
    dp_time = dp_bytes / _link_rate(hw, t * d) if d > 1 else 0.0
    # Replicas all-reduce each bucket of gradients once the last micro-batch's backward
    # has produced it (PyTorch DDP; Megatron-LM without a pipeline): only what outlasts
    # that backward waits. ZeRO's gathers and reduce-scatters stay in the open.
    last_backward = total(slowest, "backward_s")
    dp_exposed = dp_time if dims.fsdp_enabled else max(dp_time - last_backward, 0.0)
    # AdamW reads and writes each float32 variable of the device once.
    optimizer = (params * OPTIMIZER_STEP_BYTES / zero_divisors(dims)["optimizer"]
                 / _memory_rate(hw))
    step_s = pipelined + dp_exposed + optimizer
    return {"compute_s": m * (matmul + memory_bound), "matmul_s": m * matmul,
            "memory_s": m * memory_bound, "bubble": bubble, "tensor_comm_s": m * tp_comm,
            "pipeline_comm_s": m * pp_comm, "data_comm_s": dp_time,
            "data_comm_exposed_s": dp_exposed, "optimizer_s": optimizer, "step_s": step_s,
            "comm_bytes": tp_bytes + pp_bytes + dp_bytes, "tokens_per_s": tokens / step_s,
            "mfu": model_flops / (step_s * hw.devices * peak)}
