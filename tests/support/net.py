"""Ports and plain HTTP on 127.0.0.1."""

from __future__ import annotations

import asyncio
import itertools
import os
import socket
import urllib.error
import urllib.request
from types import TracebackType

# Below the kernel's ephemeral range (32768 up), so a port handed out here is never
# one the kernel gives a listener on port 0; each xdist worker has its own block,
# and within it no port is handed out twice: two tests never race for one port.
# SYNCD_TEST_FIRST_PORT moves the blocks, for test runs side by side (other checkouts).
_FIRST_PORT = int(os.environ.get("SYNCD_TEST_FIRST_PORT", "20000"))
_PORTS_PER_WORKER = 2_000
_WORKER = int(os.environ.get("PYTEST_XDIST_WORKER", "gw0").removeprefix("gw") or 0)
_START = _FIRST_PORT + _WORKER * _PORTS_PER_WORKER
_candidates = itertools.count(_START)


def free_port() -> int:
    """A port nothing listens on now, of this test worker's own block."""
    for port in _candidates:
        if port >= _START + _PORTS_PER_WORKER:
            break
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"test worker {_WORKER} used up its {_PORTS_PER_WORKER} ports")


def fetch_text(url: str, timeout: float = 5) -> tuple[int, str]:
    """GET ``url``: its status and body, error statuses included."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:  # noqa: S310 - 127.0.0.1
            status: int = response.status
            return status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


class BareHttpServer:
    """An HTTP/1.1 server on 127.0.0.1 that answers every request with ``answer``,
    written byte for byte and then the connection closed: it can leave out what every
    HTTP framework adds (aiohttp's servers always send a Content-Type).
    ``async with BareHttpServer(answer) as url``."""

    def __init__(self, answer: bytes) -> None:
        self._answer = answer
        self._server: asyncio.Server | None = None
        self.requests = 0

    async def __aenter__(self) -> str:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        port = self._server.sockets[0].getsockname()[1]
        return f"http://127.0.0.1:{port}"

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        assert self._server is not None
        self._server.close()
        await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        for line in head.split(b"\r\n"):
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                await reader.readexactly(int(value))
        self.requests += 1
        writer.write(self._answer)
        await writer.drain()
        writer.close()
