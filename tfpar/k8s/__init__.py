"""Kubernetes: manifests for multi-worker jobs (`tfpar k8s render`).

In-pod cluster discovery lives in `tfpar.cluster.discovery`; the exit codes
that the manifests' failure policies act on live in `tfpar.exit_codes`. This
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

__all__ = ["FORMATS", "PORT", "JobSpec", "K8sSpecError", "indexed_job", "jobset", "render",
           "tfjob", "to_yaml"]
