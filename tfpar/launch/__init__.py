"""Starting multi-worker jobs on this host: `Launcher`, optionally in a private network."""

from tfpar.launch.launcher import Launcher, LaunchError, free_ports

__all__ = ["Launcher", "LaunchError", "free_ports"]
