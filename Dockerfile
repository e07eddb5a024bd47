# One image, both programs: `ipvs-operator` (the default command) and `ipvs-agent`.
# charts/ipvs-operator runs the operator as user 65532 on a read-only root filesystem, and the
# agent as root with NET_ADMIN only (docs/operations.md, "What the agent may do"); nothing is
# written at run time (bytecode is compiled at install, PYTHONDONTWRITEBYTECODE keeps it that way).
#
# The base is Debian 12's own "slim" image, pinned by digest. Debian builds it from Debian
# packages alone, and so does CI, which reaches no container registry: tests/image/build.sh
# bootstraps the same minbase root from Debian's archive (mmdebstrap, the slim image's path
# exclusions) and builds this file with `--from` naming that root (docs/testing.md, "Image").
FROM debian:bookworm-20260824-slim@sha256:88200866dfff7ea7f5cbcb6ec7c8a701889efe6fe859fe64d6990e4b07ea4171 AS base

# Python is Debian's (3.11, security-supported with the distribution); the project and its
# dependencies go into a virtualenv from PyPI wheels pinned with their hashes
# (requirements/image.txt, written by tests/image/lock.py).
FROM base AS build
RUN apt-get update \
 && apt-get install -y --no-install-recommends \
        python3=3.11.2-1+b1 \
        python3-venv=3.11.2-1+b1 \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY requirements/image.txt requirements.txt
RUN python3 -m venv /opt/ipvs \
 && /opt/ipvs/bin/pip install --no-cache-dir --require-hashes --only-binary=:all: \
        --requirement requirements.txt
COPY pyproject.toml README.md ./
COPY api api
COPY operator operator
COPY node-agent node-agent
COPY crds crds
# Built without isolation, with the pinned setuptools; then the installers leave the venv.
RUN /opt/ipvs/bin/pip install --no-cache-dir --no-deps --no-build-isolation /src \
 && /opt/ipvs/bin/pip uninstall --yes setuptools \
 && /opt/ipvs/bin/python -m pip uninstall --yes pip

FROM base
# The programs the agent runs besides Python, and nothing else: nft (its nftables table,
# ipvs_agent/host/nftables.py), ip and modprobe (fou receive ports for GUE real servers,
# ipvs_agent/host/realserver.py; modprobe also loads ip_vs in the chart's init container, with
# the base's sh). IPVS, addresses and links go over netlink (pyroute2), with no CLI. Pinned to
# Debian 12's current versions: a Debian point release that drops one fails the build, on purpose.
# The operator's user 65532 gets a name: kopf asks for it (getpass.getuser) and, without an
# entry in /etc/passwd, the operator stopped at start (found by tests/image/test_programs.py).
RUN apt-get update \
 && apt-get install -y --no-install-recommends \
        python3=3.11.2-1+b1 \
        nftables=1.0.6-2+deb12u2 \
        iproute2=6.1.0-3 \
        kmod=30+20221128-1 \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --gid 65532 nonroot \
 && useradd --uid 65532 --gid 65532 --no-create-home --home-dir /nonexistent \
        --shell /usr/sbin/nologin nonroot
COPY --from=build /opt/ipvs /opt/ipvs
ENV PATH=/opt/ipvs/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
USER 65532:65532
ENTRYPOINT []
CMD ["ipvs-operator"]
