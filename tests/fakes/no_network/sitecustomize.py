"""Loaded by every Python process started with this folder on PYTHONPATH: no network but loopback.

A connect to (or a name lookup of) anything other than 127.0.0.0/8, ::1, `localhost` or a Unix socket fails with
ENETUNREACH and is appended, one line each, to the file NO_NETWORK_LOG names. Covers socket.socket.connect and
connect_ex (which asyncio, requests/urllib3, httpx and aiohttp all end in) and socket.getaddrinfo.
"""

from __future__ import annotations

import errno
import ipaddress
import os
import socket

_LOG = os.environ.get("NO_NETWORK_LOG")


def _loopback(host: object) -> bool:
    if isinstance(host, bytes):
        host = host.decode(errors="replace")
    if not isinstance(host, str):
        return False
    if host in ("localhost", "") or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host.split("%", 1)[0]).is_loopback
    except ValueError:
        return False


def _refuse(what: str, target: object) -> OSError:
    if _LOG:
        with open(_LOG, "a") as out:
            out.write(f"{os.getpid()} {what} {target!r}\n")
    return OSError(errno.ENETUNREACH, f"network disabled for this test: {what} {target!r}")


def _allowed(sock: socket.socket, address: object) -> bool:
    if getattr(socket, "AF_UNIX", None) is not None and sock.family == socket.AF_UNIX:
        return True
    return isinstance(address, tuple) and bool(address) and _loopback(address[0])


_connect = socket.socket.connect
_connect_ex = socket.socket.connect_ex
_getaddrinfo = socket.getaddrinfo


def connect(self: socket.socket, address: object) -> None:
    if not _allowed(self, address):
        raise _refuse("connect", address)
    return _connect(self, address)


def connect_ex(self: socket.socket, address: object) -> int:
    if not _allowed(self, address):
        _refuse("connect", address)
        return errno.ENETUNREACH
    return _connect_ex(self, address)


def getaddrinfo(host, *args, **kwargs):  # type: ignore[no-untyped-def]
    if host is not None and not _loopback(host):
        raise _refuse("getaddrinfo", host)
    return _getaddrinfo(host, *args, **kwargs)


socket.socket.connect = connect  # type: ignore[method-assign]
socket.socket.connect_ex = connect_ex  # type: ignore[method-assign]
socket.getaddrinfo = getaddrinfo
