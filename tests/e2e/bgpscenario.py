"""The BGP lab's scenario: the objects a user applies, and what the router and status show.

Shared by tests/e2e/test_bgp.py (behaviour) and ``tests/lab --bgp`` (the demo). The objects
are what docs/operations.md "BGP announcement" tells a user to write: a BGPPeer per router
address family, an AddressPool with ``bgp``, and VirtualServers with ``mh`` over direct
routing, so that both directors pick the same real server for a flow.
"""

from __future__ import annotations

from tests.e2e.bed import LabBed, wait_for
from tests.e2e.bgpguest import NODES, VIP4, VIP6

__all__ = ["NODES", "VIP4", "VIP6"]
from tests.e2e.l2guest import REAL_SERVERS, node_addresses
from tests.kernel import bgpbed
from tests.operator import harness

NAMESPACE = "bgp"
POOL = "anycast"
PEERS = ("r1", "r1-v6")
VIPS = {"web4": VIP4, "web6": VIP6}
TIMEOUT = 240.0


def prepare(bed: LabBed) -> None:
    """The namespace, the router's BGPPeers, a pool announced over BGP, a VirtualServer per
    family (TCP and UDP port 80, mh hashing addresses and ports, direct routing)."""
    harness.core(bed.admin).create_namespace({"metadata": {"name": NAMESPACE}})
    api = harness.custom(bed.admin)
    for peer in bgpbed.peer_objects():
        api.create_cluster_custom_object(harness.GROUP, harness.VERSION, "bgppeers", peer)
    pool = bgpbed.pool_object(communities=["64512:100"])
    pool["spec"]["autoAssign"] = False
    api.create_cluster_custom_object(harness.GROUP, harness.VERSION, "addresspools", pool)
    for name, vip in VIPS.items():
        family = 1 if ":" in vip else 0
        api.create_namespaced_custom_object(
            harness.GROUP,
            harness.VERSION,
            NAMESPACE,
            "virtualservers",
            {
                "apiVersion": "ipvs.io/v1alpha1",
                "kind": "VirtualServer",
                "metadata": {"name": name},
                "spec": {
                    "address": vip,
                    "addressPool": POOL,
                    "ports": [{"port": 80, "protocol": "TCP"}, {"port": 80, "protocol": "UDP"}],
                    "scheduler": {"name": "mh", "flags": ["mh-fallback", "mh-port"]},
                    "forwarding": {"method": "DR"},
                    "drainTimeoutSeconds": 0,
                    "backends": {
                        "static": [{"address": addrs[family]} for addrs in REAL_SERVERS.values()]
                    },
                },
            },
        )


def director_address(node: str, vip: str) -> str:
    """The node's address the router uses as next hop for ``vip``'s family."""
    v4, v6 = node_addresses(NODES.index(node) + 1)
    return v6 if ":" in vip else v4


def next_hops(bed: LabBed, vip: str) -> set[str]:
    return set(bed.call("next_hops", vip=vip))


def announcers(bed: LabBed) -> dict[str, list[str]]:
    """VirtualServer name → the nodes its status says announce it over BGP."""
    found: dict[str, list[str]] = {}
    for vs in harness.list_vs(bed.admin, NAMESPACE):
        announcement = (vs.get("status") or {}).get("announcement") or {}
        nodes = announcement.get("nodes", []) if announcement.get("mode") == "BGP" else []
        found[vs["metadata"]["name"]] = sorted(nodes)
    return found


def wait_announced(bed: LabBed, nodes: tuple[str, ...], timeout: float = TIMEOUT) -> None:
    """Until the router routes both VIPs over exactly ``nodes`` and the status says so."""
    for vip in VIPS.values():
        hops = {director_address(n, vip) for n in nodes}
        wait_for(
            f"{vip} via {sorted(hops)} in the router's FIB",
            lambda vip=vip, hops=hops: next_hops(bed, vip) == hops,  # type: ignore[misc]
            timeout,
            0.2,
        )
    wanted = dict.fromkeys(VIPS, sorted(nodes))
    wait_for(f"status: announced by {list(nodes)}", lambda: announcers(bed) == wanted, timeout)


def sessions(bed: LabBed, node: str) -> dict[str, str]:
    """Peer name → session state, as the node's IPVSNode reports it."""
    obj = harness.custom(bed.admin).get_cluster_custom_object(
        harness.GROUP, harness.VERSION, "ipvsnodes", node
    )
    bgp = (obj.get("status") or {}).get("bgp") or {}
    return {s.get("peer", ""): s.get("state", "") for s in bgp.get("sessions", [])}


def director_connections(bed: LabBed, node: str, vip: str) -> int:
    """Connections the node's kernel scheduled for ``vip`` (``ipvsadm --stats``)."""
    out = bed.call("run", argv=["ipvsadm", "-L", "-n", "--stats", "--exact"], node=node)
    total = 0
    current = False
    for line in out["stdout"].splitlines():
        words = line.split()
        if words and words[0] in ("TCP", "UDP"):
            current = words[1].rsplit(":", 1)[0].strip("[]") == vip
            if current and words[0] == "TCP":
                total += int(words[2])
    return total
