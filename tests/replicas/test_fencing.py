"""Two real syncd processes sharing one PostgreSQL and the WalkMe sandbox (each on its
own sandbox port, so every change WalkMe applies is attributed to its sender):

- a replica frozen (SIGSTOP) past its lease while it waits on a ``Retry-After``
  wakes up, logs ``segment.lease_lost`` and sends nothing more, while the replica
  that took over has made WalkMe equal the changed source;
- a Heap task completing on one replica while the other is mid-run on the same
  segment is not lost: WalkMe ends up with the latest membership within the
  debounce plus a run, not at the next schedule.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
from pathlib import Path

import aiohttp

from syncd.sandbox import Faults
from tests.support.heap import WEBHOOK_SECRET, new_task, page, post_signed
from tests.support.ids import write_ids
from tests.support.net import free_port
from tests.support.replicas import (
    RecordingSandbox,
    Replica,
    connect,
    recording_sandbox,
    replica_env,
)
from tests.support.waiting import wait_until

LEASE_TTL = 2
RETRY_AFTER_S = 4  # longer than the lease: the frozen replica's lease lapses meanwhile
SEGMENT = "Fenced segment"


def _env(
    sandbox_port: int, url: str, segments_file: Path, work: Path, **settings: str
) -> dict[str, str]:
    return replica_env(
        api_port=sandbox_port,
        state_url=url,
        segments_file=segments_file,
        work_dir=work,
        admin_port=free_port(),
        lease_ttl=str(LEASE_TTL),
        max_remove_fraction="1.0",
        http_timeout="20",
        **settings,
    )


def _sync(index: int, tmp_path: Path, env: dict[str, str], port: int) -> Replica:
    """``syncd sync`` to its end."""
    replica = Replica.start(index, tmp_path / f"sync-{index}", env, port, 0, command="sync")
    try:
        replica.process.wait(timeout=60)
    finally:
        replica.close()
    return replica


async def _snapshot_members(url: str, name: str) -> set[str]:
    conn = await connect(url)
    try:
        rows = await conn.fetch("SELECT id FROM members WHERE segment = $1", name)
    finally:
        await conn.close()
    return {row[0] for row in rows}


def _walkme_members(sandbox: RecordingSandbox, name: str) -> set[str]:
    """The WalkMe segment's members (none while it does not exist yet)."""
    record = sandbox.find(name=name)
    return set() if record is None else sandbox.members(record.guid)


def test_a_replica_frozen_past_its_lease_sends_nothing_after_waking(
    fresh_database: str, tmp_path: Path
) -> None:
    url = fresh_database
    source = tmp_path / "members.txt"
    base = [f"user{n:04d}@example.com" for n in range(200)]
    late = [f"late{n:04d}@example.com" for n in range(50)]
    write_ids(source, base)
    segments_file = tmp_path / "segments.json"
    mapping = {"name": SEGMENT, "source": {"type": "file", "path": str(source)}}
    segments_file.write_text(json.dumps([mapping]), encoding="utf-8")

    with recording_sandbox(2, Faults()) as sandbox:
        frozen_port, other_port = sandbox.ports
        settings = {"retry_max_wait": "30"}
        frozen_env = _env(frozen_port, url, segments_file, tmp_path / "work-a", **settings)
        other_env = _env(other_port, url, segments_file, tmp_path / "work-b", **settings)
        first = _sync(1, tmp_path, other_env, other_port)
        assert first.process.returncode == 0, first.tail()

        # The frozen replica's add of the 50 late ids is throttled; it waits, frozen.
        write_ids(source, base + late)
        sandbox.script(429, retry_after=str(RETRY_AFTER_S))
        frozen = Replica.start(0, tmp_path / "frozen", frozen_env, frozen_port, 0, "sync")
        try:
            wait_until(lambda: sandbox.count("update", status=429) == 1, 30, "the throttled update")
            os.kill(frozen.pid, signal.SIGSTOP)
            try:
                time.sleep(LEASE_TTL + 1)  # its lease lapses
                write_ids(source, base)  # the late ids leave again
                other = _sync(2, tmp_path, other_env, other_port)
                assert other.process.returncode == 0, other.tail()
                assert other.count("segment.synced") == 1, other.tail()
                assert _walkme_members(sandbox, SEGMENT) == set(base)
                woke = time.monotonic()
            finally:
                os.kill(frozen.pid, signal.SIGCONT)
            frozen.process.wait(timeout=60)
        finally:
            frozen.close()

        sent_after_waking = [
            change
            for change in sandbox.applied_changes()
            if change.port == frozen_port and change.at >= woke
        ]
        assert sent_after_waking == [], (
            f"the frozen replica sent {len(sent_after_waking)} changes after waking\n"
            + frozen.tail()
        )
        assert frozen.count("segment.lease_lost") >= 1, frozen.tail()
        assert frozen.count("segment.synced") == 0, frozen.tail()
        walkme = _walkme_members(sandbox, SEGMENT)
        assert walkme == set(base), (
            f"WalkMe holds {len(walkme - set(base))} ids not in the source\n" + frozen.tail()
        )
        assert asyncio.run(_snapshot_members(url, SEGMENT)) == set(base)


HEAP_SEGMENT_ID = 4242
DEBOUNCE_S = 0.5
WALKME_DELAY_S = 2.0  # each WalkMe call: a run is mid-send for a while


async def _post_task(port: int, add: list[str], remove: list[str]) -> None:
    body = page(
        task=new_task(),
        number=1,
        total=1,
        add=add,
        remove=remove,
        segment_id=HEAP_SEGMENT_ID,
        name="Heap fenced",
    )
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as http:
        answer = await post_signed(http, f"http://127.0.0.1:{port}/heap/webhook", body)
    assert answer.status == 200, answer


async def _running_runs(url: str) -> int:
    conn = await connect(url)
    try:
        count: int = await conn.fetchval(
            "SELECT count(*) FROM runs WHERE segment = $1 AND result = 'running'", SEGMENT
        )
    finally:
        await conn.close()
    return count


def test_a_task_completing_while_another_replica_runs_the_segment_is_synced_soon(
    fresh_database: str, tmp_path: Path
) -> None:
    url = fresh_database
    segments_file = tmp_path / "segments.json"
    mapping = {
        "name": SEGMENT,
        "source": {"type": "heap_webhook", "heap_segment_id": HEAP_SEGMENT_ID},
    }
    segments_file.write_text(json.dumps([mapping]), encoding="utf-8")
    first = [f"heap{n:04d}@example.com" for n in range(100)]
    joining = [f"joined{n:04d}@example.com" for n in range(25)]
    leaving = first[:5]
    latest = (set(first) - set(leaving)) | set(joining)

    replicas: list[Replica] = []
    with recording_sandbox(2, Faults()) as sandbox:
        try:
            hooks = []
            for index, port in enumerate(sandbox.ports):
                hook = free_port()
                hooks.append(hook)
                env = _env(
                    port,
                    url,
                    segments_file,
                    tmp_path / f"work-{index}",
                    schedule="1h",
                    heap_webhook_secret=WEBHOOK_SECRET,
                    webhook_port=str(hook),
                    heap_webhook_debounce=str(DEBOUNCE_S),
                )
                env["SYNCD_LEASE_TTL"] = "10"
                replicas.append(Replica.start(index, tmp_path / f"replica-{index}", env, port, 0))
            a, b = replicas
            wait_until(
                lambda: all(r.count("cycle.finished") for r in replicas),
                60,
                "both replicas' start-up cycle",
            )
            sandbox.faults = Faults(delay=WALKME_DELAY_S)

            asyncio.run(_post_task(hooks[0], first, []))
            wait_until(lambda: asyncio.run(_running_runs(url)) == 1, 30, "A's run to start")
            time.sleep(0.3)  # A has read its membership and is sending
            skipped_before = b.count("segment.skipped")
            asyncio.run(_post_task(hooks[1], joining, leaving))
            wait_until(
                lambda: b.count("segment.skipped") > skipped_before, 30, "B to meet A's lease"
            )
            asked = time.monotonic()

            # Within the debounce plus one run (four WalkMe calls at most), and margin.
            within = DEBOUNCE_S + 4 * WALKME_DELAY_S + 15
            try:
                wait_until(
                    lambda: _walkme_members(sandbox, SEGMENT) == latest, within, "convergence"
                )
            except AssertionError:
                walkme = _walkme_members(sandbox, SEGMENT)
                raise AssertionError(
                    f"{time.monotonic() - asked:.0f} s after the second task: WalkMe lacks"
                    f" {len(latest - walkme)} ids and holds {len(walkme - latest)} removed"
                    f" ones\n{a.tail()}\n{b.tail()}"
                ) from None
            assert a.count("segment.rerun") + b.count("segment.rerun") >= 1
        finally:
            for replica in replicas:
                replica.close()
