"""`tfpar k8s render`: Kubernetes manifests for a multi-worker job (`tfpar.k8s`)."""

from __future__ import annotations

from absl import flags

from tfpar.cli.flags import Command, define_restart_flags, write_error
from tfpar.flags import define_flags, flag_group

K8S_RENDER_FLAGS = {
    "name": (flags.DEFINE_string, None,
        "Job name (a DNS-1123 label); also the Service name and the pods' subdomain. "
        "Required."),
    "image": (flags.DEFINE_string, None,
        "Container image with Python, TensorFlow, tfpar and the training script. "
        "Required."),
    "workers": (flags.DEFINE_integer, None, "Number of worker pods. Required."),
    "kind": (flags.DEFINE_string, "indexed-job",
        "The manifests: indexed-job (a headless Service + Indexed Job, plain "
        "Kubernetes), jobset (JobSet) or tfjob (Kubeflow TFJob)."),
    "gpus_per_worker": (flags.DEFINE_integer, 0, "nvidia.com/gpu per pod."),
    "cpu": (flags.DEFINE_string, None, "CPU request per pod ('8', '500m')."),
    "memory": (flags.DEFINE_string, None, "Memory request and limit per pod ('32Gi')."),
    "namespace": (flags.DEFINE_string, None, "Namespace (default: kubectl's current one)."),
    "checkpoint_dir": (flags.DEFINE_string, None,
        "Shared backup location: a bucket URL (gs://, s3://) or an absolute path where "
        "a ReadWriteMany volume is mounted. Pods get it as $(TFPAR_CHECKPOINT_DIR), "
        "which the command may use."),
    "checkpoint_claim": (flags.DEFINE_string, None,
        "PersistentVolumeClaim mounted at --checkpoint_dir (default NAME-checkpoints)."),
    "checkpoint_size": (flags.DEFINE_string, None,
        "Also create the checkpoint claim with this size ('100Gi')."),
    "output": (flags.DEFINE_string, None, "Write the YAML here instead of stdout."),
    "network_policy": (flags.DEFINE_bool, True,
        "Also render a NetworkPolicy: only the job's own pods may connect to the worker "
        "port (2222), every other connection to the pods is refused. TensorFlow's gRPC "
        "port has no authentication: a pod that reaches it can run ops in the workers. "
        "--network_policy=false leaves it out (the pod network must then be trusted)."),
    "egress": (flags.DEFINE_list, None,
        "Restrict the pods' outgoing connections to their peers, DNS and these networks: "
        "CIDR[:PORT],... (TCP port; none: any port), e.g. "
        "--egress=10.0.0.0/8:443,0.0.0.0/0:443, or --egress=none. Default: unrestricted."),
}


@flag_group
def define_k8s_render_flags(fv: flags.FlagValues) -> None:
    define_flags(fv, K8S_RENDER_FLAGS)
    # Kubernetes defaults: pods are preempted and rescheduled, and saving a large
    # model to a bucket takes longer than on a local disk.
    define_restart_flags(fv, max_restarts=3, grace_period=120)


def run(fv, program) -> int:
    from tfpar.k8s import JobSpec, K8sSpecError, render, to_yaml

    missing = [f"--{n}" for n in ("name", "image", "workers") if fv[n].value is None]
    if missing:
        write_error("k8s render", f"{', '.join(missing)} required, e.g. `tfpar k8s render "
                    "--name mnist --image registry/train:1 --workers 4 -- python train.py "
                    "--strategy=multi_worker`.")
        return 2
    try:
        spec = JobSpec(
            name=fv.name, image=fv.image, command=program or [], workers=fv.workers,
            gpus_per_worker=fv.gpus_per_worker, cpu=fv.cpu, memory=fv.memory,
            namespace=fv.namespace, checkpoint_dir=fv.checkpoint_dir,
            checkpoint_claim=fv.checkpoint_claim, checkpoint_size=fv.checkpoint_size,
            max_restarts=fv.max_restarts, grace_period_s=int(fv.grace_period),
            network_policy=fv.network_policy, egress=fv.egress)
        text = to_yaml(render(spec, fv.kind))
    except K8sSpecError as e:
        write_error("k8s render", str(e))
        return 2
    if fv.output:
        with open(fv.output, "w") as f:
            f.write(text)
    else:
        print(text, end="")
    return 0


COMMAND = Command(
    name="k8s render",
    summary="Kubernetes manifests for a multi-worker job",
    usage="--name NAME --image IMAGE --workers N [--kind indexed-job|jobset|tfjob] "
          "[--gpus_per_worker G] [--cpu C] [--memory M] [--checkpoint_dir PATH|URL] "
          "[--egress CIDR[:PORT],...|none] [--nonetwork_policy] [--output FILE] "
          "-- command [args...]",
    example="tfpar k8s render --name lm --image registry.example.com/train:1 --workers 4 "
            "--kind=jobset -- python train.py --strategy=multi_worker",
    groups=(("k8s render", define_k8s_render_flags),),
    run=run,
    takes_program=True,
)
