"""The Heap source tests' helpers: a Heap-style signer, page builder, receiver,
settings for an engine on a sandbox, and views of the stored Heap pages.

The signer here is written independently of ``syncd.webhook.sign`` so the
receiver is never checked against its own code.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
from pydantic import SecretStr

from syncd.settings import Settings
from syncd.state import StateStore, open_store
from syncd.webhook import HeapWebhookReceiver
from tests.support.settings import sandbox_settings

WEBHOOK_SECRET = "whsec-heap-3f9c1a7e5b2d4c6a8e0f"
WEBHOOK_PATH = "/heap/webhook"
FREE_CUSTOMERS = 1338065

# ---------------------------------------------------------------------------- signing


def heap_hash(secret: str, ts_ms: int, body: bytes) -> str:
    """``Heap-Hash`` exactly as Heap documents it, from the standard library only."""
    message = str(ts_ms).encode("ascii") + body
    mac = hmac.new(secret.encode("utf-8"), message, hashlib.sha256).digest()
    return f"ts:{ts_ms},hmac:{base64.b64encode(mac).decode('ascii')}"


def now_ms() -> int:
    return int(time.time() * 1000)


# ---------------------------------------------------------------------------- pages


def page(
    *,
    task: str,
    number: int,
    total: int,
    add: Iterable[str] = (),
    remove: Iterable[str] = (),
    segment_id: int = FREE_CUSTOMERS,
    name: str = "Free Customers",
    action: str = "segment.users.sync",
) -> dict[str, Any]:
    """A Heap Segments Sync body, shaped like the documented example."""
    data: dict[str, Any] = {
        "segment": {"id": segment_id, "name": name},
        "sync_info": {"page_number": number, "total_pages": total, "sync_task_id": task},
    }
    adds, removes = list(add), list(remove)
    if adds:
        data["add"] = [{"id": member} for member in adds]
    if removes:
        data["remove"] = [{"id": member} for member in removes]
    return {
        "id_token": str(uuid.uuid4()),
        "action_type": action,
        "customer_config": {
            "fields": [
                {
                    "field_id": "workspace",
                    "field_display_name": "Workspace",
                    "value": {"id": "workspace_1", "display_name": "Workspace 1"},
                }
            ]
        },
        "data": data,
    }


def _field_holder(payload: dict[str, Any], path: str) -> tuple[Any, str]:
    """The object holding the field at the dotted ``path``, and the field's key."""
    *parents, last = path.split(".")
    holder: Any = payload
    for key in parents:
        holder = holder[key]
    return holder, last


def page_with(path: str, value: Any) -> dict[str, Any]:
    """A one-page task adding one id, its field at the dotted ``path`` set to ``value``."""
    payload = page(task=new_task(), number=1, total=1, add=["a@x.com"])
    holder, key = _field_holder(payload, path)
    holder[key] = value
    return payload


def page_without(path: str) -> dict[str, Any]:
    """A one-page task adding one id, without its field at the dotted ``path``."""
    payload = page(task=new_task(), number=1, total=1, add=["a@x.com"])
    holder, key = _field_holder(payload, path)
    del holder[key]
    return payload


def encode(payload: Any) -> bytes:
    """Compact JSON, raw UTF-8 (no \\u escapes), as Heap sends it."""
    return json.dumps(payload, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def new_task() -> str:
    return str(uuid.uuid4())


@dataclass
class Answer:
    status: int
    body: Any
    elapsed: float


async def post_raw(
    session: aiohttp.ClientSession,
    url: str,
    body: bytes,
    *,
    header: str | None,
    headers: dict[str, str] | None = None,
) -> Answer:
    sent = {"Content-Type": "application/json", **(headers or {})}
    if header is not None:
        sent["Heap-Hash"] = header
    started = time.monotonic()
    async with session.post(url, data=body, headers=sent) as response:
        text = await response.text()
        elapsed = time.monotonic() - started
    try:
        parsed: Any = json.loads(text)
    except ValueError:
        parsed = text
    return Answer(response.status, parsed, elapsed)


async def post_signed(
    session: aiohttp.ClientSession,
    url: str,
    payload: Any,
    *,
    secret: str = WEBHOOK_SECRET,
    ts_ms: int | None = None,
) -> Answer:
    body = payload if isinstance(payload, bytes) else encode(payload)
    ts = now_ms() if ts_ms is None else ts_ms
    return await post_raw(session, url, body, header=heap_hash(secret, ts, body))


async def post_escaped(session: aiohttp.ClientSession, url: str, payload: Any) -> Answer:
    """``post_signed`` with the payload as ASCII-escaped JSON: the only way to send a
    lone surrogate (as "\\ud800")."""
    return await post_signed(session, url, json.dumps(payload).encode())


# ---------------------------------------------------------------------------- store views


async def heap_state(store: StateStore) -> dict[int, tuple[str, str, int, int, frozenset[str]]]:
    """Everything the receiver may have changed: segments with their members."""
    result: dict[int, tuple[str, str, int, int, frozenset[str]]] = {}
    for segment in await store.heap_segments():
        members = await heap_members(store, segment.heap_segment_id)
        result[segment.heap_segment_id] = (
            segment.name,
            segment.mapping_name,
            segment.members,
            segment.complete_tasks,
            frozenset(members),
        )
    return result


async def heap_members(store: StateStore, heap_segment_id: int) -> set[str]:
    members: set[str] = set()
    async for chunk in store.heap_members(heap_segment_id, 1000):
        members.update(chunk.ids())
    return members


# ---------------------------------------------------------------------------- receivers


@dataclass
class Receiver:
    receiver: HeapWebhookReceiver
    store: StateStore
    state_url: str
    completed: list[int] = field(default_factory=list)

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.receiver.port}"

    @property
    def url(self) -> str:
        return self.base + WEBHOOK_PATH

    async def stop(self) -> None:
        await self.receiver.stop()
        await self.store.close()


async def nothing_stored(receiver: Receiver) -> None:
    """The receiver changed no Heap segment and completed no task."""
    assert await heap_state(receiver.store) == {}
    assert receiver.completed == []


async def assert_refused(receiver: Receiver, answer: Answer, status: int) -> None:
    """``answer`` is a refusal with ``status``, and the receiver stored nothing."""
    assert answer.status == status, answer.body
    await nothing_stored(receiver)


async def start_receiver(
    tmp_path: Path,
    *,
    max_body: int = 64 * 1024,
    tolerance_s: float = 60.0,
    read_timeout_s: float = 10.0,
    state_url: str | None = None,
) -> Receiver:
    """A receiver on a free port of 127.0.0.1, by default on a SQLite file in ``tmp_path``."""
    state_url = state_url or "sqlite:///" + str(tmp_path / "state.db")
    store = await open_store(state_url)
    completed: list[int] = []
    receiver = HeapWebhookReceiver(
        store,
        secret=SecretStr(WEBHOOK_SECRET),
        port=0,
        path=WEBHOOK_PATH,
        tolerance_s=tolerance_s,
        max_body=max_body,
        on_task_complete=completed.append,
        host="127.0.0.1",
        read_timeout_s=read_timeout_s,
    )
    await receiver.start()
    return Receiver(receiver, store, state_url, completed)


def make_settings(
    sandbox_url: str,
    state_url: str,
    *,
    segments: list[dict[str, Any]] | None = None,
    **extra: Any,
) -> Settings:
    """Settings for an engine talking to a sandbox; retries kept short for tests."""
    return sandbox_settings(
        sandbox_url,
        state_url=state_url,
        segments=segments,
        retry_attempts=2,
        retry_max_wait=1.0,
        http_timeout=20.0,
        **extra,
    )


def connect_identity(user_id: int) -> str | None:
    """The ``identity`` Heap Connect's ``users`` table gives a user in the warehouse
    tests: none for every tenth (never identified), the previous user's for every
    97th (one person, two devices), a non-ASCII one now and then."""
    if user_id % 10 == 0:
        return None
    if user_id % 97 == 0:
        return connect_identity(user_id - 1)
    if user_id % 1000 == 1:
        return f"zoë.{user_id}@exämple.com"
    return f"user{user_id}@example.com"

