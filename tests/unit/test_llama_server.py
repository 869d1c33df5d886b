from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from lifecycle.downloads import ProvisionError
from lifecycle.llama_server import base_cmake_args, cache_version, cached_binary, check_build_tools, find_llama_server


def exe(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("#!/bin/sh\n")
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return path


def test_resolution_order(tmp_path: Path) -> None:
    explicit = exe(tmp_path / "explicit" / "llama-server")
    on_path = exe(tmp_path / "bin" / "llama-server")
    official = exe(tmp_path / "app" / "llama-server")
    cache = tmp_path / "cache"
    cached = exe(cached_binary(cache, ""))
    env = {"PATH": str(on_path.parent)}
    assert find_llama_server(explicit, cache, env, official) == explicit
    assert find_llama_server(None, cache, env, official) == on_path
    assert find_llama_server(None, cache, {"PATH": ""}, official) == official
    assert find_llama_server(None, cache, {"PATH": ""}, tmp_path / "none") == cached
    assert find_llama_server(None, tmp_path / "empty", {"PATH": ""}, tmp_path / "none") is None


def test_explicit_binary_must_exist(tmp_path: Path) -> None:
    with pytest.raises(ProvisionError, match="LLAMA_SERVER_BIN"):
        find_llama_server(tmp_path / "missing", tmp_path, {"PATH": ""})


def test_cmake_args_get_their_own_cache_entry(tmp_path: Path) -> None:
    assert cache_version("") == "0.3.36-r2"
    cuda = cache_version("-DGGML_CUDA=ON")
    assert cuda.startswith("0.3.36-r2-") and cuda != cache_version("-DGGML_VULKAN=ON")
    assert find_llama_server(None, tmp_path, {"PATH": "", "CMAKE_ARGS": "-DGGML_CUDA=ON"}, tmp_path / "x") is None


def test_missing_build_tools_say_what_to_install(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("sys.executable", str(tmp_path / "python"))
    with pytest.raises(ProvisionError) as err:
        check_build_tools({"PATH": str(tmp_path)})
    message = str(err.value)
    assert "apt-get install cmake" in message and "pip install cmake" in message
    assert "build-essential" in message
    assert "LLAMA_SERVER_BIN" in message


def test_real_tools_are_found() -> None:
    assert check_build_tools(os.environ)


def test_x86_builds_leave_amx_out() -> None:
    """AMX crashed the pinned llama-server on a Sapphire Rapids VM: x86-64 builds compile it out, others are as
    configured."""
    x86 = base_cmake_args("x86_64")
    assert "-DCMAKE_CXX_FLAGS=-mno-amx-tile -mno-amx-int8 -mno-amx-bf16" in x86
    assert not any("amx" in arg for arg in base_cmake_args("aarch64"))
