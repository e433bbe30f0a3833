# One image for every role: Ray head, Ray workers, the gateway, job entrypoints, Serve replicas.
#   docker build -t flm/flm:0.1.0 .                          # CPU (torch's CPU wheel)
#   docker build -t flm/flm:0.1.0-cuda --build-arg VARIANT=cuda .   # CUDA 12 (torch's default wheel)
# Without a container registry or the PyTorch index (benchmarks/compose_check.py builds this way when none answers):
#   --build-arg BASE_CPU=<a local Debian image with python3.11 as `python`> --build-arg TORCH_INDEX=none with the
#   torch wheel in docker/wheels/ (a folder in the build context; empty otherwise).
# Ray's nodes in a cluster must run the same Ray and Python versions: build every node from this image.
ARG VARIANT=cpu
ARG BASE_CPU=python:3.11-slim
# where torch==2.13.0 comes from: an index URL, or `none`: the wheel in docker/wheels/ (its dependencies from PyPI)
ARG TORCH_INDEX=

FROM ${BASE_CPU} AS base-cpu
ARG TORCH_INDEX
ENV TORCH_INDEX=${TORCH_INDEX:-https://download.pytorch.org/whl/cpu}

FROM nvidia/cuda:12.4.1-cudnn-runtime-ubuntu22.04 AS base-cuda
RUN apt-get update && apt-get install -y --no-install-recommends software-properties-common \
    && add-apt-repository -y ppa:deadsnakes/ppa && apt-get update \
    && apt-get install -y --no-install-recommends python3.11 python3.11-venv python3.11-dev \
    && ln -sf /usr/bin/python3.11 /usr/local/bin/python && python -m ensurepip && rm -rf /var/lib/apt/lists/*
ARG TORCH_INDEX
ENV TORCH_INDEX=${TORCH_INDEX:-https://pypi.org/simple}

FROM base-${VARIANT}
RUN apt-get update && apt-get install -y --no-install-recommends build-essential curl \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /opt/flm
ENV PYTHONUNBUFFERED=1 RAY_USAGE_STATS_ENABLED=0 FLM_HOME=/data
# torch first, from the variant's index (or docker/wheels/), so the project's `torch>=2.4` finds it installed
COPY docker/wheels/ /tmp/wheels/
RUN python -m pip install --no-cache-dir --upgrade pip setuptools wheel \
    && if [ "$TORCH_INDEX" = none ]; then src="--find-links /tmp/wheels"; \
       else src="--index-url $TORCH_INDEX"; fi \
    && python -m pip install --no-cache-dir $src torch==2.13.0 && rm -rf /tmp/wheels
RUN DS_BUILD_OPS=0 python -m pip install --no-cache-dir --no-build-isolation "deepspeed>=0.15"
COPY pyproject.toml README.md ./
COPY flm ./flm
COPY cluster ./cluster
COPY service ./service
COPY api ./api
COPY configs ./configs
RUN python -m pip install --no-cache-dir ".[train,serve,cloud,hf]" torch==2.13.0
# every role runs as this user, not root; /data (a new volume takes its owner from here) is its own
RUN useradd --create-home --uid 1000 --shell /bin/bash flm && mkdir -p /data && chown flm:flm /data
USER flm
VOLUME ["/data"]
# Ray (6379 GCS, 8265 dashboard/jobs, 10001 client), Serve 8000, the gateway 8080
EXPOSE 6379 8265 10001 8000 8080
CMD ["flm", "--help"]
