# syntax=docker/dockerfile:1
# The model side on NVIDIA GPUs: PRM service, rollout workers, trainer (ml + vllm extras).
#
#   docker build -f deploy/docker/cuda.Dockerfile -t psgpo/cuda:0.1.0 .
#
# Base: NVIDIA's official CUDA runtime image on UBI 9, which packages Python 3.11 (the project's
# Python) as `python3.11`. The torch wheel brings its own CUDA user-space libraries; the host needs
# an NVIDIA driver recent enough for CUDA 12.8 and the NVIDIA container toolkit (or, on
# Kubernetes, the NVIDIA device plugin).
#
# The `vllm` extra (pyproject.toml) brings the vllm backends (issue 9; not yet run on a GPU). vLLM
# pins its own torch version: set TORCH_SPEC to that version (or leave it to vLLM) so pip does not
# swap torch between the two steps.

# ------------------------------------------------------------------------------------------ build
FROM nvidia/cuda:12.8.1-runtime-ubi9 AS build

ARG TORCH_SPEC="torch==2.13.0"
ARG TORCH_INDEX_URL=""
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1

RUN dnf install -y --setopt=install_weak_deps=False python3.11 python3.11-pip \
    && dnf clean all \
    && python3.11 -m venv /opt/venv \
    && /opt/venv/bin/pip install ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"} "$TORCH_SPEC"
WORKDIR /src
COPY pyproject.toml README.md ./
COPY protos ./protos
COPY services ./services
COPY trainer ./trainer
RUN /opt/venv/bin/pip install ".[ml,vllm]" \
    && /opt/venv/bin/python -c "import torch, transformers, services.prm.server, services.rollout.server"

# ---------------------------------------------------------------------------------------- runtime
FROM nvidia/cuda:12.8.1-runtime-ubi9

ARG VERSION=0.1.0
ARG SOURCE=""
LABEL org.opencontainers.image.title="psgpo-cuda" \
      org.opencontainers.image.description="psgpo model side on NVIDIA GPUs: PRM service (HTTP 8001, gRPC 50051), rollout workers, trainer" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.source="${SOURCE}" \
      org.opencontainers.image.base.name="nvidia/cuda:12.8.1-runtime-ubi9"

RUN dnf install -y --setopt=install_weak_deps=False python3.11 shadow-utils \
    && dnf clean all \
    && rm -rf /var/cache/dnf \
    && groupadd --system --gid 10001 psgpo \
    && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
       --shell /sbin/nologin psgpo \
    && install -d -o 10001 -g 10001 -m 0755 /models /runs /cache /run/psgpo

COPY --from=build /opt/venv /opt/venv

# vLLM's Triton kernels compile a small C launcher (against Python.h) the first time they run, so
# an image WITH vLLM needs a C compiler at run time: the one exception to "no build tools in the
# final stage", taken only when vLLM is installed.
RUN if [ -d /opt/venv/lib/python3.11/site-packages/vllm ]; then \
        dnf install -y --setopt=install_weak_deps=False gcc python3.11-devel && dnf clean all \
        && rm -rf /var/cache/dnf; \
    fi

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

HEALTHCHECK --interval=15s --timeout=5s --start-period=300s --retries=3 \
    CMD ["python", "-c", "import os, sys, urllib.request; port = os.environ.get('PRM_HTTP_PORT', '8001'); sys.exit(0 if urllib.request.urlopen(f'http://127.0.0.1:{port}/healthz', timeout=4).status == 200 else 1)"]

# No tini on UBI: compose runs these containers with `init: true` (deploy/compose/gpu.yml).
CMD ["psgpo", "serve", "prm", "--model", "/models/prm"]
