"""The cluster a process belongs to, as TensorFlow's TF_CONFIG describes it.

TF_CONFIG is a JSON object that every multi-worker TensorFlow process reads
from its environment::

    {"cluster": {"worker": ["10.0.0.1:2222", "10.0.0.2:2222"]},
     "task": {"type": "worker", "index": 1}}

`Cluster` is the validated form of it. It is built from flags or a host list
(`Cluster.from_hosts`), parsed from the environment (`Cluster.from_env`), and
written back (`Cluster.to_tf_config`) in exactly the shape that
`tf.distribute.cluster_resolver.TFConfigClusterResolver` reads. It accepts the
variants that the Kubeflow training-operator (an extra ``"environment"`` key)
and Ray Train write.

A malformed TF_CONFIG is an error, never a silent fall-back to single-worker
training: a worker that quietly trains alone wastes a whole job.

Example::

    >>> c = Cluster.from_hosts(["127.0.0.1:2222", "127.0.0.1:2223"],
    ...                        task_type="worker", task_index=1)
    >>> c.num_workers, c.is_chief
    (2, False)
    >>> c.to_tf_config()["task"]
    {'type': 'worker', 'index': 1}
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Mapping, Sequence

# The roles TensorFlow's multi-worker strategies know. "chief" and "worker"
# train; "evaluator" evaluates checkpoints on the side; "ps" holds variables
# for ParameterServerStrategy.
TRAINING_ROLES = ("chief", "worker")
ROLES = ("chief", "worker", "evaluator", "ps")
# Roles that may have a single task only.
SINGLE_TASK_ROLES = ("chief", "evaluator")
# Top-level TF_CONFIG keys written by TensorFlow, Kubeflow and Ray.
_KNOWN_KEYS = ("cluster", "task", "environment", "rpc_layer")


class ClusterConfigError(ValueError):
    """A TF_CONFIG or cluster flag combination that cannot describe a cluster."""


def _parse_address(address: object, where: str) -> tuple[str, int]:
    if not isinstance(address, str) or not address.strip():
        raise ClusterConfigError(
            f"{where}: address {address!r} is not a 'host:port' string. "
            "Write each task's address as 'host:port', e.g. 'worker-0.svc:2222'."
        )
    host, sep, port = address.rpartition(":")
    if not sep or not host:
        raise ClusterConfigError(
            f"{where}: address {address!r} has no port. "
            "Write it as 'host:port', e.g. '10.0.0.1:2222'."
        )
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]  # [::1]:2222
    try:
        port_number = int(port)
    except ValueError:
        raise ClusterConfigError(
            f"{where}: port {port!r} of address {address!r} is not a number. "
            "Ports are integers in 1..65535."
        ) from None
    if not 1 <= port_number <= 65535:
        raise ClusterConfigError(
            f"{where}: port {port_number} of address {address!r} is out of "
            "range. Ports are integers in 1..65535."
        )
    if any(c.isspace() for c in host):
        raise ClusterConfigError(
            f"{where}: host {host!r} of address {address!r} contains "
            "whitespace. Remove it."
        )
    return host, port_number


@dataclasses.dataclass(frozen=True)
class Cluster:
    """A validated multi-worker cluster and this process's place in it.

    Attributes:
      jobs: role -> list of "host:port" addresses, in task-index order.
      task_type: this process's role ("chief", "worker", "evaluator", "ps").
      task_index: this process's index within its role.
      rpc_layer: the RPC protocol TensorFlow uses between tasks.
    """

    jobs: Mapping[str, tuple[str, ...]]
    task_type: str
    task_index: int
    rpc_layer: str = "grpc"

    def __post_init__(self):
        jobs = {role: tuple(addresses) for role, addresses in self.jobs.items()}
        object.__setattr__(self, "jobs", jobs)
        self._validate()

    # ----------------------------------------------------------------- build
    @classmethod
    def from_hosts(
        cls,
        worker_hosts: Sequence[str],
        *,
        task_type: str = "worker",
        task_index: int = 0,
        chief_host: str | None = None,
    ) -> "Cluster":
        """A cluster of workers (and optionally a separate chief) from flags."""
        jobs: dict[str, tuple[str, ...]] = {}
        if chief_host:
            jobs["chief"] = (chief_host,)
        if worker_hosts:
            jobs["worker"] = tuple(worker_hosts)
        return cls(jobs=jobs, task_type=task_type, task_index=task_index)

    @classmethod
    def from_tf_config(cls, tf_config: str | Mapping) -> "Cluster":
        """Parses and validates a TF_CONFIG (a JSON string or a dict).

        Raises:
          ClusterConfigError: naming what is wrong and how to fix it.
        """
        if isinstance(tf_config, str):
            try:
                config = json.loads(tf_config)
            except json.JSONDecodeError as e:
                raise ClusterConfigError(
                    f"TF_CONFIG is not valid JSON ({e.msg} at character "
                    f"{e.pos}): {tf_config[:200]!r}. Write it as "
                    '\'{"cluster": {"worker": ["host:port", ...]}, '
                    '"task": {"type": "worker", "index": 0}}\'.'
                ) from None
        else:
            config = tf_config
        if not isinstance(config, Mapping):
            raise ClusterConfigError(
                f"TF_CONFIG must be a JSON object, got {type(config).__name__}: "
                f"{config!r}."
            )
        unknown = sorted(set(config) - set(_KNOWN_KEYS))
        if unknown:
            raise ClusterConfigError(
                f"TF_CONFIG has unknown keys {unknown}; the known keys are "
                f"{list(_KNOWN_KEYS)}. Check for a misspelling."
            )
        cluster = config.get("cluster")
        if not isinstance(cluster, Mapping) or not cluster:
            raise ClusterConfigError(
                f"TF_CONFIG has no 'cluster' object (got {cluster!r}). Add "
                '"cluster": {"worker": ["host:port", ...]}.'
            )
        task = config.get("task")
        if not isinstance(task, Mapping):
            raise ClusterConfigError(
                f"TF_CONFIG has no 'task' object (got {task!r}). Add "
                '"task": {"type": "worker", "index": N} naming this process.'
            )
        if "type" not in task or "index" not in task:
            raise ClusterConfigError(
                f"TF_CONFIG 'task' must have both 'type' and 'index', got "
                f"{dict(task)!r}."
            )
        index = task["index"]
        # Some launchers write the index as a string; TensorFlow int()s it.
        if isinstance(index, str) and index.strip().isdigit():
            index = int(index)
        if isinstance(index, bool) or not isinstance(index, int):
            raise ClusterConfigError(
                f"TF_CONFIG task index {task['index']!r} is not an integer."
            )
        jobs = {}
        for role, addresses in cluster.items():
            # TensorFlow also accepts {index: address} dicts for sparse jobs.
            if isinstance(addresses, Mapping):
                try:
                    addresses = [addresses[k] for k in sorted(addresses, key=int)]
                except (TypeError, ValueError):
                    raise ClusterConfigError(
                        f"TF_CONFIG cluster job {role!r} is a dict whose keys "
                        f"are not task indices: {addresses!r}."
                    ) from None
            if isinstance(addresses, str) or not isinstance(addresses, Sequence):
                raise ClusterConfigError(
                    f"TF_CONFIG cluster job {role!r} must be a list of "
                    f"'host:port' strings, got {addresses!r}."
                )
            jobs[role] = tuple(addresses)
        return cls(
            jobs=jobs,
            task_type=task["type"],
            task_index=index,
            rpc_layer=config.get("rpc_layer") or "grpc",
        )

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> "Cluster | None":
        """The cluster TF_CONFIG describes, or None when TF_CONFIG is unset.

        An unset, empty or ``{}`` TF_CONFIG means "no cluster" (TensorFlow
        reads it the same way). Anything else must be a valid cluster.
        """
        environ = os.environ if environ is None else environ
        raw = environ.get("TF_CONFIG", "").strip()
        if not raw:
            return None
        try:
            if json.loads(raw) == {}:
                return None
        except json.JSONDecodeError:
            pass  # from_tf_config raises the descriptive error.
        return cls.from_tf_config(raw)

    # ------------------------------------------------------------- validate
    def _validate(self):
        unknown = sorted(set(self.jobs) - set(ROLES))
        if unknown:
            raise ClusterConfigError(
                f"cluster has unknown roles {unknown}; tfpar knows {list(ROLES)}."
            )
        if not any(self.jobs.get(role) for role in TRAINING_ROLES):
            raise ClusterConfigError(
                f"cluster {dict(self.jobs)} has no chief and no workers: nobody "
                "would train. Add a 'worker' list (worker 0 acts as chief) or "
                "a 'chief'."
            )
        seen: dict[tuple[str, int], str] = {}
        for role, addresses in self.jobs.items():
            if not addresses:
                raise ClusterConfigError(
                    f"cluster job {role!r} is empty. Remove it or list its "
                    "tasks' addresses."
                )
            if role in SINGLE_TASK_ROLES and len(addresses) > 1:
                raise ClusterConfigError(
                    f"cluster has {len(addresses)} {role!r} tasks "
                    f"{list(addresses)}; there can be only one {role}. Make the "
                    "others 'worker' tasks."
                )
            for i, address in enumerate(addresses):
                where = f"{role}[{i}]"
                key = _parse_address(address, where)
                if key in seen:
                    raise ClusterConfigError(
                        f"address {address!r} is used twice, by {seen[key]} and "
                        f"{where}. Give every task its own host:port."
                    )
                seen[key] = where
        if self.task_type not in ROLES:
            raise ClusterConfigError(
                f"task type {self.task_type!r} is not a role; use one of "
                f"{list(ROLES)}."
            )
        if self.task_type not in self.jobs:
            raise ClusterConfigError(
                f"task type {self.task_type!r} is not in the cluster, which has "
                f"{sorted(self.jobs)}. Add its addresses or fix the task type."
            )
        count = len(self.jobs[self.task_type])
        if not 0 <= self.task_index < count:
            raise ClusterConfigError(
                f"task index {self.task_index} is out of range for "
                f"{self.task_type!r}, which has {count} task(s) (indices "
                f"0..{count - 1})."
            )

    # ------------------------------------------------------------ derived
    @property
    def num_workers(self) -> int:
        """Training tasks: the chief (if any) plus the workers."""
        return sum(len(self.jobs.get(role, ())) for role in TRAINING_ROLES)

    @property
    def is_chief(self) -> bool:
        """The task that writes checkpoints and summaries.

        The chief if the cluster has one, else worker 0 (TensorFlow's rule).
        """
        if "chief" in self.jobs:
            return self.task_type == "chief"
        return self.task_type == "worker" and self.task_index == 0

    @property
    def rank(self) -> int:
        """This task's position among the training tasks (chief first)."""
        if self.task_type == "chief":
            return 0
        if self.task_type == "worker":
            return len(self.jobs.get("chief", ())) + self.task_index
        raise ClusterConfigError(
            f"a {self.task_type!r} task has no training rank."
        )

    @property
    def address(self) -> str:
        return self.jobs[self.task_type][self.task_index]

    @property
    def training_addresses(self) -> list[str]:
        """Addresses of the training tasks in rank order."""
        return [a for role in TRAINING_ROLES for a in self.jobs.get(role, ())]

    @property
    def coordination_leader(self) -> str:
        """The task that hosts TensorFlow's coordination service."""
        role = "chief" if "chief" in self.jobs else "worker"
        return f"/job:{role}/replica:0/task:0"

    def dtensor_env(self) -> dict[str, str]:
        """The DTENSOR_* variables that make the training tasks one DTensor mesh.

        DTensor multi-client: every training task is a client, in rank order
        (chief first), reached at its TF_CONFIG address.
        """
        if self.task_type not in TRAINING_ROLES:
            raise ClusterConfigError(
                f"a {self.task_type!r} task is not a DTensor client; only chief and "
                "worker tasks are.")
        return {
            "DTENSOR_JOBS": ",".join(self.training_addresses),
            "DTENSOR_CLIENT_ID": str(self.rank),
            "DTENSOR_NUM_CLIENTS": str(self.num_workers),
            "DTENSOR_JOB_NAME": "worker",
        }

    def to_tf_config(self) -> dict:
        """The TF_CONFIG dict that TFConfigClusterResolver reads."""
        config = {
            "cluster": {role: list(a) for role, a in self.jobs.items()},
            "task": {"type": self.task_type, "index": self.task_index},
        }
        if self.rpc_layer != "grpc":
            config["rpc_layer"] = self.rpc_layer
        return config

    def to_json(self) -> str:
        return json.dumps(self.to_tf_config(), sort_keys=True)

    def for_task(self, task_type: str, task_index: int) -> "Cluster":
        """The same cluster seen from another task."""
        return dataclasses.replace(self, task_type=task_type, task_index=task_index)
