"""Messages for a person (``SYNCD_NOTIFY_URL``), end to end against the sandbox and a
local receiver: one message per change of a segment's standing, the quarantine,
a receiver that is down or hangs, ``syncd sync`` and a restarted ``syncd run``."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest_asyncio
import structlog

from syncd.sandbox import WalkMeSandbox, serve_in_thread
from syncd.settings import Settings
from tests.support.harness import CLIENT_SECRET, Harness, HarnessFactory, assert_no_secrets, cli_env
from tests.support.ids import make_ids, write_ids
from tests.support.logs import parse_log_lines, run_endings
from tests.support.net import free_port
from tests.support.processes import DaemonProcess, run_cli_async
from tests.support.receiver import TOKEN, NotifyReceiver
from tests.support.waiting import wait_until

StartDaemon = Callable[[dict[str, str]], DaemonProcess]
NOTIFY_TIMEOUT_S = 1.0


@pytest_asyncio.fixture
async def receiver() -> AsyncIterator[NotifyReceiver]:
    async with NotifyReceiver() as started:
        yield started


BINARY = ["\x00"]  # a source that fails every run: "contains NUL bytes"


def notifying(harness: Harness, url: str, mappings: list[dict[str, Any]], **extra: Any) -> Settings:
    values = {"notify_after_failures": 2, "notify_timeout": NOTIFY_TIMEOUT_S} | extra
    return harness.settings(mappings, notify_url=url, **values)


def facts(receiver: NotifyReceiver) -> list[dict[str, Any]]:
    return [body["syncd"] for body in receiver.delivered()]


async def test_failing_is_told_once_after_two_failed_runs_then_recovered(
    harness: Harness, receiver: NotifyReceiver
) -> None:
    settings = notifying(harness, receiver.url, [harness.mapping("Trial users", make_ids(50))])
    assert (await harness.sync_one(settings)).result == "synced"
    harness.source("Trial users", BINARY)

    for run in range(1, 5):
        assert (await harness.sync_one(settings)).result == "failed"
        expected = [] if run < 2 else [("Trial users", "failing")]
        assert receiver.events() == expected, f"after failed run {run}"
    [failing] = facts(receiver)
    assert failing["failures"] == 2
    assert "NUL bytes" in failing["error"]
    assert failing["command"] == "syncd history --segment 'Trial users'"
    assert failing["last_success_at"] is not None

    harness.source("Trial users", make_ids(51))
    for _ in range(2):
        assert (await harness.sync_one(settings)).result == "synced"
    assert receiver.events() == [("Trial users", "failing"), ("Trial users", "recovered")]
    recovered = facts(receiver)[1]
    assert (recovered["previous"], recovered["members"], recovered["added"]) == ("failing", 51, 1)
    assert_no_secrets(harness.sandbox, repr(receiver.posted()))


async def test_held_is_told_once_with_the_force_command_then_recovered(
    harness: Harness, receiver: NotifyReceiver
) -> None:
    full = make_ids(200)
    mapping = harness.mapping("Guarded", full)
    settings = notifying(harness, receiver.url, [mapping])
    await harness.sync_one(settings)

    for _ in range(2):
        assert (await harness.sync_changed(settings, "Guarded", full[:20])).result == "held"
    assert receiver.events() == [("Guarded", "held")]
    [held] = facts(receiver)
    assert held["command"] == "syncd sync --segment Guarded --force"
    assert (held["planned_removes"], held["snapshot_members"], held["source_ids"]) == (
        180,
        200,
        20,
    )
    assert "`syncd sync --segment Guarded --force`" in receiver.delivered()[0]["text"]

    assert (await harness.sync_changed(settings, "Guarded", full)).result == "synced"
    assert receiver.events() == [("Guarded", "held"), ("Guarded", "recovered")]
    assert facts(receiver)[1]["previous"] == "held"


async def test_quarantined_ids_are_told_once_with_the_examples(
    make_harness: HarnessFactory, receiver: NotifyReceiver
) -> None:
    harness = await make_harness(rejected_ids=["bad-1@example.com", "bad-2@example.com"])
    ids = [*make_ids(30), "bad-1@example.com", "bad-2@example.com"]
    settings = notifying(harness, receiver.url, [harness.mapping("Mixed", ids)])
    outcome = await harness.sync_one(settings)
    assert (outcome.result, outcome.quarantined) == ("synced", 2)
    assert (await harness.sync_one(settings)).result == "synced"  # nothing new set aside
    assert receiver.events() == [("Mixed", "quarantined")]
    [told] = facts(receiver)
    assert sorted(told["examples"]) == ["bad-1@example.com", "bad-2@example.com"]
    assert (told["quarantined"], told["quarantined_total"]) == (2, 2)
    assert told["command"] == "syncd status"


async def test_a_hanging_receiver_neither_fails_nor_holds_up_a_sync(
    harness: Harness, receiver: NotifyReceiver
) -> None:
    receiver.answer = "hang"
    mapping = harness.mapping("Stuck", BINARY)
    settings = notifying(harness, receiver.url, [mapping], notify_after_failures=1)
    with structlog.testing.capture_logs() as logs:
        started = time.monotonic()
        outcome = await harness.sync_one(settings)
        took = time.monotonic() - started
    assert outcome.result == "failed"
    assert "NUL bytes" in (outcome.error or "")
    # The run itself did not wait; leaving waited at most SYNCD_NOTIFY_TIMEOUT for it.
    assert outcome.duration_s < 1
    assert took < outcome.duration_s + NOTIFY_TIMEOUT_S + 1.5
    [failed] = [line for line in logs if line["event"] == "notify.failed"]
    assert (failed["segment"], failed["notice"]) == ("Stuck", "failing")
    assert "stopped before it was delivered" in failed["error"]
    assert len(receiver.posted()) == 1
    assert receiver.delivered() == []


async def test_a_receiver_that_is_down_is_logged_and_the_standing_still_moves_on(
    harness: Harness,
) -> None:
    mapping = harness.mapping("Alone", BINARY)
    down = f"http://127.0.0.1:{free_port()}/services/{TOKEN}"
    settings = notifying(harness, down, [mapping], notify_after_failures=1)
    with structlog.testing.capture_logs() as logs:
        assert (await harness.sync_one(settings)).result == "failed"
        assert (await harness.sync_one(settings)).result == "failed"
    failed = [line for line in logs if line["event"] == "notify.failed"]
    # Told (and lost) once: a receiver that was down is not a reason to say it again.
    assert len(failed) == 1
    assert "cannot connect to http://127.0.0.1:" in failed[0]["error"]
    assert TOKEN not in repr(logs)


async def test_syncd_sync_sends_before_it_exits_and_a_hang_delays_it_a_bounded_time(
    harness: Harness, receiver: NotifyReceiver
) -> None:
    mapping = harness.mapping("Cli", BINARY)
    env = cli_env(
        harness.sandbox.url,
        harness.folder,
        [mapping],
        notify_url=receiver.url,
        notify_after_failures=1,
        notify_timeout=NOTIFY_TIMEOUT_S,
    )
    code, out, err = await run_cli_async("sync", env=env)
    assert code == 1, err
    assert receiver.events() == [("Cli", "failing")]  # delivered before the exit

    receiver.answer = "hang"
    harness.source("Cli", make_ids(10))
    started = time.monotonic()
    code, out, err = await run_cli_async("sync", env=env)
    took = time.monotonic() - started
    assert code == 0, err  # the message that could not be sent changes no exit status
    assert took < 10
    assert "notify.failed" in err
    assert [body["syncd"]["event"] for body in receiver.posted()] == ["failing", "recovered"]
    assert TOKEN not in out + err
    assert CLIENT_SECRET not in out + err


def test_a_restarted_daemon_never_repeats_a_message(
    live_sandbox: WalkMeSandbox, tmp_path: Path, daemons: StartDaemon
) -> None:
    source = write_ids(tmp_path / "restarts.txt", make_ids(20))
    mapping = {"name": "Restarts", "source": {"type": "file", "path": str(source)}}
    with serve_in_thread(NotifyReceiver()) as receiver:
        env = cli_env(
            live_sandbox.url,
            tmp_path,
            [mapping],
            schedule="1s",
            notify_url=receiver.url,
            notify_after_failures=2,
            notify_timeout=NOTIFY_TIMEOUT_S,
        )
        first = daemons(env)
        first.wait_for("segment.synced")
        source.unlink()
        first.wait_for("notify.sent", notice="failing")
        first.wait_for("segment.failed", count=3)
        assert first.terminate() == 0

        # Still failing after the restart: told already, so nothing is said again.
        second = daemons(env)
        second.wait_for("segment.failed", count=3)
        assert receiver.events() == [("Restarts", "failing")]
        write_ids(source, make_ids(21))
        second.wait_for("notify.sent", notice="recovered")
        second.wait_for("segment.synced", count=2)
        assert second.terminate() == 0

        third = daemons(env)
        third.wait_for("segment.synced", count=2)
        assert third.terminate() == 0
        assert receiver.events() == [("Restarts", "failing"), ("Restarts", "recovered")]
        bodies = repr(receiver.posted())

    outputs = [daemon.output() + daemon.errors() for daemon in (first, second, third)]
    for daemon in (first, second, third):
        # The sender's lines belong to no run: each run still ends with its own line.
        run_endings(parse_log_lines(daemon.output()))
    assert TOKEN not in "".join(outputs)
    assert_no_secrets(live_sandbox, bodies, *outputs)


def test_a_hanging_receiver_delays_a_daemons_stop_a_bounded_time(
    live_sandbox: WalkMeSandbox, tmp_path: Path, daemons: StartDaemon
) -> None:
    source = write_ids(tmp_path / "stuck.txt", BINARY)
    mapping = {"name": "Stuck", "source": {"type": "file", "path": str(source)}}
    with serve_in_thread(NotifyReceiver("hang")) as receiver:
        env = cli_env(
            live_sandbox.url,
            tmp_path,
            [mapping],
            notify_url=receiver.url,
            notify_after_failures=1,
            notify_timeout=NOTIFY_TIMEOUT_S,
        )
        daemon = daemons(env)
        wait_until(lambda: bool(receiver.posted()), 30, "the message on its way")
        code, took = daemon.timed_terminate()
    assert code == 0
    assert took < NOTIFY_TIMEOUT_S + 5
    events = [event["event"] for event in parse_log_lines(daemon.output())]
    assert events[-1] == "daemon.stopped"
    assert events.index("notify.failed") < events.index("daemon.stopped")
