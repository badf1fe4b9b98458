"""absl flags of `tfpar plan`, and the Workload and Hardware they describe.

The model shape is `tfpar.models.flags` (--model, --layers, ...); the global
batch, --precision and --schedule are defined by the same functions as the
strategy flags (`tfpar.flags`), so they mean the same as for training. No
TensorFlow is imported::

    fv = flags.FlagValues()
    define_plan_flags(fv)
    fv(["plan", "--model=gpt3-175b", "--devices=1024", "--global_batch_size=1536"])
    recommend(workload_from_flags(fv), hardware_from_flags(fv))
"""

from __future__ import annotations

from absl import flags

from tfpar import recompute

from tfpar import flags as tfpar_flags
from tfpar.models import flags as model_flags
from tfpar.models import shapes
from tfpar.plan.cost import ACCELERATORS, GEMM_EFFICIENCY, Hardware, Workload

FORMATS = ("table", "json")

PLAN_FLAGS = {
    "devices": (flags.DEFINE_integer, None, "Devices (GPUs) in the job."),
    "devices_per_node": (flags.DEFINE_integer, 8, "Devices per node (host)."),
    "accelerator": (tfpar_flags.enum_flag(list(ACCELERATORS)), "a100-80gb",
        "The device type; sets the defaults of --device_memory, "
        "--device_memory_bandwidth, --device_tflops, --intra_node_bandwidth and "
        "--inter_node_bandwidth."),
    "device_memory": (flags.DEFINE_float, None, "GiB of memory per device."),
    "device_memory_bandwidth": (flags.DEFINE_float, None,
        "GB/s of each device's own memory (HBM): how fast LayerNorm, softmax, dropout "
        "and the other memory-bound kernels run."),
    "device_tflops": (flags.DEFINE_float, None,
        "Peak dense TFLOP/s per device at the --precision's compute dtype."),
    "intra_node_bandwidth": (flags.DEFINE_float, None,
        "GB/s per device and direction between devices of one node (NVLink)."),
    "inter_node_bandwidth": (flags.DEFINE_float, None,
        "GB/s per device and direction between nodes (its share of the network)."),
    "efficiency": (flags.DEFINE_float, GEMM_EFFICIENCY,
        "Fraction of peak FLOP/s a large matmul sustains in a training step (measured "
        f"on A100s: {GEMM_EFFICIENCY}); the rest of the step time (memory-bound kernels, "
        "communication, the pipeline bubble) is modelled from the shapes."),
    "recompute": (tfpar_flags.enum_flag(recompute.MODES), "none",
        "Activation recomputation to assume, as tfpar train's --recompute: none, "
        "selective (the attention core) or full (each block; published large-model runs "
        "use it)."),
    "reduce_dtype": (tfpar_flags.enum_flag(["float32", "bfloat16", "float16"]), "float32",
        "The dtype data-parallel gradients are all-reduced in, as tfpar train's "
        "--reduce_dtype."),
    "runnable_only": (flags.DEFINE_bool, False,
        "Only layouts tfpar can run today (a pipeline, with tensor-parallel "
        "stages or not, on one host)."),
    "top": (flags.DEFINE_integer, 12, "Candidates shown in the table."),
    "format": (tfpar_flags.enum_flag(FORMATS), "table", "Print a table or JSON."),
    "timeline_png": (flags.DEFINE_string, None,
        "Also draw the chosen pipeline's GPipe and 1F1B timelines to this PNG."),
    "mesh_png": (flags.DEFINE_string, None,
        "Also draw the chosen layout's devices to this PNG: which node and device "
        "holds which pipeline stage, data replica and tensor shard."),
}


@tfpar_flags.flag_group
def define_plan_flags(fv: flags.FlagValues) -> None:
    """The flags of `tfpar plan`: the cluster's hardware and the search, with the
    model shape, --global_batch_size, --precision and --schedule."""
    model_flags.define_model_flags(fv)
    tfpar_flags.define_batch_flags(fv)
    tfpar_flags.define_precision_flag(fv)
    tfpar_flags.define_schedule_flag(fv)
    tfpar_flags.define_flags(fv, PLAN_FLAGS)
    for name in ("devices", "devices_per_node", "top"):
        flags.register_validator(name, _at_least_one(name), flag_values=fv)
    for name in ("device_memory", "device_memory_bandwidth", "device_tflops",
                 "intra_node_bandwidth", "inter_node_bandwidth"):
        flags.register_validator(name, _positive(name), flag_values=fv)
    flags.register_validator("efficiency", _fraction("efficiency"), flag_values=fv)
    flags.register_validator("model", _gpt_only, flag_values=fv)


def _gpt_only(value) -> bool:
    if shapes.is_hub(value):
        raise flags.ValidationError(
            f"--model={value}: tfpar plan plans the reference GPT's shapes; give a GPT preset "
            "(--model=gpt2-small ...) or --layers/--hidden/--heads/--vocab/--seq_len.")
    return True


def _at_least_one(name):
    def check(value):
        if value is not None and value < 1:
            raise flags.ValidationError(f"--{name}={value}: must be >= 1.")
        return True
    return check


def _positive(name):
    def check(value):
        if value is not None and value <= 0:
            raise flags.ValidationError(f"--{name}={value:g}: must be > 0 (or leave it out: "
                                        "--accelerator gives the default).")
        return True
    return check


def _fraction(name):
    def check(value):
        if not 0 < value <= 1:
            raise flags.ValidationError(f"--{name}={value:g}: must be in (0, 1], e.g. "
                                        f"{GEMM_EFFICIENCY}.")
        return True
    return check


def workload_from_flags(flag_values: flags.FlagValues = flags.FLAGS) -> Workload:
    f = flag_values
    if not f.global_batch_size:
        raise ValueError("--global_batch_size is required: sequences per optimizer step "
                         "over the whole job (e.g. 1536 for GPT-3 175B).")
    return Workload(model_flags.config_from_flags(flag_values=f), f.global_batch_size,
                    precision=f.precision, schedule=f.schedule, recompute=f.recompute,
                    reduce_dtype=f.reduce_dtype)


def hardware_from_flags(flag_values: flags.FlagValues = flags.FLAGS) -> Hardware:
    f = flag_values
    if not f.devices:
        raise ValueError("--devices is required: how many devices the job may use, "
                         "e.g. --devices=8.")
    preset = ACCELERATORS[f.accelerator]
    sixteen_bit = f.precision != "float32"

    def pick(flag, default):
        value = f[flag].value
        return default if value is None else value

    return Hardware(
        devices=f.devices, devices_per_node=f.devices_per_node,
        memory_gib=pick("device_memory", preset["memory_gib"]),
        memory_gbps=pick("device_memory_bandwidth", preset["memory_gbps"]),
        peak_tflops=pick("device_tflops", preset["tflops16" if sixteen_bit else "tflops32"]),
        intra_node_gbps=pick("intra_node_bandwidth", preset["intra"]),
        inter_node_gbps=pick("inter_node_bandwidth", preset["inter"]),
        efficiency=f.efficiency)
