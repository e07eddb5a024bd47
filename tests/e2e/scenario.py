"""What the lab applies and how it looks at the result; shared by tests/e2e/lab.py and the tests.

Objects (namespace ``demo``): two AddressPools (one for requested addresses, one that hands
out addresses to Services), VirtualServers with static real servers, a LoadBalancer Service
with hand-made EndpointSlices (no kubelet or EndpointSlice controller runs). The real servers
rs1..rs3 and the clients are tests/e2e/guest.py's.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from kubernetes.client.exceptions import ApiException

from tests.e2e import guest
from tests.e2e.bed import NODE_NAME, LabBed, wait_for
from tests.operator import harness

NAMESPACE = "demo"
PORT = guest.PORT
REAL_SERVERS = guest.REAL_SERVERS  # name -> address
NAME_OF = {address: name for name, address in REAL_SERVERS.items()}
NAT_VIP = "203.0.113.10"
DR_VIP = guest.DR_VIP
TUN_VIP = guest.TUN_VIP
REQUESTED_POOL = "lab-requested"  # the addresses VirtualServers ask for by name
SERVICE_POOL = "lab-services"  # handed out to LoadBalancer Services
SERVICE_POOL_RANGE = "203.0.113.65-203.0.113.78"
METHOD_FLAG = {"-m": "NAT", "-g": "DR", "-i": "TUN"}
PROGRAM_TIMEOUT = 60.0


def client_for(method: str) -> str:
    """NAT clients sit across the director (c1); DR/TUN clients on the servers' LAN (c2)."""
    return "c1" if method == "NAT" else "c2"


# -- objects --------------------------------------------------------------------------


def address_pools() -> list[dict[str, Any]]:
    return [
        harness.address_pool(REQUESTED_POOL, ["203.0.113.0/27"], autoAssign=False),
        harness.address_pool(SERVICE_POOL, [SERVICE_POOL_RANGE], autoAssign=True),
    ]


def virtual_server(
    name: str,
    address: str,
    *,
    method: str = "NAT",
    scheduler: str = "wrr",
    weights: Sequence[int] = (1, 1, 1),
    drain_seconds: int = 300,
) -> dict[str, Any]:
    """A VirtualServer with rs1..rs3 as static real servers, with ``weights`` in that order."""
    forwarding: dict[str, Any] = {"method": method}
    if method == "TUN":
        forwarding["tunnel"] = {"type": "ipip"}
    static = [
        {"address": address_, "weight": weight}
        for address_, weight in zip(REAL_SERVERS.values(), weights, strict=True)
    ]
    return {
        "apiVersion": f"{harness.GROUP}/{harness.VERSION}",
        "kind": "VirtualServer",
        "metadata": {"name": name, "namespace": NAMESPACE},
        "spec": {
            "address": address,
            "ports": [{"name": "http", "port": PORT, "protocol": "TCP"}],
            "scheduler": {"name": scheduler},
            "forwarding": forwarding,
            "drainTimeoutSeconds": drain_seconds,
            "backends": {"static": static},
        },
    }


def load_balancer_service(
    name: str, *, scheduler: str = "rr", drain_seconds: int = 300
) -> dict[str, Any]:
    """A LoadBalancer Service of class ipvs.io/lb (NAT), its address from SERVICE_POOL."""
    body = harness.service(
        name,
        ports=[{"name": "http", "port": PORT, "targetPort": PORT, "protocol": "TCP"}],
        annotations={
            "ipvs.io/scheduler": scheduler,
            "ipvs.io/drain-timeout": str(drain_seconds),
            "ipvs.io/address-pool": SERVICE_POOL,
        },
        allocateLoadBalancerNodePorts=False,
    )
    body["metadata"]["namespace"] = NAMESPACE
    return body


def endpoint_slice(service: str, endpoints: Mapping[str, str]) -> dict[str, Any]:
    """The Service's EndpointSlice as the EndpointSlice controller would write it.

    ``endpoints`` maps a real server (rs1..) to ``ready`` or ``terminating`` (still serving:
    a pod in its grace period).
    """
    conditions = {
        "ready": {"ready": True, "serving": True, "terminating": False},
        "terminating": {"ready": False, "serving": True, "terminating": True},
    }
    return {
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {
            "name": f"{service}-lab",
            "namespace": NAMESPACE,
            "labels": {
                "kubernetes.io/service-name": service,
                "endpointslice.kubernetes.io/managed-by": "lab.ipvs.io",
            },
        },
        "addressType": "IPv4",
        "ports": [{"name": "http", "port": PORT, "protocol": "TCP"}],
        "endpoints": [
            {
                "addresses": [REAL_SERVERS[name]],
                "conditions": conditions[state],
                "nodeName": NODE_NAME,
            }
            for name, state in endpoints.items()
        ],
    }


# -- applying -------------------------------------------------------------------------


def prepare(bed: LabBed) -> None:
    """The namespace and the AddressPools (idempotent)."""
    try:
        harness.core(bed.admin).create_namespace({"metadata": {"name": NAMESPACE}})
    except ApiException as exc:
        if exc.status != 409:
            raise
    for pool in address_pools():
        try:
            harness.custom(bed.admin).create_cluster_custom_object(
                harness.GROUP, harness.VERSION, "addresspools", pool
            )
        except ApiException as exc:
            if exc.status != 409:
                raise


def apply_virtual_server(bed: LabBed, body: dict[str, Any]) -> None:
    """Create, or replace the spec of, a VirtualServer."""
    custom = harness.custom(bed.admin)
    name = body["metadata"]["name"]
    try:
        custom.create_namespaced_custom_object(
            harness.GROUP, harness.VERSION, NAMESPACE, "virtualservers", body
        )
    except ApiException as exc:
        if exc.status != 409:
            raise
        custom.patch_namespaced_custom_object(
            harness.GROUP,
            harness.VERSION,
            NAMESPACE,
            "virtualservers",
            name,
            {"spec": body["spec"]},
        )


def delete_virtual_server(bed: LabBed, name: str) -> None:
    harness.custom(bed.admin).delete_namespaced_custom_object(
        harness.GROUP, harness.VERSION, NAMESPACE, "virtualservers", name
    )


def apply_endpoint_slice(bed: LabBed, body: dict[str, Any]) -> None:
    discovery = harness.discovery(bed.admin)
    try:
        discovery.create_namespaced_endpoint_slice(NAMESPACE, body)
    except ApiException as exc:
        if exc.status != 409:
            raise
        discovery.replace_namespaced_endpoint_slice(body["metadata"]["name"], NAMESPACE, body)


def service_address(bed: LabBed, name: str) -> str:
    """Wait for the operator to publish the Service's address in its status."""
    found: list[dict[str, Any]] = wait_for(
        f"an ingress address on Service {name}",
        lambda: harness.ingress(bed.admin, NAMESPACE, name),
        PROGRAM_TIMEOUT,
    )
    return str(found[0]["ip"])


# -- the kernel table -----------------------------------------------------------------


@dataclass
class KernelService:
    """One IPVS service as ``ipvsadm -Sn`` shows it; dests map address -> (method, weight)."""

    scheduler: str
    dests: dict[str, tuple[str, int]] = field(default_factory=dict)


def parse_table(lines: Sequence[str]) -> dict[str, KernelService]:
    """``ipvsadm -Sn`` lines -> {"203.0.113.10:80": KernelService}; TCP services only."""
    table: dict[str, KernelService] = {}
    for line in lines:
        words = line.split()
        if words[:2] == ["-A", "-t"]:
            table[words[2]] = KernelService(words[words.index("-s") + 1])
        elif words[:2] == ["-a", "-t"]:
            address = re.sub(r":\d+$", "", words[words.index("-r") + 1])
            method = next((METHOD_FLAG[w] for w in words if w in METHOD_FLAG), "?")
            weight = int(words[words.index("-w") + 1])
            table[words[2]].dests[address] = (method, weight)
    return table


def local_addresses(bed: LabBed) -> set[str]:
    """The addresses on the agent's ipvs0 in the node (the VM's root netns)."""
    out = bed.call("run", argv=["ip", "-o", "addr", "show", "dev", "ipvs0"])
    return set(re.findall(r"\binet6? ([0-9a-f.:]+)/", out["stdout"]))


def expect_service(
    bed: LabBed, vip: str, scheduler: str, weights: Mapping[str, int], method: str = "NAT"
) -> KernelService:
    """Wait until the kernel holds ``vip:PORT`` with exactly these real servers (by name)."""
    key = f"{vip}:{PORT}"
    wanted = {REAL_SERVERS[name]: (method, weight) for name, weight in weights.items()}

    def matches() -> KernelService | None:
        found = parse_table(bed.ipvsadm()).get(key)
        if found and found.scheduler == scheduler and found.dests == wanted:
            # The agent adds the address to ipvs0 after the service: until then the node
            # answers "network unreachable" to a client.
            return found if vip in local_addresses(bed) else None
        return None

    try:
        return wait_for(f"{key} -s {scheduler} with {dict(weights)}", matches, PROGRAM_TIMEOUT, 0.5)
    except AssertionError as error:
        raise AssertionError(f"{error}\n{bed.diagnostics()}") from None


def expect_gone(bed: LabBed, vip: str) -> None:
    """Wait until no kernel service and no address on ipvs0 is left for ``vip``."""
    key = f"{vip}:{PORT}"

    def gone() -> bool:
        return key not in parse_table(bed.ipvsadm()) and vip not in local_addresses(bed)

    try:
        wait_for(f"{key} and its address to leave the node", gone, PROGRAM_TIMEOUT, 0.5)
    except AssertionError as error:
        raise AssertionError(f"{error}\n{bed.diagnostics()}") from None


def expect_node_entry(bed: LabBed, name: str, *, real_servers: int, draining: int) -> None:
    """Wait for the agent's IPVSNode to report these counts for VirtualServer ``name``.

    ``draining`` counts real servers the agent wants at weight 0 (terminating endpoints,
    weight-0 static ones); a removed one that still drains in the kernel is in neither.
    """

    def entry() -> dict[str, Any] | None:
        node = harness.custom(bed.admin).get_cluster_custom_object(
            harness.GROUP, harness.VERSION, "ipvsnodes", NODE_NAME
        )
        for item in (node.get("status") or {}).get("virtualServers") or ():
            if (item["namespace"], item["name"]) == (NAMESPACE, name) and (
                item.get("realServers"),
                item.get("drainingRealServers"),
            ) == (real_servers, draining):
                found: dict[str, Any] = item
                return found
        return None

    try:
        wait_for(f"IPVSNode entry of {name}: {real_servers} + {draining} draining", entry, 60)
    except AssertionError as error:
        raise AssertionError(f"{error}\n{bed.diagnostics()}") from None


def connections(bed: LabBed, vip: str, count: int, method: str = "NAT") -> dict[str, int]:
    """``count`` sequential TCP connections to ``vip:PORT``: how many each real server took."""
    counts: dict[str, int] = bed.call(
        "tcp", client=client_for(method), vip=vip, port=PORT, count=count, seconds=120
    )
    return counts
