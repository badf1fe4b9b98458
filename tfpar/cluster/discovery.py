"""Finding this process's cluster where it runs, with no hand-written TF_CONFIG.

`discover()` tries, in order:

1. ``TF_CONFIG`` (Kubeflow's TFJob, Ray Train, `tfpar launch`, by hand);
2. a Kubernetes **JobSet** pod (``JOBSET_NAME`` set): the pods of replicated
   job R are ``JOBSET-R-J-P`` (job index J, completion index P) in the
   JobSet's subdomain;
3. a Kubernetes **Indexed Job** pod (``JOB_COMPLETION_INDEX`` set): the pods
   are ``JOB-0 .. JOB-{N-1}`` in the subdomain of a headless Service, so
   worker i is ``JOB-i.SUBDOMAIN:2222``. The job name comes from the pod's
   hostname (``JOB-INDEX``).

The Kubernetes sources need the worker count, which no Kubernetes variable
holds: the manifests of `tfpar k8s render` set ``TFPAR_NUM_WORKERS`` (and
``TFPAR_SUBDOMAIN``, ``TFPAR_PORT``). Without ``TFPAR_NUM_WORKERS`` a pod is
not a tfpar multi-worker pod, and discovery finds no cluster there.

Names are resolved by TensorFlow when it connects; `wait_until_resolvable`
checks them first, because an unresolvable peer otherwise shows up minutes
later as a registration timeout that does not name the host.

Example (inside pod 1 of a 3-worker Indexed Job named "mnist")::

    >>> d = discover({"JOB_COMPLETION_INDEX": "1", "HOSTNAME": "mnist-1",
    ...               "TFPAR_NUM_WORKERS": "3", "TFPAR_SUBDOMAIN": "mnist"})
    >>> d.source, d.cluster.rank, d.cluster.training_addresses[0]
    ('indexed-job', 1, 'mnist-0.mnist:2222')
    >>> dtensor_env(d.cluster)["DTENSOR_JOBS"]
    'mnist-0.mnist:2222,mnist-1.mnist:2222,mnist-2.mnist:2222'
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import socket
import time
from typing import Callable, Mapping

from tfpar.cluster.tf_config import Cluster, ClusterConfigError, _parse_address

DEFAULT_PORT = 2222
ENV_NUM_WORKERS = "TFPAR_NUM_WORKERS"
ENV_SUBDOMAIN = "TFPAR_SUBDOMAIN"
ENV_PORT = "TFPAR_PORT"
SOURCES = ("flags", "TF_CONFIG", "jobset", "indexed-job")


@dataclasses.dataclass(frozen=True)
class Discovered:
    """A cluster and where it was found.

    Attributes:
      cluster: the validated cluster, seen from this process.
      source: one of SOURCES.
      details: the environment facts it was built from (for `tfpar info`).
    """

    cluster: Cluster
    source: str
    details: Mapping[str, object] = dataclasses.field(default_factory=dict)


def discover(environ: Mapping[str, str] | None = None) -> Discovered | None:
    """This process's cluster from TF_CONFIG, JobSet or Indexed Job; None if none.

    Raises:
      ClusterConfigError: a source is present but inconsistent (index out of
        range, hostname that does not match the index, bad numbers).
    """
    environ = os.environ if environ is None else environ
    cluster = Cluster.from_env(environ)
    if cluster is not None:
        return Discovered(cluster, "TF_CONFIG")
    if ENV_NUM_WORKERS not in environ:
        return None
    if environ.get("JOBSET_NAME"):
        return _from_jobset(environ)
    return _from_indexed_job(environ)


def _int(environ, name, *, minimum, why):
    raw = environ.get(name)
    if raw is None or not raw.strip():
        raise ClusterConfigError(f"{name} is not set; {why}")
    try:
        value = int(raw)
    except ValueError:
        raise ClusterConfigError(f"{name}={raw!r} is not an integer; {why}") from None
    if value < minimum:
        raise ClusterConfigError(f"{name}={value} must be >= {minimum}; {why}")
    return value


_RERENDER = "re-render the manifest with `tfpar k8s render`, which sets it"


def _hostname(environ) -> str:
    # Kubernetes sets HOSTNAME in every container; the kernel's name is the
    # same in a pod, and the fallback for processes started by hand.
    return environ.get("HOSTNAME") or socket.gethostname()


def _port(environ) -> int:
    return _int(environ, ENV_PORT, minimum=1, why=_RERENDER) if environ.get(ENV_PORT) else DEFAULT_PORT


def _from_indexed_job(environ) -> Discovered:
    num_workers = _int(environ, ENV_NUM_WORKERS, minimum=1, why=_RERENDER)
    index = _int(environ, "JOB_COMPLETION_INDEX", minimum=0,
                 why=f"{ENV_NUM_WORKERS} is set, so this must be a pod of an Indexed Job "
                     "(completionMode: Indexed), where Kubernetes sets it.")
    if index >= num_workers:
        raise ClusterConfigError(
            f"JOB_COMPLETION_INDEX={index} is out of range for {ENV_NUM_WORKERS}="
            f"{num_workers} (indices 0..{num_workers - 1}): the Job's completions and "
            f"{ENV_NUM_WORKERS} must be equal; {_RERENDER} from one --workers value.")
    hostname = _hostname(environ).split(".")[0]
    suffix = f"-{index}"
    if not hostname.endswith(suffix) or len(hostname) == len(suffix):
        raise ClusterConfigError(
            f"hostname {hostname!r} does not end with '-{index}' (JOB_COMPLETION_INDEX="
            f"{index}): Indexed Job pods are named JOB-INDEX, and peers are found from "
            "that name. Run the pod in an Indexed Job with a subdomain, or set TF_CONFIG.")
    job = hostname[: -len(suffix)]
    subdomain = environ.get(ENV_SUBDOMAIN) or job
    port = _port(environ)
    hosts = [f"{job}-{i}.{subdomain}:{port}" for i in range(num_workers)]
    cluster = Cluster.from_hosts(hosts, task_type="worker", task_index=index)
    return Discovered(cluster, "indexed-job", {
        "job": job, "hostname": hostname, "subdomain": subdomain,
        "completion_index": index, "num_workers": num_workers, "port": port})


def _from_jobset(environ) -> Discovered:
    jobset = environ["JOBSET_NAME"]
    num_workers = _int(environ, ENV_NUM_WORKERS, minimum=1, why=_RERENDER)
    replicated = environ.get("REPLICATED_JOB_NAME")
    if not replicated:
        raise ClusterConfigError(
            f"JOBSET_NAME={jobset!r} is set but REPLICATED_JOB_NAME is not; {_RERENDER} "
            "(from the jobset.sigs.k8s.io/replicatedjob-name annotation).")
    why = "JobSet pods get it from the Job (JOB_COMPLETION_INDEX) and from the " \
          "jobset.sigs.k8s.io/job-index annotation (JOB_INDEX); " + _RERENDER
    job_index = _int(environ, "JOB_INDEX", minimum=0, why=why)
    pod_index = _int(environ, "JOB_COMPLETION_INDEX", minimum=0, why=why)
    replicas = _int(environ, "REPLICATED_JOB_REPLICAS", minimum=1, why=why) \
        if environ.get("REPLICATED_JOB_REPLICAS") else 1
    if num_workers % replicas:
        raise ClusterConfigError(
            f"{ENV_NUM_WORKERS}={num_workers} is not a multiple of the {replicas} "
            f"replicas of replicated job {replicated!r}: every Job must have the same "
            "number of pods.")
    per_job = num_workers // replicas
    if job_index >= replicas or pod_index >= per_job:
        raise ClusterConfigError(
            f"JobSet pod (JOB_INDEX={job_index}, JOB_COMPLETION_INDEX={pod_index}) is out "
            f"of range for {replicas} job(s) of {per_job} pod(s) ({ENV_NUM_WORKERS}="
            f"{num_workers}); {_RERENDER} from one --workers value.")
    subdomain = environ.get(ENV_SUBDOMAIN) or jobset
    port = _port(environ)
    names = [f"{jobset}-{replicated}-{j}-{p}" for j in range(replicas) for p in range(per_job)]
    rank = job_index * per_job + pod_index
    hostname = _hostname(environ).split(".")[0]
    if hostname != names[rank]:
        raise ClusterConfigError(
            f"hostname {hostname!r} is not the JobSet pod name {names[rank]!r} that "
            f"JOBSET_NAME, REPLICATED_JOB_NAME, JOB_INDEX and JOB_COMPLETION_INDEX give: "
            "enable spec.network.enableDNSHostnames in the JobSet.")
    cluster = Cluster.from_hosts([f"{n}.{subdomain}:{port}" for n in names],
                                 task_type="worker", task_index=rank)
    return Discovered(cluster, "jobset", {
        "jobset": jobset, "replicated_job": replicated, "job_index": job_index,
        "completion_index": pod_index, "hostname": hostname, "subdomain": subdomain,
        "num_workers": num_workers, "port": port})


# -------------------------------------------------------------- resolution
def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
        return True
    except ValueError:
        return False


def wait_until_resolvable(
    cluster: Cluster,
    timeout_s: float,
    *,
    poll_s: float = 1.0,
    resolve: Callable[..., object] = socket.getaddrinfo,
) -> None:
    """Waits until every task's host name resolves; raises after `timeout_s`.

    Peers' DNS records appear as their pods are created, not all at once, so
    a name that does not resolve yet is retried until the deadline.

    Raises:
      ClusterConfigError: naming the first unresolvable host and what to check.
    """
    pending = []
    for role, addresses in cluster.jobs.items():
        for i, address in enumerate(addresses):
            host, port = _parse_address(address, f"{role}[{i}]")
            if not _is_ip(host):
                pending.append((f"{role}[{i}]", host, port))
    deadline = time.monotonic() + timeout_s
    start = time.monotonic()
    while pending:
        where, host, port = pending[0]
        try:
            resolve(host, port, type=socket.SOCK_STREAM)
            pending.pop(0)
            continue
        except (socket.gaierror, UnicodeError) as e:
            error = e
        if time.monotonic() >= deadline:
            raise ClusterConfigError(
                f"cannot resolve {where} host {host!r} after {time.monotonic() - start:.0f} s "
                f"({error}). On Kubernetes, the pods' subdomain must be the name of a "
                "headless Service in the same namespace whose selector matches the worker "
                "pods, with publishNotReadyAddresses: true (`tfpar k8s render` writes both): "
                f"check `kubectl get service {host.partition('.')[2] or host}` and that the "
                f"pod {host.partition('.')[0]!r} exists.")
        time.sleep(poll_s)


# ----------------------------------------------------------------- DTensor
def dtensor_env(cluster: Cluster) -> dict[str, str]:
    """The DTENSOR_* variables that make this process one client of a multi-client mesh.

    Every training task is a client, in rank order (chief first); the
    variables must be set before TensorFlow initializes.

    Example::

        os.environ.update(dtensor_env(discover().cluster))
    """
    return cluster.dtensor_env()
