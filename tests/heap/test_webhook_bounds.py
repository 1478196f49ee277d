"""What the webhook receiver refuses, over real HTTP on 127.0.0.1: every input a
sender controls is bounded before it costs memory, reaches the store or a log line.

Deterministically bad requests get a 4xx (Heap retries anything else for ever);
only a transient condition gets a 5xx.
"""

from __future__ import annotations

import asyncio
import gzip
import json
import zlib
from collections.abc import AsyncIterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import pytest_asyncio
import structlog

from syncd.engine import auto_mapping
from syncd.ids import NotAnId, SkippedIds, clean_ids
from syncd.settings import ConfigError, parse_mappings, segment_name_problem
from tests.support.heap import (
    FREE_CUSTOMERS,
    WEBHOOK_PATH,
    WEBHOOK_SECRET,
    Receiver,
    assert_refused,
    encode,
    heap_hash,
    heap_members,
    heap_state,
    new_task,
    nothing_stored,
    now_ms,
    page,
    page_with,
    post_escaped,
    post_raw,
    post_signed,
    start_receiver,
)
from tests.support.postgres import create_database, drop_database, postgres_url, url_for_database


@pytest_asyncio.fixture
async def roomy(tmp_path: Path) -> AsyncIterator[Receiver]:
    """A receiver taking bodies of up to 4 MiB, for hostile bodies of a megabyte."""
    running = await start_receiver(tmp_path, max_body=4 * 1024 * 1024)
    try:
        yield running
    finally:
        await running.stop()


# ------------------------------------------------------------------------ compressed bodies


@pytest.mark.parametrize("encoding", ["gzip", "deflate", "GZIP", "br", "gzip, identity"])
async def test_compressed_body_is_415_and_never_inflated(
    receiver: Receiver, http: aiohttp.ClientSession, encoding: str
) -> None:
    """Signed over the plain JSON, so a receiver that inflated it would store the page."""
    plain = encode(page(task=new_task(), number=1, total=1, add=["zip@x.com"]))
    packed = zlib.compress(plain) if encoding == "deflate" else gzip.compress(plain)
    answer = await post_raw(
        http,
        receiver.url,
        packed,
        header=heap_hash(WEBHOOK_SECRET, now_ms(), plain),
        headers={"Content-Encoding": encoding},
    )
    await assert_refused(receiver, answer, 415)


async def test_gzip_bomb_is_refused_without_reading_it(
    receiver: Receiver, http: aiohttp.ClientSession
) -> None:
    """64 MiB of zeros packs into ~64 KiB; the fixture's max_body is 64 KiB of *any* bytes."""
    bomb = gzip.compress(b"0" * (64 * 1024 * 1024), compresslevel=9)
    answer = await post_raw(
        http, receiver.url, bomb, header="ts:1,hmac:AAAA", headers={"Content-Encoding": "gzip"}
    )
    assert answer.status == 415, answer.body


async def test_only_identity_content_encoding_is_read(
    receiver: Receiver, http: aiohttp.ClientSession
) -> None:
    body = encode(page(task=new_task(), number=1, total=1, add=["plain@x.com"]))
    answers = [
        await post_raw(
            http,
            receiver.url,
            gzip.compress(body) if encoding == "gzip" else body,
            header=heap_hash(WEBHOOK_SECRET, now_ms(), body),
            headers={"Content-Encoding": encoding},
        )
        for encoding in ("identity", "gzip")
    ]
    assert [answer.status for answer in answers] == [200, 415]
    assert await heap_members(receiver.store, FREE_CUSTOMERS) == {"plain@x.com"}


async def _raw_request(receiver: Receiver, head: str, body: bytes) -> bytes:
    """Send bytes no HTTP client library would; return the status line."""
    reader, writer = await asyncio.open_connection("127.0.0.1", receiver.receiver.port)
    try:
        writer.write(head.replace("\n", "\r\n").encode() + b"\r\n" + body)
        await writer.drain()
        return await asyncio.wait_for(reader.readline(), 10)
    finally:
        writer.close()


async def test_content_encoding_given_twice_is_415(receiver: Receiver) -> None:
    plain = encode(page(task=new_task(), number=1, total=1, add=["zip@x.com"]))
    packed = gzip.compress(plain)
    head = (
        f"POST {WEBHOOK_PATH} HTTP/1.1\nHost: syncd\nContent-Length: {len(packed)}\n"
        f"Content-Encoding: identity\nContent-Encoding: gzip\n"
        f"Heap-Hash: {heap_hash(WEBHOOK_SECRET, now_ms(), plain)}\n"
    )
    assert b" 415 " in await _raw_request(receiver, head, packed)
    await nothing_stored(receiver)


async def test_malformed_http_is_400_with_one_short_log_line(
    receiver: Receiver, caplog: pytest.LogCaptureFixture
) -> None:
    """aiohttp's own complaint quotes the bytes it choked on: it must stay one short line."""
    bomb = gzip.compress(bytes(10_000_000))
    head = f"POST {WEBHOOK_PATH} HTTP/1.1\nHost: syncd\nTransfer-Encoding: gzip\n"
    with caplog.at_level("DEBUG", logger="syncd.webhook.http"):
        assert b" 400 " in await _raw_request(receiver, head, bomb)
        await asyncio.sleep(0.1)
    records = [r for r in caplog.records if r.name == "syncd.webhook.http"]
    assert records, "aiohttp logged nothing: the test proves nothing"
    for record in records:
        assert record.exc_info is None
        assert record.levelname == "WARNING"
        assert len(record.getMessage()) < 400
        assert "\n" not in record.getMessage()


# ------------------------------------------------------------------------ slow and many senders


async def _stalled_post(url: str, head: bytes, stalled: asyncio.Event) -> int:
    """Send ``head`` of a chunked body, then nothing until ``stalled`` is set."""

    async def stream() -> AsyncIterator[bytes]:
        yield head
        await stalled.wait()
        yield b"}"

    timeout = aiohttp.ClientTimeout(total=30)
    async with (
        aiohttp.ClientSession(timeout=timeout) as session,
        session.post(url, data=stream(), headers={"Heap-Hash": "ts:1,hmac:AAAA"}) as response,
    ):
        return response.status


async def test_slow_sender_is_cut_off_with_408(tmp_path: Path) -> None:
    running = await start_receiver(tmp_path, read_timeout_s=0.5)
    never = asyncio.Event()
    try:
        status = await asyncio.wait_for(_stalled_post(running.url, b'{"a":', never), 10)
        assert status == 408
    finally:
        never.set()
        await running.stop()


async def test_unverified_bytes_held_at_once_are_bounded_with_503(
    receiver: Receiver, http: aiohttp.ClientSession
) -> None:
    """Two stalled 60 KiB bodies fill the budget (twice the 64 KiB max_body): a third
    body is answered 503 (Heap sends it again later); once they are gone, it is taken."""
    release = asyncio.Event()
    head = b'{"x":"' + b"x" * (60 * 1024)
    stalled = [asyncio.create_task(_stalled_post(receiver.url, head, release)) for _ in "ab"]
    try:
        body = encode(page(task=new_task(), number=1, total=1, add=["third@x.com"]))
        body = body[:-1] + b',"pad":"' + b"p" * (30 * 1024) + b'"}'
        for _ in range(100):  # wrongly signed (401) until the stalled bodies have arrived
            answer = await post_signed(http, receiver.url, body, secret="wrong")
            if answer.status != 401:
                break
            await asyncio.sleep(0.05)
        assert answer.status == 503, answer.body
        await nothing_stored(receiver)
    finally:
        release.set()
        assert await asyncio.gather(*stalled) == [401, 401]
    answer = await post_signed(http, receiver.url, body)
    assert answer.status == 200, answer.body


# ------------------------------------------------------------------------ JSON bounds


async def test_deeply_nested_signed_body_is_400(
    roomy: Receiver, http: aiohttp.ClientSession
) -> None:
    payload = page(task=new_task(), number=1, total=1, add=["a@x.com"])
    body = encode(payload)[:-1] + b',"deep":' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    answer = await post_signed(http, roomy.url, body)
    await assert_refused(roomy, answer, 400)


@pytest.mark.parametrize("constant", ["NaN", "Infinity", "-Infinity"])
async def test_nan_and_infinity_ids_are_400_never_sent(
    receiver: Receiver, http: aiohttp.ClientSession, constant: str
) -> None:
    body = encode(page(task=new_task(), number=1, total=1, add=["PLACEHOLDER"]))
    body = body.replace(b'"PLACEHOLDER"', constant.encode())
    answer = await post_signed(http, receiver.url, body)
    await assert_refused(receiver, answer, 400)


@pytest.mark.parametrize(
    ("path", "value"),
    [
        pytest.param("data.segment.id", 2**63, id="segment-id-2^63"),
        pytest.param("data.segment.id", 2**64, id="segment-id-2^64"),
        pytest.param(
            "data.sync_info",
            {"page_number": 2**63, "total_pages": 2**63, "sync_task_id": "t"},
            id="page-2^63",
        ),
        pytest.param("data.sync_info.total_pages", 2**31, id="total-2^31"),
        pytest.param("data.sync_info.total_pages", 2**64, id="total-2^64"),
        pytest.param("data.sync_info.total_pages", 1_000_001, id="total-over-a-million"),
        pytest.param("data.sync_info.sync_task_id", "t" * 1_000_000, id="task-id-1MB"),
        pytest.param("data.sync_info.sync_task_id", "", id="task-id-empty"),
        pytest.param("data.sync_info.sync_task_id", "task\nwith a newline", id="task-id-control"),
        pytest.param("data.sync_info.sync_task_id", "\ud800", id="task-id-surrogate"),
        pytest.param("data.add", [{"id": 1.5}], id="id-float"),
        pytest.param("data.add", [{"id": 1e400}], id="id-float-overflow"),
    ],
)
async def test_out_of_range_or_wrong_typed_fields_are_400(
    roomy: Receiver, http: aiohttp.ClientSession, path: str, value: Any
) -> None:
    answer = await post_escaped(http, roomy.url, page_with(path, value))
    assert answer.status == 400, answer.body
    assert len(json.dumps(answer.body)) < 300, "the answer echoes what was sent"
    await nothing_stored(roomy)


async def test_largest_fields_in_range_are_stored_and_one_more_is_400(
    receiver: Receiver, http: aiohttp.ClientSession
) -> None:
    largest = 2**63 - 1
    edge = page(task="t" * 200, number=10**6, total=10**6, segment_id=largest)
    edge["data"]["add"] = [{"id": 2**70}, {"id": None}, {"id": "  padded@x.com  "}]
    answer = await post_signed(http, receiver.url, edge)
    assert answer.status == 200, answer.body
    assert await heap_members(receiver.store, largest) == {str(2**70), "padded@x.com"}
    beyond = [
        page(task=new_task(), number=1, total=1, segment_id=largest + 1),
        page(task=new_task(), number=10**6 + 1, total=10**6 + 1),
        page(task="t" * 201, number=1, total=1),
    ]
    assert [(await post_signed(http, receiver.url, body)).status for body in beyond] == [400] * 3


async def test_sender_controlled_text_in_log_lines_is_cut(
    roomy: Receiver, http: aiohttp.ClientSession
) -> None:
    huge = "A" * 1_000_000
    with structlog.testing.capture_logs() as logged:
        ignored = await post_signed(
            http, roomy.url, page(task=new_task(), number=1, total=1, action=huge)
        )
        refused = await post_signed(http, roomy.url, page_with("data.sync_info.sync_task_id", huge))
    assert (ignored.status, refused.status) == (200, 400)
    assert logged, "nothing was logged"
    for entry in logged:
        assert len(json.dumps(entry)) < 1000, f"{entry['event']} holds a long text"


# ------------------------------------------------------------------------ segment names


@pytest.mark.parametrize(
    ("sent", "stored"),
    [
        pytest.param("N" * 199 + " tail", "N" * 199, id="cut-leaves-a-space"),
        pytest.param("日本語 " * 60, ("日本語 " * 50).strip(), id="cut-leaves-a-space-non-ascii"),
        pytest.param("Free\nCustomers", "Free Customers", id="newline"),
        pytest.param("Free\tCustomers\x00", "Free Customers", id="tab-and-nul"),
        pytest.param("\x85Free\x9f", "Free", id="c1-controls"),
        pytest.param("\x00\x01\x1f", str(FREE_CUSTOMERS), id="only-controls"),
        pytest.param("\ud800 lone surrogate", str(FREE_CUSTOMERS), id="surrogate"),
    ],
)
async def test_segment_name_is_stored_as_a_valid_mapping_name(
    receiver: Receiver, http: aiohttp.ClientSession, sent: Any, stored: str
) -> None:
    """Whatever Heap calls a segment, the stored name makes a valid auto-mapping."""
    answer = await post_escaped(http, receiver.url, page_with("data.segment.name", sent))
    assert answer.status == 200, answer.body
    name, mapping_name, *_ = (await heap_state(receiver.store))[FREE_CUSTOMERS]
    assert (name, mapping_name) == (stored, stored)
    assert segment_name_problem(mapping_name) is None
    assert auto_mapping(FREE_CUSTOMERS, mapping_name).name == stored


@pytest.mark.parametrize("name", ["Free\nCustomers", "tab\tname", "nul\x00", "mid\x85dle"])
def test_configured_segment_names_follow_the_same_rule(name: str) -> None:
    mapping = {"name": name, "source": {"type": "heap_webhook", "heap_segment_id": 1}}
    assert segment_name_problem(name) is not None
    with pytest.raises(ConfigError, match="name"):
        parse_mappings([mapping], "SYNCD_SEGMENTS")


def test_configured_heap_segment_id_must_be_an_int64() -> None:
    mapping = {"name": "Big", "source": {"type": "heap_webhook", "heap_segment_id": 2**63}}
    with pytest.raises(ConfigError, match="heap_segment_id"):
        parse_mappings([mapping], "SYNCD_SEGMENTS")


# ------------------------------------------------------------------------ ids in the store


@pytest.mark.parametrize(
    "value", [float("nan"), float("inf"), -float("inf"), Decimal("NaN"), Decimal("sNaN")]
)
def test_non_finite_numbers_are_refused_never_sent_as_nan_or_inf(value: object) -> None:
    """A warehouse value of NaN or Infinity must never become the id "nan" or "inf"."""
    with pytest.raises(NotAnId):
        clean_ids(["a", value, 7], SkippedIds())


@pytest_asyncio.fixture
async def pg_receiver(tmp_path: Path) -> AsyncIterator[Receiver]:
    """A receiver whose store is a fresh PostgreSQL database."""
    database = await create_database()
    running = await start_receiver(tmp_path, state_url=url_for_database(postgres_url(), database))
    try:
        yield running
    finally:
        await running.stop()
        await drop_database(database)


async def test_id_with_a_nul_is_stored_and_reported_as_skipped_on_postgresql(
    pg_receiver: Receiver, http: aiohttp.ClientSession
) -> None:
    """PostgreSQL text cannot hold NUL: the page must not fail (503 for ever), and the id
    must still be one the id rules refuse and report rather than send."""
    body = page(task=new_task(), number=1, total=1, add=["good@x.com", "bad\x00@x.com"])
    answer = await post_signed(http, pg_receiver.url, body)
    assert answer.status == 200, answer.body
    stored = await heap_members(pg_receiver.store, FREE_CUSTOMERS)
    assert len(stored) == 2
    skipped = SkippedIds()
    assert clean_ids(sorted(stored), skipped) == ["good@x.com"]
    assert skipped.count == 1


async def test_pages_of_two_segments_sharing_a_task_id_are_both_stored(
    receiver: Receiver, http: aiohttp.ClientSession
) -> None:
    task, other = new_task(), 77
    first = page(task=task, number=1, total=1, add=["one@x.com"])
    second = page(task=task, number=1, total=1, add=["two@x.com"], segment_id=other, name="Two")
    answers = [await post_signed(http, receiver.url, body) for body in (first, second)]
    assert [(a.status, a.body) for a in answers] == [(200, {"status": "stored"})] * 2
    assert await heap_members(receiver.store, other) == {"two@x.com"}
    assert receiver.completed == [FREE_CUSTOMERS, other]
