# syntax=docker/dockerfile:1
#
# Text-to-audio inference service. Two final targets:
#   docker build --target cpu  -t tta:cpu  .     (default: the last stage)
#   docker build --target cuda -t tta:cuda .
# Both install through deploy/install.sh, the script scripts/image_install_check.sh
# also runs, so the pip steps live in one place. The shipped models (models/zoo) are
# package data and arrive with the installed `models` package.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm
ARG CUDA_IMAGE=nvidia/cuda:12.8.1-runtime-ubuntu22.04

# ---------------------------------------------------------------- cpu builder
FROM ${PYTHON_IMAGE} AS builder-cpu
# PyTorch's CPU-only wheel index: without it the default torch wheel is the CUDA build,
# several GiB of libraries a CPU image never loads. Pass an empty value to use PyPI only.
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHON=/opt/venv/bin/python
RUN python -m venv /opt/venv
COPY deploy/install.sh /src/deploy/install.sh
# Heavy layer first (torch), so that source edits do not re-download it.
RUN TORCH_INDEX_URL="${TORCH_INDEX_URL}" sh /src/deploy/install.sh cpu
COPY pyproject.toml /src/
COPY models /src/models
COPY service /src/service
RUN sh /src/deploy/install.sh cpu /src

# --------------------------------------------------------------- cuda builder
# Built on the runtime base itself so that the venv's interpreter path matches.
FROM ${CUDA_IMAGE} AS cuda-base
ARG DEBIAN_FRONTEND=noninteractive
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3.11 python3.11-venv ca-certificates \
    && rm -rf /var/lib/apt/lists/*

FROM cuda-base AS builder-cuda
ARG TORCH_INDEX_URL=
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHON=/opt/venv/bin/python
RUN python3.11 -m venv /opt/venv
COPY deploy/install.sh /src/deploy/install.sh
RUN TORCH_INDEX_URL="${TORCH_INDEX_URL}" sh /src/deploy/install.sh cuda
COPY pyproject.toml /src/
COPY models /src/models
COPY service /src/service
RUN sh /src/deploy/install.sh cuda /src

# ----------------------------------------------------------------- cuda image
FROM cuda-base AS cuda
RUN groupadd --system --gid 10001 tta \
    && useradd --system --uid 10001 --gid tta --create-home --home-dir /home/tta tta
COPY --from=builder-cuda /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1 \
    TTA_HOST=0.0.0.0 \
    TTA_PORT=8000 \
    TTA_DEVICE=cuda \
    TTA_RUNTIME=auto \
    NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility
WORKDIR /home/tta
USER 10001:10001
EXPOSE 8000
# Ready means loaded and warmed; urllib raises on the 503 served before that.
HEALTHCHECK --interval=15s --timeout=5s --start-period=180s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:' + os.environ.get('TTA_PORT', '8000') + '/health/ready', timeout=4)"]
ENTRYPOINT ["python", "-m", "service"]

# ------------------------------------------------------------------ cpu image
# Last stage, so a plain `docker build .` gives the CPU image.
FROM ${PYTHON_IMAGE} AS cpu
RUN groupadd --system --gid 10001 tta \
    && useradd --system --uid 10001 --gid tta --create-home --home-dir /home/tta tta
COPY --from=builder-cpu /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1 \
    TTA_HOST=0.0.0.0 \
    TTA_PORT=8000 \
    TTA_DEVICE=cpu \
    TTA_RUNTIME=auto
WORKDIR /home/tta
USER 10001:10001
EXPOSE 8000
HEALTHCHECK --interval=15s --timeout=5s --start-period=120s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:' + os.environ.get('TTA_PORT', '8000') + '/health/ready', timeout=4)"]
ENTRYPOINT ["python", "-m", "service"]
