"""The shell around the Python entry points: entrypoint.sh's DEBUG_SHELL and the Makefile's `model` / `serve`."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT

FAKE = ROOT / "tests" / "fakes" / "fake_llama_server.py"


def stub_bin(folder: Path) -> Path:
    """python3 (ours) and a `sleep` that says it would hold, on a PATH of their own."""
    folder.mkdir()
    (folder / "python3").write_text(f'#!/bin/sh\nexec "{sys.executable}" "$@"\n')
    (folder / "sleep").write_text('#!/bin/sh\necho "held: sleep $*"\n')
    for name in ("python3", "sleep"):
        (folder / name).chmod(0o755)
    return folder


def run_entrypoint(tmp_path: Path, **env: str) -> subprocess.CompletedProcess[str]:
    bin_dir = stub_bin(tmp_path / "bin")
    full = {"PATH": f"{bin_dir}:/usr/bin:/bin", "HOME": str(tmp_path), "DATA_DIR": str(tmp_path / "data"), **env}
    return subprocess.run(["bash", str(ROOT / "entrypoint.sh")], cwd=ROOT, env=full, capture_output=True, text=True,
                          timeout=60)


@pytest.mark.parametrize("value", ["on", "true", "YES", "1"])
def test_debug_shell_holds_for_every_true_spelling(tmp_path: Path, value: str) -> None:
    proc = run_entrypoint(tmp_path, DEBUG_SHELL=value)
    assert proc.returncode == 0, proc.stderr
    assert "DEBUG_SHELL: holding the container" in proc.stdout
    assert "held: sleep infinity" in proc.stdout
    assert "debug_shell=True" in proc.stdout  # the resolved settings were printed


def test_debug_shell_garbage_exits_2_with_the_settings_error(tmp_path: Path) -> None:
    proc = run_entrypoint(tmp_path, DEBUG_SHELL="garbage")
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "error: DEBUG_SHELL='garbage' is not a boolean: use true/false, 1/0, yes/no or on/off"]
    assert "held" not in proc.stdout


@pytest.mark.parametrize("value", ["off", "false", ""])
def test_debug_shell_off_starts_the_mode(tmp_path: Path, value: str) -> None:
    """Off: entrypoint.sh execs `python3 -m gateway`, which here stops at once on a bad PORT (exit 2)."""
    proc = run_entrypoint(tmp_path, DEBUG_SHELL=value, PORT="abc")
    assert proc.returncode == 2
    assert "held" not in proc.stdout
    assert proc.stderr.strip().splitlines() == ["error: PORT='abc' is not allowed: use an integer 1-65535"]


def make(tmp_path: Path, target: str, **env: str) -> subprocess.CompletedProcess[str]:
    """The real Makefile run in `tmp_path` (so its ./data is tmp_path/data), with our interpreter and set-up done."""
    (tmp_path / "pyproject.toml").touch()  # the set-up stamp's prerequisite, older than the stamp
    stamp = tmp_path / "stamp"
    stamp.touch()
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    if not (bin_dir / "llama-server").exists():
        (bin_dir / "llama-server").symlink_to(FAKE)  # found on PATH: nothing is built or installed
    full = {**{k: v for k, v in os.environ.items() if k not in ("DATA_DIR", "MODEL_NAME", "MODEL_PATH", "MAKEFLAGS")},
            "PATH": f"{bin_dir}:{os.environ['PATH']}", "PYTHONPATH": str(ROOT), **env}
    return subprocess.run(["make", "--no-print-directory", "-f", str(ROOT / "Makefile"), target,
                           f"PY={sys.executable}", f"STAMP={stamp}"],
                          cwd=tmp_path, env=full, capture_output=True, text=True, timeout=120)


def test_make_model_finds_model_name_in_data(tmp_path: Path) -> None:
    """README: `MODEL_NAME=x make serve` looks in ./data/models (the seed's bug: `model` ran without DATA_DIR)."""
    (tmp_path / "data" / "models").mkdir(parents=True)
    (tmp_path / "data" / "models" / "mine.Q4_K_M.gguf").write_bytes(b"GGUF")
    proc = make(tmp_path, "model", MODEL_NAME="mine.Q4_K_M.gguf")
    assert proc.returncode == 0, proc.stderr
    missing = make(tmp_path, "model", MODEL_NAME="other.gguf")
    assert missing.returncode != 0
    assert f"model not found: {Path('data/models/other.gguf')}" in missing.stderr


def test_make_serve_names_the_model_it_serves(tmp_path: Path) -> None:
    (tmp_path / "data" / "models").mkdir(parents=True)
    (tmp_path / "data" / "models" / "mine.Q4_K_M.gguf").write_bytes(b"GGUF")
    entry = tmp_path / "entrypoint.sh"  # what `serve` execs, relative to where make runs
    entry.write_text('#!/bin/sh\necho "entrypoint: DATA_DIR=$DATA_DIR MODEL_NAME=$MODEL_NAME"\n')
    entry.chmod(0o755)
    proc = make(tmp_path, "serve", MODEL_NAME="mine.Q4_K_M.gguf")
    assert proc.returncode == 0, proc.stderr
    assert "Serving mine.Q4_K_M.gguf on http://localhost:8000" in proc.stdout
    assert "entrypoint: DATA_DIR=./data MODEL_NAME=mine.Q4_K_M.gguf" in proc.stdout


def test_make_serve_names_every_model_with_models_set(tmp_path: Path) -> None:
    (tmp_path / "data" / "models").mkdir(parents=True)
    for name in ("alpha.gguf", "beta.gguf"):
        (tmp_path / "data" / "models" / name).write_bytes(b"GGUF")
    entry = tmp_path / "entrypoint.sh"
    entry.write_text('#!/bin/sh\necho "entrypoint: MODELS=$MODELS"\n')
    entry.chmod(0o755)
    proc = make(tmp_path, "serve", MODELS="all", DEFAULT_MODEL="beta")
    assert proc.returncode == 0, proc.stderr
    assert "Serving beta.gguf alpha.gguf on http://localhost:8000" in proc.stdout  # the default first
    assert "entrypoint: MODELS=all" in proc.stdout
    bad = make(tmp_path, "model", MODELS="all", DEFAULT_MODEL="zeta")
    assert bad.returncode != 0 and "DEFAULT_MODEL='zeta' is none of the served models" in bad.stderr
