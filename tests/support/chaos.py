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
import sqlite3
import subprocess
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from syncd.sandbox import Faults, RequestKind, WalkMeSandbox
from tests.support.ids import write_ids
from tests.support.processes import REPO_ROOT, DaemonProcess, syncd_command
from tests.support.settings import syncd_env

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


def storm(seed: int, *, retry_after: float, drop_rate: float, delay: float = 0.0) -> Faults:
    """The chaos tests' flaky WalkMe: a fifth of the segment calls answered with a server
    error, a tenth throttled (each 429's Retry-After, of ``retry_after`` seconds, given as
    delta-seconds or as an HTTP-date at random), ``drop_rate`` of the answers lost after
    WalkMe applied the call, and every segment call answered after ``delay``."""
    return Faults(
        seed=seed,
        error_rate=0.2,
        throttle_rate=0.1,
        retry_after=retry_after,
        retry_after_http_date=None,
        drop_rate=drop_rate,
        delay=delay,
    )


class ChaosSandbox(WalkMeSandbox):
    """The sandbox with the chaos credentials, plus the fault its ``Faults`` cannot aim:
    ``slow_on_create = (delay, seconds)`` turns WalkMe slow (every segment call
    answers after ``delay``) the moment the first create arrives, for ``seconds``.
    Stalls and dropped creates are the sandbox's own (``stall_write``,
    ``drop_after_apply``)."""

    def __init__(self, **kwargs: Any) -> None:
        kwargs.setdefault("client_id", CLIENT_ID)
        kwargs.setdefault("client_secret", CLIENT_SECRET)
        super().__init__(**kwargs)
        self.slow_on_create: tuple[float, float] | None = None
        self.slow_started_at: float | None = None
        self.on_request(self._slow_down_on_create)

    def writes(self) -> int:
        """Create and update requests the sandbox has recorded so far."""
        return self.count("create") + self.count("update")

    @property
    def retry_after_sent(self) -> list[str]:
        """Every ``Retry-After`` the sandbox sent, in order."""
        return [r.retry_after for r in list(self.requests) if r.retry_after is not None]

    def _slow_down_on_create(self, kind: RequestKind) -> None:
        if kind != "create" or self.slow_on_create is None:
            return
        delay, seconds = self.slow_on_create
        self.slow_on_create = None
        self.faults = Faults(delay=delay)
        self.slow_started_at = time.monotonic()
        asyncio.get_running_loop().call_later(seconds, self._back_to_normal)

    def _back_to_normal(self) -> None:
        self.faults = Faults()


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
        work = self.folder / "work"
        work.mkdir(exist_ok=True)
        defaults: dict[str, object] = {
            "segments": list(self.mappings if mappings is None else mappings),
            "state_url": "sqlite:///" + str(self.db_path),
            "schedule": "1h",
            "admin_port": 0,
            "retry_attempts": RETRY_ATTEMPTS,
            "retry_max_wait": RETRY_MAX_WAIT,
            "http_timeout": 10,
            "work_dir": work,
            # Secrets every chaos run holds, so the secrets check means something:
            # the webhook receiver is on, and a warehouse URL carries a password.
            "heap_webhook_secret": WEBHOOK_SECRET,
            "webhook_port": 0,
            "heap_auto_map": "false",
            "warehouse_url": WAREHOUSE_URL,
        }
        return syncd_env(
            self.sandbox.url, defaults | extra, client_id=CLIENT_ID, client_secret=CLIENT_SECRET
        )

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


def basic_auth() -> str:
    """The ``Authorization: Basic`` value syncd sends: a leak of it leaks the secret."""
    return base64.b64encode(f"{CLIENT_ID}:{CLIENT_SECRET}".encode()).decode()
