"""Where we run: the data directory and which mode (HTTP gateway or RunPod serverless handler) to start."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable, Mapping
from pathlib import Path

# Network volumes as the platforms mount them, in order of preference. /data is the fallback, never
# probed: the old images set DATA_DIR=/data themselves and so never detected anything.
PROBE_ROOTS = (Path("/runpod-volume"), Path("/workspace"))
FALLBACK_DATA_DIR = Path("/data")


def detect_data_dir(explicit: Path | None, probe_roots: Iterable[Path] | None = None) -> Path:
    if explicit is not None:
        return explicit
    for root in PROBE_ROOTS if probe_roots is None else probe_roots:
        if root.is_dir():
            return root
    return FALLBACK_DATA_DIR


def detect_mode(env: Mapping[str, str]) -> str:
    """`handler` on the RunPod serverless job queue, `gateway` everywhere else; MODE overrides."""
    from lifecycle.settings import read  # lifecycle.settings imports this module for DATA_DIR detection

    mode = read("MODE", env)  # the settings' own rule and message (SettingsError is a ValueError)
    if mode:
        return str(mode).lower()
    return "handler" if env.get("RUNPOD_WEBHOOK_GET_JOB") else "gateway"


def main() -> int:
    try:
        print(detect_mode(os.environ))
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
