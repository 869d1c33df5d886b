"""Our container images start as root only long enough to hand the unprivileged user its folders; entrypoint.sh
then drops to that user (the official postgres image's pattern).

`python3 -m lifecycle.container prepare` (as root, before the drop):
1. creates $DATA_DIR/models, $DATA_DIR/logs (with _boot, the log folder and audit) and the cache folder and gives
   them (not the user's own files) to the image user, so a volume that RunPod or Vast.ai mounted root-owned works;
2. when the keys file is one the image user cannot read (the old project's recipe: mounted read-only, owned by
   root, mode 0600), keeps a private copy in /run/llama-gguf-inference that the user can read, refreshed within a
   second of every change by a small root process (`sync-keys`), so hot reload keeps working; a key removed from
   the file is removed from the copy, and a file that disappears takes the copy with it (fail closed);
3. prints the `export` lines entrypoint.sh evaluates (shell-quoted).
"""

from __future__ import annotations

import os
import pwd
import shlex
import subprocess
import sys
import time
from pathlib import Path

from lifecycle.settings import BAD_SETTINGS_EXIT, Settings, SettingsError

IMAGE_USER = "llama"
RUN_DIR = Path("/run/llama-gguf-inference")
SYNC_INTERVAL = 1.0


def _give(path: Path, uid: int, gid: int) -> None:
    path.mkdir(parents=True, exist_ok=True)
    os.chown(path, uid, gid)


def _readable_by(path: Path, uid: int, gid: int) -> bool:
    """Whether `uid` could read `path` (walking its folders), decided from modes and owners."""
    try:
        for part in [*reversed(path.parents), path]:
            st = part.stat()
            want = 0o4 if part == path else 0o1
            if st.st_uid == uid:
                ok = bool(st.st_mode & (want << 6))
            elif st.st_gid == gid:
                ok = bool(st.st_mode & (want << 3))
            else:
                ok = bool(st.st_mode & want)
            if not ok:
                return False
    except OSError:
        return False
    return True


def copy_keys(src: Path, dst: Path, uid: int, gid: int) -> None:
    """Make `dst` a 0600 copy of `src` owned by uid:gid, replaced atomically; no `src` means no `dst`."""
    try:
        data = src.read_bytes()
    except OSError:
        dst.unlink(missing_ok=True)
        return
    try:
        if dst.read_bytes() == data:
            return
    except OSError:
        pass
    tmp = dst.with_name(f".{dst.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
    os.chown(tmp, uid, gid)
    os.replace(tmp, dst)


def sync_keys(src: Path, dst: Path, uid: int, gid: int) -> None:
    """Keep `dst` equal to `src`, checking every SYNC_INTERVAL seconds, until killed."""
    while True:
        try:
            copy_keys(src, dst, uid, gid)
        except OSError as exc:  # never the content: the file holds keys
            print(f"warning: cannot copy the keys file {src}: {exc.strerror}", file=sys.stderr, flush=True)
        time.sleep(SYNC_INTERVAL)


def prepare(settings: Settings, user: str = IMAGE_USER) -> dict[str, str]:
    """Hand the image user its folders; the variables to export before the drop."""
    pw = pwd.getpwnam(user)
    uid, gid = pw.pw_uid, pw.pw_gid
    exports: dict[str, str] = {}
    cache = settings.cache_dir
    if not os.environ.get("LLAMA_GGUF_CACHE_DIR"):
        exports["LLAMA_GGUF_CACHE_DIR"] = str(cache)  # the same folder after the drop (HOME changes)
    for folder in (settings.data_dir / "models", settings.data_dir / "logs", cache):
        _give(folder, uid, gid)
    for folder in (settings.data_dir / "logs" / "_boot", settings.log_dir, settings.audit_dir):
        _give(folder, uid, gid)
        for item in folder.iterdir():  # our own logs from an earlier, root-run start
            if item.is_file() and item.stat().st_uid != uid:
                os.chown(item, uid, gid)
    settings.audit_dir.chmod(0o700)  # who changed which key: for the gateway's user alone (gateway.audit)
    keys = settings.keys_file
    if settings.auth_enabled and keys.exists() and not _readable_by(keys, uid, gid):
        RUN_DIR.mkdir(mode=0o700, exist_ok=True)
        os.chown(RUN_DIR, uid, gid)
        copy = RUN_DIR / "api_keys.txt"
        copy_keys(keys, copy, uid, gid)
        subprocess.Popen(
            [sys.executable, "-m", "lifecycle.container", "sync-keys", str(keys), str(copy), user],
            # not our stdout: entrypoint.sh reads that to its end, and this process never closes it
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, start_new_session=True,
        )
        print(f"keys file {keys} is not readable by the user {user}: serving a private copy, refreshed every "
              f"{SYNC_INTERVAL:g}s", file=sys.stderr)
        exports["AUTH_KEYS_FILE"] = str(copy)
    return exports


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if args[:1] == ["sync-keys"] and len(args) == 4:
        pw = pwd.getpwnam(args[3])
        sync_keys(Path(args[1]), Path(args[2]), pw.pw_uid, pw.pw_gid)
        return 0
    if args != ["prepare"]:
        print("usage: python -m lifecycle.container prepare | sync-keys SRC DST USER", file=sys.stderr)
        return 2
    try:
        settings = Settings.from_env()
    except SettingsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return BAD_SETTINGS_EXIT
    try:
        exports = prepare(settings)
    except OSError as exc:
        print(f"error: cannot prepare {exc.filename or settings.data_dir} for the user {IMAGE_USER}: "
              f"{exc.strerror}", file=sys.stderr)
        return 1
    for name, value in exports.items():
        print(f"export {name}={shlex.quote(value)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
