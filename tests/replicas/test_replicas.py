"""Three ``syncd run`` replicas sharing one PostgreSQL, under churn, one SIGKILLed
(issue 6 §2).

Setup: a fresh PostgreSQL database; the WalkMe sandbox on a thread of this
process, serving each replica on its own port (so every request WalkMe applies is
attributed to the replica that sent it) and remembering the ids of every applied
change in the order it applied them; 30 file-source segments of 2,000-20,000 ids;
3 replicas (``SYNCD_SCHEDULE=3s``, ``SYNCD_LEASE_TTL=5``, batches of 500, guard
off); WalkMe answers after 0.05 s, so runs take several requests and overlap.

For 60 s a churn thread rewrites every source file each 2 s (seeded random adds
and removes of 2-6 % each, written to a temporary file and renamed in). Half way
through, the next batch WalkMe applies for any replica gets that replica
SIGKILLed before it hears the answer: the worst moment, a batch applied in WalkMe
but never recorded in the snapshot. The segments whose leases it held then are
its in-flight segments; their in-flight batch is its last applied change for each.

What is measured, from WalkMe's side (the sandbox applied log, with ids):

- replaying every applied change per segment in order, an id *added while already
  a member* or *removed while not a member* is a redundant send (an id sent more
  than once). Redundant sends are allowed only for ids of the killed replica's
  in-flight batch of that segment, only by later requests of other replicas, and
  only once per id: at most one batch per segment. ids sent = effective membership
  changes + redundant sends, so "minimum needed" is the effective change count;
- convergence: after churn stops, within 60 s, every WalkMe segment equals its
  final file and the PostgreSQL snapshot (``members`` table, the ``segments``
  counter and ``syncd status --json``) equals WalkMe;
- exactly one WalkMe segment per mapping (no double create across replicas);
- ``segment.skipped`` lines appear (replicas step around each other's leases),
  every replica synced some segments, no Traceback, no internal error, no failed
  run other than interruptions, and the survivors exit 0 on SIGTERM.

The counts are printed (``pytest -s tests/replicas``).
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import subprocess
import sys
import threading
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from syncd.sandbox import Faults

from .conftest import (
    CLIENT_SECRET,
    Applied,
    RecordingSandbox,
    Replica,
    connect,
    free_port,
    recording_sandbox,
    replica_env,
    wait_until,
)

SEED = 20260601
SEGMENTS = 30
REPLICAS = 3
SIZES = (2_000, 20_000)
BATCH = 500
DELAY = 0.05
SCHEDULE = "3s"
LEASE_TTL = 5
CHURN_S = 60.0
CHURN_STEP_S = 2.0
CHURN_FRACTION = (0.02, 0.06)  # of a segment's size, added and (separately) removed
KILL_AFTER_S = 30.0
CONVERGE_WITHIN_S = 60.0
STOP_WITHIN_S = 30.0


# ---------------------------------------------------------------------------- sources


@dataclass
class SourceFile:
    name: str
    path: Path
    universe: list[str]
    members: set[str]
    writes: int = 0

    def write(self) -> None:
        # Readers never see half a file: write aside, then rename over it.
        partial = self.path.with_name(self.path.name + ".partial")
        partial.write_text("".join(f"{m}\n" for m in sorted(self.members)), encoding="utf-8")
        os.replace(partial, self.path)
        self.writes += 1

    def churn(self, rng: random.Random) -> None:
        size = len(self.members)
        leaving = rng.sample(sorted(self.members), int(size * rng.uniform(*CHURN_FRACTION)))
        outside = [member for member in self.universe if member not in self.members]
        joining = rng.sample(outside, min(len(outside), int(size * rng.uniform(*CHURN_FRACTION))))
        self.members.difference_update(leaving)
        self.members.update(joining)


def make_sources(directory: Path, rng: random.Random) -> list[SourceFile]:
    directory.mkdir()
    sources = []
    for index in range(SEGMENTS):
        size = rng.randint(*SIZES)
        universe = [f"r{index:02d}-user{n:06d}@example.com" for n in range(2 * size)]
        source = SourceFile(
            name=f"Replica segment {index:02d}",
            path=directory / f"segment-{index:02d}.txt",
            universe=universe,
            members=set(rng.sample(universe, size)),
        )
        source.write()
        sources.append(source)
    return sources


@dataclass
class Churner:
    sources: list[SourceFile]
    rng: random.Random
    until: float
    stop: threading.Event = field(default_factory=threading.Event)
    steps: int = 0
    error: BaseException | None = None

    def run(self) -> None:
        try:
            due = time.monotonic() + CHURN_STEP_S
            while due <= self.until:
                if self.stop.wait(max(0.0, due - time.monotonic())):
                    return
                for source in self.sources:
                    source.churn(self.rng)
                    source.write()
                self.steps += 1
                due += CHURN_STEP_S
        except BaseException as exc:
            self.error = exc


# ---------------------------------------------------------------------------- state views


async def _leases(url: str) -> list[tuple[str, str]]:
    conn = await connect(url)
    try:
        rows = await conn.fetch("SELECT segment, holder FROM leases")
    finally:
        await conn.close()
    return [(row[0], row[1]) for row in rows]


def leases_of(url: str, pid: int) -> set[str]:
    """Segments whose lease a process holds (holder is ``host:pid:random``)."""
    return {
        segment
        for segment, holder in asyncio.run(_leases(url))
        if holder.rsplit(":", 2)[-2] == str(pid)
    }


@dataclass
class Snapshot:
    guids: dict[str, str | None]
    counters: dict[str, int]
    members: dict[str, set[str]]


async def _snapshot(url: str, with_members: bool) -> Snapshot:
    conn = await connect(url)
    try:
        rows = await conn.fetch("SELECT name, segment_guid, members FROM segments")
        members: dict[str, set[str]] = defaultdict(set)
        if with_members:
            for segment, member in await conn.fetch("SELECT segment, id FROM members"):
                members[segment].add(member)
    finally:
        await conn.close()
    return Snapshot(
        guids={row[0]: row[1] for row in rows},
        counters={row[0]: row[2] for row in rows},
        members=dict(members),
    )


def snapshot(url: str, with_members: bool = True) -> Snapshot:
    return asyncio.run(_snapshot(url, with_members))


def walkme_segments(sandbox: RecordingSandbox) -> list[dict[str, Any]]:
    segments: list[dict[str, Any]] = sandbox.state()["segments"]
    return segments


def convergence_problems(
    sandbox: RecordingSandbox, sources: list[SourceFile], url: str
) -> list[str]:
    """Empty once WalkMe equals every source and the snapshot equals WalkMe."""
    problems = []
    walkme: dict[str, tuple[str, set[str]]] = {}
    for source in sources:
        record = sandbox.find(name=source.name)
        if record is None:
            problems.append(f"{source.name}: no WalkMe segment")
            continue
        members = sandbox.members(record.guid)
        walkme[source.name] = (record.guid, members)
        if members != source.members:
            problems.append(
                f"{source.name}: WalkMe has {len(members - source.members)} ids not in the"
                f" source and lacks {len(source.members - members)} of it"
            )
    if problems:
        return problems
    stored = snapshot(url, with_members=False)
    for name, (guid, members) in walkme.items():
        if stored.guids.get(name) != guid or stored.counters.get(name) != len(members):
            problems.append(
                f"{name}: snapshot says {stored.guids.get(name)} with"
                f" {stored.counters.get(name)} members, WalkMe {guid} with {len(members)}"
            )
    if problems:
        return problems
    stored = snapshot(url)
    for name, (_, members) in walkme.items():
        held = stored.members.get(name, set())
        if held != members:
            problems.append(
                f"{name}: snapshot has {len(held - members)} ids WalkMe lacks and lacks"
                f" {len(members - held)} WalkMe has"
            )
    return problems


# ---------------------------------------------------------------------------- the replay


@dataclass
class Replay:
    """Every applied change replayed in order: what was effective, what redundant."""

    requests_by_port: Counter[int] = field(default_factory=Counter)
    ids_sent: int = 0
    effective: int = 0
    excused: int = 0
    excused_by_segment: Counter[str] = field(default_factory=Counter)
    violations: list[str] = field(default_factory=list)
    violating_ids: int = 0
    final: dict[str, set[str]] = field(default_factory=dict)


def replay(
    changes: list[Applied],
    names: dict[str, str],
    in_flight: dict[str, Applied],
    victim_port: int | None,
) -> Replay:
    result = Replay()
    members: dict[str, set[str]] = defaultdict(set)
    resent: dict[str, set[str]] = defaultdict(set)
    for change in changes:
        result.requests_by_port[change.port] += 1
        result.ids_sent += len(change.ids)
        current = members[change.guid]
        if change.action == "create":
            redundant: set[str] = set()
            effective = len(change.ids)
            members[change.guid] = set(change.ids)
        elif change.action == "add":
            redundant = set(change.ids & current)
            effective = len(change.ids) - len(redundant)
            current |= change.ids
        elif change.action == "remove":
            redundant = set(change.ids - current)
            effective = len(change.ids) - len(redundant)
            current -= change.ids
        else:  # override: re-sending a present id is a re-send
            redundant = set(change.ids & current)
            effective = len(change.ids ^ current)
            members[change.guid] = set(change.ids)
        result.effective += effective
        if not redundant:
            continue
        name = names.get(change.guid, change.guid)
        batch = in_flight.get(change.guid)
        excusable: set[str] = set()
        if batch is not None and change.seq > batch.seq and change.port != victim_port:
            excusable = (redundant & batch.ids) - resent[change.guid]
        resent[change.guid] |= excusable
        result.excused += len(excusable)
        result.excused_by_segment[name] += len(excusable)
        unexcused = redundant - excusable
        if unexcused:
            result.violating_ids += len(unexcused)
            result.violations.append(
                f"{name}: change #{change.seq} ({change.action} of {len(change.ids)} ids, port"
                f" {change.port}) re-sent {len(unexcused)} ids that were not in a batch in"
                f" flight on the killed replica, e.g. {sorted(unexcused)[:3]}"
            )
    result.final = dict(members)
    return result


# ---------------------------------------------------------------------------- the test


def _status_json(env: dict[str, str], cwd: Path) -> dict[str, Any]:
    done = subprocess.run(
        [sys.executable, "-m", "syncd", "status", "--json"],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, f"syncd status --json: {done.returncode}\n{done.stderr}"
    status: dict[str, Any] = json.loads(done.stdout)
    return status


def test_three_replicas_share_one_postgres_through_churn_and_a_sigkill(
    fresh_database: str, tmp_path: Path
) -> None:
    began = time.monotonic()
    rng = random.Random(SEED)
    sources = make_sources(tmp_path / "sources", rng)
    mappings = [{"name": s.name, "source": {"type": "file", "path": str(s.path)}} for s in sources]
    segments_file = tmp_path / "segments.json"
    segments_file.write_text(json.dumps(mappings), encoding="utf-8")

    problems: list[str] = []
    replicas: list[Replica] = []
    churner: Churner | None = None
    envs: list[dict[str, str]] = []
    with recording_sandbox(REPLICAS, Faults(delay=DELAY)) as sandbox:
        try:
            for index, api_port in enumerate(sandbox.ports):
                admin_port = free_port()
                env = replica_env(
                    api_port=api_port,
                    state_url=fresh_database,
                    segments_file=segments_file,
                    admin_port=admin_port,
                    work_dir=tmp_path / f"work-{index}",
                    schedule=SCHEDULE,
                    lease_ttl=str(LEASE_TTL),
                    batch_size=str(BATCH),
                    max_remove_fraction="1.0",
                    http_timeout="20",
                    retry_max_wait="2",
                )
                (tmp_path / f"work-{index}").mkdir()
                envs.append(env)
                replicas.append(
                    Replica.start(index, tmp_path / f"replica-{index}", env, api_port, admin_port)
                )
            by_port = {replica.api_port: replica for replica in replicas}

            def all_started() -> bool:
                for replica in replicas:
                    if replica.process.poll() is not None:
                        raise AssertionError(
                            f"replica {replica.index} exited with {replica.process.returncode}"
                            f" before starting\n{replica.tail()}"
                        )
                return all(replica.count("daemon.started") for replica in replicas)

            wait_until(all_started, 30, "the three replicas to start")
            churn_started = time.monotonic()
            churner = Churner(sources, rng, churn_started + CHURN_S)
            thread = threading.Thread(target=churner.run, name="churn", daemon=True)
            thread.start()

            # Half way: SIGKILL whichever replica next has a batch applied by WalkMe,
            # before it hears the answer.
            time.sleep(max(0.0, churn_started + KILL_AFTER_S - time.monotonic()))
            sandbox.arm_kill({replica.api_port: replica.pid for replica in replicas})
            assert sandbox.killed.wait(30), "no replica sent a batch within 30 s of arming"
            kill = sandbox.kill
            assert kill is not None
            victim = by_port[kill.port]
            held = leases_of(fresh_database, victim.pid)
            victim.process.wait(timeout=10)
            if victim.process.returncode != -9:
                problems.append(f"the victim exited with {victim.process.returncode}, not -9")

            thread.join(timeout=CHURN_S + 10)
            assert not thread.is_alive(), "the churn thread did not finish"
            if churner.error is not None:
                raise churner.error
            churn_stopped = time.monotonic()

            remaining: list[str] = []
            converged_after: float | None = None
            deadline = churn_stopped + CONVERGE_WITHIN_S
            while True:
                remaining = convergence_problems(sandbox, sources, fresh_database)
                if not remaining:
                    converged_after = time.monotonic() - churn_stopped
                    break
                if time.monotonic() > deadline:
                    break
                time.sleep(0.5)
            status = _status_json(envs[0], tmp_path)

            survivors = [replica for replica in replicas if replica is not victim]
            exits = {replica.index: replica.terminate(STOP_WITHIN_S) for replica in survivors}
        finally:
            if churner is not None:
                churner.stop.set()
            for replica in replicas:
                replica.close()
        changes = sandbox.applied_changes()
        walkme = walkme_segments(sandbox)
        request_counts = sandbox.request_counts()
        final_members = {s["guid"]: sandbox.members(s["guid"]) for s in walkme}

    # ------------------------------------------------------------ what happened
    names = {segment["guid"]: segment["name"] for segment in walkme}
    guids = {segment["name"]: segment["guid"] for segment in walkme}
    in_flight: dict[str, Applied] = {}
    for change in changes:
        if change.port == kill.port and names.get(change.guid) in held:
            in_flight[change.guid] = change  # the last one per segment wins
    result = replay(changes, names, in_flight, kill.port)
    events = {replica.index: replica.events() for replica in replicas}
    counts = {
        replica.index: Counter(str(entry.get("event")) for entry in events[replica.index])
        for replica in replicas
    }
    port_index = {replica.api_port: replica.index for replica in replicas}
    failed_runs = [
        (replica.index, entry)
        for replica in replicas
        for entry in events[replica.index]
        if entry.get("event") == "segment.failed" and not entry.get("interrupted")
    ]

    # ------------------------------------------------------------ the counts
    lines = [
        "",
        f"replicas: {REPLICAS}, segments: {SEGMENTS}, batch {BATCH}, WalkMe delay {DELAY} s,"
        f" schedule {SCHEDULE}, lease TTL {LEASE_TTL} s",
        f"churn: {churner.steps} steps of {CHURN_STEP_S} s over {CHURN_S:.0f} s,"
        f" final source sizes {sum(len(s.members) for s in sources)} ids",
        f"killed: replica {victim.index} (pid {victim.pid}) at"
        f" {kill.at - churn_started:.1f} s into the churn, right after WalkMe applied its"
        f" change #{kill.seq}; leases it held: {len(held)}; in-flight batches: "
        + ", ".join(
            f"{names[guid]} {change.action} {len(change.ids)} ids"
            for guid, change in sorted(in_flight.items(), key=lambda item: names[item[0]])
        ),
        f"requests to WalkMe: {request_counts['total']} ({request_counts['byKind']},"
        f" statuses {request_counts['byStatus']}, dropped {request_counts['dropped']})",
        f"applied segment changes: {len(changes)}; by replica "
        + ", ".join(
            f"{port_index.get(port, port)}: {n}"
            for port, n in sorted(result.requests_by_port.items())
        ),
        f"ids sent: {result.ids_sent}; effective membership changes (the minimum needed):"
        f" {result.effective}; re-sent: {result.excused + result.violating_ids}"
        f" (within the killed replica's in-flight batches: {result.excused}"
        f" {dict(result.excused_by_segment)}; elsewhere: {result.violating_ids})",
        "per replica: "
        + "; ".join(
            f"{i}: synced {c['segment.synced']}, skipped {c['segment.skipped']},"
            f" lease_lost {c['segment.lease_lost']}, failed {c['segment.failed']},"
            f" cycles {c['cycle.finished']}"
            for i, c in counts.items()
        ),
        "convergence after churn stopped: "
        + (f"{converged_after:.1f} s" if converged_after is not None else "NOT REACHED"),
        f"survivors' exit statuses on SIGTERM: {exits}",
        f"test wall time: {time.monotonic() - began:.1f} s",
    ]
    print("\n".join(lines))

    # ------------------------------------------------------------ the verdict
    if remaining:
        details = []
        for problem in remaining:
            details.append(problem)
        for source in sources:
            guid = guids.get(source.name)
            if guid is None:
                continue
            members = final_members[guid]
            batch = in_flight.get(guid)
            extra, missing = members - source.members, source.members - members
            if extra or missing:
                from_batch = (
                    f"; of these, {len(extra & batch.ids)} extra and {len(missing & batch.ids)}"
                    f" missing are ids of the killed replica's in-flight {batch.action} batch"
                    f" ({len(batch.ids)} ids)"
                    if batch is not None
                    else ""
                )
                details.append(
                    f"{source.name}: at the end WalkMe has {len(extra)} extra and misses"
                    f" {len(missing)} ids{from_batch}"
                )
        problems.append(
            f"not converged {CONVERGE_WITHIN_S:.0f} s after churn stopped:\n  "
            + "\n  ".join(details)
        )
    if len(walkme) != SEGMENTS or len(guids) != SEGMENTS:
        problems.append(
            f"WalkMe holds {len(walkme)} segments under {len(guids)} names, expected"
            f" {SEGMENTS}: {sorted(Counter(s['name'] for s in walkme).items())}"
        )
    if result.violations:
        problems.append(
            f"{result.violating_ids} ids re-sent outside the killed replica's in-flight"
            " batches:\n  " + "\n  ".join(result.violations[:20])
        )
    for guid, members in final_members.items():
        if result.final.get(guid) != members:
            problems.append(f"replaying the applied log does not give {names[guid]}'s members")
    rows = {row["segment"]: row for row in status["segments"]}
    for source in sources:
        row = rows.get(source.name, {})
        guid = guids.get(source.name)
        if (
            guid is None
            or row.get("segment_guid") != guid
            or row.get("members") != len(final_members[guid])
        ):
            problems.append(f"syncd status --json disagrees with WalkMe for {source.name}: {row}")
    if not any(c["segment.skipped"] for c in counts.values()):
        problems.append("no replica logged segment.skipped: the replicas never met a lease")
    for index, c in counts.items():
        if not c["segment.synced"]:
            problems.append(f"replica {index} synced no segment: the work was not shared")
        if c["segment.internal_error"]:
            problems.append(f"replica {index} logged segment.internal_error")
    for index, entry in failed_runs[:10]:
        problems.append(f"replica {index}: a run failed: {entry}")
    for replica in replicas:
        if "Traceback" in replica.stderr() or "Traceback" in replica.stdout():
            problems.append(f"a Traceback in replica {replica.index}'s output:\n{replica.tail()}")
        if CLIENT_SECRET in replica.stderr() or CLIENT_SECRET in replica.stdout():
            problems.append(f"the client secret appeared in replica {replica.index}'s output")
    for index, code in exits.items():
        if code != 0:
            problems.append(
                f"replica {index} exited with {code} on SIGTERM (None: did not exit within"
                f" {STOP_WITHIN_S:.0f} s)"
            )
    assert not problems, "\n".join(problems)
