"""`tfpar <command> [flags] [-- program ...]`.

Commands:
  train    train the reference GPT on text (the embedded corpus by default)
  plan     recommend data/tensor/pipeline degrees for a model and a cluster
  info     devices, versions, the strategy the flags would build, the cluster
  launch   run a command as N local workers (tfpar's torchrun)
  k8s      `k8s render`: Kubernetes manifests for a multi-worker job

Each command is a thin layer over the library; flags are absl flags, so
`tfpar info --strategy=data --num_simulated_devices=4` describes exactly
what a training script given the same flags would build.
"""

from __future__ import annotations

import json
import sys

from absl import app, flags

from tfpar import flags as tfpar_flags  # noqa: F401  (defines the strategy flags)
from tfpar.plan import flags as plan_flags  # noqa: F401  (defines the plan flags)
from tfpar.train import flags as train_flags  # noqa: F401  (defines the train flags)
from tfpar.cluster import ClusterConfigError, dtensor_env
from tfpar.devices import DeviceConfigError, simulate_devices

FLAGS = flags.FLAGS

flags.DEFINE_bool("json", False, "info: print JSON instead of text.")
flags.DEFINE_integer("nproc", 1, "launch: number of worker processes on this host.")
flags.DEFINE_integer("max_restarts", 0,
                     "launch: restart the whole group this many times after a "
                     "failure (the script resumes from its BackupAndRestore backup).")
flags.DEFINE_float("grace_period", 10.0,
                   "launch: seconds between SIGTERM and SIGKILL when stopping ranks. "
                   "k8s render: the pods' terminationGracePeriodSeconds (default 120).")
# k8s render. --max_restarts and --grace_period mean the same for a Kubernetes
# job as for a local launch; their Kubernetes defaults differ (below).
flags.DEFINE_string("name", None, "k8s render: job name (a DNS-1123 label); also the "
                    "Service name and the pods' subdomain.")
flags.DEFINE_string("image", None, "k8s render: container image with Python, TensorFlow, "
                    "tfpar and the training script.")
flags.DEFINE_integer("workers", None, "k8s render: number of worker pods.")
flags.DEFINE_integer("gpus_per_worker", 0, "k8s render: nvidia.com/gpu per pod.")
flags.DEFINE_string("cpu", None, "k8s render: CPU request per pod ('8', '500m').")
flags.DEFINE_string("memory", None, "k8s render: memory request and limit per pod ('32Gi').")
flags.DEFINE_string("namespace", None, "k8s render: namespace (default: kubectl's current one).")
flags.DEFINE_string("checkpoint_dir", None,
                    "k8s render: shared backup location: a bucket URL (gs://, s3://) or an "
                    "absolute path where a ReadWriteMany volume is mounted. Pods get it as "
                    "$(TFPAR_CHECKPOINT_DIR), which the command may use.")
flags.DEFINE_string("checkpoint_claim", None,
                    "k8s render: PersistentVolumeClaim mounted at --checkpoint_dir "
                    "(default NAME-checkpoints).")
flags.DEFINE_string("checkpoint_size", None,
                    "k8s render: also create the checkpoint claim with this size ('100Gi').")
flags.DEFINE_string("format", None, "k8s render: indexed-job (default), jobset or tfjob. "
                    "plan: table (default) or json.")
flags.DEFINE_string("output", None, "k8s render: write the YAML here instead of stdout.")
K8S_DEFAULT_MAX_RESTARTS = 3
K8S_DEFAULT_GRACE_PERIOD_S = 120

COMMANDS = ("train", "plan", "info", "launch", "k8s")
USAGE = (
    "usage: tfpar <command> [flags] [-- program args...]\n"
    "commands:\n"
    "  train [--strategy=data|tensor|pipeline ...] [--output_dir DIR] [--dataset NAME |\n"
    "      --text_files GLOB] [--model SIZE] [--train_steps N] ...   (tfpar train --helpfull)\n"
    "  plan --model SIZE --devices N [--devices_per_node G] [--device_memory GIB]\n"
    "      [--global_batch_size B] [--format table|json] ...\n"
    "  info [--json] [strategy flags]   what this process would run on\n"
    "  launch --nproc N [--max_restarts R] -- python train.py [flags]\n"
    "  k8s render --name NAME --image IMAGE --workers N [--gpus_per_worker G] [--cpu C]\n"
    "      [--memory M] [--namespace NS] [--checkpoint_dir PATH|URL]\n"
    "      [--format indexed-job|jobset|tfjob] [--output FILE] -- python train.py [flags]\n"
)


def info() -> dict:
    """Devices, versions, the strategy the flags would build, the cluster."""
    import keras
    import tensorflow as tf

    from tfpar import __version__

    if FLAGS.num_simulated_devices:
        simulate_devices(FLAGS.num_simulated_devices)
    found = tfpar_flags.discover_from_flags()
    cluster = None if found is None else found.cluster
    name = tfpar_flags.resolve_strategy_name()
    devices = [d.name for d in tf.config.list_logical_devices()]
    gpus = [d for d in devices if "GPU" in d]
    replicas = {"one_device": 1, "data": len(gpus) or sum("CPU" in d for d in devices),
                "multi_worker": (len(gpus) or 1) * (cluster.num_workers if cluster else 1)}
    if FLAGS.mesh:
        from tfpar.strategies.tensor.mesh import parse_mesh

        names, sizes = parse_mesh(FLAGS.mesh)
        replicas["tensor"] = dict(zip(names, sizes)).get("batch")
    return {
        "tfpar": __version__,
        "tensorflow": tf.__version__,
        "keras": keras.__version__,
        "keras_backend": keras.backend.backend(),
        "devices": devices,
        "strategy": {
            "name": name,
            "replicas": replicas.get(name),
            "precision": FLAGS.precision,
            "mesh": FLAGS.mesh if name == "tensor" else None,
            "layouts": FLAGS.layouts if name == "tensor" else None,
        },
        "cluster": None if cluster is None else {
            "source": found.source,
            "details": dict(found.details),
            "tf_config": cluster.to_tf_config(),
            "num_workers": cluster.num_workers,
            "is_chief": cluster.is_chief,
            "rank": cluster.rank if cluster.task_type in ("chief", "worker") else None,
            "dtensor_env": (dtensor_env(cluster)
                            if cluster.task_type in ("chief", "worker") else None),
        },
    }


def _print_info(report: dict) -> None:
    s = report["strategy"]
    print(f"tfpar {report['tfpar']}  TensorFlow {report['tensorflow']}  "
          f"Keras {report['keras']} ({report['keras_backend']} backend)")
    print(f"devices:  {', '.join(report['devices'])}")
    print(f"strategy: {s['name']} ({s['replicas']} replica(s), precision {s['precision']})")
    c = report["cluster"]
    if c is None:
        print("cluster:  none (single process)")
    else:
        role = "chief" if c["is_chief"] else "worker"
        print(f"cluster:  {c['num_workers']} worker(s); this is rank {c['rank']} ({role}); "
              f"found in {c['source']}")
        print(f"TF_CONFIG: {json.dumps(c['tf_config'])}")


def main(argv: list[str]) -> int:
    args = argv[1:]
    if not args or args[0] not in COMMANDS:
        sys.stderr.write(USAGE)
        return 2
    command, rest = args[0], args[1:]
    try:
        return _dispatch(command, rest)
    except (ClusterConfigError, DeviceConfigError) as e:
        sys.stderr.write(f"tfpar {command}: {e}\n")
        return 2


def _dispatch(command: str, rest: list[str]) -> int:
    if command in ("train", "plan", "info") and rest:
        sys.stderr.write(f"tfpar {command}: unexpected arguments {rest}\n{USAGE}")
        return 2
    if command == "k8s":
        return k8s(rest)
    if command == "train":
        return train()
    if command == "plan":
        return plan()
    if command == "info":
        report = info()
        if FLAGS.json:
            print(json.dumps(report, indent=2, sort_keys=True))
        else:
            _print_info(report)
        return 0
    from tfpar.launch import Launcher, LaunchError

    try:
        launcher = Launcher(nproc=FLAGS.nproc, max_restarts=FLAGS.max_restarts,
                            grace_period_s=FLAGS.grace_period)
        return launcher.run(rest)
    except LaunchError as e:
        sys.stderr.write(f"tfpar launch: {e}\n")
        return 2


def train() -> int:
    """`tfpar train [flags]`: trains the reference GPT (tfpar.train)."""
    from tfpar.data.text import TextDataError
    from tfpar.strategies.tensor.layouts import LayoutError
    from tfpar.strategies.tensor.mesh import MeshError
    from tfpar.strategies.pipeline import PipelineConfigError, PipelineSplitError
    from tfpar.train import TrainConfigError, config_from_flags, run

    try:
        strategy = tfpar_flags.from_flags()
        run(config_from_flags(strategy), strategy)
    except (TrainConfigError, TextDataError, FileNotFoundError, MeshError, LayoutError,
            PipelineConfigError, PipelineSplitError) as e:
        sys.stderr.write(f"tfpar train: {e}\n")
        return 2
    return 0


def plan() -> int:
    """`tfpar plan [flags]`: recommends data, tensor and pipeline degrees (tfpar.plan)."""
    from tfpar.plan import recommend
    from tfpar.plan.render import dumps, schedule_png, table

    fmt = FLAGS.format or "table"
    if fmt not in ("table", "json"):
        sys.stderr.write(f"tfpar plan: --format={fmt}: use table or json.\n")
        return 2
    try:
        result = recommend(plan_flags.workload_from_flags(), plan_flags.hardware_from_flags(),
                           runnable_only=FLAGS.runnable_only)
    except ValueError as e:
        sys.stderr.write(f"tfpar plan: {e}\n")
        return 2
    print(dumps(result) if fmt == "json" else table(result, top=FLAGS.top))
    best = result.best
    if best is None:
        sys.stderr.write(f"tfpar plan: {result.reasons[0]}\n")
        return 1
    if FLAGS.timeline_png:
        dims = best.dims
        schedule_png(FLAGS.timeline_png, max(dims.pp, 2), best.microbatches,
                     f"data={dims.dp} tensor={dims.tp} pipeline={dims.pp}: "
                     f"{max(dims.pp, 2)} stages, {best.microbatches} micro-batches")
    return 0


def k8s(rest: list[str]) -> int:
    """`tfpar k8s render ... -- COMMAND`: writes the manifests."""
    from tfpar.k8s import JobSpec, K8sSpecError, render, to_yaml

    if not rest or rest[0] != "render":
        sys.stderr.write(f"tfpar k8s: expected `render`, got {rest[:1]}\n{USAGE}")
        return 2
    missing = [f"--{n}" for n in ("name", "image", "workers") if FLAGS[n].value is None]
    if missing:
        sys.stderr.write(f"tfpar k8s render: {', '.join(missing)} required, e.g. `tfpar k8s "
                         "render --name mnist --image registry/train:1 --workers 4 -- "
                         "python train.py --strategy=multi_worker`.\n")
        return 2
    try:
        spec = JobSpec(
            name=FLAGS.name, image=FLAGS.image, command=rest[1:], workers=FLAGS.workers,
            gpus_per_worker=FLAGS.gpus_per_worker, cpu=FLAGS.cpu, memory=FLAGS.memory,
            namespace=FLAGS.namespace, checkpoint_dir=FLAGS.checkpoint_dir,
            checkpoint_claim=FLAGS.checkpoint_claim, checkpoint_size=FLAGS.checkpoint_size,
            max_restarts=(FLAGS.max_restarts if FLAGS["max_restarts"].present
                          else K8S_DEFAULT_MAX_RESTARTS),
            grace_period_s=(int(FLAGS.grace_period) if FLAGS["grace_period"].present
                            else K8S_DEFAULT_GRACE_PERIOD_S),
        )
        text = to_yaml(render(spec, FLAGS.format or "indexed-job"))
    except K8sSpecError as e:
        sys.stderr.write(f"tfpar k8s render: {e}\n")
        return 2
    if FLAGS.output:
        with open(FLAGS.output, "w") as f:
            f.write(text)
    else:
        sys.stdout.write(text)
    return 0


def run() -> None:
    """Console-script entry point."""
    # absl stops parsing at "--": the launched program's own flags are left
    # untouched for it.
    app.run(lambda argv: sys.exit(main(argv)))


if __name__ == "__main__":
    run()
