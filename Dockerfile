# syntax=docker/dockerfile:1.7
# EAGLE containers for GPU hosts (the same image runs expert-only on a CPU-only host).
#
#   docker build --target edge -t eagle-edge .   # headless REST service: `eagle serve` on :8080
#   docker build --target app  -t eagle-app  .   # Gradio web app:        `eagle app`   on :7860
#
# Volumes: /models (Hugging Face cache, HF_HOME) and /data (banks, audit log, jobs: EAGLE_DATA_DIR).
# Runs as the non-root user `eagle` (uid 10001). See docs/edge.md.

ARG CUDA_IMAGE=nvidia/cuda:12.8.1-cudnn-runtime-ubuntu22.04
# requirements-gpu.txt: faiss-gpu + onnxruntime-gpu. Build with --build-arg REQUIREMENTS=requirements.txt for
# a CPU-only image (faiss-cpu + onnxruntime).
ARG REQUIREMENTS=requirements-gpu.txt

# ---------------------------------------------------------------------------------------------------------------
# base: CUDA runtime + Python 3.11 + the unprivileged user. Shared by the build and the runtime stages.
FROM ${CUDA_IMAGE} AS base
ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    LANG=C.UTF-8
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates gnupg software-properties-common \
 && add-apt-repository -y ppa:deadsnakes/ppa \
 && apt-get update \
 && apt-get install -y --no-install-recommends python3.11 python3.11-venv libglib2.0-0 \
 && apt-get purge -y --auto-remove software-properties-common gnupg \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --system --gid 10001 eagle \
 && useradd --system --uid 10001 --gid eagle --home-dir /home/eagle --create-home --shell /usr/sbin/nologin eagle

# ---------------------------------------------------------------------------------------------------------------
# build: the pinned requirements into /opt/venv (cached while requirements*.txt are unchanged), then EAGLE.
FROM base AS build
ARG REQUIREMENTS
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python3.11 -m venv /opt/venv && /opt/venv/bin/pip install --upgrade pip
WORKDIR /src
COPY requirements-base.txt requirements.txt requirements-gpu.txt ./
RUN /opt/venv/bin/pip install -r ${REQUIREMENTS}
COPY pyproject.toml README.md ./
COPY eagle ./eagle
COPY expert ./expert
COPY mllm ./mllm
COPY app ./app
COPY deploy ./deploy
RUN /opt/venv/bin/pip install --no-deps . \
 && /opt/venv/bin/python -c "import eagle, expert, deploy, app; print('EAGLE installed')"

# ---------------------------------------------------------------------------------------------------------------
# runtime: the venv only (no pip cache, no sources), the volumes, the user.
FROM base AS runtime
COPY --from=build /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    EAGLE_DATA_DIR=/data \
    HF_HOME=/models/hf \
    GRADIO_ANALYTICS_ENABLED=False \
    MPLCONFIGDIR=/tmp/matplotlib
RUN mkdir -p /data /models/hf && chown -R eagle:eagle /data /models
VOLUME ["/models", "/data"]
USER eagle
WORKDIR /home/eagle

# ---------------------------------------------------------------------------------------------------------------
# edge: the headless service. Set EAGLE_SERVICE__TOKEN (or mount a token file and pass --token-file): without a
# token the service refuses to listen on 0.0.0.0. Expert-only box: EAGLE_MLLM__ENABLED=false.
FROM runtime AS edge
ENV EAGLE_SERVICE__HOST=0.0.0.0 \
    EAGLE_SERVICE__PORT=8080
EXPOSE 8080
HEALTHCHECK --interval=30s --timeout=10s --start-period=60s --retries=3 CMD ["python", "-m", "deploy.healthcheck", "edge"]
STOPSIGNAL SIGTERM
CMD ["eagle", "serve"]

# ---------------------------------------------------------------------------------------------------------------
# app: the Gradio web app.
FROM runtime AS app
ENV EAGLE_APP__HOST=0.0.0.0 \
    EAGLE_APP__PORT=7860
EXPOSE 7860
HEALTHCHECK --interval=30s --timeout=10s --start-period=90s --retries=3 CMD ["python", "-m", "deploy.healthcheck", "app"]
STOPSIGNAL SIGTERM
CMD ["eagle", "app"]
