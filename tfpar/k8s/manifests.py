"""Kubernetes manifests for a multi-worker tfpar job: Indexed Job, JobSet, TFJob.

`JobSpec` is the validated description of one job (name, image, workers,
resources, checkpoint location, the training command); `render(spec)` turns it
into the list of Kubernetes objects (plain dicts) of one format, and
`to_yaml` writes them as one multi-document YAML stream for `kubectl apply -f`.

Every format gives the pods what `tfpar.cluster.discover()` needs to build the
cluster without a hand-written TF_CONFIG:

- indexed-job: a headless Service named NAME and an Indexed Job whose pods
  have hostnames NAME-0 .. NAME-{N-1} in subdomain NAME, so that worker i is
  reachable at NAME-i.NAME:2222. Kubernetes sets JOB_COMPLETION_INDEX; the
  manifest sets TFPAR_NUM_WORKERS, TFPAR_SUBDOMAIN and TFPAR_PORT.
- jobset: a JobSet (jobset.x-k8s.io/v1alpha2) with one replicated job
  "workers"; JobSet creates the headless Service; pods are
  NAME-workers-0-i.NAME.
- tfjob: a Kubeflow TFJob (kubeflow.org/v1); the operator writes TF_CONFIG.

Every format also gets a NetworkPolicy (`tfpar.k8s.network_policy`): only
the job's own pods may connect to the worker port, because TensorFlow's gRPC
servers accept anyone who can reach them.

Failure handling is the contract of `tfpar.exit_codes`: a worker exits with
PREEMPTED after saving a checkpoint on SIGTERM and with PEER_LOST when a peer
vanished; both restart the group and resume. Exit codes 1 and 2 (an uncaught
error, a bad flag) fail the job at once: restarting cannot fix them.

Example::

    >>> spec = JobSpec(name="mnist", image="registry/train:1", workers=2,
    ...                command=["python", "train.py", "--strategy=multi_worker"])
    >>> [d["kind"] for d in render(spec)]
    ['NetworkPolicy', 'Service', 'Job']
"""

from __future__ import annotations

import dataclasses
import re
from typing import Sequence

from tfpar import exit_codes
from tfpar.k8s.network_policy import EgressRule, network_policy, parse_egress

FORMATS = ("indexed-job", "jobset", "tfjob")
PORT = 2222
PORT_NAME = "tfpar-grpc"  # an IANA service name: <= 15 characters
CONTAINER = "worker"
TFJOB_CONTAINER = "tensorflow"  # the TFJob operator finds its container by this name
JOBSET_REPLICATED_JOB = "workers"
NON_ROOT_UID = 1000
# Environment the manifests set for `tfpar.cluster.discover()`.
ENV_NUM_WORKERS = "TFPAR_NUM_WORKERS"
ENV_SUBDOMAIN = "TFPAR_SUBDOMAIN"
ENV_PORT = "TFPAR_PORT"
ENV_CHECKPOINT_DIR = "TFPAR_CHECKPOINT_DIR"
# Bucket URLs TensorFlow's file system layer (tf.io.gfile) writes to directly.
BUCKET_SCHEMES = ("gs://", "s3://", "hdfs://", "az://")

_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_CPU = re.compile(r"^(\d+(\.\d+)?|\d+m)$")
_MEMORY = re.compile(r"^\d+(\.\d+)?(Ki|Mi|Gi|Ti|Pi|k|M|G|T|P)?$")


class K8sSpecError(ValueError):
    """A job description that cannot become a valid Kubernetes manifest."""


@dataclasses.dataclass(frozen=True)
class JobSpec:
    """One multi-worker training job on Kubernetes.

    Attributes:
      name: the job's name; also the Service name and the pods' subdomain
        (a DNS-1123 label: lower-case letters, digits and '-').
      image: the container image (it must contain Python, TensorFlow, tfpar
        and the training script).
      command: the container command: the training program and its flags,
        passed through unchanged (strategy flags included).
      workers: number of worker pods (worker 0 is the chief).
      gpus_per_worker: nvidia.com/gpu per pod (0: CPU only).
      cpu: CPU request per pod ("8", "500m"); None: no request.
      memory: memory request and limit per pod ("32Gi"); None: none.
      namespace: the namespace; None: kubectl's current one.
      checkpoint_dir: where backups live, shared by all workers: a bucket URL
        (gs://..., s3://...) or an absolute path in the container, which is
        then a mounted PersistentVolumeClaim (ReadWriteMany).
      checkpoint_claim: the claim mounted at a path checkpoint_dir
        (default NAME-checkpoints).
      checkpoint_size: if given, the manifest also creates that claim with
        this size ("100Gi").
      max_restarts: restarts after a failure that is not a preemption
        (Job backoffLimit, JobSet maxRestarts, TFJob backoffLimit).
      grace_period_s: seconds between SIGTERM and SIGKILL: time for the
        workers to agree on a step and write a checkpoint.
      network_policy: also render a NetworkPolicy that lets only the job's
        own pods reach the worker port.
      egress: None: the pods' outgoing connections are not restricted;
        otherwise `--egress` rules (see `network_policy.parse_egress`):
        ["none"] or CIDR[:PORT] strings; the pods may then reach only their
        peers, DNS, and these networks.
    """

    name: str
    image: str
    command: Sequence[str]
    workers: int = 1
    gpus_per_worker: int = 0
    cpu: str | None = None
    memory: str | None = None
    namespace: str | None = None
    checkpoint_dir: str | None = None
    checkpoint_claim: str | None = None
    checkpoint_size: str | None = None
    max_restarts: int = 3
    grace_period_s: int = 120
    network_policy: bool = True
    egress: Sequence[str] | None = None

    def __post_init__(self):
        object.__setattr__(self, "command", tuple(self.command))
        if self.egress is not None:
            object.__setattr__(self, "egress", tuple(self.egress))
        self._validate()

    def _validate(self) -> None:
        _check(bool(_DNS_LABEL.match(self.name or "")),
               f"--name={self.name!r}: a job name must be a DNS-1123 label (lower-case "
               "letters, digits and '-', starting and ending with a letter or digit), "
               "because it becomes the pods' hostnames and the Service name. Try "
               f"--name={_suggest_label(self.name)!r}.")
        _check(bool(self.image) and not any(c.isspace() for c in self.image),
               f"--image={self.image!r}: give a container image reference without "
               "spaces, e.g. --image=registry.example.com/team/train:1.0.")
        _check(isinstance(self.workers, int) and self.workers >= 1,
               f"--workers={self.workers}: a job needs at least 1 worker.")
        _check(isinstance(self.gpus_per_worker, int) and self.gpus_per_worker >= 0,
               f"--gpus_per_worker={self.gpus_per_worker}: must be an integer >= 0.")
        _check(self.cpu is None or bool(_CPU.match(self.cpu)),
               f"--cpu={self.cpu!r}: write a CPU quantity, cores ('8', '0.5') or "
               "millicores ('500m').")
        for flag, value in (("memory", self.memory), ("checkpoint_size", self.checkpoint_size)):
            _check(value is None or bool(_MEMORY.match(value)),
                   f"--{flag}={value!r}: write a byte quantity such as '16Gi', "
                   "'512Mi' or '100G'.")
        if self.namespace is not None:
            _check(bool(_DNS_LABEL.match(self.namespace)) and len(self.namespace) <= 63,
                   f"--namespace={self.namespace!r}: a namespace is a DNS-1123 label of "
                   "at most 63 characters (lower-case letters, digits, '-').")
        _check(bool(self.command),
               "no training command: put it after '--', e.g. `tfpar k8s render --name "
               "job --image img --workers 2 -- python train.py --strategy=multi_worker`.")
        _check(isinstance(self.max_restarts, int) and self.max_restarts >= 0,
               f"--max_restarts={self.max_restarts}: must be >= 0.")
        _check(self.grace_period_s >= 1,
               f"--grace_period={self.grace_period_s}: the pods need at least 1 second "
               "after SIGTERM to save a checkpoint.")
        if self.checkpoint_dir is not None:
            _check(self.is_bucket or self.checkpoint_dir.startswith("/"),
                   f"--checkpoint_dir={self.checkpoint_dir!r}: give a bucket URL "
                   f"({', '.join(s + '...' for s in BUCKET_SCHEMES)}) or an absolute path, "
                   "where a shared volume is mounted.")
        if self.checkpoint_claim is not None or self.checkpoint_size is not None:
            _check(self.checkpoint_dir is not None and not self.is_bucket,
                   "--checkpoint_claim/--checkpoint_size describe a volume, which needs "
                   "--checkpoint_dir=/an/absolute/path to mount it at.")
        if self.checkpoint_claim is not None:
            _check(bool(_DNS_LABEL.match(self.checkpoint_claim)),
                   f"--checkpoint_claim={self.checkpoint_claim!r}: a claim name is a "
                   "DNS-1123 label.")
        if self.egress is not None:
            _check(self.network_policy,
                   "--egress rules are part of the NetworkPolicy, which "
                   "--network_policy=false leaves out: drop one of the two.")
            _egress_rules(self.egress)

    @property
    def egress_rules(self) -> tuple[EgressRule, ...] | None:
        """The parsed `egress` (None: unrestricted)."""
        return None if self.egress is None else _egress_rules(self.egress)

    @property
    def is_bucket(self) -> bool:
        return bool(self.checkpoint_dir) and self.checkpoint_dir.startswith(BUCKET_SCHEMES)

    @property
    def claim_name(self) -> str | None:
        if self.checkpoint_dir is None or self.is_bucket:
            return None
        return self.checkpoint_claim or f"{self.name}-checkpoints"

    def pod_hostnames(self, fmt: str) -> list[str]:
        """The workers' hostnames in rank order, as each format names them."""
        if fmt == "indexed-job":
            return [f"{self.name}-{i}" for i in range(self.workers)]
        if fmt == "jobset":
            return [f"{self.name}-{JOBSET_REPLICATED_JOB}-0-{i}" for i in range(self.workers)]
        if fmt == "tfjob":
            return [f"{self.name}-worker-{i}" for i in range(self.workers)]
        raise K8sSpecError(f"--kind={fmt!r}: use one of {list(FORMATS)}.")

    def check_format(self, fmt: str) -> None:
        longest = self.pod_hostnames(fmt)[-1]
        _check(len(longest) <= 63,
               f"--name={self.name!r} is too long for --kind={fmt} with "
               f"{self.workers} workers: the last pod's hostname {longest!r} has "
               f"{len(longest)} characters and Kubernetes allows 63. Shorten the name "
               f"to at most {len(self.name) - (len(longest) - 63)} characters.")


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise K8sSpecError(message)


def _egress_rules(values) -> tuple[EgressRule, ...]:
    try:
        return parse_egress(values)
    except ValueError as e:
        raise K8sSpecError(str(e)) from None


def _suggest_label(name) -> str:
    label = re.sub(r"[^a-z0-9-]+", "-", str(name or "job").lower()).strip("-")
    return label[:50] or "job"


# ---------------------------------------------------------------- pieces
def _labels(spec: JobSpec) -> dict:
    return {"app.kubernetes.io/name": "tfpar", "app.kubernetes.io/instance": spec.name,
            "app.kubernetes.io/component": "worker",
            "app.kubernetes.io/managed-by": "tfpar"}


def _pod_selector(spec: JobSpec) -> dict:
    """Labels that pick out this job's pods, in every format.

    These are labels of the pod template as rendered (`_labels`), which each
    controller keeps on the pods it creates: the Job controller (indexed-job;
    it adds batch.kubernetes.io/job-name), JobSet (adds
    jobset.sigs.k8s.io/jobset-name, replicatedjob-name, job-index) and the
    TFJob operator (adds training.kubeflow.org/job-name, replica-type,
    replica-index; earlier tf-operator releases used other names). The
    controllers' labels are not used: they differ between controllers and
    their versions, and a selector naming a label the pods lack would leave
    them unprotected (podSelector) or cut them apart (from).
    """
    labels = _labels(spec)
    return {key: labels[key] for key in ("app.kubernetes.io/name", "app.kubernetes.io/instance",
                                         "app.kubernetes.io/component")}


def _network_policy(spec: JobSpec) -> list[dict]:
    if not spec.network_policy:
        return []
    return [network_policy(metadata=_metadata(spec), selector=_pod_selector(spec), port=PORT,
                           egress=spec.egress_rules)]


def _metadata(spec: JobSpec, name: str | None = None) -> dict:
    meta = {"name": name or spec.name, "labels": _labels(spec)}
    if spec.namespace:
        meta["namespace"] = spec.namespace
    return meta


def _env(spec: JobSpec, fmt: str) -> list[dict]:
    env = [{"name": "PYTHONUNBUFFERED", "value": "1"}]
    if fmt != "tfjob":  # the TFJob operator writes TF_CONFIG instead
        env += [
            {"name": ENV_NUM_WORKERS, "value": str(spec.workers)},
            {"name": ENV_SUBDOMAIN, "value": spec.name},
            {"name": ENV_PORT, "value": str(PORT)},
        ]
    if fmt == "jobset":
        # JobSet records a pod's place as annotations; the downward API makes
        # them the environment variables `tfpar.cluster.discover()` reads.
        for var, key in (("JOBSET_NAME", "jobset-name"),
                         ("REPLICATED_JOB_NAME", "replicatedjob-name"),
                         ("JOB_INDEX", "job-index")):
            env.append({"name": var, "valueFrom": {"fieldRef": {
                "fieldPath": f"metadata.annotations['jobset.sigs.k8s.io/{key}']"}}})
    if spec.checkpoint_dir:
        env.append({"name": ENV_CHECKPOINT_DIR, "value": spec.checkpoint_dir})
    return env


def _resources(spec: JobSpec) -> dict:
    # No CPU limit: CFS throttling stalls the all-reduce of every worker when
    # one is throttled. Memory limit = request: a pod is never OOM-killed for
    # memory it was promised, and the scheduler places it where that fits.
    requests, limits = {}, {}
    if spec.cpu:
        requests["cpu"] = spec.cpu
    if spec.memory:
        requests["memory"] = limits["memory"] = spec.memory
    if spec.gpus_per_worker:
        # Extended resources: the limit is the request and must be given.
        limits["nvidia.com/gpu"] = spec.gpus_per_worker
    resources = {}
    if requests:
        resources["requests"] = requests
    if limits:
        resources["limits"] = limits
    return resources


def _pod_spec(spec: JobSpec, fmt: str) -> dict:
    container = {
        "name": TFJOB_CONTAINER if fmt == "tfjob" else CONTAINER,
        "image": spec.image,
        "command": list(spec.command),
        "ports": [{"name": "tfjob-port" if fmt == "tfjob" else PORT_NAME,
                   "containerPort": PORT, "protocol": "TCP"}],
        "env": _env(spec, fmt),
        "securityContext": {
            "allowPrivilegeEscalation": False,
            "runAsNonRoot": True,
            "capabilities": {"drop": ["ALL"]},
        },
    }
    resources = _resources(spec)
    if resources:
        container["resources"] = resources
    pod = {
        "restartPolicy": "Never",  # podFailurePolicy requires it
        "terminationGracePeriodSeconds": spec.grace_period_s,
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": NON_ROOT_UID,
            "runAsGroup": NON_ROOT_UID,
            # The checkpoint volume becomes writable by the non-root user.
            "fsGroup": NON_ROOT_UID,
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "containers": [container],
    }
    if fmt == "indexed-job":
        pod["subdomain"] = spec.name
    claim = spec.claim_name
    if claim:
        container["volumeMounts"] = [{"name": "checkpoints", "mountPath": spec.checkpoint_dir}]
        pod["volumes"] = [{"name": "checkpoints",
                           "persistentVolumeClaim": {"claimName": claim}}]
    if spec.gpus_per_worker:
        # GPU nodes are usually tainted so that only GPU pods land there.
        pod["tolerations"] = [{"key": "nvidia.com/gpu", "operator": "Exists",
                               "effect": "NoSchedule"}]
    return pod


def _pod_failure_policy(container: str) -> dict:
    return {"rules": [
        # A bug or a bad flag fails the same way every time: fail the job now.
        {"action": "FailJob", "onExitCodes": {
            "containerName": container, "operator": "In",
            "values": sorted(exit_codes.PERMANENT)}},
        # Preempted (checkpoint saved) or a peer vanished: replace the pod; it
        # does not count against backoffLimit.
        {"action": "Ignore", "onExitCodes": {
            "containerName": container, "operator": "In",
            "values": sorted(exit_codes.RETRYABLE)}},
        # Evicted, preempted by a higher-priority pod, node drained or lost.
        {"action": "Ignore", "onPodConditions": [
            {"type": "DisruptionTarget", "status": "True"}]},
    ]}


def _job_spec(spec: JobSpec, fmt: str, backoff_limit: int) -> dict:
    labels = _labels(spec)
    return {
        "completionMode": "Indexed",
        "completions": spec.workers,
        "parallelism": spec.workers,
        "backoffLimit": backoff_limit,
        "podFailurePolicy": _pod_failure_policy(CONTAINER),
        "template": {"metadata": {"labels": labels}, "spec": _pod_spec(spec, fmt)},
    }


def _claim(spec: JobSpec) -> list[dict]:
    if not (spec.claim_name and spec.checkpoint_size):
        return []
    return [{
        "apiVersion": "v1", "kind": "PersistentVolumeClaim",
        "metadata": _metadata(spec, spec.claim_name),
        "spec": {"accessModes": ["ReadWriteMany"],  # every worker reads the backup
                 "resources": {"requests": {"storage": spec.checkpoint_size}}},
    }]


# ----------------------------------------------------------------- formats
def indexed_job(spec: JobSpec) -> list[dict]:
    """A headless Service and an Indexed Job (plus the checkpoint claim if sized)."""
    service = {
        "apiVersion": "v1", "kind": "Service",
        "metadata": _metadata(spec),
        "spec": {
            "clusterIP": "None",
            # Peers must resolve before they are Ready: TensorFlow connects
            # while every worker is still starting.
            "publishNotReadyAddresses": True,
            "selector": {"app.kubernetes.io/instance": spec.name,
                         "app.kubernetes.io/component": "worker"},
            "ports": [{"name": PORT_NAME, "port": PORT, "targetPort": PORT,
                       "protocol": "TCP"}],
        },
    }
    job = {"apiVersion": "batch/v1", "kind": "Job", "metadata": _metadata(spec),
           "spec": _job_spec(spec, "indexed-job", spec.max_restarts)}
    return _claim(spec) + _network_policy(spec) + [service, job]


def jobset(spec: JobSpec) -> list[dict]:
    """A JobSet: any failed Job restarts the whole group, up to maxRestarts."""
    # backoffLimit 0: a pod that fails fails its Job at once, and JobSet then
    # recreates every Job, so all workers restart together from the backup.
    job_spec = _job_spec(spec, "jobset", backoff_limit=0)
    return _claim(spec) + _network_policy(spec) + [{
        "apiVersion": "jobset.x-k8s.io/v1alpha2", "kind": "JobSet",
        "metadata": _metadata(spec),
        "spec": {
            "failurePolicy": {
                "maxRestarts": spec.max_restarts,
                # A Job failed by its podFailurePolicy (exit code 1 or 2) is a
                # real error: restarting cannot fix it.
                "rules": [{"name": "failOnProgramErrors", "action": "FailJobSet",
                           "onJobFailureReasons": ["PodFailurePolicy"]}],
            },
            "network": {"enableDNSHostnames": True, "subdomain": spec.name},
            "replicatedJobs": [{
                "name": JOBSET_REPLICATED_JOB, "replicas": 1,
                "template": {"metadata": {"labels": _labels(spec)}, "spec": job_spec},
            }],
        },
    }]


def tfjob(spec: JobSpec) -> list[dict]:
    """A Kubeflow TFJob for clusters that still run the legacy training-operator."""
    pod = _pod_spec(spec, "tfjob")
    pod.pop("restartPolicy")  # the replica spec's restartPolicy governs
    return _claim(spec) + _network_policy(spec) + [{
        "apiVersion": "kubeflow.org/v1", "kind": "TFJob",
        "metadata": _metadata(spec),
        "spec": {
            "runPolicy": {"backoffLimit": spec.max_restarts, "cleanPodPolicy": "Running"},
            "tfReplicaSpecs": {"Worker": {
                "replicas": spec.workers,
                # ExitCode: the operator restarts pods that exit with >= 128
                # (tfpar's PREEMPTED and PEER_LOST, signals) and fails the job
                # on 1-127.
                "restartPolicy": "ExitCode",
                "template": {"metadata": {"labels": _labels(spec)}, "spec": pod},
            }},
        },
    }]


_RENDERERS = {"indexed-job": indexed_job, "jobset": jobset, "tfjob": tfjob}


def render(spec: JobSpec, fmt: str = "indexed-job") -> list[dict]:
    """The Kubernetes objects of `spec` in format `fmt` (see FORMATS)."""
    if fmt not in _RENDERERS:
        raise K8sSpecError(f"--kind={fmt!r}: use one of {list(FORMATS)}.")
    spec.check_format(fmt)
    return _RENDERERS[fmt](spec)


def to_yaml(documents: Sequence[dict]) -> str:
    """A multi-document YAML stream (keys in the order written, for humans)."""
    import yaml

    return yaml.safe_dump_all(list(documents), sort_keys=False, default_flow_style=False,
                              width=100)
