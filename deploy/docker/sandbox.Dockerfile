# syntax=docker/dockerfile:1
# The code sandbox: base dependencies only (no torch), `psgpo serve sandbox`.
#
#   docker build -f deploy/docker/sandbox.Dockerfile -t psgpo/sandbox:0.1.0 .
#
# Runs as the unprivileged user `sandbox` (uid/gid 10002, not the 10001 of the model images: the
# sandbox caps processes per uid with RLIMIT_NPROC, which counts every process and thread of that
# uid on the node). See docs/deploy.md for the isolation layers that are active in a container.

# ------------------------------------------------------------------------------------------ build
FROM python:3.11.13-slim-bookworm AS build

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1

# gcc and libc headers: the sandbox's runner in C is compiled here (services/sandbox/native.py);
# the runtime image gets the built library, not the compiler.
RUN apt-get update \
    && apt-get install -y --no-install-recommends gcc libc6-dev \
    && rm -rf /var/lib/apt/lists/* \
    && python -m venv /opt/venv
WORKDIR /src
COPY pyproject.toml README.md ./
COPY protos ./protos
COPY services ./services
COPY trainer ./trainer
# Not editable: the package lands in the venv's site-packages, which the runs cannot read (the
# sandbox keeps its own code and install tree out of the runs' Landlock rules).
RUN /opt/venv/bin/pip install . \
    && /opt/venv/bin/python -m services.sandbox.native \
    && /opt/venv/bin/python -c "import services.sandbox.server, psgpo.v1.sandbox_pb2"

# ---------------------------------------------------------------------------------------- runtime
FROM python:3.11.13-slim-bookworm

ARG VERSION=0.1.0
ARG SOURCE=""
LABEL org.opencontainers.image.title="psgpo-sandbox" \
      org.opencontainers.image.description="psgpo code sandbox: runs untrusted Python against unit tests (HTTP 8002, gRPC 50052)" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.source="${SOURCE}" \
      org.opencontainers.image.base.name="python:3.11.13-slim-bookworm"

# libseccomp2: the sandbox compiles its seccomp filters with it (ctypes); tini: PID 1 that reaps
# orphans and forwards signals. Runtime libraries only, no compiler.
RUN apt-get update \
    && apt-get install -y --no-install-recommends libseccomp2 tini \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --system --gid 10002 sandbox \
    && useradd --system --uid 10002 --gid 10002 --no-create-home --home-dir /nonexistent \
       --shell /usr/sbin/nologin sandbox \
    && install -d -o 10002 -g 10002 -m 0755 /run/psgpo

COPY --from=build /opt/venv /opt/venv

# HOME=/tmp: the root filesystem is read-only in compose and Kubernetes; /tmp is a tmpfs/emptyDir.
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HOME=/tmp \
    SANDBOX_HOST=0.0.0.0 \
    SANDBOX_HTTP_PORT=8002 \
    SANDBOX_GRPC_PORT=50052

USER 10002:10002
WORKDIR /tmp
EXPOSE 8002 50052

HEALTHCHECK --interval=15s --timeout=5s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import os, sys, urllib.request; port = os.environ.get('SANDBOX_HTTP_PORT', '8002'); sys.exit(0 if urllib.request.urlopen(f'http://127.0.0.1:{port}/healthz', timeout=4).status == 200 else 1)"]

ENTRYPOINT ["/usr/bin/tini", "--"]
# Refuses to start on 0.0.0.0 without SANDBOX_AUTH_TOKEN or SANDBOX_AUTH_TOKEN_FILE (by design).
CMD ["psgpo", "serve", "sandbox"]
