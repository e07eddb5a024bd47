"""Names that the operator, the agent, the chart and users must agree on."""

from typing import Final

GROUP: Final = "ipvs.io"
VERSION: Final = "v1alpha1"
API_VERSION: Final = f"{GROUP}/{VERSION}"

VIRTUAL_SERVER: Final = "VirtualServer"
VIRTUAL_SERVERS: Final = "virtualservers"
ADDRESS_POOL: Final = "AddressPool"
ADDRESS_POOLS: Final = "addresspools"
BGP_PEER: Final = "BGPPeer"
BGP_PEERS: Final = "bgppeers"
IPVS_NODE: Final = "IPVSNode"
IPVS_NODES: Final = "ipvsnodes"
#: Further slices of a node's IPVSNode entries, when they would not fit one object.
IPVS_NODE_REPORT: Final = "IPVSNodeReport"
IPVS_NODE_REPORTS: Final = "ipvsnodereports"

#: spec.loadBalancerClass of the Services we serve.
LOAD_BALANCER_CLASS: Final = "ipvs.io/lb"

#: Label on VirtualServers that the operator made from a Service.
LABEL_SERVICE_NAME: Final = "ipvs.io/service-name"
#: Label on objects the project manages (chart, generated objects).
LABEL_MANAGED_BY: Final = "app.kubernetes.io/managed-by"
MANAGED_BY: Final = "ipvs-operator"

#: The packet-mark bit the node agent sets on NAT traffic to masquerade it (nftables). No
#: firewall-mark service may use a mark with this bit: IPVS matches fwmark services first, so it
#: would capture that traffic on every node (AddressPool firewallMarks refuse such ranges).
MASQUERADE_MARK: Final = 0x2000
