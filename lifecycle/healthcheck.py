"""The container's HEALTHCHECK: `python3 -m lifecycle.healthcheck`.

HTTP mode: GET the gateway's own health server on PORT_HEALTH (never the backend): 200 while the gateway runs, 503
from the moment it drains, so Docker's health status follows the gateway and not llama-server. Serverless mode has
no HTTP server; there the check passes while the process runs (RunPod watches the worker itself).
Exit 0 healthy, 1 unhealthy. Stdlib only, so each check starts fast.
"""

from __future__ import annotations

import os
import sys
import urllib.error
import urllib.request

from lifecycle.platform import detect_mode
from lifecycle.settings import SettingsError, read

TIMEOUT = 3.0


def main() -> int:
    try:
        mode = detect_mode(os.environ)
    except ValueError as exc:
        print(exc, file=sys.stderr)
        return 1
    if mode == "handler":
        return 0
    try:
        port = read("PORT_HEALTH")  # as the gateway reads it, default included
    except SettingsError as exc:
        print(exc, file=sys.stderr)
        return 1
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=TIMEOUT) as resp:
            return 0 if resp.status == 200 else 1
    except (urllib.error.URLError, OSError) as exc:
        print(f"unhealthy: http://127.0.0.1:{port}/: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
