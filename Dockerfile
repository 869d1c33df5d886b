# CUDA image (amd64): docker build -t llama-gguf-inference:cuda .
# Dockerfile.cpu is this file with other defaults for the first four build arguments; see docs/DOCKER.md.
# llama-server is built in the first stage by the project's own `python -m lifecycle.llama_server`, from the same
# pinned, sha256-checked llama.cpp source the test suite runs. Needs BuildKit (DOCKER_BUILDKIT=1 or buildx).
ARG BUILDER_IMAGE=nvidia/cuda:12.8.1-devel-ubuntu24.04
ARG RUNTIME_IMAGE=nvidia/cuda:12.8.1-runtime-ubuntu24.04
ARG CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES=75;80;86;89;90 -DCMAKE_EXE_LINKER_FLAGS=-Wl,--allow-shlib-undefined"
ARG IMAGE_FLAVOUR=cuda

FROM ${BUILDER_IMAGE} AS llama-server
ARG CMAKE_ARGS
ARG TARGETARCH
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends build-essential cmake python3 python3-pip ca-certificates \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY lifecycle lifecycle
# The source download goes through pip; a TLS-intercepting proxy's CA comes in as a build secret (never a layer).
# The build cache mount keeps the compiled llama-server between image builds.
RUN --mount=type=secret,id=ca-bundle \
    --mount=type=cache,target=/cache \
    if [ -s /run/secrets/ca-bundle ]; then export PIP_CERT=/run/secrets/ca-bundle; fi \
    && portable="" \
    && if [ "$TARGETARCH" = amd64 ] && [ "${CMAKE_ARGS#*GGML_NATIVE=OFF}" != "$CMAKE_ARGS" ]; then \
         portable="-DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON"; fi \
    && CMAKE_ARGS="$CMAKE_ARGS $portable" LLAMA_GGUF_CACHE_DIR=/cache python3 -m lifecycle.llama_server \
       --install /opt/llama-server

FROM ${RUNTIME_IMAGE}
ARG IMAGE_FLAVOUR
ARG VERSION=0.1.0
ARG LLAMA_CPP_SOURCE=llama-cpp-python-0.3.36
LABEL org.opencontainers.image.title="llama-gguf-inference (${IMAGE_FLAVOUR})" \
      org.opencontainers.image.description="llama.cpp's llama-server behind an OpenAI-compatible gateway or a RunPod serverless handler" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.source="https://github.com/zepfu/llama-gguf-inference" \
      org.opencontainers.image.licenses="MIT" \
      io.llama-gguf-inference.llama-cpp="${LLAMA_CPP_SOURCE}"
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv libgomp1 ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --system --gid 10001 llama \
    && useradd --system --uid 10001 --gid llama --home-dir /home/llama --create-home --shell /usr/sbin/nologin llama
COPY --from=llama-server /opt/llama-server /opt/llama-server
WORKDIR /opt/llama-gguf-inference
COPY pyproject.toml README.md ./
COPY lifecycle lifecycle
COPY gateway gateway
COPY handler handler
COPY entrypoint.sh test_input.json ./
RUN --mount=type=secret,id=ca-bundle \
    if [ -s /run/secrets/ca-bundle ]; then export PIP_CERT=/run/secrets/ca-bundle; fi \
    && python3 -m venv /opt/venv \
    && /opt/venv/bin/pip install --no-cache-dir --disable-pip-version-check . \
    && /opt/llama-server/llama-server --version
ENV PATH=/opt/venv/bin:$PATH \
    LLAMA_SERVER_BIN=/opt/llama-server/llama-server \
    LLAMA_GGUF_IMAGE=${IMAGE_FLAVOUR} \
    PYTHONUNBUFFERED=1
EXPOSE 8000 8001
STOPSIGNAL SIGTERM
# Through the gateway's own health server (PORT_HEALTH): healthy while it runs, unhealthy once it drains.
HEALTHCHECK --interval=10s --timeout=5s --start-period=30s --retries=3 CMD ["python3", "-m", "lifecycle.healthcheck"]
# Starts as root only to give the unprivileged user `llama` its folders in the data volume; see entrypoint.sh.
ENTRYPOINT ["./entrypoint.sh"]
