"""No source read may hold up a run, the other segments, or shutdown: a source
that hangs fails its own run after ``SYNCD_SOURCE_TIMEOUT``, and a shutdown stops
waiting for it at once.

A read hung in the kernel (a dead NFS mount) is made here by a file object whose
reads block until the test releases them; the run sees it as a regular file.
"""

from __future__ import annotations

import asyncio
import io
import os
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from syncd.app import open_runtime
from syncd.sandbox import WalkMeSandbox
from tests.support.harness import Harness, cli_env
from tests.support.ids import make_ids
from tests.support.processes import DaemonProcess

# The daemon subprocess's sitecustomize: io.open hands out hanging files for STUCK_PATH.
HANG_MODULE = '''
import io, os, threading

_real_open = io.open
_never = threading.Event()


class Stuck:
    def __init__(self, handle):
        self._handle = handle

    def read(self, *args):
        _never.wait()

    readline = read

    def __getattr__(self, name):
        return getattr(self._handle, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._handle.close()


def open_stuck(file, *args, **kwargs):
    handle = _real_open(file, *args, **kwargs)
    if os.readlink(f"/proc/self/fd/{handle.fileno()}") == os.environ["STUCK_PATH"]:
        return Stuck(handle)
    return handle


io.open = open_stuck
'''


class _StuckFile:
    """A file whose reads block until ``released`` is set, as on a dead NFS mount."""

    def __init__(self, handle: Any, released: threading.Event) -> None:
        self._handle = handle
        self._released = released

    def read(self, *args: Any) -> Any:
        self._released.wait()
        return self._handle.read(*args)

    def readline(self, *args: Any) -> Any:
        self._released.wait()
        return self._handle.readline(*args)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._handle, name)

    def __enter__(self) -> _StuckFile:
        return self

    def __exit__(self, *_: object) -> None:
        self._handle.close()


@pytest.fixture
def stuck(monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[list[Path], threading.Event]]:
    """Paths put in the list read as hung files until the event is set (at the end)."""
    paths: list[Path] = []
    released = threading.Event()
    real_open = io.open

    def open_maybe_stuck(file: Any, *args: Any, **kwargs: Any) -> Any:
        handle = real_open(file, *args, **kwargs)
        name = os.readlink(f"/proc/self/fd/{handle.fileno()}")
        if any(name == str(path) for path in paths):
            return _StuckFile(handle, released)
        return handle

    monkeypatch.setattr(io, "open", open_maybe_stuck)
    try:
        yield paths, released
    finally:
        released.set()


async def test_a_hung_file_read_fails_its_run_and_other_segments_sync(
    harness: Harness, stuck: tuple[list[Path], threading.Event]
) -> None:
    paths, _ = stuck
    good = make_ids(500)
    mappings = [harness.mapping("Stuck", make_ids(10)), harness.mapping("Good", good)]
    paths.append(harness.folder / "Stuck.txt")
    settings = harness.settings(mappings, source_timeout=1)
    started = time.monotonic()
    outcomes = {o.segment: o for o in await asyncio.wait_for(harness.sync(settings), 20)}
    assert time.monotonic() - started < 10
    stuck_run = outcomes["Stuck"]
    assert stuck_run.result == "failed"
    assert stuck_run.error == (
        f"file {paths[0]} did not answer within 1 s (SYNCD_SOURCE_TIMEOUT);"
        " the next run reads it again"
    )
    assert outcomes["Good"].result == "synced", outcomes["Good"].error
    assert harness.sandbox.members(harness.guid("Good")) == set(good)
    assert harness.sandbox.find(name="Stuck") is None


async def test_a_shutdown_stops_waiting_for_a_hung_read_at_once(
    harness: Harness, stuck: tuple[list[Path], threading.Event]
) -> None:
    paths, _ = stuck
    settings = harness.settings([harness.mapping("Stuck", make_ids(10))])
    paths.append(harness.folder / "Stuck.txt")
    async with open_runtime(settings, settings.mappings()) as runtime:
        run = asyncio.create_task(runtime.engine.sync_all())
        await asyncio.sleep(0.5)  # well into the (hung) read
        runtime.engine.stop()
        started = time.monotonic()
        [outcome] = await asyncio.wait_for(run, 10)
    assert time.monotonic() - started < 3
    assert (outcome.result, outcome.interrupted) == ("failed", True)
    assert outcome.error is not None
    assert "stopped by shutdown" in outcome.error


def test_sigterm_stops_the_daemon_while_a_file_read_hangs(
    live_sandbox: WalkMeSandbox,
    tmp_path: Path,
    daemons: Callable[[dict[str, str]], DaemonProcess],
) -> None:
    """A hung read's thread must not keep the process alive after SIGTERM."""
    stuck_path = tmp_path / "stuck.txt"
    stuck_path.write_text("a@x.com\n", encoding="utf-8")
    hooks = tmp_path / "hooks"
    hooks.mkdir()
    (hooks / "sitecustomize.py").write_text(HANG_MODULE, encoding="utf-8")
    mappings = [{"name": "Stuck", "source": {"type": "file", "path": str(stuck_path)}}]
    env = cli_env(live_sandbox.url, tmp_path, mappings, schedule="1h")
    env.update(STUCK_PATH=str(stuck_path), PYTHONPATH=str(hooks))
    daemon = daemons(env)
    daemon.wait_for("daemon.started")
    time.sleep(1)  # the first cycle is reading the stuck file by now
    try:
        code = daemon.terminate(timeout=10)
    except subprocess.TimeoutExpired:
        raise AssertionError("syncd run did not exit within 10 s of SIGTERM") from None
    assert code == 0, daemon.errors()
    assert daemon.count("daemon.stopped") == 1
    [failed] = [e for e in daemon.events() if e["event"] == "segment.failed"]
    assert failed["interrupted"] is True
    assert "stopped by shutdown" in failed["error"]
