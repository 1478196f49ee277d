# Container image for syncd.
#
# Builds with BuildKit or with the legacy builder (DOCKER_BUILDKIT=0, or a docker
# client without the buildx plugin): no RUN --mount, no "# syntax=" line (fetching a
# frontend needs a registry).
#
#   docker build -t syncd:local .
#
# Dependencies are installed from requirements.lock with --require-hashes: two builds
# of one commit hold the same packages (`bash .ci/lock` rewrites the lock).
#
# Labels: pass the version and commit (the release workflow does):
#
#   docker build --build-arg VERSION=0.1.0 --build-arg REVISION="$(git rev-parse HEAD)" \
#       -t syncd:local .
#
# Behind a TLS-intercepting proxy, build on a base that trusts its CA and whose pip
# uses the system store: tests/image/build-base.sh makes one (Debian's pip does).
# Another index (a mirror):
#
#   docker build --network host --build-arg BASE_IMAGE=syncd-base:local \
#       --build-arg PIP_INDEX_URL=https://mirror.example/simple -t syncd:local .
#
# The index URLs exist only in the builder stage, which the runtime image does not
# contain. Don't put passwords in them: build args show in build logs.

# A pinned tag, so a rebuild months later starts from the same Python and Debian.
ARG BASE_IMAGE=python:3.12.11-slim-bookworm

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

# Dependencies first, in their own layer, so code changes don't re-download them:
# exactly the locked versions, each file checked against its hash.
COPY requirements.lock ./
RUN set -eu; \
    if [ -z "${PIP_INDEX_URL}" ]; then unset PIP_INDEX_URL; fi; \
    if [ -z "${PIP_EXTRA_INDEX_URL}" ]; then unset PIP_EXTRA_INDEX_URL; fi; \
    /opt/syncd/bin/python -m pip install --require-hashes --no-deps --only-binary :all: \
        -r requirements.lock

COPY pyproject.toml README.md ./
COPY syncd ./syncd
# Then the project itself (nothing else: --no-deps); afterwards drop pip/setuptools
# (not needed at runtime, and they differ between bases) and compile bytecode now,
# because the runtime root filesystem is read-only. unchecked-hash .pyc files stay
# valid whatever the file mtimes are after COPY --from. `syncd --help` imports the
# whole CLI: a module missing from the lock fails the build here, not the container.
RUN set -eu; \
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

ARG VERSION=0.1.0
ARG REVISION=unknown
ARG SOURCE=https://github.com/example-org/syncd
LABEL org.opencontainers.image.title="syncd" \
      org.opencontainers.image.description="Keeps WalkMe segments equal to Heap segments, unattended." \
      org.opencontainers.image.source="${SOURCE}" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.licenses="LicenseRef-Proprietary"

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
