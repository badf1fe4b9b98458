"""Which cluster this process belongs to, and how it was found."""

from tfpar.cluster.discovery import (
    Discovered,
    discover,
    dtensor_env,
    wait_until_resolvable,
)
from tfpar.cluster.tf_config import (
    ROLES,
    Cluster,
    ClusterConfigError,
)

__all__ = ["Cluster", "ClusterConfigError", "Discovered", "ROLES", "discover", "dtensor_env",
           "wait_until_resolvable"]
