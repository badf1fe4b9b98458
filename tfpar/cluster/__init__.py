"""Which cluster this process belongs to, and how it was found."""

from tfpar.cluster.tf_config import (
    ROLES,
    Cluster,
    ClusterConfigError,
)

__all__ = ["Cluster", "ClusterConfigError", "ROLES"]
