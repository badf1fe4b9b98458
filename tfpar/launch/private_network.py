"""A network of the launch's own: the ranks share a new network namespace with loopback only.

TensorFlow's gRPC servers bind every interface (`*:port`) even when
TF_CONFIG names 127.0.0.1, and they have no authentication: any host that
reaches a worker's port can run ops in it. `tfpar launch --private_network`
starts every rank in one new network namespace whose only interface is
`lo`, so the ports exist nowhere else: not on the host's addresses, not
even on the host's own 127.0.0.1.

The namespace has no name and no mount point (unlike `ip netns add`): the
launcher holds it by an open file, and the kernel frees it once that file
is closed and its last process has exited, so a launcher that crashes or is
killed leaves no namespace behind. Each rank also gets SIGKILL when the
launcher dies (`setpriv --pdeathsig`), so a killed launcher leaves no rank.

Example::

    network = PrivateNetwork()
    network.open()  # needs root; see unavailable_reason()
    subprocess.run(network.command(["python", "-c", "print('inside')"]))
    network.close()

Linux only; it needs root (a network namespace needs CAP_SYS_ADMIN) and
util-linux's `unshare`, `nsenter` and `setpriv`, and iproute2's `ip`.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from typing import Sequence

# The programs the namespace needs, and the package that has each.
TOOLS = {"unshare": "util-linux", "nsenter": "util-linux", "setpriv": "util-linux",
         "ip": "iproute2"}


def unavailable_reason() -> str | None:
    """Why this host cannot give a launch a private network, or None if it can."""
    if not sys.platform.startswith("linux"):
        return f"network namespaces are Linux only (this is {sys.platform})"
    if os.geteuid() != 0:
        return ("creating a network namespace needs root (CAP_SYS_ADMIN); run tfpar launch "
                "as root, or leave --private_network out on a host whose network you trust")
    missing = [f"`{tool}` ({package})" for tool, package in TOOLS.items()
               if shutil.which(tool) is None]
    if missing:
        return f"{', '.join(missing)} not found; install them"
    return None


class PrivateNetworkError(RuntimeError):
    """The namespace could not be created (the message has the system's reason)."""


class PrivateNetwork:
    """One loopback-only network namespace for the ranks of a launch."""

    def __init__(self):
        self._fd: int | None = None

    @property
    def is_open(self) -> bool:
        return self._fd is not None

    def open(self) -> "PrivateNetwork":
        """Creates the namespace with `lo` up. Raises PrivateNetworkError."""
        # A short-lived holder: the namespace must exist while it is opened,
        # then the open file alone keeps it.
        holder = subprocess.Popen(
            ["unshare", "--net", "--", "sh", "-c", "ip link set lo up && echo ready && exec cat"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        try:
            line = holder.stdout.readline()
            if line.strip() == "ready":
                self._fd = os.open(f"/proc/{holder.pid}/ns/net", os.O_RDONLY | os.O_CLOEXEC)
        finally:
            holder.stdin.close()
            rest = holder.stdout.read()
            holder.wait()
            holder.stdout.close()
        if self._fd is None:
            raise PrivateNetworkError(
                f"could not create a network namespace: {(line + rest).strip() or 'no output'} "
                f"(`unshare --net` exited with {holder.returncode})")
        if os.fstat(self._fd).st_ino == os.stat("/proc/self/ns/net").st_ino:
            self.close()
            raise PrivateNetworkError("`unshare --net` did not create a new network namespace")
        return self

    def command(self, command: Sequence[str]) -> list[str]:
        """`command`, run inside the namespace and killed if its starter dies.

        setpriv and nsenter each exec the next program: the process started
        is the command itself (same pid, same process group). The kernel
        sends the parent-death signal when the thread that started it exits:
        start it from the thread that waits for it.
        """
        if self._fd is None:
            raise PrivateNetworkError("the private network is not open")
        return ["setpriv", "--pdeathsig", "KILL", "--",
                "nsenter", f"--net=/proc/{os.getpid()}/fd/{self._fd}", "--", *command]

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
