"""Processes the benchmarks start: the sandbox WalkMe, ``syncd sync``, state stores.

Every ``syncd sync`` is a separate process, waited for with ``os.wait4`` (by
``launcher.py``) so its own CPU time and peak RSS are known exactly
(``RUSAGE_CHILDREN`` would mix in the sandbox's, which holds every member in memory).
"""

from __future__ import annotations

import asyncio
import compileall
import contextlib
import hashlib
import itertools
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import asyncpg

import syncd
from tests.support.net import free_port
from tests.support.postgres import postgres_url
from tests.support.processes import base_env
from tests.support.settings import syncd_env

SYNC_TIMEOUT_S = 3600.0
LAUNCHER = Path(__file__).with_name("launcher.py")
_databases = itertools.count(1)


# ------------------------------------------------------------------------- sandbox


class Sandbox:
    """``python -m syncd.sandbox`` in its own process, on a free port of 127.0.0.1."""

    def __init__(self, log: Path, delay: float = 0.0) -> None:
        self._log_path = log
        self._delay = delay
        self._proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None
        self.url = ""

    def __enter__(self) -> Sandbox:
        port = free_port()
        command = [sys.executable, "-m", "syncd.sandbox", "--port", str(port)]
        if self._delay:
            command += ["--delay", str(self._delay)]
        self._log = self._log_path.open("wb")
        self._proc = subprocess.Popen(
            command, stdout=self._log, stderr=subprocess.STDOUT, env=_clean_env()
        )
        self.url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 30
        while True:
            try:
                self.state()
                return self
            except OSError:
                if self._proc.poll() is not None or time.monotonic() > deadline:
                    self.__exit__(None, None, None)
                    raise RuntimeError(
                        f"the sandbox did not start: {self._log_path.read_text()[-2000:]}"
                    ) from None
                time.sleep(0.05)

    def __exit__(self, *_: object) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.send_signal(signal.SIGTERM)
            try:
                self._proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        if self._log is not None:
            self._log.close()

    def state(self) -> dict[str, Any]:
        with urllib.request.urlopen(f"{self.url}/_sandbox/state", timeout=60) as answer:  # noqa: S310
            document: dict[str, Any] = json.load(answer)
        return document

    def cpu_seconds(self) -> float:
        """CPU time the sandbox has used so far (Linux /proc; 0 elsewhere)."""
        if self._proc is None:
            return 0.0
        try:
            stat = Path(f"/proc/{self._proc.pid}/stat").read_text()
        except OSError:
            return 0.0
        # Fields after the command name, which is in parentheses: utime, stime are 14, 15.
        fields = stat.rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def segment_requests(self) -> int:
        """Create and update requests so far (token and list requests do not count)."""
        by_kind = self.state()["requests"]["byKind"]
        return int(by_kind.get("create", 0)) + int(by_kind.get("update", 0))

    def sizes(self) -> dict[str, int]:
        """Members per segment, by segment name."""
        return {item["name"]: int(item["size"]) for item in self.state()["segments"]}



_code: Path | None = None  # where subprocesses import syncd from, once frozen


def freeze_code(folder: Path) -> str:
    """Copy the ``syncd`` package as it is now into ``folder``; every process started
    afterwards imports that copy, so edits to the working tree during a long run do
    not change what is measured halfway. Returns a digest of the copied sources."""
    global _code
    source = Path(syncd.__file__).resolve().parent
    target = folder / "syncd"
    shutil.copytree(source, target, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    compileall.compile_dir(target, quiet=1)  # no first-import compile inside a measurement
    digest = hashlib.sha256()
    for path in sorted(target.rglob("*.py")):
        digest.update(path.relative_to(folder).as_posix().encode() + b"\0" + path.read_bytes())
    _code = folder
    return digest.hexdigest()[:12]


def _with_code(env: dict[str, str]) -> dict[str, str]:
    """``env`` importing syncd from the frozen copy of the code, once there is one."""
    if _code is not None:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(_code), env.get("PYTHONPATH")]))
    return env


def _clean_env() -> dict[str, str]:
    """This environment without SYNCD_* variables: only what a case sets reaches syncd."""
    return _with_code(base_env())


# -------------------------------------------------------------------------- stores


async def _admin(url: str, statement: str) -> str:
    conn = await asyncpg.connect(url, timeout=30)
    try:
        return await conn.execute(statement)
    finally:
        await conn.close()


def postgres_version() -> str:
    try:
        conn_url = postgres_url()

        async def version() -> str:
            conn = await asyncpg.connect(conn_url, timeout=10)
            try:
                return str(await conn.fetchval("SHOW server_version"))
            finally:
                await conn.close()

        return asyncio.run(version())
    except (OSError, asyncpg.PostgresError) as exc:
        return f"unreachable ({exc})"


@contextlib.contextmanager
def fresh_store(kind: str, folder: Path) -> Iterator[str]:
    """A ``SYNCD_STATE_URL`` nobody used before; dropped (or deleted) afterwards."""
    if kind == "sqlite":
        yield "sqlite:///" + str((folder / "state.db").resolve())
        return
    assert kind == "postgresql", kind
    base = postgres_url()
    name = f"syncd_bench_{os.getpid()}_{next(_databases)}"
    asyncio.run(_admin(base, f'CREATE DATABASE "{name}"'))
    try:
        yield urllib.parse.urlsplit(base)._replace(path="/" + name).geturl()
    finally:
        asyncio.run(_admin(base, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


# ----------------------------------------------------------------------- syncd sync


@dataclass
class Measured:
    """One ``syncd sync`` process."""

    wall_s: float
    cpu_s: float
    peak_rss_mb: float
    exit_code: int
    outcomes: list[dict[str, Any]] = field(default_factory=list)  # segment.* end lines
    log: Path | None = None

    def errors(self) -> list[str]:
        shown = [
            f"{o.get('segment')}: {o.get('event')} {o.get('error') or o.get('reason') or ''}"
            for o in self.outcomes
            if o.get("event") != "segment.synced"
        ]
        return shown[:3]


def sync_env(
    api_url: str,
    state_url: str,
    mappings: Sequence[Mapping[str, Any]],
    work_dir: Path,
    **extra: object,
) -> dict[str, str]:
    """The environment of one ``syncd sync``: the sandbox, the store, the mappings."""
    defaults = {
        "segments": list(mappings),
        "state_url": state_url,
        "work_dir": work_dir,
        "admin_port": 0,
        "log_format": "json",
        "log_level": "info",
    }
    env = syncd_env(api_url, defaults | extra)
    return _with_code(env)


def run_sync(env: Mapping[str, str], log: Path, profile: Path | None = None) -> Measured:
    """Run ``python -m syncd sync`` once and measure the whole process.

    With ``profile``, py-spy records it (raw format) and the numbers are py-spy's
    process tree's, not comparable with unprofiled runs.
    """
    command = [sys.executable, "-m", "syncd", "sync"]
    if profile is not None:
        spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
        command = [spy, "record", "-f", "raw", "--threads", "--idle", "-r", "200"]
        command += ["-o", str(profile), "--", sys.executable, "-m", "syncd", "sync"]
    measured = run_process(command, env, log)
    measured.outcomes = _outcomes(log)
    return measured


def startup_seconds(folder: Path, repeats: int = 3) -> float:
    """Wall time of a Python process that only imports syncd's command line: the
    part of every ``syncd sync`` that no store or diff can make faster."""
    command = [sys.executable, "-c", "import syncd.cli"]
    log = folder / "startup.log"
    return min(run_process(command, _clean_env(), log).wall_s for _ in range(repeats))


def run_process(command: Sequence[str], env: Mapping[str, str], log: Path) -> Measured:
    """Run ``command`` with its output in ``log``; wall, CPU and peak RSS of it alone
    (measured by ``launcher.py``, see there why)."""
    result = log.with_suffix(".rusage.json")
    launcher = [sys.executable, str(LAUNCHER), str(result), str(SYNC_TIMEOUT_S), "--"]
    with log.open("wb") as out:
        subprocess.run(
            [*launcher, *command], env=dict(env), stdout=out, stderr=subprocess.STDOUT, check=True
        )
    usage = json.loads(result.read_text())
    return Measured(
        wall_s=usage["wall_s"],
        cpu_s=usage["cpu_s"],
        peak_rss_mb=usage["peak_rss_kb"] / 1024,
        exit_code=usage["exit_code"],
        log=log,
    )


def _outcomes(log: Path) -> list[dict[str, Any]]:
    ends = ("segment.synced", "segment.failed", "segment.held", "segment.internal_error")
    found: list[dict[str, Any]] = []
    for line in log.read_text(errors="replace").splitlines():
        if not line.startswith("{"):
            continue
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if isinstance(entry, dict) and entry.get("event") in ends:
            found.append(entry)
    return found
