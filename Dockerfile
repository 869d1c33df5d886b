# CUDA image (amd64). The official llama.cpp server image supplies /app/llama-server, which the lifecycle finds
# by itself (no build inside the image). Ubuntu 24.04 base, so python3 is 3.12.
ARG LLAMA_CPP_IMAGE=ghcr.io/ggml-org/llama.cpp:server-cuda
FROM ${LLAMA_CPP_IMAGE}

RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv ca-certificates \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /opt/llama-gguf-inference
COPY pyproject.toml README.md ./
COPY lifecycle lifecycle
COPY gateway gateway
COPY handler handler
COPY entrypoint.sh test_input.json ./
RUN python3 -m venv /opt/venv && /opt/venv/bin/pip install --no-cache-dir .

ENV PATH=/opt/venv/bin:$PATH
EXPOSE 8000 8001
ENTRYPOINT ["./entrypoint.sh"]
