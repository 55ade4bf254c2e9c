# EAGLE containers: one Debian bookworm base for GPU hosts and CPU-only hosts alike (see docs/edge.md).
#
#   docker build --target edge -t eagle-edge .   # headless REST service: `eagle serve` on :8080
#   docker build --target app  -t eagle-app  .   # Gradio web app:        `eagle app`   on :7860
#
# No CUDA base image: PyPI's torch, onnxruntime-gpu and faiss-gpu wheels bring their CUDA libraries, and the
# NVIDIA container runtime brings the driver (`docker run --gpus all`, or the compose file's device reservation).
# Python is Debian bookworm's python3 (3.11), installed by apt, so any bookworm base works:
#   --build-arg BASE_IMAGE=eagle-base:bookworm        a local base where no registry is reachable
#                                                     (debootstrap + docker import: deploy/container-smoke.sh)
#   --build-arg REQUIREMENTS=requirements.txt         a CPU image (faiss-cpu + onnxruntime instead of the GPU builds)
# Wheels: from the package index, or only from a local wheel directory when one is given:
#   docker buildx build --build-context wheels=/path/to/wheels ...          (BuildKit named context), or
#   tar -C /path/to/wheels -ch . | docker import - eagle-wheels:local
#   docker build --build-arg WHEELS_IMAGE=eagle-wheels:local ...            (any BuildKit docker)
# A TLS-intercepting proxy in front of the index: pass its CA bundle as a secret (it never lands in a layer):
#   docker build --secret id=pip_cert,src=/etc/ssl/certs/ca-certificates.crt ...
# BuildKit is required (RUN --mount); there is deliberately no `# syntax=` line, which would pull the Dockerfile
# frontend from a registry: the frontend built into Docker >= 20.10 reads this file.
#
# Volumes: /models (Hugging Face cache, HF_HOME) and /data (banks, audit log, jobs: EAGLE_DATA_DIR).
# Runs as the non-root user `eagle` (uid 10001).

ARG BASE_IMAGE=debian:bookworm-slim
# requirements-gpu.txt: faiss-gpu + onnxruntime-gpu. Build with --build-arg REQUIREMENTS=requirements.txt for
# a CPU-only image (faiss-cpu + onnxruntime).
ARG REQUIREMENTS=requirements-gpu.txt
# An image (or, with buildx, a named build context) whose root holds wheels; scratch: none, the index only.
ARG WHEELS_IMAGE=scratch

# ---------------------------------------------------------------------------------------------------------------
# wheels: a local wheel directory, preferred by pip over the index for the same version. Empty by default.
FROM ${WHEELS_IMAGE} AS wheels

# ---------------------------------------------------------------------------------------------------------------
# base: Debian's Python 3.11 + the unprivileged user. Shared by the build and the runtime stages.
FROM ${BASE_IMAGE} AS base
ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    LANG=C.UTF-8
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates python3 libglib2.0-0 \
 && rm -rf /var/lib/apt/lists/* \
 && python3 -c "import sys; assert sys.version_info[:2] == (3, 11), sys.version" \
 && groupadd --system --gid 10001 eagle \
 && useradd --system --uid 10001 --gid eagle --home-dir /home/eagle --create-home --shell /usr/sbin/nologin eagle

# ---------------------------------------------------------------------------------------------------------------
# deps: the pinned requirements into /opt/venv (cached while requirements*.txt are unchanged).
FROM base AS deps
ARG REQUIREMENTS
# Optional mirror of the package index (not needed where PyPI is reachable).
ARG PIP_INDEX_URL
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_DEFAULT_TIMEOUT=180
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3-venv \
 && rm -rf /var/lib/apt/lists/* \
 && python3 -m venv /opt/venv
WORKDIR /src
COPY requirements-base.txt requirements.txt requirements-gpu.txt ./
# A local wheel directory must be complete (`pip download -r <requirements> -d DIR`): pip then installs from it
# alone (--no-index), because with both sources pip takes the index's copy of the same version.
RUN --mount=type=bind,from=wheels,target=/wheels \
    --mount=type=secret,id=pip_cert \
    set -e; \
    if [ -s /run/secrets/pip_cert ]; then export PIP_CERT=/run/secrets/pip_cert; fi; \
    from=""; \
    if ls /wheels/*.whl > /dev/null 2>&1; then from="--no-index --find-links /wheels"; fi; \
    echo "pip install -r ${REQUIREMENTS} from: ${from:-the package index}"; \
    /opt/venv/bin/pip install $from -r ${REQUIREMENTS}

# ---------------------------------------------------------------------------------------------------------------
# build: EAGLE itself as a wheel (the sources change often; the dependencies above do not).
FROM deps AS build
COPY pyproject.toml README.md ./
COPY eagle ./eagle
COPY expert ./expert
COPY mllm ./mllm
COPY common ./common
COPY app ./app
COPY deploy ./deploy
RUN /opt/venv/bin/pip wheel --no-deps --no-index --no-build-isolation --wheel-dir /dist .

# ---------------------------------------------------------------------------------------------------------------
# runtime: the venv (no pip cache, no sources), the volumes, the user. The dependencies are one layer, copied
# from `deps`, so a change to EAGLE's code rebuilds only the small layer that installs its wheel.
FROM base AS runtime
COPY --from=deps /opt/venv /opt/venv
RUN --mount=type=bind,from=build,source=/dist,target=/dist \
    /opt/venv/bin/pip install --no-deps --no-index /dist/*.whl \
 && /opt/venv/bin/python -c "import eagle, expert, deploy, app; print('EAGLE installed')"
ENV PATH=/opt/venv/bin:$PATH \
    EAGLE_DATA_DIR=/data \
    HF_HOME=/models/hf \
    GRADIO_ANALYTICS_ENABLED=False \
    MPLCONFIGDIR=/tmp/matplotlib
RUN mkdir -p /data /models/hf && chown -R eagle:eagle /data /models
# Pre-export the expert's ONNX backbone into /data/cache/onnx (`eagle warm-cache`: the graph every bank build copies,
# verified by sha256; docs/edge.md), so no build spends 10-20 s exporting it. It needs the backbone weights: they
# are fetched into /models/hf when the build reaches the Hugging Face hub; where it cannot, the step says so and
# is skipped (the app's start-up and the first build then export once). --build-arg WARM_ONNX_CACHE=off skips it.
# Before VOLUME: what a RUN writes into a declared volume afterwards is discarded.
ARG WARM_ONNX_CACHE=on
RUN if [ "$WARM_ONNX_CACHE" = on ]; then \
      eagle warm-cache || echo "eagle warm-cache skipped (no backbone weights at build time): builds export once"; \
      chown -R eagle:eagle /data /models; \
    fi
VOLUME ["/models", "/data"]
USER eagle
WORKDIR /home/eagle

# ---------------------------------------------------------------------------------------------------------------
# edge: the headless service. Set EAGLE_SERVICE__TOKEN (or mount a token file and pass --token-file): without a
# token the service refuses to listen on 0.0.0.0. Expert-only box: EAGLE_MLLM__ENABLED=false.
# CPU-only box (built with REQUIREMENTS=requirements.txt): EAGLE_EXPERT__PRECISION=int8 runs the expert's backbone
# quantised, ~3x faster on CPUs with VNNI; set it before building banks (each bank records its precision and is
# served only with it). How to choose: docs/edge.md section 8.
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
