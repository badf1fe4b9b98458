"""Kubernetes: manifests for multi-worker jobs (`tfpar k8s render`).

In-pod cluster discovery lives in `tfpar.cluster.discovery`; the exit codes
that the manifests' failure policies act on live in `tfpar.exit_codes`; the
NetworkPolicy that closes the workers' port lives in `network_policy`. This
package does not import TensorFlow.
"""

from tfpar.k8s.manifests import (
    FORMATS,
    PORT,
    JobSpec,
    K8sSpecError,
    indexed_job,
    jobset,
    render,
    tfjob,
    to_yaml,
)
from tfpar.k8s.network_policy import EgressRule, network_policy, parse_egress

__all__ = ["FORMATS", "PORT", "EgressRule", "JobSpec", "K8sSpecError", "indexed_job", "jobset",
           "network_policy", "parse_egress", "render", "tfjob", "to_yaml"]
