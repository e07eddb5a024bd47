# One image, both programs: `ipvs-operator` (the default command) and `ipvs-agent`.
# The agent needs NET_ADMIN and host networking (see docs); nothing here runs as root by default.
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
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir --no-index --find-links=/wheels ipvs-operator==0.1.0 \
 && rm -rf /wheels
USER 65532:65532
ENTRYPOINT []
CMD ["ipvs-operator"]
