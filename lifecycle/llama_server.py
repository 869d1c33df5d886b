"""Find llama-server, or build it once from pinned llama.cpp source into the cache.

Resolution order: LLAMA_SERVER_BIN, `llama-server` on PATH, /app/llama-server (the official llama.cpp image),
the cache (~/.cache/llama-gguf-inference/llama-server/<version>/), otherwise a build from the llama.cpp tree
vendored in the llama-cpp-python sdist on PyPI. `python -m lifecycle.llama_server` (make llama-server) runs
only this step.
"""

from __future__ import annotations

import hashlib
import os
import platform
import re
import shlex
import shutil
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path

from lifecycle.downloads import ProvisionError, file_lock, pip_download

SOURCE_VERSION = "0.3.36"
SDIST = f"llama-cpp-python=={SOURCE_VERSION}"
SDIST_FILE = f"llama_cpp_python-{SOURCE_VERSION}.tar.gz"
SDIST_SHA256 = "832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e"
OFFICIAL_IMAGE_BIN = Path("/app/llama-server")

BASE_CMAKE_ARGS = (
    "-DCMAKE_BUILD_TYPE=Release",
    "-DLLAMA_BUILD_TESTS=OFF",
    "-DLLAMA_BUILD_EXAMPLES=OFF",
    "-DLLAMA_BUILD_TOOLS=ON",
    "-DLLAMA_BUILD_SERVER=ON",
    "-DLLAMA_CURL=OFF",
    "-DLLAMA_OPENSSL=OFF",
    # The prebuilt web UI is fetched from a model hub at configure time; the gateway does not expose it anyway.
    "-DLLAMA_USE_PREBUILT_UI=OFF",
    # Static llama/ggml: the installed binary needs no libraries of ours next to it.
    "-DBUILD_SHARED_LIBS=OFF",
)
# x86-64: no AMX code, even where -march=native (the default GGML_NATIVE=ON) would compile it in. On Sapphire
# Rapids VMs the pinned llama.cpp's AMX matrix multiply crashed llama-server (SIGSEGV in ggml_backend_amx_mul_mat)
# while it loaded the default model; AVX-512 and AVX2 still do the work. GCC and clang let an explicit -mno-*
# win over -march, wherever it comes in the command line.
X86_CMAKE_ARGS = (
    "-DCMAKE_C_FLAGS=-mno-amx-tile -mno-amx-int8 -mno-amx-bf16",
    "-DCMAKE_CXX_FLAGS=-mno-amx-tile -mno-amx-int8 -mno-amx-bf16",
)
# The build recipe's revision: bumped whenever the arguments above change, so the cache gets a new entry rather
# than a binary built the old way.
BUILD_REVISION = "r2"

Progress = Callable[[str], None]


def _stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def cache_version(cmake_args: str) -> str:
    """One cache entry per source version and CMAKE_ARGS, so a CUDA build never masquerades as a CPU one."""
    if not cmake_args.strip():
        return f"{SOURCE_VERSION}-{BUILD_REVISION}"
    return f"{SOURCE_VERSION}-{BUILD_REVISION}-{hashlib.sha256(cmake_args.strip().encode()).hexdigest()[:10]}"


def base_cmake_args(machine: str | None = None) -> tuple[str, ...]:
    """What every build is configured with, before CMAKE_ARGS (which can override any of it)."""
    machine = (machine or platform.machine()).lower()
    return BASE_CMAKE_ARGS + (X86_CMAKE_ARGS if machine in ("x86_64", "amd64") else ())


def cached_binary(cache_dir: Path, cmake_args: str) -> Path:
    return cache_dir / "llama-server" / cache_version(cmake_args) / "llama-server"


def find_llama_server(
    explicit: Path | None,
    cache_dir: Path,
    env: Mapping[str, str],
    official: Path = OFFICIAL_IMAGE_BIN,
) -> Path | None:
    if explicit is not None:
        if not (explicit.is_file() and os.access(explicit, os.X_OK)):
            raise ProvisionError(f"LLAMA_SERVER_BIN={explicit} is not an executable file")
        return explicit
    on_path = shutil.which("llama-server", path=env.get("PATH"))
    if on_path:
        return Path(on_path)
    if official.is_file() and os.access(official, os.X_OK):
        return official
    cached = cached_binary(cache_dir, env.get("CMAKE_ARGS", ""))
    if cached.is_file() and os.access(cached, os.X_OK):
        return cached
    return None


def server_version(binary: Path) -> str:
    """`llama-server --version`, which prints the build to stderr; raises if the binary does not run."""
    try:
        proc = subprocess.run([str(binary), "--version"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise ProvisionError(f"{binary} --version failed: {exc}") from None
    text = (proc.stdout + proc.stderr).strip()
    match = re.search(r"^version: .*$", text, re.MULTILINE)
    if proc.returncode != 0 or not match:
        raise ProvisionError(f"{binary} --version failed (exit {proc.returncode}):\n{text[-2000:]}")
    return match.group(0)


def _tool(names: tuple[str, ...], env: Mapping[str, str]) -> str | None:
    # The venv's bin folder comes first, so `pip install cmake` into the venv is enough.
    search = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", os.defpath)])
    for name in names:
        found = shutil.which(name, path=search)
        if found:
            return found
    return None


def check_build_tools(env: Mapping[str, str]) -> str:
    cmake = _tool(("cmake",), env)
    missing = []
    if cmake is None:
        missing.append("CMake (apt-get install cmake, or pip install cmake)")
    if _tool(("c++", "g++", "clang++"), env) is None or _tool(("cc", "gcc", "clang"), env) is None:
        missing.append("a C/C++ compiler (apt-get install build-essential)")
    if missing:
        raise ProvisionError(
            "llama-server was not found and cannot be built: missing " + " and ".join(missing)
            + ". Install them, or point LLAMA_SERVER_BIN at an existing llama-server."
        )
    assert cmake is not None
    return cmake


def _run_logged(cmd: list[str], log: Path, progress: Progress, show: Callable[[str], bool]) -> None:
    with log.open("a") as fh:
        fh.write(f"$ {shlex.join(cmd)}\n")
        fh.flush()
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1)
        assert proc.stdout is not None
        tail: list[str] = []
        for line in proc.stdout:
            fh.write(line)
            tail = [*tail[-39:], line.rstrip()]
            if show(line):
                progress(line.rstrip())
        code = proc.wait()
    if code != 0:
        raise ProvisionError(f"`{shlex.join(cmd[:3])} ...` failed (exit {code}); full log: {log}\n" + "\n".join(tail))


def extract(tar: tarfile.TarFile, dest: Path) -> None:
    """Unpack with the "data" filter (no absolute paths, no escapes, no device files); on a Python without it
    (3.11 before 3.11.4, e.g. Debian 12's 3.11.2) the same rules are checked here first."""
    if hasattr(tarfile, "data_filter"):
        tar.extractall(dest, filter="data")
        return
    root = dest.resolve()
    for member in tar.getmembers():
        target = (root / member.name).resolve()
        link_ok = not (member.issym() or member.islnk()) or (
            (target.parent / member.linkname).resolve().is_relative_to(root) if member.issym()
            else (root / member.linkname).resolve().is_relative_to(root))
        if not target.is_relative_to(root) or not link_ok or member.isdev() or member.isfifo():
            raise ProvisionError(f"refusing to unpack {member.name!r}: it points outside {dest} or is a device")
    tar.extractall(dest)


def _source_tree(cache_dir: Path, progress: Progress) -> Path:
    root = cache_dir / "src" / f"llama_cpp_python-{SOURCE_VERSION}"
    tree = root / "vendor" / "llama.cpp"
    if (tree / "tools" / "server" / "CMakeLists.txt").is_file():
        return tree
    sdist = pip_download(SDIST, SDIST_FILE, SDIST_SHA256, cache_dir / "downloads", sdist=True)
    progress(f"unpacking {sdist.name}")
    with tempfile.TemporaryDirectory(dir=cache_dir / "src", prefix=".unpack-") as tmp, tarfile.open(sdist) as tar:
        extract(tar, Path(tmp))
        shutil.rmtree(root, ignore_errors=True)
        (Path(tmp) / root.name).rename(root)
    if not (tree / "tools" / "server" / "CMakeLists.txt").is_file():
        raise ProvisionError(f"{sdist.name} has no vendor/llama.cpp/tools/server; cannot build llama-server")
    return tree


def build_llama_server(cache_dir: Path, env: Mapping[str, str], progress: Progress = _stderr) -> Path:
    cmake_args = env.get("CMAKE_ARGS", "")
    version = cache_version(cmake_args)
    target = cached_binary(cache_dir, cmake_args)
    with file_lock(cache_dir / "locks" / f"build-{version}.lock"):
        if target.is_file():
            return target
        cmake = check_build_tools(env)
        (cache_dir / "src").mkdir(parents=True, exist_ok=True)
        tree = _source_tree(cache_dir, progress)
        build = cache_dir / "build" / version
        log = cache_dir / "build" / f"{version}.log"
        build.mkdir(parents=True, exist_ok=True)
        jobs = str(os.cpu_count() or 2)
        progress(f"building llama-server from llama-cpp-python {SOURCE_VERSION}'s llama.cpp "
                 f"(about 6 minutes on 2 cores); log: {log}")
        configure = [cmake, "-S", str(tree), "-B", str(build), *base_cmake_args(), *shlex.split(cmake_args)]
        _run_logged(configure, log, progress, lambda line: line.startswith("CMake Error"))
        compile_cmd = [cmake, "--build", str(build), "--target", "llama-server", "-j", jobs]
        _run_logged(compile_cmd, log, progress, lambda line: line.startswith("["))
        built = build / "bin" / "llama-server"
        if not built.is_file():
            raise ProvisionError(f"the build finished but {built} is missing; see {log}")
        # Install atomically: copy the binary and any shared libraries beside it, then one rename.
        target.parent.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(dir=target.parent.parent, prefix=f".{version}-"))
        for item in [built, *(build / "bin").glob("*.so*")]:
            shutil.copy2(item, staging / item.name)
        server_version(staging / "llama-server")
        if target.parent.exists():
            shutil.rmtree(target.parent)
        staging.rename(target.parent)
    progress(f"llama-server installed: {target}")
    return target


def ensure_llama_server(
    explicit: Path | None, cache_dir: Path, env: Mapping[str, str], progress: Progress = _stderr
) -> Path:
    found = find_llama_server(explicit, cache_dir, env)
    return found if found is not None else build_llama_server(cache_dir, env, progress)


def main(argv: list[str] | None = None) -> int:
    """`python -m lifecycle.llama_server [--install DIR]`: find or build llama-server; with --install, also copy it
    to DIR/llama-server (the images' build stage: the cache there is a build-cache mount, not a layer)."""
    import argparse

    from lifecycle.settings import SettingsError, default_cache_dir

    parser = argparse.ArgumentParser(prog="python -m lifecycle.llama_server")
    parser.add_argument("--install", type=Path, metavar="DIR", help="copy the binary to DIR/llama-server")
    args = parser.parse_args(argv)
    try:
        explicit = os.environ.get("LLAMA_SERVER_BIN")
        binary = ensure_llama_server(Path(explicit) if explicit else None, default_cache_dir(os.environ), os.environ)
        version = server_version(binary)
        if args.install is not None:
            args.install.mkdir(parents=True, exist_ok=True)
            shutil.copy2(binary, args.install / "llama-server")
            (args.install / "VERSION").write_text(f"{SOURCE_VERSION} {version}\n")
            binary = args.install / "llama-server"
        print(f"llama-server: {binary} ({version})")
    except (ProvisionError, SettingsError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
