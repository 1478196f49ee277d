"""Processes the benchmarks start: the sandbox WalkMe, ``syncd sync``, the peer
script, ``syncd run`` with the Heap webhook receiver, state stores.

Every ``syncd sync`` (and every peer run) is a separate process, waited for with
``os.wait4`` (by ``launcher.py``) so its own CPU time and peak RSS are known exactly
(``RUSAGE_CHILDREN`` would mix in the sandbox's, which holds every member in memory).
A ``syncd run`` daemon lives across cycles, so what one sync costs it is read from
``/proc``: CPU time before and after, and the peak RSS since a reset of its
high-water mark (``clear_refs``).
"""

from __future__ import annotations

import asyncio
import compileall
import contextlib
import hashlib
import itertools
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.parse
import urllib.request
import uuid
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import IO, Any

import aiohttp
import asyncpg

import syncd
from tests.support.heap import WEBHOOK_PATH, WEBHOOK_SECRET, page, post_signed
from tests.support.logs import TERMINAL_EVENTS
from tests.support.postgres import postgres_url
from tests.support.processes import DaemonProcess, base_env
from tests.support.settings import syncd_env
from tests.support.waiting import wait_until

SYNC_TIMEOUT_S = 3600.0
LAUNCHER = Path(__file__).with_name("launcher.py")
PEER = Path(__file__).with_name("peer.py")
_databases = itertools.count(1)


# ------------------------------------------------------------------------- /proc


def cpu_seconds(pid: int) -> float:
    """CPU time process ``pid`` has used so far (Linux /proc; 0 elsewhere)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0.0
    # Fields after the command name, which is in parentheses: utime, stime are 14, 15.
    fields = stat.rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def reset_peak_rss(pid: int) -> None:
    """Start ``pid``'s peak RSS (VmHWM) again from its current RSS (Linux 4.0+)."""
    Path(f"/proc/{pid}/clear_refs").write_text("5")


def peak_rss_mb(pid: int) -> float:
    """``pid``'s peak RSS since it started or since ``reset_peak_rss``."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return 0.0


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
        # Port 0: the kernel picks one nobody holds (other test runs share this host's
        # port blocks); the sandbox prints the URL it listens on.
        command = [sys.executable, "-m", "syncd.sandbox", "--port", "0"]
        if self._delay:
            command += ["--delay", str(self._delay)]
        self._log = self._log_path.open("wb")
        self._proc = subprocess.Popen(
            command, stdout=self._log, stderr=subprocess.STDOUT, env=_clean_env()
        )
        deadline = time.monotonic() + 30
        while True:
            try:
                self.url = self.url or _listening_url(self._log_path)
                if self.url:
                    self.state()
                    return self
            except OSError:
                pass
            if self._proc.poll() is not None or time.monotonic() > deadline:
                self.__exit__(None, None, None)
                raise RuntimeError(
                    f"the sandbox did not start: {self._log_path.read_text()[-2000:]}"
                )
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
        return 0.0 if self._proc is None else cpu_seconds(self._proc.pid)

    def segment_requests(self) -> int:
        """Create and update requests so far (token and list requests do not count)."""
        by_kind = self.state()["requests"]["byKind"]
        return int(by_kind.get("create", 0)) + int(by_kind.get("update", 0))

    def sizes(self) -> dict[str, int]:
        """Members per segment, by segment name."""
        return {item["name"]: int(item["size"]) for item in self.state()["segments"]}

    def members(self, name: str) -> set[str] | None:
        """The members of the segment named ``name`` (None: no such segment)."""
        url = f"{self.url}/_sandbox/state?members=1"
        with urllib.request.urlopen(url, timeout=600) as answer:  # noqa: S310
            segments = json.load(answer)["segments"]
        found = [set(item["members"]) for item in segments if item["name"] == name]
        return found[0] if found else None



def _listening_url(log: Path) -> str:
    """The URL in the sandbox's "sandbox listening on URL" line, once printed."""
    for line in log.read_text(errors="replace").splitlines():
        if line.startswith("sandbox listening on "):
            return line.removeprefix("sandbox listening on ").strip()
    return ""


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
        if not shown and self.log is not None and self.log.exists():
            # A process without segment lines (the peer, a crash): its last words.
            lines = self.log.read_text(errors="replace").strip().splitlines()
            shown = lines[-1:]
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


def run_peer(api_url: str, name: str, source: Path, snapshot: Path, log: Path) -> Measured:
    """Run the peer script (``peer.py``) once for segment ``name`` against the WalkMe
    at ``api_url``, measured as ``run_sync`` measures ``syncd sync``."""
    command = [sys.executable, str(PEER), "--name", name, "--source", str(source)]
    return run_process([*command, "--snapshot", str(snapshot)], syncd_env(api_url, {}), log)


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


# ------------------------------------------------------------- syncd run, webhook


HEAP_SEGMENT_ID = 7_000_001  # the benchmark's Heap segment
HEAP_PAGE_IDS = 25_000  # adds + removes per page: Heap does not document its page size
DAEMON_START_S = 120.0


def heap_pages(
    adds: Sequence[str], removes: Sequence[str], per_page: int = HEAP_PAGE_IDS
) -> list[tuple[Sequence[str], Sequence[str]]]:
    """One Heap sync task's (adds, removes) per page, at most ``per_page`` ids a page
    (at least one page: an empty task still says "nothing changed")."""
    count = max(1, math.ceil((len(adds) + len(removes)) / per_page))
    step_adds, step_removes = math.ceil(len(adds) / count), math.ceil(len(removes) / count)
    return [
        (
            adds[index * step_adds : (index + 1) * step_adds],
            removes[index * step_removes : (index + 1) * step_removes],
        )
        for index in range(count)
    ]


class HeapDaemon:
    """``python -m syncd run`` with the Heap webhook receiver on and one mapping,
    ``name`` from Heap segment ``HEAP_SEGMENT_ID``. ``SYNCD_SCHEDULE`` is a day, so
    after the start-up cycle (which fails: no complete task from Heap yet) only the
    tasks posted here trigger syncs, ``debounce_s`` after their last page."""

    def __init__(
        self, api_url: str, state_url: str, name: str, work_dir: Path, debounce_s: float
    ) -> None:
        self.name = name
        self._port = 0  # the kernel picks it; heap.webhook_listening says which
        mapping = {
            "name": name,
            "source": {"type": "heap_webhook", "heap_segment_id": HEAP_SEGMENT_ID},
        }
        env = sync_env(
            api_url,
            state_url,
            [mapping],
            work_dir,
            schedule="1d",
            admin_host="127.0.0.1",
            heap_webhook_secret=WEBHOOK_SECRET,
            webhook_host="127.0.0.1",
            webhook_port=0,
            heap_webhook_debounce=debounce_s,
        )
        self._daemon = DaemonProcess(env)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._port}{WEBHOOK_PATH}"

    def __enter__(self) -> HeapDaemon:
        self._daemon.start()
        try:
            self._daemon.wait_for("heap.webhook_listening", timeout=DAEMON_START_S)
            listening = [e for e in self._daemon.events() if e["event"] == "heap.webhook_listening"]
            self._port = int(listening[0]["port"])
            self._daemon.wait_for("cycle.finished", timeout=DAEMON_START_S)
        except BaseException:
            self._daemon.kill_if_alive()
            raise
        return self

    def __exit__(self, *_: object) -> None:
        try:
            if self._daemon.alive():
                self._daemon.terminate(timeout=60)
        finally:
            self._daemon.kill_if_alive()

    def output(self) -> str:
        return self._daemon.output() + self._daemon.errors()

    def _run_endings(self) -> list[dict[str, Any]]:
        return [
            event
            for event in self._daemon.events()
            if event.get("event") in TERMINAL_EVENTS and event.get("segment") == self.name
        ]

    def sync_task(
        self, adds: Sequence[str], removes: Sequence[str], timeout_s: float = SYNC_TIMEOUT_S
    ) -> Measured:
        """Post one Heap sync task (its pages in order, signed) and measure the sync it
        triggers: wall from the last page's 200 answer to the run's end line's own
        timestamp; the daemon's CPU time and peak RSS over that span."""
        pid = self._daemon.process.pid
        seen = len(self._run_endings())
        started, cpu_before = asyncio.run(self._post_task(adds, removes, pid))
        ending: dict[str, Any] = {}

        def ended() -> bool:
            if not self._daemon.alive():
                raise RuntimeError(f"syncd run exited: {self.output()[-2000:]}")
            endings = self._run_endings()
            if len(endings) > seen:
                ending.update(endings[seen])
            return bool(ending)

        try:
            wait_until(ended, timeout_s, f"the end of {self.name!r}'s run", step=0.01)
        except AssertionError as exc:
            outcome = {"segment": self.name, "event": "no end of run", "error": str(exc)}
            return Measured(time.time() - started, 0.0, 0.0, 1, [outcome])
        ended_at = datetime.fromisoformat(ending["timestamp"]).timestamp()
        return Measured(
            wall_s=ended_at - started,
            cpu_s=cpu_seconds(pid) - cpu_before,
            peak_rss_mb=peak_rss_mb(pid),
            exit_code=0 if ending["event"] == "segment.synced" else 1,
            outcomes=[ending],
        )

    async def _post_task(
        self, adds: Sequence[str], removes: Sequence[str], pid: int
    ) -> tuple[float, float]:
        """Post the task's pages; at the last page's 200, the wall clock and the
        daemon's CPU time, and its peak RSS starts again from there."""
        pages = heap_pages(adds, removes)
        task = str(uuid.uuid4())
        timeout = aiohttp.ClientTimeout(total=SYNC_TIMEOUT_S)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            for number, (added, removed) in enumerate(pages, 1):
                body = page(
                    task=task,
                    number=number,
                    total=len(pages),
                    add=added,
                    remove=removed,
                    segment_id=HEAP_SEGMENT_ID,
                    name=self.name,
                )
                answer = await post_signed(session, self.url, body)
                if answer.status != 200:
                    raise RuntimeError(f"page {number}: HTTP {answer.status}: {answer.body}")
        answered = time.time()
        cpu_before = cpu_seconds(pid)
        reset_peak_rss(pid)
        return answered, cpu_before
