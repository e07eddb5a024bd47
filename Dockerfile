# One image, both programs: `ipvs-operator` (the default command) and `ipvs-agent`.
# charts/ipvs-operator runs the operator as user 65532 on a read-only root filesystem, and the
# agent as root with NET_ADMIN only (docs/operations.md, "Privileges"); nothing is written at run
# time (bytecode is compiled at install, PYTHONDONTWRITEBYTECODE keeps it that way).
FROM python:3.11.14-slim-bookworm AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY api api
COPY operator operator
COPY node-agent node-agent
COPY crds crds
RUN pip wheel --no-cache-dir --no-deps --wheel-dir /wheels . \
 && pip wheel --no-cache-dir --wheel-dir /wheels /wheels/ipvs_operator-*.whl

FROM python:3.11.14-slim-bookworm
# The programs the agent runs besides Python, and nothing else: nft (its nftables table,
# ipvs_agent/host/nftables.py), ip and modprobe (fou receive ports for GUE real servers,
# ipvs_agent/host/realserver.py; modprobe also loads ip_vs in the chart's init container).
# IPVS, addresses and links go over netlink (pyroute2), with no CLI. The BGP speaker, ExaBGP,
# is a Python dependency of the package (pyproject.toml): the agent runs it as `python -m exabgp`.
# Pinned to Debian 12's current versions: a Debian point release that drops one fails the build,
# on purpose.
RUN apt-get update \
 && apt-get install -y --no-install-recommends \
        nftables=1.0.6-2+deb12u2 \
        iproute2=6.1.0-3 \
        kmod=30+20221128-1 \
 && rm -rf /var/lib/apt/lists/*
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir --no-index --find-links=/wheels ipvs-operator==0.1.0 \
 && rm -rf /wheels
USER 65532:65532
ENTRYPOINT []
CMD ["ipvs-operator"]
