"""The agent's host-networking shell: virtual addresses, nftables, sysctls, real-server setup.

Each module pairs a pure function that renders the desired host state from plain values with
a small class that reads the live state and applies only the difference, touching nothing the
agent does not own. Every class takes an optional network namespace, so the same code prepares
the node itself or, later, a pod's namespace.
"""
