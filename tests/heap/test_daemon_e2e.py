"""End to end through ``syncd run``: Heap pages in, debounced syncs out, SIGTERM.

The daemon is a real subprocess (``python -m syncd run``); the WalkMe sandbox runs
on a thread of the test process so its state can be read directly. With
``SYNCD_SCHEDULE=1h`` only the start-up cycle is scheduled: every later WalkMe
request comes from a webhook-triggered sync.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sys
import time
import zlib
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import pytest_asyncio

from syncd.sandbox import SANDBOX_SYSTEM_GUID, Faults, WalkMeSandbox, run_sandbox_in_thread
from tests.support.heap import (
    FREE_CUSTOMERS,
    WEBHOOK_PATH,
    WEBHOOK_SECRET,
    encode,
    heap_hash,
    new_task,
    page,
    post_signed,
)
from tests.support.net import free_port

CLIENT_ID = "e2e-client"
CLIENT_SECRET = "wm-client-secret-8d7c6b5a4f3e2d1c"
DEBOUNCE = 0.5
STARTUP_TIMEOUT = 20.0
SYNC_TIMEOUT = 20.0


@dataclass
class RunningDaemon:
    process: asyncio.subprocess.Process
    admin_port: int
    webhook_port: int
    path: str = WEBHOOK_PATH
    output: list[str] = field(default_factory=list)
    reader: asyncio.Task[None] | None = None

    @property
    def webhook_url(self) -> str:
        return f"http://127.0.0.1:{self.webhook_port}{self.path}"

    def text(self) -> str:
        return "\n".join(self.output)

    def events(self) -> list[dict[str, Any]]:
        found = []
        for line in self.output:
            with contextlib.suppress(ValueError):
                entry = json.loads(line)
                if isinstance(entry, dict):
                    found.append(entry)
        return found

    async def stop(self) -> int:
        if self.process.returncode is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            code = await asyncio.wait_for(self.process.wait(), timeout=20)
        finally:
            if self.process.returncode is None:
                self.process.kill()
                await self.process.wait()
            if self.reader is not None:
                await asyncio.wait_for(self.reader, timeout=5)
        return code


@pytest.fixture
def walkme() -> Iterator[WalkMeSandbox]:
    with run_sandbox_in_thread(client_id=CLIENT_ID, client_secret=CLIENT_SECRET) as sandbox:
        yield sandbox


async def _read_lines(stream: asyncio.StreamReader, sink: list[str]) -> None:
    while line := await stream.readline():
        sink.append(line.decode("utf-8", errors="replace").rstrip("\n"))


async def _start_daemon(
    tmp_path: Path, sandbox: WalkMeSandbox, extra_env: dict[str, str]
) -> RunningDaemon:
    env = {name: value for name, value in os.environ.items() if not name.startswith("SYNCD_")}
    admin_port, webhook_port = free_port(), free_port()
    env.update(
        {
            "SYNCD_WALKME_CLIENT_ID": CLIENT_ID,
            "SYNCD_WALKME_CLIENT_SECRET": CLIENT_SECRET,
            "SYNCD_WALKME_SYSTEM_GUID": SANDBOX_SYSTEM_GUID,
            "SYNCD_WALKME_API_URL": sandbox.url,
            "SYNCD_STATE_URL": "sqlite:///" + str(tmp_path / "state.db"),
            "SYNCD_SCHEDULE": "1h",
            "SYNCD_HEAP_WEBHOOK_SECRET": WEBHOOK_SECRET,
            "SYNCD_ADMIN_PORT": str(admin_port),
            "SYNCD_WEBHOOK_PORT": str(webhook_port),
            "SYNCD_HEAP_WEBHOOK_DEBOUNCE": str(DEBOUNCE),
            "SYNCD_LOG_FORMAT": "json",
            "SYNCD_LOG_LEVEL": "debug",
            "SYNCD_RETRY_ATTEMPTS": "3",
            "SYNCD_RETRY_MAX_WAIT": "1",
            **extra_env,
        }
    )
    if "SYNCD_HEAP_WEBHOOK_SECRET_FILE" in extra_env:
        del env["SYNCD_HEAP_WEBHOOK_SECRET"]
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "syncd",
        "run",
        cwd=tmp_path,
        env=env,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    assert process.stdout is not None
    path = extra_env.get("SYNCD_HEAP_WEBHOOK_PATH", WEBHOOK_PATH)
    daemon = RunningDaemon(process, admin_port, webhook_port, path)
    daemon.reader = asyncio.create_task(_read_lines(process.stdout, daemon.output))
    await _wait_until_listening(daemon)
    return daemon


async def _wait_until_listening(daemon: RunningDaemon) -> None:
    deadline = time.monotonic() + STARTUP_TIMEOUT
    timeout = aiohttp.ClientTimeout(total=2)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        while time.monotonic() < deadline:
            if daemon.process.returncode is not None:
                break
            try:
                async with session.get(f"http://127.0.0.1:{daemon.admin_port}/healthz") as admin:
                    healthy = admin.status == 200
                async with session.get(f"http://127.0.0.1:{daemon.webhook_port}/") as hook:
                    listening = hook.status == 404
                if healthy and listening:
                    return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.1)
    await asyncio.sleep(0.2)
    pytest.fail(
        f"syncd run did not start listening within {STARTUP_TIMEOUT} s"
        f" (exit code {daemon.process.returncode}); output:\n{daemon.text()}"
    )


@pytest_asyncio.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
        yield session


async def _wait_for(
    condition: Callable[[], bool], daemon: RunningDaemon, what: str, within: float = SYNC_TIMEOUT
) -> None:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if condition():
            return
        if daemon.process.returncode is not None:
            break
        await asyncio.sleep(0.1)
    pytest.fail(f"timed out waiting for {what}; daemon output:\n{daemon.text()[-6000:]}")


def _members(sandbox: WalkMeSandbox, **criteria: str) -> set[str] | None:
    record = sandbox.find(**criteria)
    return None if record is None else sandbox.members(record.guid)


def _segment_calls(sandbox: WalkMeSandbox) -> int:
    """Segment calls WalkMe has answered (the token call is never delayed)."""
    return sum(sandbox.count(kind) for kind in ("create", "update", "list", "delete"))


def _assert_no_secrets(daemon: RunningDaemon) -> None:
    text = daemon.text()
    assert WEBHOOK_SECRET not in text, "the Heap webhook secret appeared in syncd's output"
    assert CLIENT_SECRET not in text, "the WalkMe client secret appeared in syncd's output"


async def test_run_syncs_after_each_complete_heap_task(
    tmp_path: Path, walkme: WalkMeSandbox, http: aiohttp.ClientSession
) -> None:
    mapping = {
        "name": "Free Customers",
        "source": {"type": "heap_webhook", "heap_segment_id": FREE_CUSTOMERS},
    }
    daemon = await _start_daemon(tmp_path, walkme, {"SYNCD_SEGMENTS": json.dumps([mapping])})
    try:
        # The start-up cycle finds no complete Heap task: it must not touch WalkMe.
        await _wait_for(
            lambda: any(e.get("event") == "segment.failed" for e in daemon.events()),
            daemon,
            "the start-up cycle to report the segment as not ready",
        )
        assert walkme.requests == []

        first = {f"user{i:03d}@email.com" for i in range(30)} | {"zoë@exämple.com"}
        ordered = sorted(first)
        task = new_task()
        bodies = {
            number: page(task=task, number=number, total=3, add=ordered[number - 1 :: 3])
            for number in (1, 2, 3)
        }
        # Pages 2 and 3 (with a retry): the task is incomplete, so no sync may start.
        for number in (2, 3, 2):
            answer = await post_signed(http, daemon.webhook_url, bodies[number])
            assert answer.status == 200, answer.body
        await asyncio.sleep(DEBOUNCE * 3)
        assert walkme.requests == [], "a sync ran before Heap's task was complete"

        answer = await post_signed(http, daemon.webhook_url, bodies[1])
        assert answer.status == 200, answer.body
        await _wait_for(
            lambda: _members(walkme, name="Free Customers") == first,
            daemon,
            "the first Heap task to reach WalkMe",
        )

        # Heap's next sync: some users left, others joined.
        leaving = set(ordered[:10])
        joining = {"new1@email.com", "new2@email.com", "用户@例子.中国"}
        task = new_task()
        second = [
            page(task=task, number=1, total=2, remove=sorted(leaving)[:5], add=["new1@email.com"]),
            page(task=task, number=2, total=2, remove=sorted(leaving)[5:],
                 add=["new2@email.com", "用户@例子.中国"]),
        ]
        for body in reversed(second):
            answer = await post_signed(http, daemon.webhook_url, body)
            assert answer.status == 200, answer.body
        expected = (first - leaving) | joining
        await _wait_for(
            lambda: _members(walkme, name="Free Customers") == expected,
            daemon,
            "the second Heap task to reach WalkMe",
        )
        assert walkme.count("create") == 1
        assert len(walkme.segments) == 1
    finally:
        code = await daemon.stop()
    assert code == 0, daemon.text()[-4000:]
    _assert_no_secrets(daemon)
    events = [e.get("event") for e in daemon.events()]
    assert "daemon.stopped" in events


async def test_receiver_answers_fast_while_walkme_is_slow(
    tmp_path: Path, walkme: WalkMeSandbox, http: aiohttp.ClientSession
) -> None:
    """A sync stuck on a slow WalkMe must not hold up Heap's pages (auto-mapped segment).

    Also: the secret from SYNCD_HEAP_WEBHOOK_SECRET_FILE, a custom SYNCD_HEAP_WEBHOOK_PATH.
    """
    secret_file = tmp_path / "heap-webhook-secret"
    secret_file.write_text(WEBHOOK_SECRET + "\n", encoding="utf-8")
    daemon = await _start_daemon(  # no mapping: auto-map
        tmp_path,
        walkme,
        {
            "SYNCD_HEAP_WEBHOOK_SECRET_FILE": str(secret_file),
            "SYNCD_HEAP_WEBHOOK_PATH": "/hooks/heap-sync",
        },
    )
    heap_id = 9_001
    try:
        async with http.post(
            f"http://127.0.0.1:{daemon.webhook_port}{WEBHOOK_PATH}", data=b"{}"
        ) as default_path:
            assert default_path.status == 404  # only the configured path is served
        walkme.faults = Faults(delay=3.0)  # every segment call takes 3 s
        task = new_task()
        body = page(task=task, number=1, total=1, add=["slow1@x.com", "slow2@x.com"],
                    segment_id=heap_id, name="Slow Segment")
        answer = await post_signed(http, daemon.webhook_url, body)
        assert answer.status == 200, answer.body

        # The debounced sync has started: it holds a token and waits on WalkMe.
        await _wait_for(lambda: walkme.tokens_issued >= 1, daemon, "the sync to start", 10)
        task = new_task()
        timings = []
        for number in (1, 2):
            body = page(task=task, number=number, total=2, add=[f"fast{number}@x.com"],
                        remove=["slow1@x.com"] if number == 2 else [],
                        segment_id=heap_id, name="Slow Segment")
            answer = await post_signed(http, daemon.webhook_url, body)
            assert answer.status == 200, answer.body
            timings.append(answer.elapsed)
        assert _segment_calls(walkme) == 0, "WalkMe answered already; the test proves nothing"
        assert max(timings) < 2.0, f"receiver answered in {timings} s while WalkMe was slow"

        walkme.faults = Faults()  # WalkMe recovers
        expected = {"slow2@x.com", "fast1@x.com", "fast2@x.com"}
        await _wait_for(
            lambda: _members(walkme, external_id=str(heap_id)) == expected,
            daemon,
            "both Heap tasks to reach WalkMe",
        )
        record = walkme.find(external_id=str(heap_id))
        assert record is not None
        assert record.name == "Slow Segment"
        assert walkme.count("create") == 1
    finally:
        code = await daemon.stop()
    assert code == 0, daemon.text()[-4000:]
    _assert_no_secrets(daemon)


async def test_sigterm_during_a_slow_sync_exits_0(
    tmp_path: Path, walkme: WalkMeSandbox, http: aiohttp.ClientSession
) -> None:
    """Stopping waits for the request in flight, records it, and exits cleanly."""
    daemon = await _start_daemon(tmp_path, walkme, {})
    try:
        walkme.faults = Faults(delay=1.5)
        body = page(task=new_task(), number=1, total=1, add=["a@x.com"], segment_id=5,
                    name="Stopping")
        assert (await post_signed(http, daemon.webhook_url, body)).status == 200
        await _wait_for(lambda: walkme.tokens_issued >= 1, daemon, "the sync to start", 10)
    finally:
        started = time.monotonic()
        code = await daemon.stop()
    assert code == 0, daemon.text()[-4000:]
    assert time.monotonic() - started < 15
    _assert_no_secrets(daemon)


@pytest.mark.parametrize(
    ("heap_name", "walkme_name"),
    [("N" * 260, "N" * 200), ("N" * 199 + " tail", "N" * 199), ("Tab\tName\n", "Tab Name")],
    ids=["260-characters", "cut-leaves-a-space", "control-characters"],
)
async def test_heap_segment_with_an_overlong_name_does_not_stop_the_daemon(
    tmp_path: Path,
    walkme: WalkMeSandbox,
    http: aiohttp.ClientSession,
    heap_name: str,
    walkme_name: str,
) -> None:
    """Heap documents no limit on segment names; a mapping name allows 200 characters.

    The receiver accepts the page (200), so the name is in the state for good: that
    segment and the others must sync, and the daemon must still start the next time.
    """
    daemon = await _start_daemon(tmp_path, walkme, {})
    try:
        long_page = page(task=new_task(), number=1, total=1, add=["long@x.com"],
                         segment_id=61, name=heap_name)
        assert (await post_signed(http, daemon.webhook_url, long_page)).status == 200
        fine_page = page(task=new_task(), number=1, total=1, add=["fine@x.com"],
                         segment_id=62, name="Fine")
        assert (await post_signed(http, daemon.webhook_url, fine_page)).status == 200
        await _wait_for(
            lambda: _members(walkme, external_id="62") == {"fine@x.com"},
            daemon,
            "segment 62 to sync next to a Heap segment with an unusable name",
            within=10,
        )
        await _wait_for(
            lambda: _members(walkme, external_id="61") == {"long@x.com"},
            daemon,
            "the segment with the repaired name to sync",
            within=10,
        )
        record = walkme.find(external_id="61")
        assert record is not None
        assert record.name == walkme_name
    finally:
        code = await daemon.stop()
    assert code == 0, daemon.text()[-4000:]

    restarted = await _start_daemon(tmp_path, walkme, {})  # fails if the daemon cannot start
    assert await restarted.stop() == 0, restarted.text()[-4000:]


def _memory_kib(pid: int) -> dict[str, int]:
    """VmRSS (now) and VmHWM (the peak so far) of a process, in KiB."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            fields[key] = int(value.split()[0])
    return fields


def _gzip_bomb(inflated: int) -> bytes:
    """``inflated`` bytes of zeros, gzipped (about a thousandth of that)."""
    packer = zlib.compressobj(9, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
    block = bytes(1024 * 1024)
    parts = [packer.compress(block) for _ in range(inflated // len(block))]
    return b"".join([*parts, packer.flush()])


async def _hostile(url: str, kind: str, bomb: bytes, stop: asyncio.Event) -> int:
    """One hostile request of ``kind``; returns the status it was answered."""
    timeout = aiohttp.ClientTimeout(total=60)
    headers = {"Heap-Hash": "ts:1,hmac:AAAA", "Content-Type": "application/json"}
    body: Any
    if kind == "gzip-bomb":
        headers["Content-Encoding"] = "gzip"
        body = bomb
    elif kind == "deep-nesting":
        body = encode(page(task=new_task(), number=1, total=1))[:-1]
        body += b',"deep":' + b"[" * 100_000 + b"]" * 100_000 + b"}"
        headers["Heap-Hash"] = heap_hash(WEBHOOK_SECRET, int(time.time() * 1000), body)
    elif kind == "huge-chunked":

        async def huge() -> AsyncIterator[bytes]:
            block = b"x" * (1024 * 1024)
            for _ in range(64):  # twice the default 32 MiB limit, no Content-Length
                yield block

        body = huge()
    else:  # "slow": a byte now and then, never finishing until told to stop

        async def slow() -> AsyncIterator[bytes]:
            while not stop.is_set():
                yield b" "
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), 0.2)

        body = slow()
    async with (
        aiohttp.ClientSession(timeout=timeout) as session,
        session.post(url, data=body, headers=headers) as response,
    ):
        return response.status


async def test_hostile_requests_leave_memory_and_healthz_alone(
    tmp_path: Path, walkme: WalkMeSandbox, http: aiohttp.ClientSession
) -> None:
    """8 hostile requests at once (2 each: 1 GiB gzip bombs, signed pages nested 100,000
    deep, 64 MiB chunked bodies, slow senders) against ``syncd run`` with its default
    limits: its peak RSS stays under 150 MB and /healthz answers within 1 s throughout."""
    bomb = _gzip_bomb(1024 * 1024 * 1024)
    daemon = await _start_daemon(tmp_path, walkme, {"SYNCD_LOG_LEVEL": "info"})
    healthz = f"http://127.0.0.1:{daemon.admin_port}/healthz"
    stop = asyncio.Event()
    latencies: list[float] = []

    async def watch_healthz() -> None:
        while not stop.is_set():
            started = time.monotonic()
            async with http.get(healthz) as answer:
                assert answer.status == 200
            latencies.append(time.monotonic() - started)
            await asyncio.sleep(0.05)

    try:
        before = _memory_kib(daemon.process.pid)
        watcher = asyncio.create_task(watch_healthz())
        kinds = ["gzip-bomb", "deep-nesting", "huge-chunked", "slow"] * 2
        hostile = [
            asyncio.create_task(_hostile(daemon.webhook_url, kind, bomb, stop)) for kind in kinds
        ]
        finished = await asyncio.gather(*(task for task in hostile[:3] + hostile[4:7]))
        await asyncio.sleep(1.0)  # the slow senders are still connected
        after = _memory_kib(daemon.process.pid)
        fine = page(task=new_task(), number=1, total=1, add=["fine@x.com"], segment_id=8)
        assert (await post_signed(http, daemon.webhook_url, fine)).status == 200
        stop.set()
        await watcher
        slow = await asyncio.gather(hostile[3], hostile[7])
    finally:
        stop.set()
        code = await daemon.stop()
    peak_mb = after["VmHWM"] / 1024
    print(
        f"RSS before {before['VmRSS'] / 1024:.0f} MB, peak {peak_mb:.0f} MB;"
        f" /healthz: {len(latencies)} answers, slowest {max(latencies) * 1000:.0f} ms;"
        f" answers {finished} {slow}"
    )
    assert code == 0, daemon.text()[-4000:]
    assert finished == [415, 400, 413] * 2
    assert all(status >= 400 for status in slow)
    assert peak_mb < 150, f"peak RSS {peak_mb:.0f} MB under hostile requests"
    assert max(latencies) < 1.0, f"/healthz took {max(latencies):.2f} s under hostile requests"
