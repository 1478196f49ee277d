# Container image for syncd.
#
# Needs BuildKit (RUN --mount). No "# syntax=" line on purpose: the frontend
# built into Docker >= 20.10 is enough, and fetching one needs a registry.
#
#   DOCKER_BUILDKIT=1 docker build -t syncd:local .
#
# Behind a TLS-intercepting proxy / private index (see tests/image/README.md):
#
#   DOCKER_BUILDKIT=1 docker build --network host \
#       --secret id=pip_ca,src=/etc/ssl/certs/ca-certificates.crt \
#       --build-arg PIP_INDEX_URL=https://pypi.org/simple \
#       --build-arg BASE_IMAGE=syncd-base:local \
#       -t syncd:local .
#
# The CA bundle is mounted only for the duration of the pip RUN steps (it is never
# written to a layer), and the build args live only in the builder stage.

ARG BASE_IMAGE=python:3.12-slim

############################################################ builder
FROM ${BASE_IMAGE} AS builder

ARG PIP_INDEX_URL=https://pypi.org/simple
ARG PIP_EXTRA_INDEX_URL=
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DEFAULT_TIMEOUT=120 \
    PYTHONDONTWRITEBYTECODE=1

RUN python3 -m venv /opt/syncd

WORKDIR /src

# Dependencies first, in their own layer, so code changes don't re-download them.
COPY pyproject.toml ./
RUN --mount=type=secret,id=pip_ca \
    set -eu; \
    if [ -s /run/secrets/pip_ca ]; then export PIP_CERT=/run/secrets/pip_ca; fi; \
    if [ -z "${PIP_INDEX_URL}" ]; then unset PIP_INDEX_URL; fi; \
    if [ -z "${PIP_EXTRA_INDEX_URL}" ]; then unset PIP_EXTRA_INDEX_URL; fi; \
    python3 -c 'import tomllib; print("\n".join(tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"]))' \
        > /tmp/requirements.txt; \
    /opt/syncd/bin/python -m pip install -r /tmp/requirements.txt

COPY README.md ./
COPY syncd ./syncd
# Then the project itself; afterwards drop pip/setuptools (not needed at runtime,
# and they differ between bases) and compile bytecode now, because the runtime root
# filesystem is read-only. unchecked-hash .pyc files stay valid whatever the file
# mtimes are after COPY --from. `syncd --help` imports the whole CLI: a module missing
# from pyproject.toml's dependencies fails the build here, not the container at start.
RUN --mount=type=secret,id=pip_ca \
    set -eu; \
    if [ -s /run/secrets/pip_ca ]; then export PIP_CERT=/run/secrets/pip_ca; fi; \
    if [ -z "${PIP_INDEX_URL}" ]; then unset PIP_INDEX_URL; fi; \
    if [ -z "${PIP_EXTRA_INDEX_URL}" ]; then unset PIP_EXTRA_INDEX_URL; fi; \
    /opt/syncd/bin/python -m pip install --no-deps .; \
    /opt/syncd/bin/python -m pip check; \
    /opt/syncd/bin/python -m pip uninstall -y -q pip setuptools wheel 2>/dev/null || true; \
    /opt/syncd/bin/python -m compileall -q -f -j 0 --invalidation-mode unchecked-hash /opt/syncd/lib; \
    test -x /opt/syncd/bin/syncd; \
    /opt/syncd/bin/syncd --help >/dev/null

############################################################ runtime
FROM ${BASE_IMAGE} AS runtime

ENV PATH=/opt/syncd/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    SYNCD_STATE_URL=sqlite:////data/syncd.db

RUN groupadd --system --gid 10001 syncd \
 && useradd --system --uid 10001 --gid 10001 --home-dir /data --no-create-home \
        --shell /usr/sbin/nologin syncd \
 && mkdir -p /data \
 && chown 10001:10001 /data \
 && chmod 0750 /data

COPY --from=builder /opt/syncd /opt/syncd

# Only /data (this volume) and /tmp (a tmpfs) need to be writable:
#   docker run --read-only --tmpfs /tmp -v syncd-data:/data syncd:local
VOLUME ["/data"]
WORKDIR /data

# 9090: admin (/healthz, /metrics); 8080: webhook receiver.
EXPOSE 9090 8080

USER 10001:10001

# Probes http://127.0.0.1:${SYNCD_ADMIN_PORT:-9090}/healthz with urllib (no curl in
# slim images). Proxies are bypassed so HTTP(S)_PROXY meant for WalkMe can't break it.
HEALTHCHECK --interval=30s --timeout=5s --start-period=30s --retries=3 \
    CMD ["/opt/syncd/bin/python", "-c", "import os, urllib.request as u; port = os.environ.get('SYNCD_ADMIN_PORT') or '9090'; u.build_opener(u.ProxyHandler({})).open('http://127.0.0.1:%s/healthz' % port, timeout=4).close()"]

ENTRYPOINT ["syncd"]
CMD ["run"]
