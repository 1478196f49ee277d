"""The integration suites' harness: a sandbox WalkMe on 127.0.0.1, settings and
subprocess environments pointing at it, and raw API calls for test setup."""

from __future__ import annotations

import base64
import json
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp

from syncd.app import open_runtime
from syncd.engine import Outcome
from syncd.sandbox import SANDBOX_SYSTEM_GUID, RequestRecord, WalkMeSandbox
from syncd.settings import Settings
from tests.support.ids import file_mapping, write_ids
from tests.support.processes import run_cli
from tests.support.settings import sandbox_settings, syncd_env

CLIENT_ID = "itest-client"
# Distinctive, so a leak into any output is found by a plain substring search.
CLIENT_SECRET = "itest-S3cret-7f3a9c1e-never-print-me"
BATCH = 25_000
SEGMENTS_PATH = f"/public/v1/user/system/{SANDBOX_SYSTEM_GUID}/segment"


def segment_requests(sandbox: WalkMeSandbox) -> list[RequestRecord]:
    """Create and update requests the sandbox has seen (list/token/delete left out)."""
    return [r for r in list(sandbox.requests) if r.kind in ("create", "update")]


# ------------------------------------------------------------ raw sandbox access


async def raw_call(
    sandbox: WalkMeSandbox, method: str, path: str, body: Any = None
) -> tuple[int, Any]:
    """One API call made by hand (for test setup), with a fresh token."""
    async with aiohttp.ClientSession() as session:
        basic = base64.b64encode(f"{sandbox.client_id}:{sandbox.client_secret}".encode())
        async with session.post(
            sandbox.token_url,
            data={"grant_type": "client_credentials"},
            headers={"Authorization": "Basic " + basic.decode()},
        ) as response:
            assert response.status == 200
            token = (await response.json())["access_token"]
        async with session.request(
            method,
            sandbox.url + path,
            json=body,
            headers={"Authorization": f"Bearer {token}"},
        ) as response:
            text = await response.text()
            return response.status, json.loads(text) if text else None


async def seed_segment(
    sandbox: WalkMeSandbox, name: str, members: list[str], external_id: str | None = None
) -> str:
    """A segment that exists in WalkMe before syncd ever ran."""
    body: dict[str, Any] = {"name": name, "userIds": members}
    if external_id is not None:
        body["id"] = external_id
    status, answer = await raw_call(sandbox, "POST", SEGMENTS_PATH, body)
    assert status == 201, answer
    record = sandbox.find(name=name, external_id=external_id)
    assert record is not None
    return record.guid


async def delete_segment(sandbox: WalkMeSandbox, guid: str) -> None:
    status, answer = await raw_call(sandbox, "DELETE", f"{SEGMENTS_PATH}/{guid}")
    assert status == 200, answer


def segments_named(sandbox: WalkMeSandbox, name: str) -> list[dict[str, Any]]:
    return [s for s in sandbox.state()["segments"] if s["name"] == name]


# ------------------------------------------------------------ in-process harness


@dataclass
class Harness:
    """A running sandbox plus a folder for sources and the state database."""

    sandbox: WalkMeSandbox
    folder: Path

    @property
    def state_url(self) -> str:
        return "sqlite:///" + str(self.folder / "state.db")

    def source(self, name: str, ids: Iterable[str]) -> Path:
        return write_ids(self.folder / f"{name.replace(' ', '_')}.txt", ids)

    def mapping(self, name: str, ids: Iterable[str] = (), **extra: Any) -> dict[str, Any]:
        """A file-source mapping; writes ``ids`` to the segment's source file."""
        return file_mapping(self.folder, name, ids, **extra)

    def settings(self, mappings: Sequence[dict[str, Any]], **overrides: Any) -> Settings:
        values: dict[str, Any] = {
            "segments": list(mappings),
            "state_url": self.state_url,
            "retry_max_wait": 0.05,  # retries without real backoff waits; tests stay fast
            "http_timeout": 30.0,
        }
        values.update(overrides)
        return sandbox_settings(
            self.sandbox.url, client_id=CLIENT_ID, client_secret=CLIENT_SECRET, **values
        )

    async def sync(
        self,
        settings: Settings,
        names: Sequence[str] | None = None,
        *,
        dry_run: bool = False,
        force: bool = False,
    ) -> list[Outcome]:
        """``syncd sync`` in this process: every mapping, or ``names``; ``dry_run``
        and ``force`` as the command's flags."""
        async with open_runtime(settings, settings.mappings()) as runtime:
            return await runtime.engine.sync_all(names, dry_run=dry_run, force=force)

    async def sync_one(self, settings: Settings) -> Outcome:
        outcomes = await self.sync(settings)
        assert len(outcomes) == 1
        return outcomes[0]

    async def synced(self, name: str, ids: Iterable[str], **overrides: Any) -> Settings:
        """Settings of one file-source mapping, ``name`` holding ``ids``, synced once."""
        settings = self.settings([self.mapping(name, ids)], **overrides)
        outcome = await self.sync_one(settings)
        assert outcome.result == "synced", outcome.error
        return settings

    async def sync_changed(self, settings: Settings, name: str, ids: Iterable[str]) -> Outcome:
        """Write ``ids`` as segment ``name``'s source, forget the requests so far, sync once."""
        self.source(name, ids)
        self.sandbox.clear_requests()
        return await self.sync_one(settings)

    def guid(self, name: str) -> str:
        record = self.sandbox.find(name=name)
        assert record is not None, f"no segment {name!r} in the sandbox"
        return record.guid


HarnessFactory = Callable[..., Awaitable[Harness]]


def cli_env(
    api_url: str, folder: Path, mappings: Sequence[dict[str, Any]], **extra: object
) -> dict[str, str]:
    """The environment of a syncd subprocess; ``extra`` keys become SYNCD_<KEY>."""
    defaults = {
        "segments": list(mappings),
        "state_url": "sqlite:///" + str(folder / "state.db"),
        "retry_max_wait": 0.1,
        "admin_port": 0,
    }
    return syncd_env(api_url, defaults | extra, client_id=CLIENT_ID, client_secret=CLIENT_SECRET)


def parse_status(text: str) -> dict[str, dict[str, Any]]:
    """``syncd status --json`` output by segment name.

    Accepts a bare array of rows or an object holding them under ``segments``
    (plus other keys such as ``orphans``, whose rows are included too).
    """
    document = json.loads(text)
    rows: list[Any] = []
    if isinstance(document, list):
        rows = document
    else:
        assert isinstance(document, dict), text
        for value in document.values():
            if isinstance(value, list):
                rows += value
    assert all(isinstance(row, dict) and "segment" in row for row in rows), text
    return {row["segment"]: row for row in rows}


def status_rows(env: dict[str, str]) -> dict[str, dict[str, Any]]:
    """``syncd status --json`` by segment name."""
    result = run_cli("status", "--json", env=env)
    assert result.returncode == 0, result.stderr
    return parse_status(result.stdout)


def assert_no_secrets(sandbox: WalkMeSandbox | None, *outputs: str) -> None:
    """The client secret, and every access token ``sandbox`` issued, never printed."""
    text = "\n".join(outputs)
    assert CLIENT_SECRET not in text
    if sandbox is not None:
        assert sandbox.issued_tokens, "expected issued tokens to check"
        leaked = [token for token in sandbox.issued_tokens if token in text]
        assert not leaked, f"{len(leaked)} access tokens printed"
