"""Ports and plain HTTP on 127.0.0.1."""

from __future__ import annotations

import socket
import urllib.error
import urllib.request


def free_port() -> int:
    """A port nothing listens on now (the kernel's pick: distinct across xdist workers)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def fetch_text(url: str, timeout: float = 5) -> tuple[int, str]:
    """GET ``url``: its status and body, error statuses included."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:  # noqa: S310 - 127.0.0.1
            status: int = response.status
            return status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()
