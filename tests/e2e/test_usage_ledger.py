"""The usage ledger through real gateway processes against the fake backend (tests/fakes, FAKE_MODE=chat): its totals
are the sums of the usage the clients saw, across a restart, for a stream cut short, with two gateways on one file,
and after a SIGKILL (at most the last second lost)."""

from __future__ import annotations

import contextlib
import json
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import openai
import requests

from gateway import ledger
from tests.conftest import ROOT, Gateway

FAKE = ROOT / "tests" / "fakes" / "fake_llama_server.py"
KEYS = {"alice": "sk-ledger-alice-0123456789abcdef", "bob": "sk-ledger-bob-0123456789abcdef"}
CHAT = [{"role": "user", "content": "Say hello."}]
FIELDS = ("requests", "errors", "prompt_tokens", "completion_tokens", "cached_tokens")


def ledger_env(data: Path, db: Path | None = None, **extra: str) -> dict[str, str]:
    (data / "api_keys.txt").write_text("".join(f"{name}:{key}:100000\n" for name, key in KEYS.items()))
    env = {"LLAMA_SERVER_BIN": str(FAKE), "FAKE_MODE": "chat", "AUTH_ENABLED": "true", "ACCESS_LOG": "false",
           **extra}
    if db is not None:
        env["USAGE_DB"] = str(db)
    return env


def start(data: Path, db: Path | None = None, **extra: str) -> Gateway:
    data.mkdir(parents=True, exist_ok=True)
    return Gateway(data, ledger_env(data, db, **extra)).start(timeout=60)


class Seen:
    """What the clients were told, per key id (thread-safe)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.by_key: dict[str, dict[str, int]] = {}

    def add(self, key_id: str, usage: object | None, error: bool = False) -> None:
        with self.lock:
            row = self.by_key.setdefault(key_id, dict.fromkeys(FIELDS, 0))
            row["requests"] += 1
            row["errors"] += error
            if usage is not None:
                row["prompt_tokens"] += usage.prompt_tokens  # type: ignore[attr-defined]
                row["completion_tokens"] += usage.completion_tokens  # type: ignore[attr-defined]
                details = usage.prompt_tokens_details  # type: ignore[attr-defined]
                row["cached_tokens"] += details.cached_tokens if details is not None else 0


def talk(gw: Gateway, key_id: str, seen: Seen, whole: int = 2, streams: int = 2) -> None:
    client = openai.OpenAI(base_url=f"{gw.url}/v1", api_key=KEYS[key_id], max_retries=0, timeout=30)
    for i in range(whole):
        answer = client.chat.completions.create(model="any", messages=CHAT, max_tokens=3 + i)
        seen.add(key_id, answer.usage)
    for i in range(streams):
        stream = client.chat.completions.create(model="any", messages=CHAT, max_tokens=4 + i, stream=True,
                                                stream_options={"include_usage": True})
        seen.add(key_id, [chunk.usage for chunk in stream if chunk.usage is not None][-1])


def cli_totals(db: Path) -> dict[str, dict[str, int]]:
    """Per key id, summed over models, as `python -m gateway.keys usage --json` prints them."""
    out = subprocess.run([sys.executable, "-m", "gateway.keys", "usage", "--json", "--db", str(db)], cwd=ROOT,
                         capture_output=True, text=True, timeout=30, check=True).stdout
    by_key: dict[str, dict[str, int]] = {}
    for record in json.loads(out):
        row = by_key.setdefault(record["key_id"], dict.fromkeys(FIELDS, 0))
        for name in FIELDS:
            row[name] += record[name]
    return by_key


def db_totals(db: Path) -> dict[str, dict[str, int]]:
    if not db.exists():
        return {}
    with contextlib.closing(ledger.open_read_only(db)) as conn:
        totals = ledger.read_totals(conn)
    return {key_id: ledger.summed(t for t in totals if t.key_id == key_id) for key_id in {t.key_id for t in totals}}


def wait_for(check: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.1)


def test_totals_equal_what_the_clients_saw_across_a_restart(tmp_path: Path) -> None:
    data = tmp_path / "data"
    seen = Seen()
    gw = start(data)
    try:
        talk(gw, "alice", seen)
        talk(gw, "bob", seen, whole=1, streams=3)
        bad = requests.post(f"{gw.url}/v1/chat/completions", data=b"{not json", timeout=10,
                            headers={"Authorization": f"Bearer {KEYS['bob']}", "Content-Type": "application/json"})
        assert bad.status_code == 400
        seen.add("bob", None, error=True)
        models = requests.get(f"{gw.url}/v1/models", headers={"Authorization": f"Bearer {KEYS['alice']}"}, timeout=10)
        assert models.ok
        seen.add("alice", None)
    finally:
        assert gw.stop() == 0
    assert cli_totals(data / "usage.sqlite3") == seen.by_key  # the final write on a clean stop
    gw = start(data)
    try:
        talk(gw, "alice", seen, whole=1, streams=1)
    finally:
        assert gw.stop() == 0
    assert cli_totals(data / "usage.sqlite3") == seen.by_key
    assert seen.by_key["alice"]["cached_tokens"] > 0  # the fake reports some, and they are counted
    with contextlib.closing(ledger.open_read_only(data / "usage.sqlite3")) as conn:
        models = {t.model for t in ledger.read_totals(conn, key_id="alice")}
    assert "" in models and len(models) == 2  # GET /v1/models under "", the chats under the served model


def test_a_stream_cut_short_counts_its_generated_tokens(tmp_path: Path) -> None:
    db = tmp_path / "data" / "usage.sqlite3"
    gw = start(tmp_path / "data", FAKE_TOKEN_INTERVAL="0.05")
    try:
        body = {"model": "any", "messages": CHAT, "max_tokens": 200, "stream": True,
                "stream_options": {"include_usage": True}}
        tokens = 0
        with requests.post(f"{gw.url}/v1/chat/completions", json=body, stream=True, timeout=30,
                           headers={"Authorization": f"Bearer {KEYS['alice']}"}) as resp:
            for line in resp.iter_lines():
                if line.startswith(b"data: ") and b'"content": "tok ' in line:
                    tokens += 1
                    if tokens == 5:
                        break  # the client goes away, 5 tokens in, long before the end (200)
        wait_for(lambda: db_totals(db).get("alice", {}).get("requests") == 1)
        row = db_totals(db)["alice"]
        assert 5 <= row["completion_tokens"] < 200  # what was relayed: the 5 seen and those already on their way
        assert row["errors"] == 0
    finally:
        gw.stop()


def test_two_gateway_processes_share_one_ledger(tmp_path: Path) -> None:
    db = tmp_path / "shared" / "usage.sqlite3"
    seen = Seen()
    gateways = [start(tmp_path / f"gw{i}", db) for i in range(2)]
    try:
        threads = [threading.Thread(target=talk, args=(gw, key_id, seen, 5, 5))
                   for gw in gateways for key_id in KEYS]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
    finally:
        for gw in gateways:
            assert gw.stop() == 0
    assert sum(row["requests"] for row in seen.by_key.values()) == 2 * 2 * 10
    assert db_totals(db) == seen.by_key
    assert not (tmp_path / "gw0" / "usage.sqlite3").exists()  # USAGE_DB, not $DATA_DIR/usage.sqlite3


def test_a_killed_gateway_loses_at_most_the_last_second(tmp_path: Path) -> None:
    db = tmp_path / "data" / "usage.sqlite3"
    seen = Seen()
    gw = start(tmp_path / "data")
    try:
        talk(gw, "alice", seen, whole=3, streams=3)
        time.sleep(1.5)  # answered more than a second before the kill: in the ledger
        assert gw.proc is not None
        gw.proc.send_signal(signal.SIGKILL)
        gw.proc.wait(10)
    finally:
        gw.stop()
    assert db_totals(db) == seen.by_key
