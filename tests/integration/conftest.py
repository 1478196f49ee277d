"""Shared fixtures for the integration tests: a real sandbox WalkMe on 127.0.0.1,
settings pointing at it, and helpers to run syncd in process or as a subprocess."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import pytest_asyncio

from syncd.app import open_runtime
from syncd.engine import Outcome
from syncd.sandbox import (
    SANDBOX_SYSTEM_GUID,
    RequestRecord,
    WalkMeSandbox,
    run_sandbox_in_thread,
)
from syncd.settings import Settings, load_settings

REPO_ROOT = Path(__file__).resolve().parents[2]
CLIENT_ID = "itest-client"
# Distinctive, so a leak into any output is found by a plain substring search.
CLIENT_SECRET = "itest-S3cret-7f3a9c1e-never-print-me"
BATCH = 25_000
SEGMENTS_PATH = f"/public/v1/user/system/{SANDBOX_SYSTEM_GUID}/segment"


# --------------------------------------------------------------------------- basics


@pytest.fixture(autouse=True)
def _no_outer_syncd_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """SYNCD_* variables of the shell running the tests must not reach the settings."""
    for name in list(os.environ):
        if name.upper().startswith("SYNCD_"):
            monkeypatch.delenv(name)


def make_ids(n: int, prefix: str = "user", start: int = 0) -> list[str]:
    return [f"{prefix}{i:07d}@example.com" for i in range(start, start + n)]


def write_ids(path: Path, ids: Iterable[str]) -> Path:
    """Write a source file atomically: a running daemon never reads half of it."""
    partial = path.with_name(path.name + ".partial")
    partial.write_text("".join(f"{member}\n" for member in ids), encoding="utf-8")
    partial.replace(path)
    return path


def segment_requests(sandbox: WalkMeSandbox) -> list[RequestRecord]:
    """Create and update requests the sandbox has seen (list/token/delete left out)."""
    return [r for r in list(sandbox.requests) if r.kind in ("create", "update")]


def wait_until(
    condition: Callable[[], bool], timeout: float, message: str = "condition", step: float = 0.05
) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {message}")
        time.sleep(step)


async def wait_until_async(
    condition: Callable[[], bool], limit_s: float, message: str = "condition", step: float = 0.02
) -> None:
    deadline = time.monotonic() + limit_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {limit_s}s waiting for {message}")
        await asyncio.sleep(step)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


# ------------------------------------------------------------ raw sandbox access


async def raw_call(
    sandbox: WalkMeSandbox, method: str, path: str, body: Any = None
) -> tuple[int, Any]:
    """One API call made by hand (for test setup), with a fresh token."""
    async with aiohttp.ClientSession() as session:
        basic = base64.b64encode(f"{sandbox.client_id}:{sandbox.client_secret}".encode())
        async with session.post(
            sandbox.token_url,
            data={"grant_type": "client_credentials"},
            headers={"Authorization": "Basic " + basic.decode()},
        ) as response:
            assert response.status == 200
            token = (await response.json())["access_token"]
        async with session.request(
            method,
            sandbox.url + path,
            json=body,
            headers={"Authorization": f"Bearer {token}"},
        ) as response:
            text = await response.text()
            return response.status, json.loads(text) if text else None


async def seed_segment(
    sandbox: WalkMeSandbox, name: str, members: list[str], external_id: str | None = None
) -> str:
    """A segment that exists in WalkMe before syncd ever ran."""
    body: dict[str, Any] = {"name": name, "userIds": members}
    if external_id is not None:
        body["id"] = external_id
    status, answer = await raw_call(sandbox, "POST", SEGMENTS_PATH, body)
    assert status == 201, answer
    record = sandbox.find(name=name, external_id=external_id)
    assert record is not None
    return record.guid


async def delete_segment(sandbox: WalkMeSandbox, guid: str) -> None:
    status, answer = await raw_call(sandbox, "DELETE", f"{SEGMENTS_PATH}/{guid}")
    assert status == 200, answer


def segments_named(sandbox: WalkMeSandbox, name: str) -> list[dict[str, Any]]:
    return [s for s in sandbox.state()["segments"] if s["name"] == name]


# ------------------------------------------------------------ in-process harness


@dataclass
class Harness:
    """A running sandbox plus a folder for sources and the state database."""

    sandbox: WalkMeSandbox
    folder: Path

    @property
    def state_url(self) -> str:
        return "sqlite:///" + str(self.folder / "state.db")

    def source(self, name: str, ids: Iterable[str]) -> Path:
        return write_ids(self.folder / f"{name.replace(' ', '_')}.txt", ids)

    def mapping(self, name: str, ids: Iterable[str] = (), **extra: Any) -> dict[str, Any]:
        """A file-source mapping; writes ``ids`` to the segment's source file."""
        path = self.source(name, ids)
        return {"name": name, "source": {"type": "file", "path": str(path)}, **extra}

    def settings(self, mappings: Sequence[dict[str, Any]], **overrides: Any) -> Settings:
        values: dict[str, Any] = {
            "walkme_client_id": CLIENT_ID,
            "walkme_client_secret": CLIENT_SECRET,
            "walkme_system_guid": SANDBOX_SYSTEM_GUID,
            "walkme_api_url": self.sandbox.url,
            "segments": json.dumps(list(mappings)),
            "state_url": self.state_url,
            "retry_max_wait": 0.05,  # retries without real backoff waits; tests stay fast
            "http_timeout": 30.0,
        }
        values.update(overrides)
        return load_settings(**values)

    async def sync(self, settings: Settings, names: Sequence[str] | None = None) -> list[Outcome]:
        async with open_runtime(settings, settings.mappings()) as runtime:
            return await runtime.engine.sync_all(names)

    async def sync_one(self, settings: Settings) -> Outcome:
        outcomes = await self.sync(settings)
        assert len(outcomes) == 1
        return outcomes[0]

    def guid(self, name: str) -> str:
        record = self.sandbox.find(name=name)
        assert record is not None, f"no segment {name!r} in the sandbox"
        return record.guid


HarnessFactory = Callable[..., Awaitable[Harness]]


@pytest_asyncio.fixture
async def make_harness(tmp_path: Path) -> AsyncIterator[HarnessFactory]:
    """``await make_harness(**WalkMeSandbox kwargs)``: a sandbox in this test's loop."""
    started: list[WalkMeSandbox] = []

    async def make(**kwargs: Any) -> Harness:
        kwargs.setdefault("client_id", CLIENT_ID)
        kwargs.setdefault("client_secret", CLIENT_SECRET)
        sandbox = WalkMeSandbox(**kwargs)
        await sandbox.start()
        started.append(sandbox)
        folder = tmp_path / f"harness{len(started)}"
        folder.mkdir()
        return Harness(sandbox, folder)

    yield make
    for sandbox in started:
        await sandbox.stop()


@pytest_asyncio.fixture
async def harness(make_harness: HarnessFactory) -> Harness:
    return await make_harness()


# ------------------------------------------------------------ subprocess harness


@pytest.fixture
def live_sandbox() -> Iterator[WalkMeSandbox]:
    """A sandbox on its own thread, reachable by syncd subprocesses."""
    with run_sandbox_in_thread(client_id=CLIENT_ID, client_secret=CLIENT_SECRET) as sandbox:
        yield sandbox


def base_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.upper().startswith("SYNCD_")}
    env["PYTHONUNBUFFERED"] = "1"
    return env


def cli_env(
    api_url: str, folder: Path, mappings: Sequence[dict[str, Any]], **extra: object
) -> dict[str, str]:
    """The environment of a syncd subprocess; ``extra`` keys become SYNCD_<KEY>."""
    env = base_env()
    env.update(
        {
            "SYNCD_WALKME_CLIENT_ID": CLIENT_ID,
            "SYNCD_WALKME_CLIENT_SECRET": CLIENT_SECRET,
            "SYNCD_WALKME_SYSTEM_GUID": SANDBOX_SYSTEM_GUID,
            "SYNCD_WALKME_API_URL": api_url,
            "SYNCD_SEGMENTS": json.dumps(list(mappings)),
            "SYNCD_STATE_URL": "sqlite:///" + str(folder / "state.db"),
            "SYNCD_RETRY_MAX_WAIT": "0.1",
            "SYNCD_ADMIN_PORT": "0",
        }
    )
    env.update({f"SYNCD_{key.upper()}": str(value) for key, value in extra.items()})
    return env


def syncd_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "syncd", *args]


def run_cli(
    *args: str, env: dict[str, str], timeout: float = 90
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        syncd_command(*args),
        env=env,
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


async def run_cli_async(
    *args: str, env: dict[str, str], limit_s: float = 90
) -> tuple[int, str, str]:
    """``run_cli`` for async tests: the event loop (and an in-loop sandbox) keeps turning."""
    process = await asyncio.create_subprocess_exec(
        *syncd_command(*args),
        env=env,
        cwd=REPO_ROOT,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(process.communicate(), limit_s)
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


def parse_status(text: str) -> dict[str, dict[str, Any]]:
    """``syncd status --json`` output by segment name.

    Accepts a bare array of rows or an object holding them under ``segments``
    (plus other keys such as ``orphans``, whose rows are included too).
    """
    document = json.loads(text)
    rows: list[Any] = []
    if isinstance(document, list):
        rows = document
    else:
        assert isinstance(document, dict), text
        for value in document.values():
            if isinstance(value, list):
                rows += value
    assert all(isinstance(row, dict) and "segment" in row for row in rows), text
    return {row["segment"]: row for row in rows}


def status_rows(env: dict[str, str]) -> dict[str, dict[str, Any]]:
    """``syncd status --json`` by segment name."""
    result = run_cli("status", "--json", env=env)
    assert result.returncode == 0, result.stderr
    return parse_status(result.stdout)


def parse_log_lines(text: str) -> list[dict[str, Any]]:
    """Every non-empty line must be one JSON object with timestamp, level and event."""
    events: list[dict[str, Any]] = []
    for line in text.splitlines():
        if not line.strip():
            continue
        try:
            event = json.loads(line)
        except ValueError:
            raise AssertionError(f"log line is not JSON: {line!r}") from None
        assert isinstance(event, dict), line
        for key in ("timestamp", "level", "event"):
            assert key in event, f"log line without {key}: {line}"
        events.append(event)
    return events


TERMINAL_EVENTS = ("segment.synced", "segment.failed", "segment.held")
TERMINAL_FIELDS = ("segment", "added", "removed", "skipped", "requests", "duration_s")


def check_run_endings(events: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Each segment run (run_id) ends with exactly one synced/failed (or held) line
    carrying all the fields.

    Returns the terminal line of each run, by run_id.
    """
    runs: dict[str, list[dict[str, Any]]] = {}
    for event in events:
        if "run_id" in event and "segment" in event:
            runs.setdefault(event["run_id"], []).append(event)
    endings: dict[str, dict[str, Any]] = {}
    for run_id, lines in runs.items():
        terminal = [e for e in lines if e["event"] in TERMINAL_EVENTS]
        assert len(terminal) == 1, f"run {run_id}: {len(terminal)} terminal lines: {lines}"
        for key in TERMINAL_FIELDS:
            assert key in terminal[0], f"run {run_id}: {terminal[0]} lacks {key}"
        assert lines[-1] is terminal[0], f"run {run_id}: lines after the terminal one"
        endings[run_id] = terminal[0]
    return endings


@dataclass
class DaemonProcess:
    """``syncd run`` as a subprocess, its stdout/stderr collected line by line."""

    env: dict[str, str]
    process: subprocess.Popen[str] = field(init=False)
    stdout: list[str] = field(default_factory=list)
    stderr: list[str] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _readers: list[threading.Thread] = field(default_factory=list)

    def start(self) -> DaemonProcess:
        self.process = subprocess.Popen(
            syncd_command("run"),
            env=self.env,
            cwd=REPO_ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        assert self.process.stdout is not None
        assert self.process.stderr is not None
        for stream, sink in (
            (self.process.stdout, self.stdout),
            (self.process.stderr, self.stderr),
        ):
            reader = threading.Thread(target=self._pump, args=(stream, sink), daemon=True)
            reader.start()
            self._readers.append(reader)
        return self

    def _pump(self, stream: Any, sink: list[str]) -> None:
        for line in stream:
            with self._lock:
                sink.append(line)

    def output(self) -> str:
        with self._lock:
            return "".join(self.stdout)

    def errors(self) -> str:
        with self._lock:
            return "".join(self.stderr)

    def events(self) -> list[dict[str, Any]]:
        with self._lock:
            lines = list(self.stdout)
        events = []
        for line in lines:
            try:
                event = json.loads(line)
            except ValueError:
                continue
            if isinstance(event, dict):
                events.append(event)
        return events

    def count(self, event: str, **fields: Any) -> int:
        return sum(
            1
            for e in self.events()
            if e.get("event") == event and all(e.get(k) == v for k, v in fields.items())
        )

    def wait_for(self, event: str, count: int = 1, timeout: float = 30, **fields: Any) -> None:
        def seen() -> bool:
            if self.process.poll() is not None:
                raise AssertionError(
                    f"syncd run exited ({self.process.returncode}) before {event}:\n"
                    + self.output()[-3000:]
                    + self.errors()[-3000:]
                )
            return self.count(event, **fields) >= count

        wait_until(seen, timeout, f"{count} x {event} {fields}")

    def terminate(self, timeout: float = 30) -> int:
        self.process.send_signal(signal.SIGTERM)
        return self.wait(timeout)

    def kill(self) -> None:
        self.process.kill()
        self.wait(10)

    def wait(self, timeout: float = 30) -> int:
        code = self.process.wait(timeout)
        for reader in self._readers:
            reader.join(5)
        return code


@pytest.fixture
def daemons() -> Iterator[Callable[[dict[str, str]], DaemonProcess]]:
    """Start ``syncd run`` processes; any still alive at the end are killed."""
    started: list[DaemonProcess] = []

    def start(env: dict[str, str]) -> DaemonProcess:
        daemon = DaemonProcess(env).start()
        started.append(daemon)
        return daemon

    yield start
    for daemon in started:
        if daemon.process.poll() is None:
            daemon.process.kill()
            daemon.process.wait(10)
