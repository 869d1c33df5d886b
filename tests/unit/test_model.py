from __future__ import annotations

from pathlib import Path

import pytest

from lifecycle.model import DEFAULT_MODEL_FILE, ModelNotFound, default_model, resolve_model
from lifecycle.settings import Settings


def settings(tmp_path: Path, **env: str) -> Settings:
    return Settings.from_env({"DATA_DIR": str(tmp_path), **env}, probe_roots=[])


def test_model_name_is_looked_up_in_models_dir(tmp_path: Path) -> None:
    (tmp_path / "models").mkdir()
    model = tmp_path / "models" / "m.gguf"
    model.write_bytes(b"GGUF")
    assert resolve_model(settings(tmp_path, MODEL_NAME="m.gguf")) == model


def test_models_dir_override(tmp_path: Path) -> None:
    model = tmp_path / "elsewhere" / "m.gguf"
    model.parent.mkdir()
    model.write_bytes(b"GGUF")
    assert resolve_model(settings(tmp_path, MODEL_NAME="m.gguf", MODELS_DIR=str(model.parent))) == model


def test_model_path_wins(tmp_path: Path) -> None:
    model = tmp_path / "x.gguf"
    model.write_bytes(b"GGUF")
    assert resolve_model(settings(tmp_path, MODEL_NAME="other.gguf", MODEL_PATH=str(model))) == model


def test_missing_model_lists_what_is_there(tmp_path: Path) -> None:
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "a.gguf").write_bytes(b"")
    (tmp_path / "models" / "notes.txt").write_text("")
    with pytest.raises(ModelNotFound) as err:
        resolve_model(settings(tmp_path, MODEL_NAME="b.gguf"))
    message = str(err.value)
    assert str(tmp_path / "models" / "b.gguf") in message
    assert "a.gguf" in message and "notes.txt" not in message


def test_missing_models_folder(tmp_path: Path) -> None:
    with pytest.raises(ModelNotFound, match="does not exist"):
        resolve_model(settings(tmp_path, MODEL_PATH=str(tmp_path / "nope" / "m.gguf")))


def test_default_model_is_the_real_smollm2_gguf() -> None:
    """The real default (already fetched by `make test`): a GGUF file from the pinned wheel."""
    import os

    from lifecycle.settings import default_cache_dir

    path = default_model(default_cache_dir(os.environ))
    assert path.name == DEFAULT_MODEL_FILE
    with path.open("rb") as fh:
        assert fh.read(4) == b"GGUF"
    assert path.stat().st_size > 90_000_000
