from __future__ import annotations

from pathlib import Path

import pytest

from lifecycle.platform import detect_data_dir, detect_mode
from lifecycle.settings import Settings


def test_explicit_data_dir_wins(tmp_path: Path) -> None:
    (tmp_path / "runpod-volume").mkdir()
    assert detect_data_dir(Path("/mine"), [tmp_path / "runpod-volume"]) == Path("/mine")


def test_runpod_volume_before_workspace(tmp_path: Path) -> None:
    roots = [tmp_path / "runpod-volume", tmp_path / "workspace"]
    for root in roots:
        root.mkdir()
    assert detect_data_dir(None, roots) == roots[0]


def test_workspace_when_no_runpod_volume(tmp_path: Path) -> None:
    roots = [tmp_path / "runpod-volume", tmp_path / "workspace"]
    roots[1].mkdir()
    assert detect_data_dir(None, roots) == roots[1]


def test_fallback_is_data(tmp_path: Path) -> None:
    assert detect_data_dir(None, [tmp_path / "nope"]) == Path("/data")


def test_settings_use_detection(tmp_path: Path) -> None:
    (tmp_path / "workspace").mkdir()
    s = Settings.from_env({}, probe_roots=[tmp_path / "runpod-volume", tmp_path / "workspace"])
    assert s.data_dir == tmp_path / "workspace"
    assert s.keys_file == tmp_path / "workspace" / "api_keys.txt"


def test_mode_detection() -> None:
    assert detect_mode({}) == "gateway"
    assert detect_mode({"RUNPOD_WEBHOOK_GET_JOB": "https://x"}) == "handler"
    assert detect_mode({"RUNPOD_WEBHOOK_GET_JOB": "https://x", "MODE": "gateway"}) == "gateway"
    with pytest.raises(ValueError, match="MODE"):
        detect_mode({"MODE": "nope"})
