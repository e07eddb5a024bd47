"""The ipvs-operator node agent: programs kernel IPVS on its node from cluster state.

It must never import kopf: the agent runs on every node with host network and NET_ADMIN, so it
stays small and auditable (the Seesaw lesson), and shares only :mod:`ipvs_api` with the operator.
"""

__version__ = "0.1.0"
