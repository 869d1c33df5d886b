#!/usr/bin/env bash
# Installs the system tools the test suite needs when they are missing; quiet (and quick) when all are present.
# - redis-server: the REDIS_URL tests run a real Redis.
# - kubectl: tests/unit/test_kubernetes.py builds deploy/kubernetes with `kubectl kustomize`. Debian bookworm's
#   `kubernetes-client` is kubectl 1.20, whose built-in kustomize predates components (kind: Component), so those
#   tests fail with it: install kubectl 1.27+ from https://kubernetes.io/docs/tasks/tools/ instead. (The machines
#   this project is tested on ship kubectl 1.32 with kustomize v5.)
set -euo pipefail

missing=()
command -v redis-server >/dev/null 2>&1 || missing+=(redis-server)
command -v kubectl >/dev/null 2>&1 || missing+=(kubernetes-client)
if [[ ${#missing[@]} -eq 0 ]]; then
    exit 0
fi

if ! command -v apt-get >/dev/null 2>&1; then
    echo "ensure.sh: missing ${missing[*]} and no apt-get here: install them by hand" >&2
    exit 1
fi
sudo=()
if [[ "$(id -u)" != 0 ]]; then
    sudo=(sudo)
fi
echo "ensure.sh: installing ${missing[*]}" >&2
export DEBIAN_FRONTEND=noninteractive
"${sudo[@]}" apt-get update -qq
"${sudo[@]}" apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
