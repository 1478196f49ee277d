"""syncd as subprocesses: one-shot commands and ``syncd run`` daemons."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from tests.support.logs import count_events, parse_events
from tests.support.waiting import wait_until

REPO_ROOT = Path(__file__).resolve().parents[2]


def syncd_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "syncd", *args]


def base_env() -> dict[str, str]:
    """The test process's environment without any SYNCD_* variable, unbuffered."""
    env = {k: v for k, v in os.environ.items() if not k.upper().startswith("SYNCD_")}
    env["PYTHONUNBUFFERED"] = "1"
    return env


def run_cli(
    *args: str, env: dict[str, str], timeout: float = 90, cwd: Path = REPO_ROOT
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        syncd_command(*args),
        env=env,
        cwd=cwd,
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
        streams = ((self.process.stdout, self.stdout), (self.process.stderr, self.stderr))
        for stream, sink in streams:
            reader = threading.Thread(target=self._pump, args=(stream, sink), daemon=True)
            reader.start()
            self._readers.append(reader)
        return self

    def _pump(self, stream: IO[str], sink: list[str]) -> None:
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
        return count_events(self.events(), event, **fields)

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

        wait_until(seen, timeout, f"{count} x {event} {fields}", step=0.02)

    def terminate(self, timeout: float = 30) -> int:
        """SIGTERM, then the exit status."""
        return self.timed_terminate(timeout)[0]

    def timed_terminate(self, timeout: float = 30) -> tuple[int, float]:
        """SIGTERM; returns the exit status and the seconds it took to exit."""
        started = time.monotonic()
        self.process.send_signal(signal.SIGTERM)
        code = self.wait(timeout)
        return code, time.monotonic() - started

    def kill(self) -> None:
        self.process.send_signal(signal.SIGKILL)
        self.wait(10)

    def kill_if_alive(self) -> None:
        """For fixtures' teardown: a daemon a failed test left running is killed."""
        if self.alive():
            self.process.kill()
            self.process.wait(10)

    def wait(self, timeout: float = 30) -> int:
        code = self.process.wait(timeout)
        for reader in self._readers:
            reader.join(5)
        return code
