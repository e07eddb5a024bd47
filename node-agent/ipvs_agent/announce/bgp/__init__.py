"""BGP announcement through ExaBGP: every node that can serve a VIP announces it as a host
route with itself as the next hop, so routers spread flows over the directors with ECMP.

``policy`` decides sessions and routes from a reconcile pass (pure); ``exabgp`` writes ExaBGP's
configuration and API lines and reads its answers (pure, golden-tested); ``driver`` runs the
ExaBGP process and talks to it through ``relay`` (shell); ``speaker`` keeps the announced
routes equal to the policy's and reports sessions (shell).
"""
