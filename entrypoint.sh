#!/usr/bin/env bash
# Detect the platform and start the right mode: `python3 -m handler` on the RunPod serverless job queue
# (RUNPOD_WEBHOOK_GET_JOB set), `python3 -m gateway` (HTTP mode) everywhere else. MODE=gateway|handler overrides.
#
# In our images (LLAMA_GGUF_IMAGE is set) a start as root hands the unprivileged user `llama` its folders in the
# data volume (lifecycle/container.py) and drops to it; the gateway, the handler and llama-server never run as root.
# `docker run --user UID:GID` starts unprivileged from the outset and skips that step.
set -euo pipefail

mode=$(python3 -m lifecycle.platform) || exit 2
# The same boolean rule as every Python setting (true/false, 1/0, yes/no, on/off); a bad value exits 2.
debug_shell=$(python3 -m lifecycle.settings --bool DEBUG_SHELL) || exit 2

if [[ -n "${LLAMA_GGUF_IMAGE:-}" && "$(id -u)" == 0 && "${debug_shell}" != true ]]; then
    exports=$(python3 -m lifecycle.container prepare) || exit $?
    eval "${exports}"
    export HOME=/home/llama USER=llama LOGNAME=llama
    exec setpriv --reuid=llama --regid=llama --init-groups --no-new-privs --inh-caps=-all --bounding-set=-all \
        -- "$0" "$@"
fi

if [[ "${debug_shell}" == true ]]; then
    echo "DEBUG_SHELL: mode=${mode}; resolved settings (no secrets):"
    python3 -m lifecycle.settings || true
    echo "DEBUG_SHELL: holding the container; exec into it to debug."
    exec sleep infinity
fi

exec python3 -m "${mode}"
