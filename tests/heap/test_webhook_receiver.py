"""The Heap Segments Sync webhook receiver, over real HTTP on 127.0.0.1.

Every request is signed by the test's own signer (``conftest.heap_hash``), the
way Heap documents it, never by ``syncd.webhook.sign``.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from syncd.state import StateStore, open_store
from syncd.state.base import HeapPage
from syncd.webhook import sign
from tests.support.heap import (
    FREE_CUSTOMERS,
    WEBHOOK_SECRET,
    Answer,
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
    page_without,
    post_raw,
    post_signed,
)

# ------------------------------------------------------------------------ the signature


def test_independent_signer_matches_a_known_vector() -> None:
    # Computed with: printf '1700000000000{"a":1}' |
    #   openssl dgst -sha256 -hmac 'whsec-known-vector' -binary | base64
    expected = "Cdj4G/cM6QEdFmqidw+cFO4sHU9LeN0TPK1z59GEZqY="
    header = heap_hash("whsec-known-vector", 1_700_000_000_000, b'{"a":1}')
    assert header == f"ts:1700000000000,hmac:{expected}"
    assert sign("whsec-known-vector", 1_700_000_000_000, b'{"a":1}') == expected


# ------------------------------------------------------------------------ good pages


async def test_good_pages_are_answered_200_and_stored(
    receiver: Receiver, http: aiohttp.ClientSession
) -> None:
    task = new_task()
    first = await post_signed(
        http,
        receiver.url,
        page(task=task, number=1, total=2, add=["user1@email.com", "user2@email.com"]),
    )
    assert first.status == 200, first.body
    assert receiver.completed == []
    assert await heap_members(receiver.store, FREE_CUSTOMERS) == {
        "user1@email.com",
        "user2@email.com",
    }

    second = await post_signed(
        http, receiver.url, page(task=task, number=2, total=2, add=["user3@email.com"])
    )
    assert second.status == 200, second.body
    state = await heap_state(receiver.store)
    name, mapping_name, count, complete_tasks, members = state[FREE_CUSTOMERS]
    assert (name, mapping_name) == ("Free Customers", "Free Customers")
    assert members == {"user1@email.com", "user2@email.com", "user3@email.com"}
    assert count == 3
    assert complete_tasks == 1
    assert receiver.completed == [FREE_CUSTOMERS]


async def test_signature_is_over_the_raw_body_bytes(
    receiver: Receiver, http: aiohttp.ClientSession
) -> None:
    """A body that is not compact JSON is verified as sent, not re-serialised."""
    payload = page(task=new_task(), number=1, total=1, add=["spaced@example.com"])
    body = json.dumps(payload, indent=3, ensure_ascii=True).encode() + b"\n"
    answer = await post_signed(http, receiver.url, body)
    assert answer.status == 200, answer.body
    assert await heap_members(receiver.store, FREE_CUSTOMERS) == {"spaced@example.com"}


async def test_page_without_add_or_remove_is_accepted(
    receiver: Receiver, http: aiohttp.ClientSession
) -> None:
    payload = page(task=new_task(), number=1, total=1)
    assert "add" not in payload["data"]
    assert "remove" not in payload["data"]
    answer = await post_signed(http, receiver.url, payload)
    assert answer.status == 200, answer.body
    state = await heap_state(receiver.store)
    assert state[FREE_CUSTOMERS][3] == 1  # one complete task, with nobody in it
    assert state[FREE_CUSTOMERS][4] == frozenset()
    assert receiver.completed == [FREE_CUSTOMERS]


async def test_duplicate_page_is_200_and_changes_nothing(
    receiver: Receiver, http: aiohttp.ClientSession
) -> None:
    task = new_task()
    first_page = page(task=task, number=1, total=2, add=["a@x.com", "b@x.com"], remove=["z@x.com"])
    assert (await post_signed(http, receiver.url, first_page)).status == 200
    before = await heap_state(receiver.store)

    again = await post_signed(http, receiver.url, first_page)  # Heap's retry: same body
    assert again.status == 200, again.body
    assert await heap_state(receiver.store) == before
    assert receiver.completed == []

    # Completing the task fires once; a retry of the last page after that fires nothing.
    last = page(task=task, number=2, total=2, add=["c@x.com"])
    assert (await post_signed(http, receiver.url, last)).status == 200
    after_completion = await heap_state(receiver.store)
    assert (await post_signed(http, receiver.url, last)).status == 200
    assert (await post_signed(http, receiver.url, first_page)).status == 200
    assert await heap_state(receiver.store) == after_completion
    assert receiver.completed == [FREE_CUSTOMERS]


# The baseline task holds x, y and z; the next task (3 pages) moves people around.
_BASELINE = ["x@example.com", "y@example.com", "z@example.com"]
_TASK_PAGES: dict[int, dict[str, list[str]]] = {
    1: {"add": ["a@example.com", "b@example.com"], "remove": ["x@example.com"]},
    2: {"add": ["c@example.com"], "remove": ["y@example.com", "never-member@example.com"]},
    3: {"add": ["d@example.com"], "remove": []},
}


async def _reference_membership(tmp_path: Path) -> set[str]:
    """Apply the baseline and each page of the task exactly once, in order, to a store."""
    store = await open_store("sqlite:///" + str(tmp_path / "reference.db"))
    try:
        await store.store_heap_page(
            HeapPage(FREE_CUSTOMERS, "Free Customers", "base", 1, 1, _BASELINE, [])
        )
        for number in (1, 2, 3):
            content = _TASK_PAGES[number]
            await store.store_heap_page(
                HeapPage(
                    FREE_CUSTOMERS, "Free Customers", "t", number, 3,
                    content["add"], content["remove"],
                )
            )
        return await heap_members(store, FREE_CUSTOMERS)
    finally:
        await store.close()


@pytest.mark.parametrize(
    "arrival",
    [(3, 1, 1, 2), (2, 3, 2, 1), (1, 2, 3, 3), (3, 3, 2, 2, 1)],
    ids=["3-1-1-2", "2-3-2-1", "1-2-3-3", "3-3-2-2-1"],
)
async def test_out_of_order_pages_with_duplicates_equal_applying_each_once(
    receiver: Receiver,
    http: aiohttp.ClientSession,
    tmp_path: Path,
    arrival: tuple[int, ...],
) -> None:
    baseline = page(task=new_task(), number=1, total=1, add=_BASELINE)
    assert (await post_signed(http, receiver.url, baseline)).status == 200
    receiver.completed.clear()

    task = new_task()
    bodies = {
        number: page(task=task, number=number, total=3, add=content["add"],
                     remove=content["remove"])
        for number, content in _TASK_PAGES.items()
    }
    seen: set[int] = set()
    for number in arrival:
        answer = await post_signed(http, receiver.url, bodies[number])
        assert answer.status == 200, answer.body
        seen.add(number)
        # The callback fires exactly when the last outstanding page arrives, never before.
        expected = [FREE_CUSTOMERS] if seen == {1, 2, 3} else []
        assert receiver.completed == expected, f"after pages {arrival}"

    expected_members = {"a@example.com", "b@example.com", "c@example.com", "d@example.com",
                        "z@example.com"}
    assert await _reference_membership(tmp_path) == expected_members
    state = await heap_state(receiver.store)
    assert state[FREE_CUSTOMERS][4] == expected_members
    assert state[FREE_CUSTOMERS][2] == len(expected_members)  # the counter agrees
    assert state[FREE_CUSTOMERS][3] == 2  # baseline + this task


async def test_interleaved_tasks_of_two_segments_complete_separately(
    receiver: Receiver, http: aiohttp.ClientSession
) -> None:
    task_a, task_b = new_task(), new_task()
    other = 2_000_000_000_001  # int64, above 32 bits
    bodies = [
        page(task=task_a, number=2, total=2, add=["a2@x.com"]),
        page(task=task_b, number=1, total=2, add=["b1@x.com"], segment_id=other, name="Other"),
        page(task=task_a, number=1, total=2, add=["a1@x.com"]),
        page(task=task_b, number=2, total=2, add=["b2@x.com"], segment_id=other, name="Other"),
    ]
    for body in bodies:
        assert (await post_signed(http, receiver.url, body)).status == 200
    assert receiver.completed == [FREE_CUSTOMERS, other]
    assert await heap_members(receiver.store, FREE_CUSTOMERS) == {"a1@x.com", "a2@x.com"}
    assert await heap_members(receiver.store, other) == {"b1@x.com", "b2@x.com"}


async def test_non_ascii_ids_are_stored_verbatim(
    receiver: Receiver, http: aiohttp.ClientSession
) -> None:
    ids = [
        "zoë@exämple.com",  # NFC
        "zoe\u0308@exa\u0308mple.com",  # the same text in NFD: not normalised, kept apart
        "用户@例子.中国",
        "Ünïcödé.Case@Example.com",
        "ünïcödé.case@example.com",  # case-sensitive: a different user
        "emoji🙂@x.com",
    ]
    answer = await post_signed(http, receiver.url, page(task=new_task(), number=1, total=1,
                                                        add=ids))
    assert answer.status == 200, answer.body
    assert await heap_members(receiver.store, FREE_CUSTOMERS) == set(ids)
    assert len(set(ids)) == 6


# ------------------------------------------------------------------------ refused: 401


async def test_wrong_secret_is_401_and_nothing_stored(
    receiver: Receiver, http: aiohttp.ClientSession
) -> None:
    body = page(task=new_task(), number=1, total=1, add=["a@x.com"])
    answer = await post_signed(http, receiver.url, body, secret="not-the-secret")
    await assert_refused(receiver, answer, 401)


async def test_body_changed_after_signing_is_401(
    receiver: Receiver, http: aiohttp.ClientSession
) -> None:
    signed = encode(page(task=new_task(), number=1, total=1, add=["a@x.com"]))
    tampered = signed.replace(b"a@x.com", b"evil@x.com")
    ts = now_ms()
    answer = await post_raw(http, receiver.url, tampered, header=heap_hash(WEBHOOK_SECRET, ts,
                                                                           signed))
    await assert_refused(receiver, answer, 401)


async def test_signature_with_another_timestamp_is_401(
    receiver: Receiver, http: aiohttp.ClientSession
) -> None:
    """The ts is part of the signed message: moving it breaks the signature."""
    body = encode(page(task=new_task(), number=1, total=1, add=["a@x.com"]))
    ts = now_ms()
    signature = heap_hash(WEBHOOK_SECRET, ts - 1000, body).split(",hmac:")[1]
    answer = await post_raw(http, receiver.url, body, header=f"ts:{ts},hmac:{signature}")
    await assert_refused(receiver, answer, 401)


@pytest.mark.parametrize(
    "offset_ms",
    [-61_000, -3_600_000, 61_000, 86_400_000],
    ids=["stale-61s", "stale-1h", "future-61s", "future-1d"],
)
async def test_timestamp_outside_tolerance_is_401(
    receiver: Receiver, http: aiohttp.ClientSession, offset_ms: int
) -> None:
    """Tolerance is 60 s in this fixture; correctly signed but too old or too new."""
    body = page(task=new_task(), number=1, total=1, add=["a@x.com"])
    answer = await post_signed(http, receiver.url, body, ts_ms=now_ms() + offset_ms)
    await assert_refused(receiver, answer, 401)


@pytest.mark.parametrize("offset_ms", [-30_000, 500], ids=["30s-old", "500ms-ahead"])
async def test_timestamp_inside_tolerance_is_accepted(
    receiver: Receiver, http: aiohttp.ClientSession, offset_ms: int
) -> None:
    body = page(task=new_task(), number=1, total=1, add=["a@x.com"])
    answer = await post_signed(http, receiver.url, body, ts_ms=now_ms() + offset_ms)
    assert answer.status == 200, answer.body


# ------------------------------------------------------------------------ refused: 400


async def test_missing_heap_hash_header_is_400(
    receiver: Receiver, http: aiohttp.ClientSession
) -> None:
    body = encode(page(task=new_task(), number=1, total=1, add=["a@x.com"]))
    answer = await post_raw(http, receiver.url, body, header=None)
    await assert_refused(receiver, answer, 400)


@pytest.mark.parametrize(
    "header",
    [
        "",
        "garbage",
        "ts:,hmac:AAAA",
        "ts:notanumber,hmac:AAAA",
        "ts:{ts}",
        "hmac:{mac}",
        "ts:{ts},hmac:",
        "ts:{ts},hmac:!!!not*base64!!!",
        "ts:{ts};hmac:{mac}",
        "sha256={mac}",
    ],
    ids=[
        "empty", "garbage", "empty-ts", "ts-not-a-number", "no-hmac", "no-ts", "empty-hmac",
        "hmac-not-base64", "semicolon", "other-scheme",
    ],
)
async def test_malformed_heap_hash_header_is_400(
    receiver: Receiver, http: aiohttp.ClientSession, header: str
) -> None:
    body = encode(page(task=new_task(), number=1, total=1, add=["a@x.com"]))
    ts = now_ms()
    mac = heap_hash(WEBHOOK_SECRET, ts, body).split(",hmac:")[1]
    answer = await post_raw(http, receiver.url, body, header=header.format(ts=ts, mac=mac))
    await assert_refused(receiver, answer, 400)


async def test_broken_json_is_400(receiver: Receiver, http: aiohttp.ClientSession) -> None:
    body = b'{"action_type":"segment.users.sync","data":{"segment":{"id":1'
    answer = await post_signed(http, receiver.url, body)
    await assert_refused(receiver, answer, 400)


async def test_body_that_is_not_utf8_is_400(
    receiver: Receiver, http: aiohttp.ClientSession
) -> None:
    body = encode(page(task=new_task(), number=1, total=1, add=["a@x.com"])).replace(
        b"a@x.com", b"a\xff@x.com"
    )
    answer = await post_signed(http, receiver.url, body)
    await assert_refused(receiver, answer, 400)


@pytest.mark.parametrize("body", [b"[]", b"null"], ids=["array", "null"])
async def test_json_that_is_not_an_object_is_400(
    receiver: Receiver, http: aiohttp.ClientSession, body: bytes
) -> None:
    """Valid JSON but not a page: malformed, like broken JSON (parse_page has this check)."""
    answer = await post_signed(http, receiver.url, body)
    await assert_refused(receiver, answer, 400)


@pytest.mark.parametrize(
    "payload",
    [
        page_without("data"),
        page_without("data.segment"),
        page_without("data.segment.id"),
        page_without("data.sync_info"),
        page_without("data.sync_info.sync_task_id"),
        page_without("data.sync_info.page_number"),
        page_without("data.sync_info.total_pages"),
        page_with("data.segment.id", None),
        page_with("data.segment.id", True),
        page_with("data.sync_info.page_number", 0),
        page_with("data.sync_info.page_number", 3),  # total_pages is 1
        page_with("data.sync_info.total_pages", 0),
        page_with("data.add", {"id": "a@x.com"}),
        page_with("data.add", [{"user": "a@x.com"}]),
        page_with("data.remove", ["a@x.com"]),
    ],
    ids=[
        "no-data", "no-segment", "no-segment-id", "no-sync-info", "no-sync-task-id",
        "no-page-number", "no-total-pages", "segment-id-null", "segment-id-bool",
        "page-0", "page-after-last", "total-0", "add-not-list", "add-entry-without-id",
        "remove-bare-strings",
    ],
)
async def test_missing_or_bad_fields_are_400(
    receiver: Receiver, http: aiohttp.ClientSession, payload: dict[str, Any]
) -> None:
    answer = await post_signed(http, receiver.url, payload)
    await assert_refused(receiver, answer, 400)


# ------------------------------------------------------------------------ other actions


@pytest.mark.parametrize("action", ["segment.users.drain", "segment.users.something_new"])
async def test_unknown_action_type_is_200_and_nothing_stored(
    receiver: Receiver, http: aiohttp.ClientSession, action: str
) -> None:
    body = page(task=new_task(), number=1, total=1, add=["a@x.com"], action=action)
    answer = await post_signed(http, receiver.url, body)
    assert answer.status == 200, answer.body
    await nothing_stored(receiver)


async def test_unknown_action_type_still_needs_a_good_signature(
    receiver: Receiver, http: aiohttp.ClientSession
) -> None:
    body = page(task=new_task(), number=1, total=1, action="segment.users.drain")
    answer = await post_signed(http, receiver.url, body, secret="wrong")
    assert answer.status == 401, answer.body


# ------------------------------------------------------------------------ size and routes


def _one_page_body(n_ids: int) -> bytes:
    """A whole task in one page adding ``n_ids`` ids of 23 bytes each."""
    ids = [f"user{i:06d}@example.com" for i in range(n_ids)]
    return encode(page(task=new_task(), number=1, total=1, add=ids))


async def _post_one_page(
    http: aiohttp.ClientSession, receiver: Receiver, n_ids: int, kib: tuple[int, int]
) -> Answer:
    """``_one_page_body(n_ids)``, its size checked to lie between ``kib`` KiB, signed
    and posted."""
    body = _one_page_body(n_ids)
    assert kib[0] * 1024 < len(body) < kib[1] * 1024
    return await post_signed(http, receiver.url, body)


async def test_oversize_body_is_413_and_nothing_stored(
    receiver: Receiver, http: aiohttp.ClientSession
) -> None:
    """max_body is 64 KiB in the fixture; this page is about 100 KiB, correctly signed."""
    answer = await _post_one_page(http, receiver, 3150, kib=(95, 110))
    await assert_refused(receiver, answer, 413)


async def test_oversize_chunked_body_without_length_is_413(
    receiver: Receiver, http: aiohttp.ClientSession
) -> None:
    body = _one_page_body(3150)

    async def stream() -> AsyncIterator[bytes]:
        for start in range(0, len(body), 8192):
            yield body[start : start + 8192]

    header = heap_hash(WEBHOOK_SECRET, now_ms(), body)
    async with http.post(
        receiver.url,
        data=stream(),
        headers={"Heap-Hash": header, "Content-Type": "application/json"},
    ) as response:
        assert "Content-Length" not in response.request_info.headers
        assert response.status == 413
    await nothing_stored(receiver)


async def test_body_just_under_the_limit_is_accepted(
    receiver: Receiver, http: aiohttp.ClientSession
) -> None:
    answer = await _post_one_page(http, receiver, 1950, kib=(60, 64))
    assert answer.status == 200, answer.body
    assert len(await heap_members(receiver.store, FREE_CUSTOMERS)) == 1950


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("POST", "/"),
        ("POST", "/webhook"),
        ("POST", "/heap/webhook/extra"),
        ("POST", "/heap"),
        ("GET", "/"),
        ("GET", "/metrics"),
    ],
)
async def test_other_paths_on_the_webhook_port_are_404(
    receiver: Receiver, http: aiohttp.ClientSession, method: str, path: str
) -> None:
    body = encode(page(task=new_task(), number=1, total=1, add=["a@x.com"]))
    header = heap_hash(WEBHOOK_SECRET, now_ms(), body)
    async with http.request(
        method, receiver.base + path, data=body, headers={"Heap-Hash": header}
    ) as response:
        assert response.status == 404
    await nothing_stored(receiver)


@pytest.mark.parametrize("path", ["/healthz", "/readyz"])
async def test_admin_endpoints_are_not_on_the_webhook_port(
    receiver: Receiver, http: aiohttp.ClientSession, path: str
) -> None:
    async with http.get(receiver.base + path) as response:
        assert response.status == 404


async def test_get_on_the_webhook_path_is_not_served(
    receiver: Receiver, http: aiohttp.ClientSession
) -> None:
    async with http.get(receiver.url) as response:
        assert response.status == 405


async def test_store_survives_restart_with_pages_already_seen(
    receiver: Receiver, http: aiohttp.ClientSession
) -> None:
    """A page acknowledged with 200 is durable: a new store on the same file sees it."""
    task = new_task()
    body = page(task=task, number=1, total=2, add=["durable@x.com"])
    assert (await post_signed(http, receiver.url, body)).status == 200
    reopened: StateStore = await open_store(receiver.state_url)
    try:
        assert await heap_members(reopened, FREE_CUSTOMERS) == {"durable@x.com"}
    finally:
        await reopened.close()
