# syntax=docker/dockerfile:1
# The model side on CPU: PRM service, rollout workers, trainer, `psgpo models tiny` (ml extra).
#
#   docker build -f deploy/docker/cpu.Dockerfile -t psgpo/cpu:0.1.0 \
#       --build-arg TORCH_INDEX_URL=<the CPU wheel index that PyTorch's install selector gives> .
#
# Without TORCH_INDEX_URL pip installs the default Linux torch wheel, which pulls in the CUDA
# libraries: it works on CPU, but the image is several GiB larger. TORCH_SPEC matches the Makefile.
# Default command: the PRM service (compose and Kubernetes set the command of each container).

# ------------------------------------------------------------------------------------------ build
FROM python:3.11.13-slim-bookworm AS build

ARG TORCH_SPEC="torch==2.13.0"
ARG TORCH_INDEX_URL=""
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1

RUN python -m venv /opt/venv \
    && /opt/venv/bin/pip install ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"} "$TORCH_SPEC"
WORKDIR /src
COPY pyproject.toml README.md ./
COPY protos ./protos
COPY services ./services
COPY trainer ./trainer
RUN /opt/venv/bin/pip install ".[ml]" \
    && /opt/venv/bin/python -c "import torch, transformers, services.prm.server, services.rollout.server"

# ---------------------------------------------------------------------------------------- runtime
FROM python:3.11.13-slim-bookworm

ARG VERSION=0.1.0
ARG SOURCE=""
LABEL org.opencontainers.image.title="psgpo-cpu" \
      org.opencontainers.image.description="psgpo model side on CPU: PRM service (HTTP 8001, gRPC 50051), rollout workers, trainer" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.source="${SOURCE}" \
      org.opencontainers.image.base.name="python:3.11.13-slim-bookworm"

# tini: PID 1 that reaps orphans and forwards signals (a runtime package, no compiler).
RUN apt-get update \
    && apt-get install -y --no-install-recommends tini \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --system --gid 10001 psgpo \
    && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
       --shell /usr/sbin/nologin psgpo \
    && install -d -o 10001 -g 10001 -m 0755 /models /runs /cache /run/psgpo

COPY --from=build /opt/venv /opt/venv

# HOME=/tmp and the caches under /tmp: the root filesystem is read-only in compose and Kubernetes.
# Models are local directories (PRM_MODEL, ROLLOUT_POLICY): nothing is fetched from a hub.
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HOME=/tmp \
    XDG_CACHE_HOME=/tmp/cache \
    HF_HOME=/tmp/huggingface \
    HF_HUB_OFFLINE=1 \
    PRM_HOST=0.0.0.0 \
    PRM_HTTP_PORT=8001 \
    PRM_GRPC_PORT=50051

USER 10001:10001
WORKDIR /tmp
EXPOSE 8001 50051

HEALTHCHECK --interval=15s --timeout=5s --start-period=120s --retries=3 \
    CMD ["python", "-c", "import os, sys, urllib.request; port = os.environ.get('PRM_HTTP_PORT', '8001'); sys.exit(0 if urllib.request.urlopen(f'http://127.0.0.1:{port}/healthz', timeout=4).status == 200 else 1)"]

ENTRYPOINT ["/usr/bin/tini", "--"]
CMD ["psgpo", "serve", "prm", "--model", "/models/prm"]
