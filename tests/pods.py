"""Emulated Kubernetes pods: one Linux network namespace per pod, no cluster needed.

Each pod gets its own network namespace with one interface (eth0, a private
10.213.0.0/24 address) on a veth pair whose other end hangs on a bridge in a
namespace of its own, as pods hang on a node's bridge. Pod DNS names
(NAME-i.SUBDOMAIN) resolve through /etc/netns/<ns>/hosts, which
`ip netns exec` mounts over /etc/hosts, so getaddrinfo (tfpar's discovery)
and gRPC (TensorFlow) find peers as they would through the cluster DNS.
Nothing is created in the host's network namespace; every namespace,
link and hosts file is removed by `close()`, and every process started is
killed by its process group.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

SUBNET = "10.213.0"


def _ip(*args, check=True):
    return subprocess.run(["ip", *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, check=check)


def unavailable_reason() -> str | None:
    """Why network namespaces cannot be used here, or None if they can."""
    if shutil.which("ip") is None:
        return "the `ip` command (iproute2) is not installed"
    if os.geteuid() != 0:
        return "creating network namespaces needs root (CI runs as root)"
    probe = f"tfpar-probe-{os.getpid()}"
    result = _ip("netns", "add", probe, check=False)
    if result.returncode != 0:
        return f"`ip netns add` failed: {result.stdout.strip()}"
    _ip("netns", "delete", probe, check=False)
    return None


def expand(value: str, env: dict) -> str:
    """Kubernetes' $(VAR) expansion in command and args (unknown names stay as written)."""
    return re.sub(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)",
                  lambda m: env.get(m.group(1), m.group(0)), value)


class Pods:
    """N emulated pods with the given hostnames in one subdomain."""

    def __init__(self, hostnames, subdomain, tag):
        self.hostnames = list(hostnames)
        self.subdomain = subdomain
        self.bridge_ns = f"tfpar-{tag}-br"
        self.pod_ns = [f"tfpar-{tag}-p{i}" for i in range(len(self.hostnames))]
        self.processes: list[subprocess.Popen] = []
        self._created: list[str] = []

    def address(self, i):
        return f"{SUBNET}.{10 + i}"

    def open(self):
        _ip("netns", "add", self.bridge_ns)
        self._created.append(self.bridge_ns)
        _ip("-n", self.bridge_ns, "link", "add", "br0", "type", "bridge")
        _ip("-n", self.bridge_ns, "link", "set", "br0", "up")
        hosts = ["127.0.0.1 localhost", "::1 localhost"]
        for i, host in enumerate(self.hostnames):
            hosts.append(f"{self.address(i)} {host}.{self.subdomain} {host}")
        for i, ns in enumerate(self.pod_ns):
            _ip("netns", "add", ns)
            self._created.append(ns)
            _ip("-n", self.bridge_ns, "link", "add", f"veth{i}", "type", "veth",
                "peer", "name", "eth0", "netns", ns)
            _ip("-n", self.bridge_ns, "link", "set", f"veth{i}", "master", "br0")
            _ip("-n", self.bridge_ns, "link", "set", f"veth{i}", "up")
            _ip("-n", ns, "addr", "add", f"{self.address(i)}/24", "dev", "eth0")
            _ip("-n", ns, "link", "set", "eth0", "up")
            _ip("-n", ns, "link", "set", "lo", "up")
            etc = Path("/etc/netns") / ns
            etc.mkdir(parents=True, exist_ok=True)
            (etc / "hosts").write_text("\n".join(hosts) + "\n")
        return self

    def start(self, i, command, env, cwd):
        """Runs `command` in pod i with `env` (plus what Kubernetes adds)."""
        full = dict(env)
        full["HOSTNAME"] = self.hostnames[i]  # what the kubelet sets in a container
        full.setdefault("PATH", os.path.dirname(sys.executable) + ":" + os.environ["PATH"])
        command = [expand(part, full) for part in command]
        process = subprocess.Popen(
            ["ip", "netns", "exec", self.pod_ns[i], *command], env=full, cwd=cwd, text=True,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
        self.processes.append(process)
        return process

    def cut(self, i):
        """Takes pod i's link down on the bridge side: its packets go nowhere."""
        _ip("-n", self.bridge_ns, "link", "set", f"veth{i}", "down")

    def kill_all(self):
        for p in self.processes:
            if p.poll() is None:
                try:
                    os.killpg(p.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            p.wait()
            if p.stdout:
                p.stdout.close()
        self.processes = []

    def close(self):
        try:
            self.kill_all()
        finally:
            for ns in reversed(self._created):
                _ip("netns", "delete", ns, check=False)
                shutil.rmtree(Path("/etc/netns") / ns, ignore_errors=True)
            self._created = []

    def __enter__(self):
        try:
            return self.open()
        except BaseException:
            self.close()  # a half-built network is removed too
            raise

    def __exit__(self, *exc):
        self.close()
