"""Pure functions of ``syncd.walkme``: tolerant parsing of undocumented answers."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from typing import Any

import pytest

from syncd.walkme import (
    BODY_SHOWN,
    RemoteSegment,
    _acknowledged,
    _backoff,
    _excerpt,
    _reports_error,
    _Response,
    _Retryable,
    create_key,
    is_guid,
    normalize_guid,
    parse_retry_after,
    parse_segment,
    segment_list,
)

GUID = "0b7e6f1c-2d3a-4b5c-9d8e-7f6a5b4c3d2e"
GUID2 = "11111111-2222-4333-8444-555555555555"
ITEMS: list[dict[str, Any]] = [{"guid": GUID, "name": "a"}, {"guid": GUID2, "name": "b"}]


# -- segment_list --------------------------------------------------------------------


def test_segment_list_bare_array() -> None:
    assert segment_list(ITEMS) == ITEMS


@pytest.mark.parametrize("key", ["data", "segments", "items", "results"])
def test_segment_list_wrapped(key: str) -> None:
    assert segment_list({key: ITEMS, "total": 2, "page": 1}) == ITEMS


def test_segment_list_nested_wrapper() -> None:
    assert segment_list({"data": {"segments": ITEMS}}) == ITEMS


def test_segment_list_skips_non_objects() -> None:
    assert segment_list([ITEMS[0], "junk", 3, None, ITEMS[1]]) == ITEMS


@pytest.mark.parametrize(
    "payload", [None, "", 42, "text", {}, {"error": "x"}, {"data": None}, {"data": "x"}, []]
)
def test_segment_list_nothing(payload: Any) -> None:
    assert segment_list(payload) == []


# -- parse_segment -------------------------------------------------------------------


@pytest.mark.parametrize("key", ["guid", "segmentGuid", "segmentId", "id"])
def test_parse_segment_guid_keys(key: str) -> None:
    segment = parse_segment({key: GUID, "name": "vip"})
    assert segment == RemoteSegment(guid=GUID, name="vip", external_id=None)


def test_parse_segment_guid_normalized() -> None:
    raw = GUID.replace("-", "").upper()
    segment = parse_segment({"segmentGuid": raw, "name": "vip"})
    assert segment is not None
    assert segment.guid == GUID


def test_parse_segment_uppercase_hyphenated() -> None:
    segment = parse_segment({"guid": GUID.upper()})
    assert segment is not None
    assert segment.guid == GUID


def test_parse_segment_external_id_field() -> None:
    segment = parse_segment({"guid": GUID, "name": "vip", "externalId": "vip-1"})
    assert segment is not None
    assert segment.external_id == "vip-1"


def test_parse_segment_non_guid_id_is_external_id() -> None:
    segment = parse_segment({"segmentGuid": GUID, "id": "vip-1", "name": "vip"})
    assert segment == RemoteSegment(guid=GUID, name="vip", external_id="vip-1")


def test_parse_segment_numeric_id_is_external_id() -> None:
    segment = parse_segment({"guid": GUID, "id": 42})
    assert segment is not None
    assert segment.external_id == "42"


def test_parse_segment_guid_id_is_not_external_id() -> None:
    segment = parse_segment({"id": GUID, "name": "vip"})
    assert segment is not None
    assert segment.guid == GUID
    assert segment.external_id is None


def test_parse_segment_guid_key_order() -> None:
    segment = parse_segment({"id": GUID2, "guid": GUID})
    assert segment is not None
    assert segment.guid == GUID


def test_parse_segment_skips_non_guid_values() -> None:
    segment = parse_segment({"guid": "nope", "segmentId": 17, "id": GUID2})
    assert segment is not None
    assert segment.guid == GUID2


@pytest.mark.parametrize(
    "item",
    [{}, {"name": "vip"}, {"id": "vip-1", "name": "vip"}, {"guid": "1234"}, {"guid": None}],
)
def test_parse_segment_without_guid(item: dict[str, Any]) -> None:
    assert parse_segment(item) is None


def test_parse_segment_non_string_name() -> None:
    segment = parse_segment({"guid": GUID, "name": {"en": "vip"}})
    assert segment is not None
    assert segment.name is None


def test_guid_helpers() -> None:
    assert is_guid(GUID)
    assert is_guid(GUID.replace("-", ""))
    assert is_guid(GUID.upper())
    assert not is_guid(GUID[:-1])
    assert not is_guid(None)
    assert not is_guid(42)
    assert normalize_guid(GUID.replace("-", "").upper()) == GUID
    assert normalize_guid(GUID) == GUID


# -- parse_retry_after ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "seconds"),
    [("0", 0.0), ("3", 3.0), (" 120 ", 120.0), ("0.25", 0.25), ("-5", 0.0)],
)
def test_retry_after_seconds(value: str, seconds: float) -> None:
    assert parse_retry_after(value) == seconds


def test_retry_after_http_date() -> None:
    now = datetime(2025, 3, 4, 10, 0, 0, tzinfo=UTC)
    later = format_datetime(now + timedelta(seconds=42), usegmt=True)
    assert parse_retry_after(later, now=now) == pytest.approx(42.0)


def test_retry_after_http_date_in_the_past() -> None:
    now = datetime(2025, 3, 4, 10, 0, 0, tzinfo=UTC)
    assert parse_retry_after("Tue, 04 Mar 2025 09:59:00 GMT", now=now) == 0.0


def test_retry_after_http_date_without_a_zone_is_utc() -> None:
    """A date in ``-0000`` (no zone given) is read as UTC, not refused or crashed on."""
    now = datetime(2025, 1, 1, 0, 0, 0, tzinfo=UTC)
    assert parse_retry_after("Wed, 01 Jan 2025 00:00:30 -0000", now=now) == 30.0


def test_retry_after_http_date_default_now() -> None:
    soon = format_datetime(datetime.now(UTC) + timedelta(seconds=30), usegmt=True)
    wait = parse_retry_after(soon)
    assert wait is not None
    assert 25.0 <= wait <= 30.0


@pytest.mark.parametrize("value", [None, "", "   ", "soon", "Mon, 99 Foo 2025"])
def test_retry_after_unusable(value: str | None) -> None:
    assert parse_retry_after(value) is None


# -- _backoff ------------------------------------------------------------------------


def test_backoff_retryable_without_retry_after() -> None:
    assert _backoff(_Retryable("server error", 503)) is True


@pytest.mark.parametrize("wait", [0.0, 0.2, 30.0])
def test_backoff_retryable_with_retry_after(wait: float) -> None:
    decision = _backoff(_Retryable("throttled", 429, wait))
    assert not isinstance(decision, bool)
    assert decision == wait


def test_backoff_timeouts_retried() -> None:
    assert _backoff(_Retryable("timeout")) is True


@pytest.mark.parametrize("exc", [ValueError("x"), RuntimeError("y"), KeyError("z"), TimeoutError()])
def test_backoff_others_not_retried(exc: Exception) -> None:
    assert _backoff(exc) is False


# -- create_key ------------------------------------------------------------------------


def test_create_key_is_pinned_and_ignores_guid_case() -> None:
    """The key of a segment never changes across versions or GUID spellings: a create
    retried after an upgrade must meet WalkMe's uniqueness check, not make a twin."""
    expected = "syncd-b331e7466282da8b5de4804c"
    assert create_key(GUID, "vip") == expected
    assert create_key(GUID.upper(), "vip") == expected


# -- acknowledgements ------------------------------------------------------------------


@pytest.mark.parametrize(
    "payload",
    [
        {"success": False},
        {"success": "false"},
        {"success": " FALSE "},
        {"error": "quota"},
        {"errors": ["bad id"]},
        {"status": "error"},
        {"status": "FAIL"},
        {"status": "failed"},
        {"status": "Failure"},
    ],
)
def test_reports_error_in_a_2xx_body(payload: dict[str, Any]) -> None:
    """Every way a body can say it failed is read as a failure, in any letter case."""
    assert _reports_error(payload)


@pytest.mark.parametrize(
    "payload",
    [{}, {"success": True}, {"errors": []}, {"error": None}, {"status": "ok"}, {"status": 500}],
)
def test_reports_no_error_in_a_plain_body(payload: dict[str, Any]) -> None:
    """Empty error fields and other statuses are not failures."""
    assert not _reports_error(payload)


def answer(status: int, body: bytes, media_type: str = "application/json") -> _Response:
    return _Response(status, body, None, media_type, None)


@pytest.mark.parametrize(
    ("kind", "response", "why"),
    [
        ("update", answer(302, b"{}"), "a status WalkMe does not acknowledge with"),
        ("list", answer(200, b" "), "an empty body"),
        ("update", answer(200, b"<html>", "text/html"), "Content-Type text/html"),
        ("update", answer(200, b"{nope"), "a body that is not JSON"),
        ("update", answer(200, b'{"errors": ["x"]}'), "JSON reporting an error"),
        ("list", answer(200, b'{"other": []}'), "JSON that holds no list of segments"),
        ("update", answer(200, b"[]"), "JSON that is not an object"),
    ],
)
def test_unacknowledged_answer_is_retried_naming_why(
    kind: str, response: _Response, why: str
) -> None:
    """A 2xx that is not WalkMe acknowledging is retried, and the message names the
    call, the status and what was wrong with the answer."""
    with pytest.raises(_Retryable) as caught:
        _acknowledged(kind, response)
    assert str(caught.value).startswith(f"{kind} answered HTTP {response.status} with {why},")


def test_acknowledged_answers() -> None:
    """An empty body acknowledges an update; an update's JSON object and a list's
    array, bare or wrapped, are handed back."""
    assert _acknowledged("update", answer(204, b"", "")) is None
    assert _acknowledged("update", answer(200, b'{"ok": 1}', "application/vnd+json")) == {"ok": 1}
    assert _acknowledged("list", answer(200, b'{"data": []}')) == {"data": []}
    assert _acknowledged("list", answer(200, b"[]")) == []


# -- _excerpt --------------------------------------------------------------------------


def test_excerpt_keeps_a_short_body_and_cuts_a_long_one() -> None:
    """Up to ``BODY_SHOWN`` characters are shown as they are; longer bodies are cut
    there and marked; bytes that are not UTF-8 are replaced, never an error."""
    assert _excerpt(b"x" * BODY_SHOWN) == "x" * BODY_SHOWN
    assert _excerpt(b"y" * (BODY_SHOWN + 1)) == "y" * BODY_SHOWN + "..."
    assert _excerpt(b"ok \xff\xfe") == "ok \ufffd\ufffd"
    assert _excerpt("é日".encode()) == "é日"
