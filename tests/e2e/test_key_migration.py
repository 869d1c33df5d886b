"""Migration from plaintext keys and the audit log (issue 16, parts 3 and 4) against a real gateway.

The backend is the fake llama-server (tests/fakes): a POST answers 200 at once with FAKE_STALL=0. The old project's
plaintext file is served, `python -m gateway.keys import` (the command the gateway's warning prints) hashes it in
place while the gateway runs, and every old key keeps working through the watcher's reload, SIGHUP and POST /reload;
each of those is a line of $DATA_DIR/logs/audit/audit.jsonl, which holds no key and no hash.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import requests

from gateway.keyfile import digest, parse_keys
from tests.conftest import Gateway

ROOT = Path(__file__).resolve().parents[2]
FAKE = ROOT / "tests" / "fakes" / "fake_llama_server.py"
PROD = "sk-prod-4f9a1c0d2b7e8a6c5d3f"
PARTNER = "sk-partner-8c1d9e2f3a4b5c6d"
OPS = "some-long-plaintext-key-0001"
SHORT = "abc123"
KEYS = [PROD, PARTNER, OPS]
CHAT = json.dumps({"model": "any", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})
OLD_FILE = (f"# the old project's file\r\nprod:{PROD}\r\npartner:{PARTNER}:20:2030-01-01\r\n"
            f"ops:{OPS} admin=true\r\nshort:{SHORT}\r\n")


@pytest.fixture
def gateway(tmp_path: Path) -> Iterator[Gateway]:
    data = tmp_path / "gw"
    data.mkdir()
    keys_file = data / "api_keys.txt"
    keys_file.write_bytes(OLD_FILE.encode())
    keys_file.chmod(0o600)
    gw = Gateway(data, {"AUTH_ENABLED": "true", "LLAMA_SERVER_BIN": str(FAKE), "FAKE_STALL": "0",
                        "MAX_REQUESTS_PER_MINUTE": "10000"}).start(timeout=60)
    yield gw
    gw.stop()


def status(gw: Gateway, key: str, path: str = "/v1/chat/completions") -> int:
    return requests.post(f"{gw.url}{path}", data=CHAT, timeout=10,
                         headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"}).status_code


def audit(gw: Gateway) -> list[dict[str, object]]:
    path = gw.data_dir / "logs" / "audit" / "audit.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def wait_for(check: Callable[[], object], timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def test_import_while_serving_keeps_every_old_key_working_and_each_step_is_audited(gateway: Gateway) -> None:
    gw, keys_file = gateway, gateway.data_dir / "api_keys.txt"
    assert [status(gw, key) for key in KEYS] == [200, 200, 200]
    assert status(gw, SHORT) == 401  # refused, as before, but now loudly
    output = gw.output()
    for key_id in ("prod", "partner", "ops"):
        assert output.count(f"key id {key_id} is stored in plaintext") == 1
    assert output.count("key id short is REFUSED") == 1
    hint = re.search(r"hash it in place, keeping the key working, with: (.+)", output)
    assert hint is not None

    # The hint as written, with the gateway's DATA_DIR (as in its container) so the audit line lands next to it.
    done = subprocess.run(shlex.split(hint.group(1)), cwd=ROOT, capture_output=True, text=True, timeout=60,
                          env={**os.environ, "DATA_DIR": str(gw.data_dir)})
    assert done.returncode == 1, done.stderr  # the short key is left for a person
    assert "imported 3 plaintext key(s)" in done.stderr and "key 'short' is NOT hashed" in done.stderr
    text = keys_file.read_text()
    for key in KEYS:
        assert key not in text
    assert [e.key_id for e in parse_keys(text) if e.hashed] == ["prod", "partner", "ops"]
    assert [status(gw, key) for key in KEYS] == [200, 200, 200]  # the same digests: no gap at all

    wait_for(lambda: any(r["who"] == "watcher" for r in audit(gw)))  # the gateway picked the change up
    assert [status(gw, key) for key in KEYS] == [200, 200, 200]
    assert gw.proc is not None
    gw.proc.send_signal(signal.SIGHUP)
    wait_for(lambda: any(r["who"] == "signal" for r in audit(gw)))
    reload = requests.post(f"{gw.url}/reload", headers={"Authorization": f"Bearer {OPS}"}, timeout=10)  # admin
    assert reload.status_code == 200 and reload.json() == {"status": "reloaded", "keys": 3}
    assert [status(gw, key) for key in KEYS] == [200, 200, 200]

    records = audit(gw)
    assert [(r["who"], r["action"], r["target"], r["result"]) for r in records] == [
        ("cli", "key.import", "prod", "ok"), ("cli", "key.import", "partner", "ok"),
        ("cli", "key.import", "ops", "ok"), ("cli", "key.import", "short", "refused"),
        ("watcher", "keys.reload", None, "ok"), ("signal", "keys.reload", None, "ok"),
        ("ops", "keys.reload", None, "ok"),
    ]
    assert records[4]["details"] == {"file": str(keys_file), "keys": 3}
    assert records[6]["from"] == "127.0.0.1" and records[5]["from"] == "SIGHUP"
    assert str(records[0]["from"]).startswith("cli pid=")
    # Nothing new to say after the reloads: each plaintext key was warned about once.
    assert gw.output().count("key id prod is stored in plaintext") == 1
    assert gw.output().count("key id short is REFUSED") == 1

    gw.stop()
    written = "\n".join(p.read_text(errors="replace") for p in gw.data_dir.rglob("*")
                        if p.is_file() and not p.name.lstrip(".").startswith("api_keys.txt"))
    for key in [*KEYS, SHORT]:
        assert key not in written and digest(key).hex() not in written
