#!/usr/bin/env bash
# The gateway's own CPU time per request under wrk (-t2 -c32 by default), for in-place A/B of hot-path changes.
#
#   bench/cpu_per_request.sh PORT [ENV=VALUE ...]
#   ROOTDIR=/path/to/patched/copy bench/cpu_per_request.sh PORT [ENV=VALUE ...]
#
# Starts `python -m gateway` from ROOTDIR (default: this checkout; a copy needs only gateway/ and lifecycle/) with
# auth on, the access log on and bench/fake_llama_server.py as its backend, on PORT..PORT+2; warms it up for 1 s,
# then runs wrk twice for 3 s and prints req/s and the gateway's CPU time (user + system, all threads, from
# /proc/<pid>/stat) divided by the requests served. CPU per request is far steadier than req/s on a shared machine;
# alternate variants and repeat. Extra ENV=VALUE arguments override the gateway's settings (e.g. ACCESS_LOG=false).
# STREAM=1 sends streamed requests ("stream": true) instead; CONNECTIONS (default 32) sets wrk's -c.
set -euo pipefail
HERE=$(cd "$(dirname "$0")/.." && pwd)
ROOT=${ROOTDIR:-$HERE}
PY=${PYTHON:-$HERE/.venv/bin/python}
B=$1; shift
T=$(mktemp -d /tmp/cpu-per-request.XXXXXX)
echo "bench:sk-bench-client-0123456789abcdef" > "$T/keys.txt"; echo GGUF > "$T/fake.gguf"
cd "$ROOT"
env DATA_DIR="$T/data" AUTH_ENABLED=true AUTH_KEYS_FILE="$T/keys.txt" HOST=127.0.0.1 PORT="$B" \
  PORT_HEALTH=$((B + 1)) PORT_BACKEND=$((B + 2)) LLAMA_SERVER_BIN="$HERE/bench/fake_llama_server.py" \
  MODEL_PATH="$T/fake.gguf" EXTRA_ARGS="--exit-after 300" PARALLEL=32 MAX_CONCURRENT_REQUESTS=32 \
  MAX_QUEUE_SIZE=64 MAX_REQUESTS_PER_MINUTE=1000000000 PYTHONPATH="$ROOT" "$@" \
  "$PY" -m gateway > "$T/gateway.log" 2>&1 &
G=$!
trap 'kill $G 2>/dev/null; wait $G 2>/dev/null; rm -rf "$T"' EXIT
for _ in $(seq 100); do curl -sf "http://127.0.0.1:$B/ping" > /dev/null && break; sleep 0.2; done
cat > "$T/post.lua" <<'LUA'
wrk.method = "POST"
wrk.body = '{"model":"any","messages":[{"role":"user","content":"Say hello."}],"max_tokens":16__STREAM__}'
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer sk-bench-client-0123456789abcdef"
LUA
if [ "${STREAM:-0}" = 1 ]; then sed -i 's/__STREAM__/,"stream":true/' "$T/post.lua"; else sed -i 's/__STREAM__//' "$T/post.lua"; fi
C=${CONNECTIONS:-32}
THREADS=$(( C < 2 ? C : 2 ))
URL="http://127.0.0.1:$B/v1/chat/completions"
wrk -t$THREADS -c$C -d1s -s "$T/post.lua" "$URL" > /dev/null
cpu_ticks() { awk '{print $14 + $15}' "/proc/$G/stat"; }
HZ=$(getconf CLK_TCK)
for _ in 1 2; do
  c0=$(cpu_ticks)
  out=$(wrk -t$THREADS -c$C -d3s -s "$T/post.lua" "$URL")
  c1=$(cpu_ticks)
  n=$(echo "$out" | grep -oE '[0-9]+ requests in' | cut -d' ' -f1)
  rps=$(echo "$out" | awk '/Requests\/sec/ {print $2}')
  echo "${*:-default} rps=$rps cpu_us_per_req=$(( (c1 - c0) * 1000000 / HZ / n ))"
done
