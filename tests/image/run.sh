#!/usr/bin/env bash
# `make test-image`: build Dockerfile.cpu as llama-gguf-inference:cpu and check the image from outside, as a user
# would (tests/image/check_image.py). Starts a Docker engine first when none is running (as root on Debian:
# apt-get install docker.io, then dockerd), and makes the base image locally when it cannot be pulled
# (tests/image/base_image.sh). Never skips: no engine, no image or a failed check is a non-zero exit.
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PY:-.venv/bin/python}
IMAGE=${IMAGE:-llama-gguf-inference:cpu}
DOCKERFILE=${DOCKERFILE:-Dockerfile.cpu}
CA_BUNDLE=${CA_BUNDLE:-/etc/ssl/certs/ca-certificates.crt}

log() { echo "test-image: $*"; }

engine_up() { docker info >/dev/null 2>&1; }

start_engine() {
    if engine_up; then return 0; fi
    if [[ $(id -u) != 0 ]]; then
        log "error: no Docker engine is running, and starting one needs root" >&2
        exit 1
    fi
    if ! command -v dockerd >/dev/null; then
        if ! command -v apt-get >/dev/null; then
            log "error: no Docker engine and no apt-get to install one (install Docker, then rerun)" >&2
            exit 1
        fi
        log "installing Docker (docker.io) with apt-get"
        export DEBIAN_FRONTEND=noninteractive
        apt-get update -q >/dev/null
        apt-get install -y -q docker.io >/dev/null
    fi
    # A dockerd (and its containerd) killed earlier, e.g. with the session that started it, leaves pid files behind.
    local pidfile
    for pidfile in /var/run/docker.pid /var/run/docker/containerd/containerd.pid; do
        if [[ -f "$pidfile" ]] && ! kill -0 "$(cat "$pidfile")" 2>/dev/null; then
            rm -f "$pidfile"
        fi
    done
    log "starting dockerd (log: /var/log/dockerd.log)"
    (setsid dockerd >/var/log/dockerd.log 2>&1 &)
    for _ in $(seq 1 60); do
        if engine_up; then return 0; fi
        sleep 1
    done
    log "error: dockerd did not come up in 60 s:" >&2
    tail -20 /var/log/dockerd.log >&2
    exit 1
}

# A CLI that can build with BuildKit: buildx when installed, else a Docker CLI older than 23 (whose `docker build`
# has BuildKit built in, as Debian's docker.io has; the newer CLIs need the buildx plugin for it).
builder() {
    if docker buildx version >/dev/null 2>&1; then
        echo "docker buildx build --load"
        return
    fi
    local cli
    for cli in $(which -a docker | awk '!seen[$0]++'); do
        local major
        major=$("$cli" version --format '{{.Client.Version}}' 2>/dev/null | cut -d. -f1) || continue
        if [[ "$major" =~ ^[0-9]+$ ]] && ((major < 23)); then
            echo "env DOCKER_BUILDKIT=1 $cli build"
            return
        fi
    done
    if [[ $(id -u) == 0 ]] && command -v apt-get >/dev/null && [[ ! -x /usr/bin/docker ]]; then
        DEBIAN_FRONTEND=noninteractive apt-get install -y -q docker.io >/dev/null
        echo "env DOCKER_BUILDKIT=1 /usr/bin/docker build"
        return
    fi
    log "error: no BuildKit builder: install the docker-buildx plugin" >&2
    exit 1
}

start_engine

# `docker compose config` checks docker-compose.yml (tests/image/check_image.py): the compose plugin, or Debian's
# docker-compose, installed like the engine when neither is there.
if ! docker compose version >/dev/null 2>&1 && ! command -v docker-compose >/dev/null; then
    if [[ $(id -u) == 0 ]] && command -v apt-get >/dev/null; then
        log "installing docker-compose with apt-get"
        DEBIAN_FRONTEND=noninteractive apt-get install -y -q docker-compose >/dev/null \
            || { apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -q docker-compose >/dev/null; }
    fi
fi
base=$(sed -n 's/^ARG RUNTIME_IMAGE=//p' "$DOCKERFILE")
bash tests/image/base_image.sh "$base"
build=$(builder)
version=$(sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml)
llama_cpp=$("$PY" -c 'from lifecycle.llama_server import SOURCE_VERSION; print(SOURCE_VERSION)')
secret=()
if [[ -s "$CA_BUNDLE" ]]; then
    secret=(--secret "id=ca-bundle,src=$CA_BUNDLE")  # a TLS-intercepting proxy's CA, never in a layer
fi
log "building $IMAGE from $DOCKERFILE ($build); the llama-server stage takes about 6 minutes the first time"
started=$SECONDS
# shellcheck disable=SC2086
$build --network host "${secret[@]}" --progress plain -f "$DOCKERFILE" -t "$IMAGE" \
    --build-arg "VERSION=$version" --build-arg "LLAMA_CPP_SOURCE=llama-cpp-python-$llama_cpp" . \
    >/tmp/test-image-build.log 2>&1 || {
    tail -40 /tmp/test-image-build.log >&2
    log "error: the image did not build (full log: /tmp/test-image-build.log)" >&2
    exit 1
}
log "built in $((SECONDS - started)) s"
RUNPOD_SKIP_AUTO_SYSTEM_CHECKS=true PYTHONUNBUFFERED=1 "$PY" tests/image/check_image.py --image "$IMAGE"
