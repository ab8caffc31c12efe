# syntax=docker/dockerfile:1
#
# session-sidecar image.
#
#   docker build -t session-sidecar .
#   docker run --rm -p 8080:8080 -e SIDECAR_REDIS_URL=redis://redis:6379/0 \
#       -e SIDECAR_JWT_SECRET=... session-sidecar
#
# Two stages: `builder` installs the package and its dependencies into a venv
# at /opt/venv (every dependency ships a manylinux wheel, so no compiler is
# needed, and none is in either stage); `runtime` is a clean slim image that
# receives only that venv and runs it as an unprivileged user.
#
# tests/test_deploy_static.py runs this file's builder RUN steps in a fresh
# venv and checks the result, parses the runtime stage, and runs its CMD and
# HEALTHCHECK (see deploy/README.md).

ARG PYTHON_IMAGE=python:3.11-slim

# ---------------------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS builder

ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PYTHONDONTWRITEBYTECODE=1

RUN python -m venv /opt/venv

WORKDIR /src
# Only what the package build reads, and the pinned versions (.dockerignore keeps the rest out).
COPY pyproject.toml README.md requirements.lock ./
COPY session_sidecar/ ./session_sidecar/

# A regular (non-editable) install; uvicorn[standard] brings uvloop and httptools.
# Every dependency at the version requirements.lock pins, so two builds of one
# commit install the same set. After changing dependencies in pyproject.toml,
# regenerate it (add --upgrade to move every pin to the newest release):
#   uv pip compile pyproject.toml --universal --python-version 3.11 -o requirements.lock
RUN /opt/venv/bin/python -m pip install --no-warn-script-location -c requirements.lock .
# Fail the build, not the first request, if the fast loop/parser or the entry point is missing.
RUN /opt/venv/bin/python -c "import uvloop, httptools, session_sidecar.app" \
 && /opt/venv/bin/session-sidecar --version
# Installers are build tools too: the runtime venv carries none.
RUN /opt/venv/bin/python -m pip uninstall --yes pip setuptools wheel

# ---------------------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS runtime

LABEL org.opencontainers.image.title="session-sidecar" \
      org.opencontainers.image.description="Answers active-session and task-status from the chat backend's Redis keys, read-only." \
      org.opencontainers.image.licenses="MIT"

RUN groupadd --system --gid 10001 sidecar \
 && useradd --system --uid 10001 --gid 10001 --no-create-home \
        --home-dir /nonexistent --shell /usr/sbin/nologin sidecar

COPY --from=builder /opt/venv /opt/venv

ENV PATH="/opt/venv/bin:${PATH}" \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    SIDECAR_HOST=0.0.0.0 \
    SIDECAR_PORT=8080

# Numeric, so Kubernetes' runAsNonRoot can verify it without reading /etc/passwd.
USER 10001:10001
EXPOSE 8080

# uvicorn handles SIGTERM: it stops accepting, lets in-flight requests finish
# (at most SIDECAR_SHUTDOWN_TIMEOUT_S, 10 s by default), then exits 0. CMD is
# in exec form, so the signal reaches Python directly, not a shell.
STOPSIGNAL SIGTERM

# No curl in the slim image: Python's standard library does the probe.
# Liveness only (/healthz never touches Redis); readiness is /readyz.
HEALTHCHECK --interval=10s --timeout=3s --start-period=15s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('SIDECAR_PORT', '8080'), timeout=2)"]

CMD ["session-sidecar", "serve"]
