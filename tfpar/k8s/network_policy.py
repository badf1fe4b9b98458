"""The NetworkPolicy that closes a job's gRPC port to everything but its own pods.

TensorFlow's gRPC servers have no authentication or TLS and bind every
interface: a peer that reaches a worker's port can run graph ops in it
(reading and writing files included). TensorFlow's security policy says
they are for trusted networks only. Without a policy, every pod of the
cluster can reach port 2222 of every worker.

`network_policy(...)` selects the job's pods and allows ingress only from
the job's own pods, only to the worker port: everything else to the pods
is denied. Egress is left alone unless rules are given
(`parse_egress`): then the pods may reach their peers' port, DNS (port 53,
any address: peers are found by name), and the listed networks only.

Example::

    >>> rules = parse_egress(["10.0.0.0/8:443", "2001:db8::/32"])
    >>> [(r.cidr, r.port) for r in rules]
    [('10.0.0.0/8', 443), ('2001:db8::/32', None)]
    >>> policy = network_policy(metadata={"name": "mnist"}, selector={"app": "mnist"},
    ...                         port=2222, egress=rules)
    >>> policy["spec"]["policyTypes"]
    ['Ingress', 'Egress']
"""

from __future__ import annotations

import dataclasses
import ipaddress
from typing import Sequence

EGRESS_SYNTAX = "CIDR[:PORT],... (e.g. 10.0.0.0/8:443,0.0.0.0/0:443), or none"
DNS_PORT = 53


@dataclasses.dataclass(frozen=True)
class EgressRule:
    """Pods may open connections to `cidr`, on TCP `port` (None: any port and protocol)."""

    cidr: str
    port: int | None = None

    def to_peer(self) -> dict:
        rule = {"to": [{"ipBlock": {"cidr": self.cidr}}]}
        if self.port is not None:
            rule["ports"] = [{"protocol": "TCP", "port": self.port}]
        return rule


def parse_egress(values: Sequence[str]) -> tuple[EgressRule, ...]:
    """`--egress` values -> rules; ["none"] -> () (peers and DNS only).

    Raises ValueError naming the value, the rule it broke and the fix.
    """
    values = [v.strip() for v in values]
    if values == ["none"]:
        return ()
    if not values or "none" in values:
        raise ValueError(f"--egress={','.join(values)!r}: give {EGRESS_SYNTAX}; 'none' "
                         "stands alone (the pods then reach only their peers and DNS).")
    return tuple(_parse_one(v) for v in values)


def _parse_one(value: str) -> EgressRule:
    address, slash, rest = value.partition("/")
    if not slash:
        guess = f"{address.rsplit(':', 1)[0]}/32" if "." in address else f"{value}/128"
        raise ValueError(f"--egress={value!r}: a rule is CIDR[:PORT] with a prefix length "
                         f"(e.g. {guess}:443 for one address); give {EGRESS_SYNTAX}.")
    prefix, colon, port_text = rest.partition(":")
    try:
        network = ipaddress.ip_network(f"{address}/{prefix}", strict=False)
    except ValueError:
        raise ValueError(f"--egress={value!r}: {address}/{prefix} is not an IPv4 or IPv6 "
                         f"network; give {EGRESS_SYNTAX}.") from None
    if str(network.network_address) != str(ipaddress.ip_address(address)):
        raise ValueError(f"--egress={value!r}: {address}/{prefix} has host bits set; the "
                         f"network is {network}, write that.")
    port = None
    if colon:
        if not (port_text.isdigit() and 1 <= int(port_text) <= 65535):
            raise ValueError(f"--egress={value!r}: the port {port_text!r} must be a number "
                             f"from 1 to 65535; give {EGRESS_SYNTAX}.")
        port = int(port_text)
    return EgressRule(str(network), port)


def network_policy(*, metadata: dict, selector: dict, port: int,
                   egress: Sequence[EgressRule] | None = None) -> dict:
    """A NetworkPolicy (networking.k8s.io/v1) for the pods matching `selector`.

    Ingress: only from pods matching `selector`, only to TCP `port`; a pod a
    policy selects accepts nothing that no policy allows, so every other
    source and port is denied. Egress: not restricted when `egress` is None;
    otherwise the peers' `port`, DNS, and `egress`.
    """
    # Fresh objects each time: YAML would write shared ones as anchors.
    def peers():
        return [{"podSelector": {"matchLabels": dict(selector)}}]

    def worker_port():
        return [{"protocol": "TCP", "port": port}]

    spec = {
        "podSelector": {"matchLabels": dict(selector)},
        "policyTypes": ["Ingress"],
        "ingress": [{"from": peers(), "ports": worker_port()}],
    }
    if egress is not None:
        spec["policyTypes"].append("Egress")
        spec["egress"] = [
            {"to": peers(), "ports": worker_port()},
            # No "to": DNS at any address (kube-dns, node-local caches).
            {"ports": [{"protocol": "UDP", "port": DNS_PORT},
                       {"protocol": "TCP", "port": DNS_PORT}]},
            *(rule.to_peer() for rule in egress),
        ]
    return {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
            "metadata": metadata, "spec": spec}
