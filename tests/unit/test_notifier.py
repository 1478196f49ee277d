"""The notifier against a local receiver: delivery, retries with backoff, a receiver
that is down, refuses, redirects or hangs, and a shutdown that never waits long."""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator, Iterator, MutableMapping
from typing import Any

import pytest
import pytest_asyncio
import structlog
from pydantic import SecretStr

from syncd import metrics
from syncd.logs import forget_redaction, scrub
from syncd.notify import (
    ATTEMPTS,
    QUEUE_LIMIT,
    Notice,
    Notifier,
    describe_receiver,
    redact_receiver,
)
from tests.support.net import free_port
from tests.support.receiver import PATH, TOKEN, Answer, NotifyReceiver
from tests.support.waiting import wait_until_async

TIMEOUT_S = 0.5  # SYNCD_NOTIFY_TIMEOUT of these tests
BODY = {"text": "syncd: segment “Trial users” is failing", "syncd": {"event": "failing"}}


def notice(segment: str = "Trial users") -> Notice:
    return Notice(segment, "failing", BODY)


def notifier(url: str) -> Notifier:
    return Notifier(SecretStr(url), timeout_s=TIMEOUT_S, max_wait=0.01)


def count(result: str) -> float:
    value = metrics.REGISTRY.get_sample_value(
        "syncd_notifications_total", {"event": "failing", "result": result}
    )
    return value or 0.0


@pytest_asyncio.fixture
async def receiver() -> AsyncIterator[NotifyReceiver]:
    async with NotifyReceiver() as started:
        yield started


@contextlib.contextmanager
def sending_to(
    receiver: NotifyReceiver, answer: Answer
) -> Iterator[tuple[Notifier, list[MutableMapping[str, Any]]]]:
    """A notifier to ``receiver``, which answers ``answer`` from now on, and the log
    lines captured in the block."""
    receiver.answer = answer
    sender = notifier(receiver.url)
    with structlog.testing.capture_logs() as logs:
        yield sender, logs


async def sent_and_closed(url: str, *notices: Notice) -> list[MutableMapping[str, Any]]:
    """Send, close (the bounded wait at exit), and return the log lines."""
    with structlog.testing.capture_logs() as logs:
        sender = notifier(url)
        for each in notices:
            sender.send(each)
        await sender.close()
    return [line for line in logs if line["event"].startswith("notify.")]


async def test_a_message_is_posted_as_json_and_logged_without_the_url(
    receiver: NotifyReceiver,
) -> None:
    before = count("sent")
    logs = await sent_and_closed(receiver.url, notice())
    assert receiver.delivered() == [BODY]
    assert [line["event"] for line in logs] == ["notify.sent"]
    assert logs[0]["receiver"] == describe_receiver(receiver.url)
    assert logs[0]["receiver"].startswith("http://127.0.0.1:")
    assert (logs[0]["segment"], logs[0]["attempts"]) == ("Trial users", 1)
    assert TOKEN not in repr(logs)
    assert count("sent") == before + 1


def test_the_receiver_is_described_by_scheme_and_host_only() -> None:
    assert describe_receiver("https://hooks.slack.com/services/T/B/x?y=1") == (
        "https://hooks.slack.com"
    )
    assert describe_receiver("http://[::1]:8080" + PATH) == "http://[::1]:8080"


async def test_a_server_error_is_retried_until_the_receiver_answers(
    receiver: NotifyReceiver,
) -> None:
    with sending_to(receiver, "error") as (sender, logs):
        sender.send(notice())
        await wait_until_async(lambda: len(receiver.posted()) >= 2, 10, "a retry")
        receiver.answer = "ok"
        await sender.close()
    assert receiver.delivered() == [BODY]
    [line] = [line for line in logs if line["event"].startswith("notify.")]
    assert line["event"] == "notify.sent"
    assert line["attempts"] >= 3


async def test_a_receiver_that_is_down_is_a_failed_line_and_a_metric() -> None:
    before = count("failed")
    logs = await sent_and_closed(f"http://127.0.0.1:{free_port()}{PATH}", notice())
    [line] = logs
    assert line["event"] == "notify.failed"
    assert line["attempts"] == ATTEMPTS
    assert "cannot connect to http://127.0.0.1:" in line["error"]
    assert TOKEN not in repr(logs)
    assert count("failed") == before + 1


@pytest.mark.parametrize(
    ("answer", "words"), [("refuse", "HTTP 404 (not retried"), ("redirect", "redirect")]
)
async def test_a_refusal_or_a_redirect_is_not_tried_again(
    receiver: NotifyReceiver, answer: Any, words: str
) -> None:
    receiver.answer = answer
    [line] = await sent_and_closed(receiver.url, notice())
    assert line["event"] == "notify.failed"
    assert words in line["error"]
    assert line["attempts"] == 1
    assert len(receiver.posted()) == 1
    assert TOKEN not in line["error"]


async def test_sending_never_waits_and_a_hanging_receiver_holds_exit_only_so_long(
    receiver: NotifyReceiver,
) -> None:
    with sending_to(receiver, "hang") as (sender, logs):
        started = time.monotonic()
        for index in range(3):
            sender.send(notice(f"segment {index}"))
        assert time.monotonic() - started < 0.05  # queued, not sent
        await wait_until_async(lambda: bool(receiver.posted()), 10, "the first post")
        closing = time.monotonic()
        await sender.close()
        closed_in = time.monotonic() - closing
    assert closed_in < TIMEOUT_S + 0.5
    failed = [line for line in logs if line["event"] == "notify.failed"]
    assert [line["segment"] for line in failed] == ["segment 0", "segment 1", "segment 2"]
    assert all("stopped before" in line["error"] for line in failed)
    assert receiver.delivered() == []


async def test_a_full_queue_drops_the_message_with_a_line(receiver: NotifyReceiver) -> None:
    with sending_to(receiver, "hang") as (sender, logs):
        sender.send(notice())
        await wait_until_async(lambda: bool(receiver.posted()), 10, "a post in flight")
        for _ in range(QUEUE_LIMIT):
            sender.send(notice())
        sender.send(notice("one too many"))
        await sender.close()
    dropped = [line for line in logs if line.get("segment") == "one too many"]
    assert len(dropped) == 1
    assert "messages already wait" in dropped[0]["error"]


async def test_a_message_after_close_is_not_sent(receiver: NotifyReceiver) -> None:
    sender = notifier(receiver.url)
    await sender.close()
    with structlog.testing.capture_logs() as logs:
        sender.send(notice())
    assert [line["event"] for line in logs] == ["notify.failed"]
    assert receiver.posted() == []


def test_the_url_and_its_token_are_scrubbed_from_any_output() -> None:
    url = f"https://hooks.example.com{PATH}?sig=0a1b2c3d4e5f"
    redact_receiver(url)
    try:
        for shown in (url, PATH, "sig=0a1b2c3d4e5f", f"POST {PATH}?sig=0a1b2c3d4e5f failed"):
            assert TOKEN not in scrub(shown), shown
            assert "0a1b2c3d4e5f" not in scrub(shown), shown
        assert scrub("https://hooks.example.com") == "https://hooks.example.com"
    finally:
        for secret in (url, PATH, f"{PATH}?sig=0a1b2c3d4e5f", "sig=0a1b2c3d4e5f"):
            forget_redaction(secret)
