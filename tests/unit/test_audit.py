"""The audit log (gateway.audit): its lines, its files, the key CLI's lines and the admin routes' lines."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import stat
import threading
from datetime import UTC, datetime
from pathlib import Path

import pytest
from aiohttp.test_utils import TestClient, TestServer

from gateway import audit as audit_mod
from gateway import keys as cli
from gateway.app import create_app
from gateway.audit import AuditLog, entry
from gateway.keyfile import digest
from lifecycle.router import ModelSet, ServedModel, Status
from lifecycle.settings import Settings
from lifecycle.supervisor import BackendState

FIELDS = ["time", "who", "action", "target", "from", "result", "details"]


def lines(path: Path) -> list[dict[str, object]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


# ---------------------------------------------------------------- the file


def test_one_json_line_per_record_private_files(tmp_path: Path) -> None:
    log = AuditLog(tmp_path / "logs" / "audit")
    assert log.add("ops", "model.load", "alpha", "203.0.113.7", details={"status": 200}) is None
    assert log.add("cli", "key.remove", "partner", "cli pid=1 user=root host=h", details={"lines": 1}) is None
    first, second = lines(log.path)
    assert list(first) == FIELDS
    assert first["who"] == "ops" and first["action"] == "model.load" and first["target"] == "alpha"
    assert first["from"] == "203.0.113.7" and first["result"] == "ok" and first["details"] == {"status": 200}
    moment = datetime.fromisoformat(str(first["time"]))
    assert moment.tzinfo is not None and abs((datetime.now(UTC) - moment).total_seconds()) < 60
    assert second["action"] == "key.remove"
    assert stat.S_IMODE(log.path.stat().st_mode) == 0o600
    assert stat.S_IMODE(log.directory.stat().st_mode) == 0o700
    assert log.path.name == "audit.jsonl"


def test_only_known_actions_results_and_plain_details() -> None:
    with pytest.raises(ValueError, match="unknown audit action"):
        entry("cli", "key.stolen", None, "x")
    with pytest.raises(ValueError, match="unknown audit result"):
        entry("cli", "key.create", None, "x", result="maybe")
    with pytest.raises(ValueError, match="not a plain value"):
        entry("cli", "key.create", "a", "x", details={"digest": digest("sk-x-0123456789abcdef")})  # bytes: no
    record = entry("cli", "key.create", "a", "x", details={"n": 1, "ids": ("a", "b"), "m": {"k": None}})
    assert record["details"] == {"n": 1, "ids": ["a", "b"], "m": {"k": None}}


def test_writers_at_once_never_interleave(tmp_path: Path) -> None:
    """One os.write per line on an O_APPEND file: the gateway and CLI runs never mix their lines."""
    log = AuditLog(tmp_path / "audit")
    padding = "x" * 3000  # lines longer than a pipe's atomic size, still whole

    def writer(n: int) -> None:
        for i in range(200):
            assert log.add(f"w{n}", "keys.reload", None, "test", details={"i": i, "pad": padding}) is None

    threads = [threading.Thread(target=writer, args=(n,)) for n in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    records = lines(log.path)
    assert len(records) == 800
    for n in range(4):
        assert [r["details"]["i"] for r in records if r["who"] == f"w{n}"] == list(range(200))  # type: ignore[index]


def test_an_unwritable_audit_log_is_one_warning_and_never_an_error(tmp_path: Path,
                                                                  caplog: pytest.LogCaptureFixture) -> None:
    blocker = tmp_path / "logs"
    blocker.write_text("a file where the folder should be\n")
    log = AuditLog(blocker / "audit")

    async def run() -> None:
        for _ in range(3):
            await log.record("ops", "keys.reload", None, "127.0.0.1")

    with caplog.at_level(logging.WARNING, logger="gateway.audit"):
        asyncio.run(run())
        blocker.unlink()
        asyncio.run(log.record("ops", "keys.reload", None, "127.0.0.1"))  # writable again: written
        log.close()
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "cannot write the audit log" in warnings[0]
    assert [r["who"] for r in lines(log.path)] == ["ops"]


def test_record_keeps_the_order_and_close_waits(tmp_path: Path) -> None:
    log = AuditLog(tmp_path / "audit")

    async def run() -> None:
        await asyncio.gather(*(log.record(f"k{i}", "keys.reload", None, "x") for i in range(50)))

    asyncio.run(run())
    log.close()
    assert [r["who"] for r in lines(log.path)] == [f"k{i}" for i in range(50)]


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root (the CLI under docker exec)")
def test_what_root_creates_goes_to_the_owner_of_the_folder_above(tmp_path: Path) -> None:
    """docker exec runs the CLI as root; the gateway, as the image user, must still be able to append."""
    logs = tmp_path / "logs"
    logs.mkdir()
    os.chown(logs, 10001, 10001)
    log = AuditLog(logs / "audit")
    assert log.add("cli", "key.create", "a", "cli") is None
    assert (log.directory.stat().st_uid, log.path.stat().st_uid) == (10001, 10001)


# ---------------------------------------------------------------- the key CLI


@pytest.fixture
def data(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.delenv("AUTH_KEYS_FILE", raising=False)
    data = tmp_path / "data"
    data.mkdir()
    monkeypatch.setenv("DATA_DIR", str(data))
    return data


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_every_key_change_is_one_audit_line_without_any_key_or_hash(data: Path,
                                                                    capsys: pytest.CaptureFixture[str]) -> None:
    keys_file = data / "api_keys.txt"
    old_plain = "sk-old-plaintext-0123456789"
    keys_file.write_text(f"legacy:{old_plain}:30\n")
    code, first, _ = run(capsys, "generate", "--name", "partner", "--rate-limit", "20", "--admin")
    assert code == 0
    assert run(capsys, "update", "--name", "partner", "--rate-limit", "50", "--expires", "2099-01-01")[0] == 0
    code, second, _ = run(capsys, "rotate", "--name", "partner")
    assert code == 0
    assert run(capsys, "import")[0] == 0
    assert run(capsys, "remove", "--name", "partner")[0] == 0
    assert run(capsys, "remove", "--name", "nobody")[0] == 1  # nothing changed: no line
    assert run(capsys, "list")[0] == 0  # reads only: no line

    path = data / "logs" / "audit" / "audit.jsonl"
    records = lines(path)
    assert [(r["action"], r["target"], r["result"]) for r in records] == [
        ("key.create", "partner", "ok"), ("key.update", "partner", "ok"), ("key.rotate", "partner", "ok"),
        ("key.import", "legacy", "ok"), ("key.remove", "partner", "ok"),
    ]
    for record in records:
        assert record["who"] == "cli"
        assert str(record["from"]).startswith(f"cli pid={os.getpid()} user=") and " host=" in str(record["from"])
        assert record["details"]["file"] == str(keys_file)  # type: ignore[index]
    create, update, rotate, imported, remove = (r["details"] for r in records)
    assert create == {"file": str(keys_file), "rate_limit": 20, "expires": None, "admin": True}
    assert update == {"file": str(keys_file), "lines": 1,
                      "changed": {"rate_limit": 50, "expires": "2099-01-01T00:00:00+00:00"}}
    assert rotate == {"file": str(keys_file), "other_lines_removed": 0}
    assert imported == {"file": str(keys_file), "lines": [1]}
    assert remove == {"file": str(keys_file), "lines": 1}
    text = path.read_text()
    for secret in (first.strip(), second.strip(), old_plain):
        assert secret not in text and digest(secret).hex() not in text


def test_a_key_change_stands_when_no_audit_line_can_be_written(data: Path,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    (data / "logs").mkdir()
    (data / "logs" / "audit").write_text("not a folder\n")
    code, out, err = run(capsys, "--quiet", "generate", "--name", "a")
    assert code == 0 and out.strip()
    assert "warning: the change is made, but no audit line was written to" in err
    assert "a:sha256:" in (data / "api_keys.txt").read_text()


def test_the_cli_never_creates_a_missing_data_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "nowhere"
    monkeypatch.setenv("DATA_DIR", str(missing))
    keys_file = tmp_path / "keys.txt"
    code, _, err = run(capsys, "--file", str(keys_file), "generate", "--name", "a")
    assert code == 0 and f"no audit line written: DATA_DIR {missing} does not exist" in err
    assert not missing.exists() and keys_file.exists()


# ---------------------------------------------------------------- the gateway: admin routes


class StubRouter:
    def __init__(self) -> None:
        self.answer = (200, b"{}")

    async def load(self, mid: str) -> tuple[int, bytes]:
        return self.answer

    async def unload(self, mid: str) -> tuple[int, bytes]:
        return self.answer

    async def status(self, mid: str, *, fresh: bool = False) -> Status:
        return Status("loaded")


class StubUpstream:
    async def close(self) -> None:
        return None


class StubBackend:
    """What gateway.admin (and create_app) use of a Backend with several models."""

    def __init__(self) -> None:
        self.models = ModelSet((ServedModel("alpha", Path("alpha.gguf")), ServedModel("beta", Path("beta.gguf"))),
                               "alpha")
        self.router = StubRouter()
        self.ready, self.up, self.restarts, self.model_id = True, True, 0, None
        self.state = BackendState.READY

    def choose(self, requested: object) -> ServedModel:
        return self.models.choose(requested)

    async def refresh_models(self) -> ModelSet:
        return self.models

    def client(self, **_: object) -> StubUpstream:
        return StubUpstream()


ADMIN = "sk-audit-admin-0123456789abcdef"
USER = "sk-audit-user-0123456789abcdef"


def test_admin_actions_and_refusals_and_reloads_are_audit_lines(tmp_path: Path) -> None:
    keys_file = tmp_path / "api_keys.txt"
    keys_file.write_text(f"ops:sha256:{digest(ADMIN).hex()} admin=true\napp:sha256:{digest(USER).hex()}\n")
    keys_file.chmod(0o600)
    (tmp_path / "models").mkdir()
    settings = Settings.from_env({"DATA_DIR": str(tmp_path), "AUTH_ENABLED": "true", "MODELS": "all",
                                  "ACCESS_LOG": "false"}, probe_roots=[])
    app = create_app(settings, StubBackend())  # type: ignore[arg-type]

    def auth(key: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {key}"}

    async def run() -> None:
        async with TestClient(TestServer(app)) as client:
            refused = await client.post("/admin/models/load", json={"model": "alpha"}, headers=auth(USER))
            assert refused.status == 403
            assert (await client.post("/admin/models/load", json={"model": "beta"}, headers=auth(ADMIN))).status == 200
            assert (await client.post("/admin/models/unload", json={"model": "beta.gguf"},
                                      headers=auth(ADMIN))).status == 200
            assert (await client.post("/admin/models/load", json={"model": "gamma"},
                                      headers=auth(ADMIN))).status == 404
            assert (await client.post("/admin/models/refresh", headers=auth(ADMIN))).status == 200
            assert (await client.post("/admin/models/refresh", headers=auth("sk-wrong-0123456789abcdef"))).status \
                == 401  # no key, no audit line: failed keys are the failure throttle's business
            assert (await client.post("/reload", headers=auth(USER))).status == 403  # an admin action (issue 16)
            assert (await client.post("/reload", headers=auth(ADMIN))).status == 200

    asyncio.run(run())  # the app's cleanup waits for the audit thread
    records = lines(settings.audit_dir / "audit.jsonl")
    assert [(r["who"], r["action"], r["target"], r["result"]) for r in records] == [
        ("app", "model.load", None, "refused"),
        ("ops", "model.load", "beta", "ok"),
        ("ops", "model.unload", "beta", "ok"),
        ("ops", "model.load", None, "failed"),
        ("ops", "models.refresh", None, "ok"),
        ("app", "keys.reload", None, "refused"),
        ("ops", "keys.reload", None, "ok"),
    ]
    assert records[0]["details"] == {"status": 403, "reason": "not an admin key"}
    assert records[1]["details"] == {"status": 200, "model_status": "loaded"}
    assert records[3]["details"] == {"status": 404, "reason": "model_not_found"}
    assert records[4]["details"] == {"status": 200, "models": 2, "added": [], "removed": []}
    assert records[5]["details"] == {"status": 403, "reason": "not an admin key"}
    assert records[6]["details"] == {"file": str(keys_file), "keys": 2}
    assert all(r["from"] == "127.0.0.1" for r in records)
    text = (settings.audit_dir / "audit.jsonl").read_text()
    for secret in (ADMIN, USER, digest(ADMIN).hex(), digest(USER).hex()):
        assert secret not in text


def test_the_module_names_its_actions() -> None:
    assert set(audit_mod.ACTIONS) >= {"key.create", "key.rotate", "key.update", "key.remove", "key.import",
                                      "keys.reload", "model.load", "model.unload", "models.refresh"}
