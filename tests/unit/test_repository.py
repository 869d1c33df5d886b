"""The tree itself: no merge left half-done."""

from __future__ import annotations

import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_no_tracked_file_holds_merge_conflict_markers() -> None:
    files = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    found = []
    for name in files:
        try:
            lines = (ROOT / name).read_text(encoding="utf-8").splitlines()
        except (UnicodeDecodeError, OSError):
            continue
        found += [f"{name}:{i}" for i, line in enumerate(lines, 1)
                  if line.startswith(("<<<<<<< ", ">>>>>>> ")) or line == "======="]
    assert not found, f"merge conflict markers: {found}"
