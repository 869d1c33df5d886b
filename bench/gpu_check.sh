#!/usr/bin/env bash
# The GPU check: on a machine with an NVIDIA GPU, build the CUDA llama-server, start the gateway once with NGL and
# CTX unset and record what it chose (/health's offload), run the end-to-end tests with NGL unset, run the
# streaming benchmark gateway vs direct (bench/stream_throughput.py --ngl auto), and print tokens/s and TTFT ratios.
# Works offline: everything it needs comes from this checkout, the cache and the inputs below.
#
#   bench/gpu_check.sh [--dry-run] [--cpu-smoke] [STEP ...]     steps: env build model probe e2e bench summary
#   bench/gpu_check.sh pack DIR                                 (on a machine with the cache and internet)
#
# No STEP: all of them, in that order; `summary` always runs last (also after a failed step). --dry-run prints what
# each step would run and checks the inputs. --cpu-smoke runs the same steps for a minute or so with CMAKE_ARGS
# unset (the CPU build in the cache), only tests/e2e/test_offload.py and a one-round benchmark.
#
# Inputs (environment):
#   OUT_DIR          results: gpu_check.json (the summary), gpu_check.log (every step's output), probe.json,
#                    stream_throughput.json, e2e.xml, steps.tsv, gpu.txt; default bench/out/gpu-check-<time>
#   CMAKE_ARGS       default "-DGGML_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES=90" (H100/H200); set it to build for others
#   LLAMA_SERVER_BIN a llama-server to use instead of building one
#   LLAMA_CPP_SDIST  llama.cpp's source, for a machine whose cache lacks it: llama-cpp-python's sdist
#                    (llama_cpp_python-<version>.tar.gz, sha256-checked as lifecycle/llama_server.py does), the
#                    trimmed llama-cpp-src.tar.gz that `pack` writes, or an unpacked tree (the sdist's folder, its
#                    vendor/llama.cpp, or any llama.cpp checkout of that version)
#   MODEL_PATH       the model; default: lifecycle/model.py's default model from the cache, which MODEL_PARTS_DIR
#                    (a `pack` folder: model.gguf.part-*, model.name, model.sha256) fills first when given
#   PYTHON           an interpreter with the project's dependencies; default: .venv/bin/python if it works, else
#                    python3 with the wheels in WHEELHOUSE (default MODEL_PARTS_DIR/wheels, if there) installed
#                    offline into SITE_DIR (default /tmp/gpu-check-site) and put on PYTHONPATH
#   cache            as the project finds it: LLAMA_GGUF_CACHE_DIR, else $XDG_CACHE_HOME/llama-gguf-inference, else
#                    ~/.cache/llama-gguf-inference (prefer XDG_CACHE_HOME: some e2e tests see LLAMA_* names)
#   BUILD_TIMEOUT, PROBE_TIMEOUT, E2E_TIMEOUT, BENCH_TIMEOUT   seconds per step (1500, 240, 900, 600)
#   E2E_TESTS        pytest paths (default tests/e2e)    BENCH_ARGS   stream_throughput.py arguments
#
# `pack DIR` writes what a machine without internet needs and may lack: DIR/llama-cpp-src.tar.gz (llama.cpp's source
# without its models, docs and media: about 11 MB), the default model split in 48 MiB parts with its name and
# sha256, and DIR/wheels (WHEELS, default "aiohttp httptools openai prometheus_client requests uvloop", for
# WHEEL_PYTHON 3.12 on manylinux x86-64; WHEELS="" skips them). bench/README.md says how to carry it.
# shellcheck disable=SC2329  # the steps are called as step_$name
set -euo pipefail

HERE=$(cd "$(dirname "$0")/.." && pwd)
cd "$HERE"
export PYTHONUNBUFFERED=1
# this checkout's lifecycle/ and gateway/ for every step, the benchmark's imports too (bench/ is its sys.path[0])
export PYTHONPATH="$HERE${PYTHONPATH:+:$PYTHONPATH}"

DRY=0
SMOKE=0
STEPS=()
ALL_STEPS=(env build model probe e2e bench)
VERSION=$(sed -n 's/^SOURCE_VERSION = "\(.*\)"$/\1/p' lifecycle/llama_server.py)
SDIST_NAME="llama_cpp_python-$VERSION"

say() { printf '[gpu_check] %s\n' "$*" >&2; }
die() { say "error: $*"; exit 1; }

usage() { sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'; }

cache_dir() {
  if [ -n "${LLAMA_GGUF_CACHE_DIR:-}" ]; then echo "$LLAMA_GGUF_CACHE_DIR"
  else echo "${XDG_CACHE_HOME:-$HOME/.cache}/llama-gguf-inference"; fi
}

# --- pack: on a machine that has the cache (and internet, for the wheels) ------------------------------------------
pack() {
  local dir=$1 cache py tree sdist model tmp
  cache=$(cache_dir)
  py=${PYTHON:-$HERE/.venv/bin/python}
  [ -x "$py" ] || py=python3
  mkdir -p "$dir"
  tree="$cache/src/$SDIST_NAME/vendor/llama.cpp"
  tmp=$(mktemp -d /tmp/gpu-check-pack.XXXXXX)
  trap 'rm -rf "$tmp"' RETURN
  if [ ! -f "$tree/tools/server/CMakeLists.txt" ]; then
    sdist="$cache/downloads/$SDIST_NAME.tar.gz"
    [ -f "$sdist" ] || "$py" -c "from lifecycle.llama_server import *; from lifecycle.downloads import pip_download; from pathlib import Path; pip_download(SDIST, SDIST_FILE, SDIST_SHA256, Path('$cache') / 'downloads', sdist=True)"
    tar -xzf "$sdist" -C "$tmp" "$SDIST_NAME/vendor/llama.cpp"
    tree="$tmp/$SDIST_NAME/vendor/llama.cpp"
  fi
  say "packing llama.cpp's source from $tree"
  tar -czhf "$dir/llama-cpp-src.tar.gz" -C "$(dirname "$(dirname "$(dirname "$tree")")")" \
    --exclude="$SDIST_NAME/vendor/llama.cpp/models" --exclude="$SDIST_NAME/vendor/llama.cpp/docs" \
    --exclude="$SDIST_NAME/vendor/llama.cpp/media" --exclude="$SDIST_NAME/vendor/llama.cpp/benches" \
    --exclude="$SDIST_NAME/vendor/llama.cpp/gguf-py" --exclude="$SDIST_NAME/vendor/llama.cpp/conversion" \
    --exclude=.git "$SDIST_NAME/vendor/llama.cpp"
  model=$(DATA_DIR="$tmp" "$py" -m lifecycle.model)
  say "packing the model $model in 48 MiB parts"
  rm -f "$dir"/model.gguf.part-*
  split -b 48M -d "$model" "$dir/model.gguf.part-"
  basename "$model" > "$dir/model.name"
  sha256sum "$model" | cut -d' ' -f1 > "$dir/model.sha256"
  local wheels=${WHEELS-aiohttp httptools openai prometheus_client requests uvloop}
  if [ -n "$wheels" ]; then
    say "downloading wheels for Python ${WHEEL_PYTHON:-3.12}: $wheels"
    # shellcheck disable=SC2086  # WHEELS is a list of names
    "$py" -m pip download -q --disable-pip-version-check --only-binary=:all: --python-version "${WHEEL_PYTHON:-3.12}" \
      --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
      --platform manylinux2014_x86_64 --platform any -d "$dir/wheels" $wheels
  fi
  du -sh "$dir"/* >&2
}

# --- arguments ----------------------------------------------------------------------------------------------------
while [ $# -gt 0 ]; do
  case $1 in
    --dry-run) DRY=1 ;;
    --cpu-smoke) SMOKE=1 ;;
    -h|--help) usage; exit 0 ;;
    pack) [ $# -eq 2 ] || die "usage: $0 pack DIR"; pack "$2"; exit 0 ;;
    env|build|model|probe|e2e|bench|summary) STEPS+=("$1") ;;
    *) die "unknown argument $1 (see $0 --help)" ;;
  esac
  shift
done
[ ${#STEPS[@]} -gt 0 ] || STEPS=("${ALL_STEPS[@]}")

if [ "$SMOKE" = 1 ]; then
  CMAKE_ARGS=""
  E2E_TESTS=${E2E_TESTS:-tests/e2e/test_offload.py}
  BENCH_ARGS=${BENCH_ARGS:---rounds 1 --requests-c1 1 --requests-c4 1 --max-tokens 16 --max-seconds 30}
  BUILD_TIMEOUT=${BUILD_TIMEOUT:-900}
else
  CMAKE_ARGS=${CMAKE_ARGS--DGGML_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES=90}
fi
export CMAKE_ARGS
E2E_TESTS=${E2E_TESTS:-tests/e2e}
BENCH_ARGS=${BENCH_ARGS:---rounds 8 --max-tokens 128 --max-seconds 300}
BUILD_TIMEOUT=${BUILD_TIMEOUT:-1500}
PROBE_TIMEOUT=${PROBE_TIMEOUT:-240}
E2E_TIMEOUT=${E2E_TIMEOUT:-900}
BENCH_TIMEOUT=${BENCH_TIMEOUT:-600}
OUT_DIR=${OUT_DIR:-$HERE/bench/out/gpu-check-$(date +%Y%m%d-%H%M%S)}
CACHE=$(cache_dir)
SITE_DIR=${SITE_DIR:-/tmp/gpu-check-site}
WHEELHOUSE=${WHEELHOUSE:-${MODEL_PARTS_DIR:+$MODEL_PARTS_DIR/wheels}}
mkdir -p "$OUT_DIR"
OUT_DIR=$(cd "$OUT_DIR" && pwd)
STATUS="$OUT_DIR/steps.tsv"
[ -f "$STATUS" ] || : > "$STATUS"
if ! command -v nvcc > /dev/null && [ -x /usr/local/cuda/bin/nvcc ]; then export PATH="/usr/local/cuda/bin:$PATH"; fi

# Run one step's command under a time limit, its output to the terminal and OUT_DIR/gpu_check.log; record its exit
# code in OUT_DIR/steps.tsv. OUT_DIR stays at 7 files (a device run brings back at most 8).
run() {
  local name=$1 limit=$2 start rc
  shift 2
  if [ "$DRY" = 1 ]; then
    say "would run ($name, at most ${limit}s): $*"
    return 0
  fi
  say "step $name (at most ${limit}s): $*"
  start=$(date +%s)
  set +e
  echo "== step $name: $*" >> "$OUT_DIR/gpu_check.log"
  timeout --kill-after=15 "$limit" "$@" 2>&1 | tee -a "$OUT_DIR/gpu_check.log"
  rc=${PIPESTATUS[0]}
  set -e
  printf '%s\t%s\t%s\n' "$name" "$rc" "$(( $(date +%s) - start ))" >> "$STATUS"
  [ "$rc" = 0 ] || say "step $name failed (exit $rc$([ "$rc" = 124 ] && echo ', timed out')); see $OUT_DIR/gpu_check.log"
  return "$rc"
}

# --- steps --------------------------------------------------------------------------------------------------------
PY=""
# The interpreter for the script's own small Python steps: PY once it exists (a dry run may have none yet).
host_python() { if [ -n "$PY" ] && [ -x "$PY" ]; then echo "$PY"; else echo python3; fi; }

find_python() {
  if [ -n "${PYTHON:-}" ]; then PY=$PYTHON
  elif "$HERE/.venv/bin/python" -c "import aiohttp" 2> /dev/null; then PY="$HERE/.venv/bin/python"
  else
    PY=python3
    # wheels installed by the env step (or an earlier run on this machine) come after this checkout
    case ":$PYTHONPATH:" in
      *":$SITE_DIR:"*) ;;
      *) if [ -d "$SITE_DIR" ]; then PYTHONPATH="$HERE:$SITE_DIR${PYTHONPATH#"$HERE"}"; export PYTHONPATH; fi ;;
    esac
  fi
}

step_env() {
  find_python
  if [ "$PY" = python3 ] && [ -n "$WHEELHOUSE" ] && [ -d "$WHEELHOUSE" ]; then
    # as the device machines' notes advise: into a folder of our own, never into the system's packages
    run wheels 300 python3 -m pip install -q --disable-pip-version-check --no-index --no-deps --no-compile \
      --upgrade --target "$SITE_DIR" "$WHEELHOUSE"/*.whl || return 1
    find_python
  fi
  if command -v nvidia-smi > /dev/null; then
    nvidia-smi --query-gpu=name,memory.total,memory.used,driver_version --format=csv,noheader > "$OUT_DIR/gpu.txt" 2>&1 || true
  else
    echo "none (no nvidia-smi)" > "$OUT_DIR/gpu.txt"
  fi
  say "GPU: $(head -1 "$OUT_DIR/gpu.txt"); python: $PY"
  run env 60 "$PY" -c "import sys, aiohttp, httptools, requests, prometheus_client; print(sys.version.split()[0], \
'aiohttp', aiohttp.__version__); import importlib.util as u; print('openai', bool(u.find_spec('openai')), \
'runpod', bool(u.find_spec('runpod')), '(e2e tests that need a missing one fail)')"
}

# Put llama.cpp's source where lifecycle/llama_server.py looks for it (the cache's src/ or downloads/).
prepare_source() {
  local dst="$CACHE/src/$SDIST_NAME/vendor/llama.cpp" src=${LLAMA_CPP_SDIST:-} cand
  [ -f "$dst/tools/server/CMakeLists.txt" ] && return 0
  [ -n "$src" ] || return 0  # lifecycle downloads the sdist itself (needs internet) or finds it in downloads/
  [ -e "$src" ] || die "LLAMA_CPP_SDIST=$src does not exist"
  if [ "$DRY" = 1 ]; then say "would place llama.cpp's source from $src under $CACHE"; return 0; fi
  if [ -d "$src" ]; then
    for cand in "$src" "$src/vendor/llama.cpp" "$src/$SDIST_NAME/vendor/llama.cpp"; do
      if [ -f "$cand/tools/server/CMakeLists.txt" ]; then
        mkdir -p "$(dirname "$dst")"
        rm -rf "$dst"
        ln -s "$(cd "$cand" && pwd)" "$dst"
        return 0
      fi
    done
    die "LLAMA_CPP_SDIST=$src holds no llama.cpp tree (tools/server/CMakeLists.txt)"
  elif [ "$(basename "$src")" = "$SDIST_NAME.tar.gz" ]; then
    mkdir -p "$CACHE/downloads"
    cp "$src" "$CACHE/downloads/"  # lifecycle checks its sha256 and unpacks it
  else
    mkdir -p "$CACHE/src"
    tar -xzf "$src" -C "$CACHE/src"
    [ -f "$dst/tools/server/CMakeLists.txt" ] || die "$src did not unpack to $SDIST_NAME/vendor/llama.cpp"
  fi
}

BIN=""
step_build() {
  if [ -n "${LLAMA_SERVER_BIN:-}" ]; then BIN=$LLAMA_SERVER_BIN; say "llama-server: $BIN (LLAMA_SERVER_BIN)"; return 0; fi
  prepare_source
  run build "$BUILD_TIMEOUT" "$(host_python)" -c "
import os, sys
from pathlib import Path
from lifecycle.llama_server import build_llama_server, server_version
from lifecycle.settings import default_cache_dir
binary = build_llama_server(default_cache_dir(os.environ), os.environ)
print('llama-server:', binary, server_version(binary))" || return 1
  resolve_binary
}

resolve_binary() {
  if [ -n "${LLAMA_SERVER_BIN:-}" ]; then BIN=$LLAMA_SERVER_BIN; return 0; fi
  BIN=$("$(host_python)" -c "import os; from lifecycle.llama_server import cached_binary; \
from lifecycle.settings import default_cache_dir; print(cached_binary(default_cache_dir(os.environ), os.environ.get('CMAKE_ARGS', '')))")
  [ "$DRY" = 1 ] || [ -x "$BIN" ] || { say "no llama-server at $BIN: run the build step"; return 1; }
}

MODEL=""
step_model() {
  if [ -n "${MODEL_PATH:-}" ]; then MODEL=$MODEL_PATH; say "model: $MODEL (MODEL_PATH)"; return 0; fi
  if [ -n "${MODEL_PARTS_DIR:-}" ]; then
    local name target
    name=$(cat "$MODEL_PARTS_DIR/model.name")
    target="$CACHE/models/$name"
    if [ "$DRY" = 1 ]; then say "would assemble $target from $MODEL_PARTS_DIR/model.gguf.part-*"
    elif [ ! -f "$target" ]; then
      mkdir -p "$CACHE/models"
      cat "$MODEL_PARTS_DIR"/model.gguf.part-* > "$target.partial"
      [ "$(sha256sum "$target.partial" | cut -d' ' -f1)" = "$(cat "$MODEL_PARTS_DIR/model.sha256")" ] \
        || { rm -f "$target.partial"; die "the parts in $MODEL_PARTS_DIR do not make the model (sha256 differs)"; }
      mv "$target.partial" "$target"
    fi
  fi
  [ "$DRY" = 1 ] && { say "would resolve the default model: $(host_python) -m lifecycle.model"; return 0; }
  MODEL=$(DATA_DIR="$OUT_DIR/data" "$(host_python)" -m lifecycle.model) || { say "no model (MODEL_PATH?)"; return 1; }
  say "model: $MODEL"
}

# Start the gateway once with NGL and CTX unset and keep its /health: what llama-server chose on this machine.
step_probe() {
  resolve_binary || return 1
  # the default model from the cache (the model step puts it there), or MODEL_PATH from the environment
  run probe "$PROBE_TIMEOUT" env LLAMA_SERVER_BIN="$BIN" "$PY" -c "
import json, sys, tempfile
from pathlib import Path
import requests
from tests.conftest import Gateway
gw = Gateway(Path(tempfile.mkdtemp(prefix='gpu-check-probe-')), {'NGL': '', 'CTX': '', 'PARALLEL': '4'})
try:
    gw.start(timeout=$((PROBE_TIMEOUT - 30)))
    health = requests.get(gw.url + '/health', timeout=10).json()
finally:
    gw.stop()
lines = [line for line in gw.output().splitlines() if 'offload:' in line]
json.dump({'health': health, 'offload_line': lines[-1] if lines else None}, open('$OUT_DIR/probe.json', 'w'), indent=2)
print(json.dumps(health.get('offload'), indent=2))
print(lines[-1] if lines else 'no offload line in the gateway log')"
}

step_e2e() {
  resolve_binary || return 1
  # NGL unset (auto); the tests' gateways set CTX=4096 themselves, as on the CPU machine. No MODEL_PATH from here:
  # some tests name their own model (MODEL_NAME), which MODEL_PATH would override.
  # shellcheck disable=SC2086  # E2E_TESTS is a list of paths
  run e2e "$E2E_TIMEOUT" env -u NGL LLAMA_SERVER_BIN="$BIN" \
    "$PY" -m pytest -q -p no:cacheprovider -o addopts=-ra --junitxml="$OUT_DIR/e2e.xml" $E2E_TESTS
}

newest_result() {
  local f newest=""
  for f in bench/out/stream_throughput-*.json; do [ -e "$f" ] && newest=$f; done  # names sort by time
  echo "$newest"
}

step_bench() {
  resolve_binary || return 1
  local before after model_args=()
  [ -n "$MODEL" ] && model_args=(--model "$MODEL")
  before=$(newest_result)
  # shellcheck disable=SC2086  # BENCH_ARGS is a list of arguments
  run bench "$BENCH_TIMEOUT" "$PY" bench/stream_throughput.py --llama-server "$BIN" "${model_args[@]}" \
    --ngl auto $BENCH_ARGS || return 1
  after=$(newest_result)
  if [ "$DRY" = 0 ] && [ -n "$after" ] && [ "$after" != "$before" ]; then cp "$after" "$OUT_DIR/stream_throughput.json"; fi
}

step_summary() {
  [ "$DRY" = 1 ] && { say "would write $OUT_DIR/gpu_check.json and print the summary"; return 0; }
  "$(host_python)" - "$OUT_DIR" "$CMAKE_ARGS" "${BIN:-}" "$SMOKE" << 'PYEOF'
import json, sys, xml.etree.ElementTree as ET
from pathlib import Path

out, cmake_args, binary, smoke = Path(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4] == "1"
def load(name):
    try:
        return json.loads((out / name).read_text())
    except (OSError, ValueError):
        return None
steps = [dict(zip(("step", "exit", "seconds"), line.split("\t"))) for line in
         (out / "steps.tsv").read_text().splitlines() if line.strip()] if (out / "steps.tsv").exists() else []
gpu = (out / "gpu.txt").read_text().strip() if (out / "gpu.txt").exists() else None
probe = load("probe.json") or {}
offload = (probe.get("health") or {}).get("offload")
e2e = None
if (out / "e2e.xml").exists():
    suite = ET.parse(out / "e2e.xml").getroot()
    suite = suite.find("testsuite") if suite.tag == "testsuites" else suite
    e2e = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    e2e["failed"] = [f"{c.get('classname')}::{c.get('name')}" for c in suite.iter("testcase")
                     if c.find("failure") is not None or c.find("error") is not None]
bench = load("stream_throughput.json")
ratios = {}
if bench:
    s = bench["summary"]
    for level in ("c1", "c4"):
        g, d = s["gateway"][level], s["direct"][level]
        ratios[level] = {"gateway_tokens_per_s": g["tokens_per_s"], "direct_tokens_per_s": d["tokens_per_s"],
                         "tps_ratio": g["tokens_per_s"] / d["tokens_per_s"],
                         "gateway_ttft_p50_ms": g["ttft_p50_ms"], "direct_ttft_p50_ms": d["ttft_p50_ms"],
                         "ttft_ratio": g["ttft_p50_ms"] / d["ttft_p50_ms"] if d["ttft_p50_ms"] else None,
                         "added_ttft_ms": g["ttft_p50_ms"] - d["ttft_p50_ms"]}
result = {"cpu_smoke": smoke, "cmake_args": cmake_args, "llama_server": binary, "gpu": gpu, "steps": steps,
          "offload": offload, "offload_line": probe.get("offload_line"), "e2e": e2e, "stream": ratios,
          "stream_config": bench and bench.get("config")}
(out / "gpu_check.json").write_text(json.dumps(result, indent=2) + "\n")

print("\n== GPU check" + (" (CPU smoke run)" if smoke else "") + f" ==\nGPU: {gpu or 'unknown'}\nCMAKE_ARGS: "
      f"{cmake_args or '(none)'}\nllama-server: {binary or '?'}")
print("steps: " + ", ".join(f"{s['step']} {'ok' if s['exit'] == '0' else 'FAILED ' + s['exit']} ({s['seconds']} s)"
                            for s in steps))
if offload:
    print(f"offload (NGL, CTX unset): {offload.get('gpu_layers')}/{offload.get('layers')} layers on the GPU, "
          f"n_ctx {offload.get('n_ctx')}, fit {offload.get('fit_status')}, buffers MiB {offload.get('device_memory_mib')}")
if e2e:
    print(f"e2e (NGL unset): {e2e['tests']} tests, {e2e['failures']} failures, {e2e['errors']} errors, "
          f"{e2e['skipped']} skipped" + "".join(f"\n  failed: {name}" for name in e2e["failed"]))
for level, r in ratios.items():
    ttft = f"{r['ttft_ratio']:.3f}" if r["ttft_ratio"] is not None else "?"
    print(f"stream {level[1:]} client(s): gateway {r['gateway_tokens_per_s']:.1f} tok/s vs direct "
          f"{r['direct_tokens_per_s']:.1f} (ratio {r['tps_ratio']:.3f}); TTFT p50 gateway "
          f"{r['gateway_ttft_p50_ms']:.1f} ms vs direct {r['direct_ttft_p50_ms']:.1f} (ratio {ttft}, "
          f"added {r['added_ttft_ms']:+.1f} ms)")
print(f"results: {out / 'gpu_check.json'}")
PYEOF
}

# --- main ---------------------------------------------------------------------------------------------------------
say "out: $OUT_DIR; cache: $CACHE; CMAKE_ARGS: ${CMAKE_ARGS:-(none)}; steps: ${STEPS[*]}$([ "$DRY" = 1 ] && echo ' (dry run)')"
failed=0
for step in "${STEPS[@]}"; do
  [ "$step" = summary ] && continue
  if [ -z "$PY" ] && [ "$step" != env ]; then find_python; PY=${PY:-python3}; fi
  "step_$step" || { failed=1; [ "$step" = build ] && break; }
done
step_summary || true
exit "$failed"
