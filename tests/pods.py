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

`Pods.enforce(policy, labels)` plays the CNI plugin's part for a rendered
NetworkPolicy: `nft_ruleset` translates the policy object into nftables
rules for every pod it selects (dropping what it does not allow, as Calico
and Cilium do), so the tests check the manifest's own policy, not a copy of
it. Outsider namespaces (`outsiders=`) hang on the same bridge as pods that
are not the job's.
"""

from __future__ import annotations

import ipaddress
import json
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


def nft_unavailable_reason() -> str | None:
    """Why nftables rules cannot be set in a network namespace, or None if they can."""
    reason = unavailable_reason()
    if reason is not None:
        return reason
    if shutil.which("nft") is None:
        return "the `nft` command (nftables) is not installed (.ci/run installs it)"
    probe = f"tfpar-nftprobe-{os.getpid()}"
    _ip("netns", "add", probe)
    try:
        result = _ip("netns", "exec", probe, "nft", "add", "table", "inet", "probe", check=False)
        if result.returncode != 0:
            return f"`nft add table` failed in a network namespace: {result.stdout.strip()}"
    finally:
        _ip("netns", "delete", probe, check=False)
    return None


def selects(selector: dict, labels: dict) -> bool:
    """Whether a Kubernetes label selector picks a pod with `labels`."""
    if set(selector) - {"matchLabels"}:
        raise NotImplementedError(f"the emulation reads matchLabels only, not {selector}")
    return all(labels.get(k) == v for k, v in selector.get("matchLabels", {}).items())


def nft_ruleset(policy: dict, endpoints) -> str:
    """nftables rules that enforce NetworkPolicy `policy` on one pod it selects.

    endpoints: (address, labels) of every pod on the network, which the
    policy's podSelector peers are chosen from. What the Kubernetes network
    model always allows is kept: loopback and replies to allowed connections.
    Anything the translation does not know (namespaceSelector, except,
    endPort) raises, so the emulation never enforces less than the manifest.
    """
    spec = policy["spec"]
    lines = ["table inet tfpar_policy {"]
    for kind, hook, direction, interface in (("Ingress", "input", "saddr", "iif"),
                                             ("Egress", "output", "daddr", "oif")):
        if kind not in spec.get("policyTypes", ["Ingress"]):
            continue
        lines += [f"  chain {hook} {{",
                  f"    type filter hook {hook} priority 0; policy drop;",
                  "    ct state established,related accept",
                  f"    {interface} lo accept"]
        for rule in spec.get(kind.lower(), []):
            lines += [f"    {match} accept" if match else "    accept"
                      for match in _rule_matches(rule, "from" if kind == "Ingress" else "to",
                                                 direction, endpoints)]
        lines.append("  }")
    lines.append("}")
    return "\n".join(lines) + "\n"


def _rule_matches(rule, peers_key, direction, endpoints) -> list[str]:
    if set(rule) - {peers_key, "ports"}:
        raise NotImplementedError(f"unknown NetworkPolicy rule fields: {rule}")
    addresses = None  # no peers: any address
    if peers_key in rule:
        addresses = []
        for peer in rule[peers_key]:
            if set(peer) == {"podSelector"}:
                addresses += [a for a, labels in endpoints if selects(peer["podSelector"], labels)]
            elif set(peer) == {"ipBlock"} and set(peer["ipBlock"]) == {"cidr"}:
                addresses.append(peer["ipBlock"]["cidr"])
            else:
                raise NotImplementedError(f"the emulation does not translate peer {peer}")
        if not addresses:
            return []  # selects no one: allows nothing
    port_matches = [""]
    if "ports" in rule:
        port_matches = []
        for port in rule["ports"]:
            if set(port) != {"protocol", "port"} or not isinstance(port["port"], int):
                raise NotImplementedError(f"the emulation does not translate port {port}")
            port_matches.append(f"{port['protocol'].lower()} dport {port['port']}")
    if addresses is None:
        address_matches = [""]
    else:
        by_family = {}
        for address in addresses:
            family = "ip" if ipaddress.ip_network(address).version == 4 else "ip6"
            by_family.setdefault(family, []).append(address)
        address_matches = [f"{family} {direction} {{ {', '.join(sorted(set(group)))} }}"
                           for family, group in by_family.items()]
    return [" ".join(part for part in (a, p) if part) for a in address_matches
            for p in port_matches]


_PROBE = """
import concurrent.futures, errno, json, socket, sys

def connect(target):
    host, port = target.rsplit(":", 1)
    with socket.socket() as s:
        s.settimeout(float(sys.argv[2]))
        try:
            s.connect((host, int(port)))
            return "connected"
        except socket.timeout:
            return "no answer"
        except OSError as e:
            return {errno.ECONNREFUSED: "refused", errno.EPERM: "blocked",
                    errno.EACCES: "blocked"}.get(e.errno, errno.errorcode.get(e.errno, str(e)))

targets = json.loads(sys.argv[1])
with concurrent.futures.ThreadPoolExecutor(len(targets)) as pool:
    print(json.dumps(dict(zip(targets, pool.map(connect, targets)))))
"""


def probe(targets, timeout=1.0, enter=()):
    """A TCP connect to each "host:port" at once, from the namespace `enter` (a command
    prefix; none: this one). Each gives connected, refused, or no answer (dropped)."""
    result = subprocess.run(
        [*enter, sys.executable, "-c", _PROBE, json.dumps(list(targets)), str(timeout)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=60, check=True)
    return json.loads(result.stdout)


def expand(value: str, env: dict) -> str:
    """Kubernetes' $(VAR) expansion in command and args (unknown names stay as written)."""
    return re.sub(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)",
                  lambda m: env.get(m.group(1), m.group(0)), value)


class Pods:
    """N emulated pods with the given hostnames in one subdomain."""

    def __init__(self, hostnames, subdomain, tag, outsiders=0):
        self.hostnames = list(hostnames)
        self.subdomain = subdomain
        self.bridge_ns = f"tfpar-{tag}-br"
        self.pod_ns = [f"tfpar-{tag}-p{i}" for i in range(len(self.hostnames))]
        # Namespaces on the same bridge that are not pods of the job.
        self.outsider_ns = [f"tfpar-{tag}-x{i}" for i in range(outsiders)]
        self.processes: list[subprocess.Popen] = []
        self._created: list[str] = []

    def address(self, i):
        return f"{SUBNET}.{10 + i}"

    def outsider_address(self, i):
        return f"{SUBNET}.{200 + i}"

    def open(self):
        _ip("netns", "add", self.bridge_ns)
        self._created.append(self.bridge_ns)
        _ip("-n", self.bridge_ns, "link", "add", "br0", "type", "bridge")
        _ip("-n", self.bridge_ns, "link", "set", "br0", "up")
        hosts = ["127.0.0.1 localhost", "::1 localhost"]
        for i, host in enumerate(self.hostnames):
            hosts.append(f"{self.address(i)} {host}.{self.subdomain} {host}")
        addresses = [self.address(i) for i in range(len(self.pod_ns))]
        addresses += [self.outsider_address(i) for i in range(len(self.outsider_ns))]
        for i, (ns, address) in enumerate(zip(self.pod_ns + self.outsider_ns, addresses)):
            _ip("netns", "add", ns)
            self._created.append(ns)
            _ip("-n", self.bridge_ns, "link", "add", f"veth{i}", "type", "veth",
                "peer", "name", "eth0", "netns", ns)
            _ip("-n", self.bridge_ns, "link", "set", f"veth{i}", "master", "br0")
            _ip("-n", self.bridge_ns, "link", "set", f"veth{i}", "up")
            _ip("-n", ns, "addr", "add", f"{address}/24", "dev", "eth0")
            _ip("-n", ns, "link", "set", "eth0", "up")
            _ip("-n", ns, "link", "set", "lo", "up")
            etc = Path("/etc/netns") / ns
            etc.mkdir(parents=True, exist_ok=True)
            (etc / "hosts").write_text("\n".join(hosts) + "\n")
        return self

    def enforce(self, policy, pod_labels, outsider_labels=()):
        """Sets the nftables rules of NetworkPolicy `policy` in every pod it selects.

        pod_labels[i] and outsider_labels[j] are the labels of pod i and of
        outsider j, as the NetworkPolicy's selectors see them.
        """
        namespaces = self.pod_ns + self.outsider_ns
        labels = list(pod_labels) + list(outsider_labels)
        addresses = [self.address(i) for i in range(len(self.pod_ns))]
        addresses += [self.outsider_address(i) for i in range(len(self.outsider_ns))]
        endpoints = list(zip(addresses, labels))
        rulesets = {}
        for ns, own in zip(namespaces, labels):
            if selects(policy["spec"]["podSelector"], own):
                rulesets[ns] = nft_ruleset(policy, endpoints)
                subprocess.run(["ip", "netns", "exec", ns, "nft", "-f", "-"],
                               input=rulesets[ns], text=True, check=True)
        return rulesets

    def probe(self, ns, targets, timeout=1.0):
        """`probe` from network namespace `ns` (a pod's or an outsider's)."""
        return probe(targets, timeout, enter=["ip", "netns", "exec", ns])

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
