"""Fixtures for the replica tests: a fresh PostgreSQL database per run, a WalkMe
sandbox that remembers every applied id and which replica sent it, and
``syncd run`` subprocesses.

Needs a PostgreSQL server: ``SYNCD_TEST_POSTGRES_URL`` (default
``postgresql://postgres@127.0.0.1:5432/test``), as a user that may
``CREATE DATABASE``. Without one the tests fail, saying how to point them at a
server; they never skip.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest
from aiohttp import web

from syncd.sandbox import SANDBOX_SYSTEM_GUID, Faults, WalkMeSandbox, _Call, serve_in_thread

PG_DEFAULT_URL = "postgresql://postgres@127.0.0.1:5432/test"
CLIENT_ID = "replicas-client"
# Distinctive, so a leak into any output would be found by a substring search.
CLIENT_SECRET = "replicas-S3cret-4b8e2f1a-never-print-me"


def postgres_url() -> str:
    return os.environ.get("SYNCD_TEST_POSTGRES_URL", PG_DEFAULT_URL)


@pytest.fixture(autouse=True)
def _no_outer_syncd_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """SYNCD_* variables of the shell running the tests must not reach the replicas."""
    for name in list(os.environ):
        if name.upper().startswith("SYNCD_") and name != "SYNCD_TEST_POSTGRES_URL":
            monkeypatch.delenv(name)


# ------------------------------------------------------------------------ PostgreSQL


class Unreachable(Exception):
    """No PostgreSQL server to test against."""


async def connect(url: str) -> asyncpg.Connection:
    try:
        return await asyncpg.connect(url, timeout=5)
    except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError) as exc:
        raise Unreachable(
            f"PostgreSQL is not reachable at {url} ({type(exc).__name__}: {exc}). The"
            " replica tests need a real server where the user may CREATE DATABASE: start"
            " one, or point the tests at one with"
            " SYNCD_TEST_POSTGRES_URL=postgresql://USER@HOST:PORT/DATABASE"
        ) from None


def _with_database(url: str, database: str) -> str:
    parts = urlsplit(url)
    return urlunsplit(parts._replace(path="/" + database))


async def _create_database(url: str, database: str) -> None:
    conn = await connect(url)
    try:
        await conn.execute(f'CREATE DATABASE "{database}"')
    finally:
        await conn.close()


async def _drop_database(url: str, database: str) -> None:
    conn = await connect(url)
    try:
        # A SIGKILLed replica's connections may linger for a moment.
        await conn.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
            " WHERE datname = $1 AND pid <> pg_backend_pid()",
            database,
        )
        await conn.execute(f'DROP DATABASE IF EXISTS "{database}"')
    finally:
        await conn.close()


@dataclass(frozen=True)
class Database:
    """A fresh database for one test, or why there is none."""

    url: str | None
    problem: str | None = None

    def ready(self) -> str:
        """Its URL, or a test failure (never a skip) saying how to get a server."""
        if self.url is None:
            pytest.fail(self.problem or "no PostgreSQL", pytrace=False)
        return self.url


@pytest.fixture
def fresh_database() -> Iterator[Database]:
    """A new, empty database on the test server; dropped afterwards."""
    url = postgres_url()
    database = f"syncd_replicas_{secrets.token_hex(6)}"
    problem = None
    try:
        asyncio.run(_create_database(url, database))
    except Unreachable as exc:
        problem = str(exc)
    except asyncpg.PostgresError as exc:
        problem = (
            f"cannot create a test database on {url}: {exc}. Point SYNCD_TEST_POSTGRES_URL"
            " at a server and a user allowed to CREATE DATABASE."
        )
    if problem is not None:
        yield Database(None, problem)
        return
    try:
        yield Database(_with_database(url, database))
    finally:
        asyncio.run(_drop_database(url, database))


# ------------------------------------------------------------------------- the sandbox


@dataclass(frozen=True, slots=True)
class Applied:
    """One segment change WalkMe applied, in the order it applied them."""

    seq: int
    at: float  # time.monotonic() in the test process
    port: int  # the sandbox port it came in on: each replica has its own
    guid: str
    action: str  # create, add, remove, override
    ids: frozenset[str]


@dataclass(frozen=True, slots=True)
class Kill:
    port: int
    pid: int
    at: float
    seq: int  # the applied change right after which the replica was killed
    guid: str


class RecordingSandbox(WalkMeSandbox):
    """The WalkMe sandbox, also remembering the ids of every applied change and the
    port (hence the replica) it came from, and able to SIGKILL a replica right after
    WalkMe applied one of its batches and before the replica hears the answer."""

    def __init__(self, extra_ports: int = 0, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.extra_ports = extra_ports
        self.applied: list[Applied] = []
        self._applied_lock = threading.Lock()
        self._armed: dict[int, int] | None = None  # port -> pid of a replica to kill
        self.kill: Kill | None = None
        self.killed = threading.Event()
        self.ports: list[int] = []

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> str:
        url = await super().start(host, port)
        for _ in range(self.extra_ports):
            await self.listen_also(host)
        return url

    async def listen_also(self, host: str = "127.0.0.1") -> int:
        """Serve the same API on one more free port; returns it."""
        runner = self._runner
        assert runner is not None, "start() first"
        before = {tuple(address[:2]) for address in runner.addresses}
        site = web.TCPSite(runner, host, 0)
        await site.start()
        added = [a for a in runner.addresses if tuple(a[:2]) not in before]
        port: int = added[0][1]
        self.ports.append(port)
        return port

    def arm_kill(self, pids_by_port: dict[int, int]) -> None:
        """The next batch (add/remove/override) WalkMe applies for any of these
        replicas gets that replica SIGKILLed before it is answered."""
        with self._applied_lock:
            self._armed = dict(pids_by_port)

    def _create(self, request: web.Request, call: _Call, system: str, raw: bytes) -> web.Response:
        response = super()._create(request, call, system, raw)
        if call.applied:
            body = json.loads(raw)
            answer = json.loads(response.text or "{}")
            self._note(request, str(answer["segmentGuid"]).lower(), "create", body["userIds"])
        return response

    def _update(self, request: web.Request, call: _Call, system: str, raw: bytes) -> web.Response:
        response = super()._update(request, call, system, raw)
        if call.applied:
            body = json.loads(raw)
            guid = request.match_info["segment_guid"].lower()
            self._note(request, guid, str(body["action"]), body["userIds"])
        return response

    def _note(self, request: web.Request, guid: str, action: str, ids: list[str]) -> None:
        # Runs on the sandbox's event loop right after the change, with no await in
        # between: the list's order is the order WalkMe applied the changes in.
        port = _local_port(request)
        with self._applied_lock:
            seq = len(self.applied)
            now = time.monotonic()
            self.applied.append(Applied(seq, now, port, guid, action, frozenset(ids)))
            armed = self._armed
            if armed is None or port not in armed or action == "create":
                return
            self._armed = None
            pid = armed[port]
            self.kill = Kill(port, pid, now, seq, guid)
        os.kill(pid, signal.SIGKILL)
        self.killed.set()

    def last_change_at(self) -> float:
        """When WalkMe last applied a change (0.0: never)."""
        with self._applied_lock:
            return self.applied[-1].at if self.applied else 0.0

    def applied_changes(self) -> list[Applied]:
        with self._applied_lock:
            return list(self.applied)


def _local_port(request: web.Request) -> int:
    transport = request.transport
    sockname = transport.get_extra_info("sockname") if transport is not None else None
    if sockname:
        return int(sockname[1])
    return int(request.url.port or 0)


@contextlib.contextmanager
def recording_sandbox(replicas: int, faults: Faults) -> Iterator[RecordingSandbox]:
    """A RecordingSandbox on a thread of the test process, with one port per replica
    (``sandbox.ports``) besides its main one."""
    sandbox = RecordingSandbox(
        extra_ports=replicas, client_id=CLIENT_ID, client_secret=CLIENT_SECRET, faults=faults
    )
    with serve_in_thread(sandbox) as served:
        yield served


# -------------------------------------------------------------------------- replicas


def replica_env(
    *,
    api_port: int,
    state_url: str,
    segments_file: Path,
    admin_port: int,
    work_dir: Path,
    **settings: str,
) -> dict[str, str]:
    env = {name: value for name, value in os.environ.items() if not name.startswith("SYNCD_")}
    env.update(
        {
            "SYNCD_WALKME_CLIENT_ID": CLIENT_ID,
            "SYNCD_WALKME_CLIENT_SECRET": CLIENT_SECRET,
            "SYNCD_WALKME_SYSTEM_GUID": SANDBOX_SYSTEM_GUID,
            "SYNCD_WALKME_API_URL": f"http://127.0.0.1:{api_port}",
            "SYNCD_STATE_URL": state_url,
            "SYNCD_SEGMENTS_FILE": str(segments_file),
            "SYNCD_ADMIN_PORT": str(admin_port),
            "SYNCD_WORK_DIR": str(work_dir),
            "SYNCD_LOG_FORMAT": "json",
            **{f"SYNCD_{name.upper()}": value for name, value in settings.items()},
        }
    )
    return env


@dataclass
class Replica:
    """One ``python -m syncd run`` (or ``sync``) subprocess; stdout and stderr go to files."""

    index: int
    api_port: int
    admin_port: int
    stdout_path: Path
    stderr_path: Path
    env: dict[str, str]
    process: subprocess.Popen[bytes]
    _files: list[IO[bytes]] = field(default_factory=list)

    @classmethod
    def start(
        cls,
        index: int,
        directory: Path,
        env: dict[str, str],
        api_port: int,
        admin_port: int,
        command: str = "run",
    ) -> Replica:
        directory.mkdir(parents=True, exist_ok=True)
        stdout_path, stderr_path = directory / "stdout.log", directory / "stderr.log"
        out, err = stdout_path.open("wb"), stderr_path.open("wb")
        process = subprocess.Popen(
            [sys.executable, "-m", "syncd", command],
            cwd=directory,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=err,
        )
        return cls(index, api_port, admin_port, stdout_path, stderr_path, env, process, [out, err])

    @property
    def pid(self) -> int:
        return self.process.pid

    def stdout(self) -> str:
        return self.stdout_path.read_text(encoding="utf-8", errors="replace")

    def stderr(self) -> str:
        return self.stderr_path.read_text(encoding="utf-8", errors="replace")

    def events(self) -> list[dict[str, Any]]:
        """Its JSON log lines: on stdout for ``run``, on stderr for ``sync``."""
        found = []
        for line in (self.stdout() + self.stderr()).splitlines():
            with contextlib.suppress(ValueError):
                entry = json.loads(line)
                if isinstance(entry, dict):
                    found.append(entry)
        return found

    def count(self, event: str) -> int:
        return sum(1 for entry in self.events() if entry.get("event") == event)

    def terminate(self, timeout: float) -> int | None:
        """SIGTERM, then the exit status (None if it did not exit in time: killed)."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=10)
            return None

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=10)
        for handle in self._files:
            handle.close()

    def tail(self, lines: int = 30) -> str:
        out = "\n".join(self.stdout().splitlines()[-lines:])
        return f"--- replica {self.index} (pid {self.pid}) stdout tail:\n{out}\n" + (
            f"--- stderr:\n{self.stderr()[-3000:]}"
        )


def wait_until(condition: Callable[[], bool], timeout: float, what: str, step: float = 0.1) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(step)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port
