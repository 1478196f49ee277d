"""The chaos suite's harness: the real ``syncd`` (as subprocesses) against a sandbox
WalkMe on a thread of the test process, with faults injected.

Everything any chaos test prints (every ``syncd`` command, every daemon, every
``/metrics`` scrape) is kept in a session-wide transcript, together with every
access token any sandbox issued, so ``test_zz_secrets.py`` can search it all.

Convergence is always checked the same way (``Scenario.assert_converged``): each
segment in the sandbox equals its source exactly, there is one WalkMe segment per
mapping, and the snapshot (the SQLite database and ``syncd status --json``) equals
what the sandbox holds.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from syncd.sandbox import SANDBOX_SYSTEM_GUID, Faults, RequestKind, WalkMeSandbox, serve_in_thread

REPO_ROOT = Path(__file__).resolve().parents[2]

# Distinctive values, so a leak into any output is found by a plain substring search.
CLIENT_ID = "chaos-client"
CLIENT_SECRET = "chaos-S3cret-91d2b7e4-never-print-me"
WEBHOOK_SECRET = "chaos-whsec-5be0a1f7c3d94e26"
PG_PASSWORD = "chaos-pg-pw-7c1e0f93ab"
# Nothing listens there: a warehouse mapping pointing at it fails to connect.
WAREHOUSE_URL = f"postgresql://heapreader:{PG_PASSWORD}@127.0.0.1:1/heap"

RETRY_ATTEMPTS = 20  # generous: random faults never exhaust them
RETRY_MAX_WAIT = 1.0  # small: retries (and Retry-After, capped by it) stay fast
# A run ends with one of these; a run skipped (another holder has the lease) is one line.
TERMINAL_EVENTS = ("segment.synced", "segment.failed", "segment.held", "segment.skipped")
DROPPED = web.RequestKey("chaos_dropped", bool)  # the sandbox dropped this request's answer


# --------------------------------------------------------------------------- ids


def make_ids(n: int, prefix: str = "user", start: int = 0) -> list[str]:
    return [f"{prefix}{i:07d}@example.com" for i in range(start, start + n)]


def write_ids(path: Path, ids: Iterable[str]) -> Path:
    """Write a source file atomically: a running daemon never reads half of it."""
    partial = path.with_name(path.name + ".partial")
    partial.write_text("".join(f"{member}\n" for member in ids), encoding="utf-8")
    partial.replace(path)
    return path


def wait_until(
    condition: Callable[[], bool], timeout: float, message: str = "condition", step: float = 0.02
) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {message}")
        time.sleep(step)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def parse_events(text: str) -> list[dict[str, Any]]:
    """The JSON log lines of some output (anything else is ignored here)."""
    events: list[dict[str, Any]] = []
    for line in text.splitlines():
        try:
            event = json.loads(line)
        except ValueError:
            continue
        if isinstance(event, dict) and "event" in event:
            events.append(event)
    return events


def run_endings(events: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Each segment run (``run_id``) must end with exactly one terminal line, last."""
    runs: dict[str, list[dict[str, Any]]] = {}
    for event in events:
        if "run_id" in event and "segment" in event:
            runs.setdefault(event["run_id"], []).append(event)
    endings: dict[str, dict[str, Any]] = {}
    for run_id, lines in runs.items():
        terminal = [e for e in lines if e["event"] in TERMINAL_EVENTS]
        assert len(terminal) == 1, f"run {run_id}: {len(terminal)} terminal lines: {lines}"
        assert lines[-1] is terminal[0], f"run {run_id}: lines after the terminal one: {lines}"
        endings[run_id] = terminal[0]
    return endings


# ---------------------------------------------------------------- the sandbox


class ChaosSandbox(WalkMeSandbox):
    """The sandbox plus the few faults its ``Faults`` cannot aim precisely.

    - every access token it issues is kept (``issued_tokens``), even after it
      expired or was revoked, for the secrets check;
    - every ``Retry-After`` it sent is kept (``retry_after_sent``);
    - ``drop_creates``: that many creates are applied, then their connections
      dropped unanswered (the ambiguous create);
    - ``stall_write``: the first create/update from this number on (1-based,
      counting every create/update received) that WalkMe applies and answers
      has its answer held back for ``stall_s`` seconds (a request "in flight"
      for as long as a test needs); one request per arming;
    - ``slow_on_create``: (delay, seconds): WalkMe turns slow (every segment call
      answers after ``delay``) the moment the first create arrives, for ``seconds``.
    """

    def __init__(self, **kwargs: Any) -> None:
        kwargs.setdefault("client_id", CLIENT_ID)
        kwargs.setdefault("client_secret", CLIENT_SECRET)
        super().__init__(**kwargs)
        self.issued_tokens: list[str] = []
        self.retry_after_sent: list[str] = []
        self.drop_creates = 0
        self.writes_received = 0
        self.stall_write: int | None = None
        self.stall_s = 3.0
        self.stalled: list[tuple[str | None, list[str]]] = []  # (action, ids) per stall
        self.slow_on_create: tuple[float, float] | None = None
        self.slow_started_at: float | None = None

    def writes(self) -> int:
        """Create and update requests the sandbox has recorded so far."""
        return self.count("create") + self.count("update")

    async def _handle_token(self, request: web.Request) -> web.Response:
        response = await super()._handle_token(request)
        body = response.body
        if response.status == 200 and isinstance(body, bytes):
            token = json.loads(body).get("access_token")
            if isinstance(token, str):
                with self._lock:
                    self.issued_tokens.append(token)
        return response

    def _finish(self, request: web.Request, call: Any, response: web.Response) -> web.Response:
        retry_after = response.headers.get("Retry-After")
        if retry_after is not None:
            self.retry_after_sent.append(retry_after)
        if call.kind == "create" and call.applied and self.drop_creates > 0:
            self.drop_creates -= 1
            call.drop = True
        response = super()._finish(request, call, response)
        request[DROPPED] = bool(call.drop)
        return response

    async def _segment_call(
        self,
        request: web.Request,
        kind: RequestKind,
        operation: Callable[[web.Request, Any, str, bytes], web.Response],
    ) -> web.Response:
        number = None
        if kind in ("create", "update"):
            with self._lock:
                self.writes_received += 1
                number = self.writes_received
        if kind == "create" and self.slow_on_create is not None:
            delay, seconds = self.slow_on_create
            self.slow_on_create = None
            self.faults = Faults(delay=delay)
            self.slow_started_at = time.monotonic()
            asyncio.get_running_loop().call_later(seconds, self._back_to_normal)
        response = await super()._segment_call(request, kind, operation)
        if (
            number is not None
            and self.stall_write is not None
            and number >= self.stall_write
            and response.status < 300
            and not request.get(DROPPED, False)
        ):
            self.stall_write = None  # one request per arming
            body = json.loads(await request.read())
            ids = body.get("userIds")
            with self._lock:
                self.stalled.append((body.get("action", kind), list(ids or [])))
            await asyncio.sleep(self.stall_s)
        return response

    def _back_to_normal(self) -> None:
        self.faults = Faults()


# ---------------------------------------------------------------- the transcript


@dataclass
class Transcript:
    """Everything the chaos runs printed, and every token the sandboxes issued."""

    texts: list[tuple[str, str]] = field(default_factory=list)
    daemons: list[DaemonProcess] = field(default_factory=list)
    sandboxes: list[ChaosSandbox] = field(default_factory=list)

    def add(self, label: str, text: str) -> None:
        self.texts.append((label, text))

    def everything(self) -> list[tuple[str, str]]:
        texts = list(self.texts)
        for number, daemon in enumerate(self.daemons):
            texts.append((f"daemon {number} stdout", daemon.output()))
            texts.append((f"daemon {number} stderr", daemon.errors()))
        return texts

    def tokens(self) -> list[str]:
        return [token for sandbox in self.sandboxes for token in sandbox.issued_tokens]


@pytest.fixture(scope="session")
def transcript() -> Transcript:
    return Transcript()


# ---------------------------------------------------------------- syncd processes


def syncd_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "syncd", *args]


@dataclass
class DaemonProcess:
    """``syncd run`` as a subprocess, its stdout/stderr collected line by line."""

    env: dict[str, str]
    process: subprocess.Popen[str] = field(init=False)
    started_at: float = 0.0
    stdout: list[str] = field(default_factory=list)
    stderr: list[str] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _readers: list[threading.Thread] = field(default_factory=list)

    def start(self) -> DaemonProcess:
        self.started_at = time.monotonic()
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
        streams = ((self.process.stdout, self.stdout), (self.process.stderr, self.stderr))
        for stream, sink in streams:
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
        return parse_events(self.output())

    def count(self, event: str, **fields: Any) -> int:
        return sum(
            1
            for e in self.events()
            if e.get("event") == event and all(e.get(k) == v for k, v in fields.items())
        )

    def alive(self) -> bool:
        return self.process.poll() is None

    def wait_for(self, event: str, count: int = 1, timeout: float = 30, **fields: Any) -> None:
        def seen() -> bool:
            if not self.alive():
                raise AssertionError(
                    f"syncd run exited ({self.process.returncode}) before {event}:\n"
                    + self.output()[-3000:]
                    + self.errors()[-3000:]
                )
            return self.count(event, **fields) >= count

        wait_until(seen, timeout, f"{count} x {event} {fields}")

    def terminate(self, timeout: float = 30) -> tuple[int, float]:
        """SIGTERM; returns the exit status and the seconds it took to exit."""
        started = time.monotonic()
        self.process.send_signal(signal.SIGTERM)
        code = self.wait(timeout)
        return code, time.monotonic() - started

    def kill(self) -> None:
        self.process.send_signal(signal.SIGKILL)
        self.wait(10)

    def wait(self, timeout: float = 30) -> int:
        code = self.process.wait(timeout)
        for reader in self._readers:
            reader.join(5)
        return code


def fetch_text(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:  # noqa: S310 - http://127.0.0.1
            status: int = response.status
            return status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


# ---------------------------------------------------------------- one scenario


@dataclass
class Scenario:
    """A sandbox, a folder for sources and state, and the mappings of one test."""

    sandbox: ChaosSandbox
    folder: Path
    transcript: Transcript
    mappings: list[dict[str, Any]] = field(default_factory=list)
    started: list[DaemonProcess] = field(default_factory=list)

    @property
    def db_path(self) -> Path:
        return self.folder / "state.db"

    def path(self, name: str) -> Path:
        return self.folder / f"{name.replace(' ', '_')}.txt"

    def source(self, name: str, ids: Iterable[str]) -> Path:
        return write_ids(self.path(name), ids)

    def add_segment(self, name: str, ids: Iterable[str] = (), **extra: Any) -> Path:
        """A file-source mapping; writes ``ids`` to the segment's source file."""
        path = self.source(name, ids)
        self.mappings.append({"name": name, "source": {"type": "file", "path": str(path)}, **extra})
        return path

    def env(
        self, mappings: Sequence[dict[str, Any]] | None = None, **extra: object
    ) -> dict[str, str]:
        """The environment of a syncd subprocess; ``extra`` keys become SYNCD_<KEY>
        (a value of None removes the variable)."""
        env = {k: v for k, v in os.environ.items() if not k.upper().startswith("SYNCD_")}
        env["PYTHONUNBUFFERED"] = "1"
        work = self.folder / "work"
        work.mkdir(exist_ok=True)
        env.update(
            {
                "SYNCD_WALKME_CLIENT_ID": CLIENT_ID,
                "SYNCD_WALKME_CLIENT_SECRET": CLIENT_SECRET,
                "SYNCD_WALKME_SYSTEM_GUID": SANDBOX_SYSTEM_GUID,
                "SYNCD_WALKME_API_URL": self.sandbox.url,
                "SYNCD_SEGMENTS": json.dumps(list(self.mappings if mappings is None else mappings)),
                "SYNCD_STATE_URL": "sqlite:///" + str(self.db_path),
                "SYNCD_SCHEDULE": "1h",
                "SYNCD_ADMIN_PORT": "0",
                "SYNCD_RETRY_ATTEMPTS": str(RETRY_ATTEMPTS),
                "SYNCD_RETRY_MAX_WAIT": str(RETRY_MAX_WAIT),
                "SYNCD_HTTP_TIMEOUT": "10",
                "SYNCD_WORK_DIR": str(work),
                # Secrets every chaos run holds, so the secrets check means something:
                # the webhook receiver is on, and a warehouse URL carries a password.
                "SYNCD_HEAP_WEBHOOK_SECRET": WEBHOOK_SECRET,
                "SYNCD_WEBHOOK_PORT": "0",
                "SYNCD_HEAP_AUTO_MAP": "false",
                "SYNCD_WAREHOUSE_URL": WAREHOUSE_URL,
            }
        )
        for key, value in extra.items():
            name = f"SYNCD_{key.upper()}"
            if value is None:
                env.pop(name, None)
            else:
                env[name] = str(value)
        return env

    def syncd(
        self, *args: str, env: dict[str, str] | None = None, timeout: float = 120
    ) -> subprocess.CompletedProcess[str]:
        """One ``syncd`` command; its output goes into the transcript."""
        result = subprocess.run(
            syncd_command(*args),
            env=self.env() if env is None else env,
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        self.transcript.add(f"syncd {' '.join(args)} (exit {result.returncode})", result.stdout)
        self.transcript.add(f"syncd {' '.join(args)} stderr", result.stderr)
        return result

    def daemon(self, env: dict[str, str] | None = None) -> DaemonProcess:
        daemon = DaemonProcess(self.env() if env is None else env).start()
        self.started.append(daemon)
        self.transcript.daemons.append(daemon)
        return daemon

    def status(self, env: dict[str, str] | None = None) -> dict[str, dict[str, Any]]:
        """``syncd status --json`` rows (segments and orphans) by segment name."""
        result = self.syncd("status", "--json", env=env)
        assert result.returncode == 0, result.stdout + result.stderr
        document = json.loads(result.stdout)
        rows = [*document["segments"], *document["orphans"]]
        return {row["segment"]: row for row in rows}

    def snapshot(self, name: str) -> set[str]:
        """The members the SQLite snapshot holds for a segment."""
        with contextlib.closing(sqlite3.connect(self.db_path)) as conn:
            rows = conn.execute("SELECT id FROM members WHERE segment = ?", (name,)).fetchall()
        return {row[0] for row in rows}

    def quarantined(self, name: str) -> set[str]:
        with contextlib.closing(sqlite3.connect(self.db_path)) as conn:
            rows = conn.execute("SELECT id FROM quarantine WHERE segment = ?", (name,)).fetchall()
        return {row[0] for row in rows}

    def named(self, name: str) -> list[str]:
        """GUIDs of the sandbox segments with this name."""
        return [s["guid"] for s in self.sandbox.state()["segments"] if s["name"] == name]

    def members(self, name: str) -> set[str]:
        guids = self.named(name)
        assert len(guids) == 1, f"{len(guids)} WalkMe segments named {name!r}"
        return self.sandbox.members(guids[0])

    def converged(self, expected: dict[str, set[str]]) -> bool:
        """Every expected segment exists once in the sandbox with exactly its members."""
        for name, ids in expected.items():
            guids = self.named(name)
            if len(guids) != 1 or self.sandbox.size(guids[0]) != len(ids):
                return False
            if self.sandbox.members(guids[0]) != ids:
                return False
        return True

    def problems(self, expected: dict[str, set[str]], *, only_these: bool = True) -> list[str]:
        """What differs between sources, sandbox and snapshot (empty: converged).

        ``only_these``: the sandbox must hold no other segment than those expected.
        """
        found: list[str] = []
        segments = self.sandbox.state()["segments"]
        if only_these:
            extra = sorted({s["name"] for s in segments} - set(expected))
            if extra:
                found.append(f"unexpected WalkMe segments: {extra}")
        rows = self.status()
        for name, ids in expected.items():
            guids = [s["guid"] for s in segments if s["name"] == name]
            if len(guids) != 1:
                found.append(f"{name}: {len(guids)} WalkMe segments with this name")
                continue
            held = self.sandbox.members(guids[0])
            if held != ids:
                found.append(
                    f"{name}: WalkMe holds {len(held)} members, the source {len(ids)};"
                    f" missing {len(ids - held)} (e.g. {sorted(ids - held)[:3]}),"
                    f" extra {len(held - ids)} (e.g. {sorted(held - ids)[:3]})"
                )
            snap = self.snapshot(name)
            if snap != held:
                found.append(
                    f"{name}: the snapshot holds {len(snap)} members, WalkMe {len(held)};"
                    f" not in WalkMe {len(snap - held)} (e.g. {sorted(snap - held)[:3]}),"
                    f" not in the snapshot {len(held - snap)} (e.g. {sorted(held - snap)[:3]})"
                )
            row = rows.get(name, {})
            if row.get("members") != len(held):
                found.append(
                    f"{name}: status says {row.get('members')} members, WalkMe {len(held)}"
                )
            if row.get("segment_guid") != guids[0]:
                found.append(f"{name}: status GUID {row.get('segment_guid')}, WalkMe {guids[0]}")
        return found

    def assert_converged(self, expected: dict[str, set[str]], *, only_these: bool = True) -> None:
        problems = self.problems(expected, only_these=only_these)
        assert not problems, "not converged:\n" + "\n".join(problems)


ScenarioFactory = Callable[..., Scenario]


@pytest.fixture
def make_scenario(tmp_path: Path, transcript: Transcript) -> Iterator[ScenarioFactory]:
    """``make_scenario(**ChaosSandbox kwargs)``: a running sandbox and a folder.

    Daemons still alive at the end are killed; sandboxes are stopped.
    """
    stack = contextlib.ExitStack()
    made: list[Scenario] = []

    def make(**kwargs: Any) -> Scenario:
        sandbox = ChaosSandbox(**kwargs)
        stack.enter_context(serve_in_thread(sandbox))
        transcript.sandboxes.append(sandbox)
        folder = tmp_path / f"scenario{len(made) + 1}"
        folder.mkdir()
        scenario = Scenario(sandbox, folder, transcript)
        made.append(scenario)
        return scenario

    with stack:
        yield make
        for scenario in made:
            for daemon in scenario.started:
                if daemon.alive():
                    daemon.process.kill()
                    daemon.process.wait(10)


def basic_auth() -> str:
    """The ``Authorization: Basic`` value syncd sends: a leak of it leaks the secret."""
    return base64.b64encode(f"{CLIENT_ID}:{CLIENT_SECRET}".encode()).decode()
