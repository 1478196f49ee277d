"""Wiring: settings -> state store, HTTP session, WalkMe client, engine."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

import stamina.instrumentation

from syncd.diff import remove_stale_spills
from syncd.engine import Engine
from syncd.notify import Notifier
from syncd.settings import SegmentMapping, Settings
from syncd.state import StateStore, open_store
from syncd.walkme import WalkMeClient, log_retry, make_session

CHECK_CONNECT_TIMEOUT = 5.0  # seconds `check` waits for a TCP/TLS connection to WalkMe


@dataclass
class Runtime:
    settings: Settings
    mappings: list[SegmentMapping]
    store: StateStore
    client: WalkMeClient
    engine: Engine
    notifier: Notifier | None  # None: SYNCD_NOTIFY_URL is not set


@asynccontextmanager
async def open_runtime(
    settings: Settings, mappings: list[SegmentMapping], *, fail_fast: bool = False
) -> AsyncIterator[Runtime]:
    """Everything a command needs, closed in reverse order on the way out.

    ``fail_fast`` (``syncd check``, run by a person waiting for it): a WalkMe
    connection that cannot be made fails at once, after at most a short connect timeout."""
    secret = settings.client_secret()
    stamina.instrumentation.set_on_retry_hooks([log_retry])
    remove_stale_spills(settings.work_dir)
    store = await open_store(settings.state_url)
    notifier = _notifier(settings)
    try:
        connect_timeout = min(CHECK_CONNECT_TIMEOUT, settings.http_timeout) if fail_fast else None
        async with make_session(
            settings.http_timeout, settings.ca_bundle, connect_timeout
        ) as session:
            client = WalkMeClient(
                session,
                api_url=settings.walkme_api_url,
                token_url=settings.token_url,
                client_id=settings.walkme_client_id,
                client_secret=secret,
                attempts=settings.retry_attempts,
                max_wait=settings.retry_max_wait,
                fail_fast=fail_fast,
            )
            engine = Engine(settings, store, client, mappings, notifier)
            yield Runtime(settings, mappings, store, client, engine, notifier)
    finally:
        if notifier is not None:
            await notifier.close()  # waits a bounded time for messages still queued
        await store.close()


def _notifier(settings: Settings) -> Notifier | None:
    url = settings.notification_url()
    if url is None:
        return None
    return Notifier(url, timeout_s=settings.notify_timeout, max_wait=settings.retry_max_wait)
