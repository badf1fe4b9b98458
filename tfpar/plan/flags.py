"""absl flags of `tfpar plan`, and the Workload and Hardware they describe.

The model shape is `tfpar.models.flags` (--model, --layers, ...); the global
batch, --precision and --schedule are tfpar's strategy flags, with the same
meaning as for training. No TensorFlow is imported.
"""

from __future__ import annotations

from absl import flags

from tfpar import flags as tfpar_flags  # noqa: F401  (--global_batch_size, --precision, --schedule)
from tfpar.models import flags as model_flags
from tfpar.plan.cost import ACCELERATORS, Hardware, Workload

FLAGS = flags.FLAGS


def _define(define, name, *args, **kwargs):
    if name not in FLAGS:
        define(name, *args, **kwargs)


_define(flags.DEFINE_integer, "devices", None, "plan: devices (GPUs) in the job.")
_define(flags.DEFINE_integer, "devices_per_node", 8, "plan: devices per node (host).")
_define(flags.DEFINE_enum, "accelerator", "a100-80gb", list(ACCELERATORS),
        "plan: the device type; sets the defaults of the four flags below.")
_define(flags.DEFINE_float, "device_memory", None, "plan: GiB of memory per device.")
_define(flags.DEFINE_float, "device_tflops", None,
        "plan: peak dense TFLOP/s per device at the --precision's compute dtype.")
_define(flags.DEFINE_float, "intra_node_bandwidth", None,
        "plan: GB/s per device and direction between devices of one node (NVLink).")
_define(flags.DEFINE_float, "inter_node_bandwidth", None,
        "plan: GB/s per device and direction between nodes (its share of the network).")
_define(flags.DEFINE_float, "efficiency", 0.5,
        "plan: fraction of peak FLOP/s the matmuls achieve (0.4-0.6 on large GPU jobs).")
_define(flags.DEFINE_bool, "recompute", False,
        "plan: assume full activation recomputation (published large-model runs use it; "
        "tfpar's runtime does not).")
_define(flags.DEFINE_bool, "runnable_only", False,
        "plan: only layouts tfpar can run today (no tensor x pipeline, pipelines on one host).")
_define(flags.DEFINE_integer, "top", 12, "plan: candidates shown in the table.")
_define(flags.DEFINE_string, "timeline_png", None,
        "plan: also draw the chosen pipeline's GPipe and 1F1B timelines to this PNG.")


def workload_from_flags() -> Workload:
    if not FLAGS.global_batch_size:
        raise ValueError("--global_batch_size is required: sequences per optimizer step "
                         "over the whole job (e.g. 1536 for GPT-3 175B).")
    return Workload(model_flags.config_from_flags(), FLAGS.global_batch_size,
                    precision=FLAGS.precision, schedule=FLAGS.schedule,
                    recompute=FLAGS.recompute)


def hardware_from_flags() -> Hardware:
    if not FLAGS.devices:
        raise ValueError("--devices is required: how many devices the job may use.")
    preset = ACCELERATORS[FLAGS.accelerator]
    sixteen_bit = FLAGS.precision != "float32"

    def pick(flag, default):
        value = FLAGS[flag].value
        return default if value is None else value

    return Hardware(
        devices=FLAGS.devices, devices_per_node=FLAGS.devices_per_node,
        memory_gib=pick("device_memory", preset["memory_gib"]),
        peak_tflops=pick("device_tflops", preset["tflops16" if sixteen_bit else "tflops32"]),
        intra_node_gbps=pick("intra_node_bandwidth", preset["intra"]),
        inter_node_gbps=pick("inter_node_bandwidth", preset["inter"]),
        efficiency=FLAGS.efficiency)
