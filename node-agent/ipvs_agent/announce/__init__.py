"""Announcing virtual addresses to the network: layer 2 (ARP and IPv6 neighbour discovery).

``election`` decides, the same way on every node, which node answers for each VIP (pure);
``members`` judges which agents are alive from their Leases (pure) and keeps this node's Lease
(shell); ``packets`` builds and reads ARP and NDP frames (pure, golden-tested); ``responder``
answers and announces on raw sockets (shell); ``speaker`` ties them to the agent's passes.
"""
