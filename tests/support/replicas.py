"""The replica tests' harness: a WalkMe sandbox that remembers every applied id and
which replica sent it, and ``syncd run`` replicas as subprocesses."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import asyncpg

from syncd.sandbox import (
    AppliedChange,
    Faults,
    WalkMeSandbox,
    serve_in_thread,
)
from tests.support.logs import count_events, parse_events
from tests.support.net import free_port
from tests.support.settings import syncd_env

CLIENT_ID = "replicas-client"
# Distinctive, so a leak into any output would be found by a substring search.
CLIENT_SECRET = "replicas-S3cret-4b8e2f1a-never-print-me"


async def connect(url: str) -> asyncpg.Connection:
    return await asyncpg.connect(url, timeout=5)


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
        self.on_apply(self._note)

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> str:
        url = await super().start(host, port)
        for _ in range(self.extra_ports):
            self.ports.append(await self.listen_also(host))
        return url

    def arm_kill(self, pids_by_port: dict[int, int]) -> None:
        """The next batch (add/remove/override) WalkMe applies for any of these
        replicas gets that replica SIGKILLed before it is answered."""
        with self._applied_lock:
            self._armed = dict(pids_by_port)

    def _note(self, change: AppliedChange) -> None:
        # An apply hook: the list's order is the order WalkMe applied the changes in.
        if change.action == "delete":
            return
        port, guid, action = change.port, change.segment_guid, change.action
        with self._applied_lock:
            seq = len(self.applied)
            now = time.monotonic()
            self.applied.append(Applied(seq, now, port, guid, action, frozenset(change.ids)))
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
    work_dir: Path,
    admin_port: int | None = None,
    **settings: str,
) -> dict[str, str]:
    """The environment of one replica: WalkMe at the sandbox's ``api_port``, JSON logs,
    its own ``work_dir`` (made here) and admin port (a free one unless given)."""
    work_dir.mkdir(parents=True, exist_ok=True)
    defaults = {
        "state_url": state_url,
        "segments_file": segments_file,
        "admin_port": free_port() if admin_port is None else admin_port,
        "work_dir": work_dir,
        "log_format": "json",
    }
    return syncd_env(
        f"http://127.0.0.1:{api_port}",
        defaults | settings,
        client_id=CLIENT_ID,
        client_secret=CLIENT_SECRET,
    )


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
        return parse_events(self.stdout() + self.stderr())

    def count(self, event: str) -> int:
        return count_events(self.events(), event)

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
