"""Health checks of real servers and LVS dynamic feedback weights.

Each decision is a pure module — one rise/fall machine for every probe kind (``machine``), the
feedback control law (``feedback``), what to check for which VirtualServer (``targets``) — and
``checker`` is the thin shell: one timer heap, an injected clock, probes on a bounded pool of
threads. What they decide reaches the kernel only as an input of the planner
(:data:`verdict.Adjustments`), so every change still goes plan → diff → apply.
"""
