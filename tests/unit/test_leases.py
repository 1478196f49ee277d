"""The lease keeper on a SQLite state store: taking, breaking, renewing, proving
and releasing a segment's lease."""

from __future__ import annotations

import asyncio
import os
import socket
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio
import structlog

from syncd.engine.leases import Lease, LeaseKeeper, dead_here
from syncd.state import StateError, StateStore, open_store
from syncd.state.base import LeaseLost, StateRecreated

NAME = "vip"
HOST = socket.gethostname()
ME = f"{HOST}:{os.getpid()}:aaaaaa"
OTHER = "elsewhere:1:bbbbbb-run"  # a live holder on another host


@pytest_asyncio.fixture
async def store(tmp_path: Path) -> AsyncIterator[StateStore]:
    opened = await open_store(f"sqlite:///{tmp_path / 'state.db'}")
    try:
        yield opened
    finally:
        await opened.close()


def dead_pid() -> int:
    """A pid no process has: one just reaped."""
    pid = os.fork()
    if pid == 0:
        os._exit(0)
    os.waitpid(pid, 0)
    return pid


# -- taking ----------------------------------------------------------------------------


async def test_a_free_lease_is_taken_for_this_tenure(store: StateStore) -> None:
    lease = await LeaseKeeper(store, ME, 30).take(NAME, "run-1")
    assert lease == Lease(NAME, f"{ME}-run-1", "run-1")
    assert await store.lease_holder(NAME) == f"{ME}-run-1"


async def test_a_lease_held_elsewhere_is_not_taken_and_leaves_a_due_mark(
    store: StateStore,
) -> None:
    assert await store.acquire_lease(NAME, OTHER, 30)
    read_started = await store.clock()
    assert await LeaseKeeper(store, ME, 30).take(NAME, "run-1") is None
    assert await store.lease_holder(NAME) == OTHER
    # The holder sees the mark: it runs the segment again before releasing.
    assert not await store.release_lease(NAME, OTHER, read_started)


async def test_a_lease_released_while_marking_due_is_taken(
    store: StateStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert await store.acquire_lease(NAME, OTHER, 30)
    mark_due = store.mark_due

    async def released_meanwhile(name: str) -> None:
        await mark_due(name)
        await store.release_lease(name, OTHER)

    monkeypatch.setattr(store, "mark_due", released_meanwhile)
    lease = await LeaseKeeper(store, ME, 30).take(NAME, "run-1")
    assert lease is not None
    assert await store.lease_holder(NAME) == lease.holder


async def test_a_store_that_recreated_its_tables_is_asked_again(
    store: StateStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    acquire = store.acquire_lease
    calls: list[str] = []

    async def recreated_once(name: str, holder: str, ttl_s: float) -> bool:
        calls.append(holder)
        if len(calls) == 1:
            raise StateRecreated("made again")
        return await acquire(name, holder, ttl_s)

    marked: list[str] = []

    async def mark_due(name: str) -> None:
        marked.append(name)

    monkeypatch.setattr(store, "acquire_lease", recreated_once)
    monkeypatch.setattr(store, "mark_due", mark_due)
    lease = await LeaseKeeper(store, ME, 30).take(NAME, "run-1")
    assert lease is not None
    assert calls == [lease.holder, lease.holder]
    assert marked == []  # taken at the first try: no run asked for again
    assert await store.lease_holder(NAME) == lease.holder


@pytest.mark.parametrize("previous", ["own pid", "dead pid"])
async def test_the_lease_of_a_process_of_this_host_that_is_gone_is_broken(
    store: StateStore, previous: str
) -> None:
    pid = os.getpid() if previous == "own pid" else dead_pid()
    gone = f"{HOST}:{pid}:cccccc-old"
    assert await store.acquire_lease(NAME, gone, 30)
    with structlog.testing.capture_logs() as logs:
        lease = await LeaseKeeper(store, ME, 30).take(NAME, "run-1")
    assert lease is not None
    assert await store.lease_holder(NAME) == lease.holder
    assert logs == [{"event": "segment.lease_broken", "holder": gone, "log_level": "info"}]


async def test_the_lease_of_a_live_process_of_this_host_is_not_broken(
    store: StateStore,
) -> None:
    live = f"{HOST}:{os.getppid()}:dddddd-run"
    assert await store.acquire_lease(NAME, live, 30)
    assert await LeaseKeeper(store, ME, 30).take(NAME, "run-1") is None
    assert await store.lease_holder(NAME) == live


# By description, not value: the ids of parametrized tests must not hold a pid (xdist).
HOLDERS = {
    "this process's pid: a previous run here": (f"{HOST}:{os.getpid()}:nonce", True),
    "a live process": (f"{HOST}:{os.getppid()}:nonce", False),
    "another host: cannot tell": (f"other-{HOST}:{os.getpid()}:nonce", False),
    "no pid": (f"{HOST}:pid:nonce", False),
    "the host only": (HOST, False),
    "nothing": ("", False),
}


@pytest.mark.parametrize("case", list(HOLDERS))
def test_dead_here_reads_host_and_pid(case: str) -> None:
    holder, dead = HOLDERS[case]
    assert dead_here(holder) is dead


def test_dead_here_for_a_pid_that_is_gone() -> None:
    assert dead_here(f"{HOST}:{dead_pid()}:nonce-run")


async def taken(store: StateStore, ttl_s: float = 30) -> tuple[LeaseKeeper, Lease]:
    """A keeper of leases of ``ttl_s`` seconds for this process, and the lease on NAME it
    took for run-1."""
    keeper = LeaseKeeper(store, ME, ttl_s)
    lease = await keeper.take(NAME, "run-1")
    assert lease is not None
    return keeper, lease


# -- keeping and proving --------------------------------------------------------------


async def test_the_lease_is_renewed_until_it_is_lost(
    store: StateStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    keeper, lease = await taken(store, 0.3)
    sleeps: list[float] = []
    sleep = asyncio.sleep

    async def counted_sleep(seconds: float) -> None:
        sleeps.append(seconds)
        if len(sleeps) == 3:  # taken away meanwhile
            await store.release_lease(NAME, lease.holder)
            await store.acquire_lease(NAME, OTHER, 30)
        await sleep(seconds)

    monkeypatch.setattr(asyncio, "sleep", counted_sleep)
    with structlog.testing.capture_logs() as logs:
        await asyncio.wait_for(keeper.keep(lease), 5)
    assert sleeps == pytest.approx([0.1, 0.1, 0.1])  # a third of the ttl, renewed twice
    assert lease.lost
    assert logs == [
        {"event": "segment.lease_lost", "segment": NAME, "run_id": "run-1", "log_level": "warning"}
    ]


async def test_a_store_failing_to_renew_loses_the_lease(
    store: StateStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    keeper, lease = await taken(store, 0.03)

    async def failing(name: str, holder: str, ttl_s: float) -> bool:
        raise StateError("disk gone")

    monkeypatch.setattr(store, "renew_lease", failing)
    await asyncio.wait_for(keeper.keep(lease), 5)
    assert lease.lost


async def test_the_proof_renews_by_the_store_clock_and_fails_once_lost(
    store: StateStore,
) -> None:
    keeper, lease = await taken(store)
    prove = keeper.proof(lease)
    await prove()
    assert not lease.lost
    await store.release_lease(NAME, lease.holder)
    await store.acquire_lease(NAME, OTHER, 30)
    with structlog.testing.capture_logs() as logs, pytest.raises(LeaseLost) as info:
        await prove()
    assert lease.lost
    assert NAME in str(info.value)
    assert [e["event"] for e in logs] == ["segment.lease_lost"]
    with structlog.testing.capture_logs() as logs, pytest.raises(LeaseLost):
        await prove()  # lost for good: said once
    assert logs == []


async def test_a_lease_known_lost_is_never_proven_again(store: StateStore) -> None:
    keeper, lease = await taken(store)
    lease.lost = True  # the keeper found it lapsed
    with pytest.raises(LeaseLost):
        await keeper.proof(lease)()


# -- releasing -----------------------------------------------------------------------------


async def test_a_finished_run_releases_the_lease(store: StateStore) -> None:
    keeper, lease = await taken(store)
    assert not await keeper.due_again(lease, await store.clock())
    assert lease.released
    assert await store.lease_holder(NAME) is None


async def test_a_run_asked_for_again_keeps_the_lease_and_runs_again(store: StateStore) -> None:
    keeper, lease = await taken(store)
    read_started = await store.clock()
    await store.mark_due(NAME)
    with structlog.testing.capture_logs() as logs:
        assert await keeper.due_again(lease, read_started)
    assert not lease.released
    assert await store.lease_holder(NAME) == lease.holder
    assert logs == [
        {
            "event": "segment.rerun",
            "reason": "asked for again (webhook, sync command or schedule) after this run"
            " began reading its source",
            "log_level": "info",
        }
    ]


@pytest.mark.parametrize("why", ["lost", "never read"])
async def test_a_lost_or_unread_run_is_not_run_again(store: StateStore, why: str) -> None:
    keeper, lease = await taken(store)
    read_started = await store.clock()
    await store.mark_due(NAME)
    lease.lost = why == "lost"
    assert not await keeper.due_again(lease, None if why == "never read" else read_started)
    assert not lease.released  # left to release()
    await keeper.release(lease)
    assert await store.lease_holder(NAME) is None


async def test_a_store_failing_at_release_is_logged_and_left_to_expire(
    store: StateStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    keeper, lease = await taken(store)

    async def failing(name: str, holder: str, read_started: float | None = None) -> bool:
        raise StateError("disk gone")

    monkeypatch.setattr(store, "release_lease", failing)
    with structlog.testing.capture_logs() as logs:
        assert not await keeper.due_again(lease, await store.clock())
    assert lease.released
    lease.released = False
    with structlog.testing.capture_logs() as more:
        await keeper.release(lease)
    expected = {"event": "state.unavailable", "error": "disk gone", "log_level": "warning"}
    assert logs == [expected]
    assert more == [expected]


async def test_a_released_lease_is_not_released_again(
    store: StateStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    keeper, lease = await taken(store)
    assert not await keeper.due_again(lease, await store.clock())
    assert await store.acquire_lease(NAME, OTHER, 30)  # the next tenure, elsewhere
    await keeper.release(lease)
    assert await store.lease_holder(NAME) == OTHER
