"""Starting multi-worker jobs: locally (`Launcher`), later on Kubernetes."""

from tfpar.launch.launcher import Launcher, LaunchError, free_ports

__all__ = ["Launcher", "LaunchError", "free_ports"]
