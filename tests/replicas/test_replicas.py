"""Three ``syncd run`` replicas sharing one PostgreSQL, under churn, one SIGKILLed.

Setup: a fresh PostgreSQL database; the WalkMe sandbox on a thread of this
process, serving each replica on its own port (so every change WalkMe applies is
attributed to the replica that sent it) and remembering the ids of every applied
change in the order it applied them (the sandbox's own ``requestLog`` has only
counts); 30 file-source segments of 2,000-20,000 ids; 3 replicas
(``SYNCD_SCHEDULE=3s``, ``SYNCD_LEASE_TTL=5``, batches of 500, removal guard off);
WalkMe answers after 0.05 s, so runs take several requests and overlap.

For 60 s a churn thread rewrites every source file each 2 s (seeded random adds
and removes of 2-6 % of its size each, written aside and renamed in). 30 s in,
the next batch WalkMe applies for any replica gets that replica SIGKILLed from
inside the sandbox, before it hears WalkMe's answer: a batch applied in WalkMe
but never recorded in the snapshot, the case "a batch that was in flight on the
killed replica" is about. The segments whose leases it held at that moment are
its in-flight segments; their in-flight batch is its last change WalkMe applied
there (its other runs' requests waiting in the sandbox still land after the kill).

What is measured, from WalkMe's side:

- an id *sent more than once*: replaying every applied change of a segment in
  order, an id added while already a member or removed while not a member (an
  override re-sending a member counts too). Allowed only for ids of the killed
  replica's in-flight batch of that segment, sent by another replica after the
  kill, once per id: at most one batch per segment. ids sent = effective
  membership changes (the minimum needed) + ids sent more than once;
- convergence: after churn stops, every WalkMe segment equals its final file and
  the PostgreSQL snapshot (``members`` table and ``segments`` counter) equals
  WalkMe; polled up to 60 s, but given up once WalkMe has received nothing for a
  lease TTL plus two cycles (12 s), since nothing would change any more;
- exactly one WalkMe segment per mapping (no double create across replicas), and
  ``syncd status --json`` agrees with the ``members`` table;
- ``segment.skipped`` lines appear (replicas step around each other's leases),
  every replica synced some segments, ``cycle.finished`` counts only failed or
  held runs as failed, no Traceback, no internal error, no failed run other than
  interruptions, and the survivors exit 0 on SIGTERM.

The counts are printed (``pytest -s tests/replicas``).
"""

from __future__ import annotations

import asyncio
import json
import random
import threading
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from syncd.sandbox import Faults
from tests.support.ids import write_ids
from tests.support.net import free_port
from tests.support.processes import run_cli
from tests.support.replicas import (
    CLIENT_SECRET,
    Applied,
    Kill,
    RecordingSandbox,
    Replica,
    connect,
    recording_sandbox,
    replica_env,
)
from tests.support.waiting import wait_until

SEED = 20260601
SEGMENTS = 30
REPLICAS = 3
SIZES = (2_000, 20_000)
BATCH = 500
DELAY = 0.05
SCHEDULE_S = 3
SCHEDULE = f"{SCHEDULE_S}s"
LEASE_TTL = 5
CHURN_S = 60.0
CHURN_STEP_S = 2.0
CHURN_FRACTION = (0.02, 0.06)  # of a segment's size, added and (separately) removed
KILL_AFTER_S = 30.0
CONVERGE_WITHIN_S = 60.0
STUCK_AFTER_S = LEASE_TTL + 2 * SCHEDULE_S + 1  # a dead holder's lease lapses, then two cycles
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
        write_ids(self.path, sorted(self.members))
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
    """Rewrites every source file each CHURN_STEP_S from ``start`` until ``until``."""

    sources: list[SourceFile]
    rng: random.Random
    start: float
    until: float
    stop: threading.Event = field(default_factory=threading.Event)
    steps: int = 0
    error: BaseException | None = None

    def run(self) -> None:
        try:
            for step in range(1, round((self.until - self.start) / CHURN_STEP_S) + 1):
                due = self.start + step * CHURN_STEP_S
                if self.stop.wait(max(0.0, due - time.monotonic())):
                    return
                for source in self.sources:
                    source.churn(self.rng)
                    source.write()
                self.steps += 1
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


# ---------------------------------------------------------------------------- the run


@dataclass
class Run:
    """Everything the live phase saw, for the report and the verdict."""

    sources: list[SourceFile]
    replicas: list[Replica]
    churner: Churner
    churn_started: float
    kill: Kill
    victim: Replica
    held: set[str]  # segments whose lease the victim held when it died
    converged_after: float | None
    gave_up: str
    exits: dict[int, int | None]
    status: dict[str, Any]
    stored: Snapshot
    changes: list[Applied]
    walkme: list[dict[str, Any]]
    walkme_members: dict[str, set[str]]
    request_counts: dict[str, Any]
    setup_s: float = 0.0
    wall_s: float = 0.0
    names: dict[str, str] = field(init=False)
    guids: dict[str, str] = field(init=False)
    in_flight: dict[str, Applied] = field(init=False)
    replayed: Replay = field(init=False)
    events: dict[int, list[dict[str, Any]]] = field(init=False)
    counts: dict[int, Counter[str]] = field(init=False)

    def __post_init__(self) -> None:
        self.names = {segment["guid"]: segment["name"] for segment in self.walkme}
        self.guids = {segment["name"]: segment["guid"] for segment in self.walkme}
        # The killed replica's in-flight batch of each segment it held: its last
        # change WalkMe applied there (one it sent and never heard back about).
        self.in_flight = {}
        for change in self.changes:
            if change.port == self.kill.port and self.names.get(change.guid) in self.held:
                self.in_flight[change.guid] = change
        self.replayed = replay(self.changes, self.names, self.in_flight, self.kill.port)
        self.events = {replica.index: replica.events() for replica in self.replicas}
        self.counts = {
            index: Counter(str(entry.get("event")) for entry in entries)
            for index, entries in self.events.items()
        }

    def takeovers(self) -> dict[str, float]:
        """Seconds from the kill to another replica's first change of each in-flight segment."""
        taken: dict[str, float] = {}
        for change in self.changes:
            batch = self.in_flight.get(change.guid)
            name = self.names[change.guid]
            if batch and change.seq > self.kill.seq and change.port != self.kill.port:
                taken.setdefault(name, round(change.at - self.kill.at, 1))
        return taken


def report(run: Run) -> str:
    replayed, kill = run.replayed, run.kill
    port_index = {replica.api_port: replica.index for replica in run.replicas}
    unchanged = {
        index: sum(1 for e in entries if e.get("event") == "segment.synced" and e.get("unchanged"))
        for index, entries in run.events.items()
    }
    in_flight = sorted(run.in_flight.items(), key=lambda item: run.names[item[0]])
    converged = f"{run.converged_after:.1f} s" if run.converged_after is not None else "NOT REACHED"
    lines = [
        "",
        f"replicas {REPLICAS}, segments {SEGMENTS}, batch {BATCH}, WalkMe delay {DELAY} s,"
        f" schedule {SCHEDULE}, lease TTL {LEASE_TTL} s, seed {SEED}",
        f"churn: {run.churner.steps} rewrites of every file, {CHURN_STEP_S:.0f} s apart, over"
        f" {CHURN_S:.0f} s; final sources hold {sum(len(s.members) for s in run.sources)} ids",
        f"killed: replica {run.victim.index} (pid {run.victim.pid}),"
        f" {kill.at - run.churn_started:.1f} s into the churn, right after WalkMe applied its"
        f" change #{kill.seq}; it held {len(run.held)} leases; in-flight batches: "
        + ", ".join(f"{run.names[g]} {c.action} {len(c.ids)} ids" for g, c in in_flight),
        f"taken over by another replica after (s): {run.takeovers()}",
        f"requests to WalkMe: {run.request_counts['total']} {run.request_counts['byKind']},"
        f" statuses {run.request_counts['byStatus']}",
        f"applied segment changes: {len(run.changes)}; by replica "
        + ", ".join(
            f"{port_index.get(port, port)}: {n}"
            for port, n in sorted(replayed.requests_by_port.items(), key=lambda i: i[0])
        ),
        f"ids sent: {replayed.ids_sent}; effective membership changes (the minimum needed):"
        f" {replayed.effective}; sent more than once: {replayed.excused + replayed.violating_ids}"
        f" (ids of the killed replica's in-flight batches: {replayed.excused}"
        f" {dict(sorted(replayed.excused_by_segment.items()))}; any other: "
        f"{replayed.violating_ids})",
        "per replica: "
        + "; ".join(
            f"{i}: synced {c['segment.synced']} ({unchanged[i]} unchanged), skipped"
            f" {c['segment.skipped']}, lease_lost {c['segment.lease_lost']}, failed"
            f" {c['segment.failed']}, cycles {c['cycle.finished']}"
            for i, c in sorted(run.counts.items())
        ),
        f"convergence after churn stopped: {converged}",
        f"survivors' exit statuses on SIGTERM: {run.exits}",
        f"wall time: {run.wall_s:.1f} s (replicas up and churn started after {run.setup_s:.1f} s)",
    ]
    return "\n".join(lines)


def _attribution(ids: set[str], batch: Applied | None) -> str:
    if batch is None or not ids:
        return ""
    return (
        f" ({len(ids & batch.ids)} of them ids of the killed replica's in-flight"
        f" {batch.action} batch of {len(batch.ids)})"
    )


def verdict(run: Run) -> list[str]:
    problems: list[str] = []
    if run.victim.process.returncode != -9:
        problems.append(f"the killed replica exited with {run.victim.process.returncode}, not -9")
    if run.gave_up:
        details = []
        for source in run.sources:
            guid = run.guids.get(source.name)
            if guid is None:
                details.append(f"{source.name}: no WalkMe segment")
                continue
            members, batch = run.walkme_members[guid], run.in_flight.get(guid)
            extra, missing = members - source.members, source.members - members
            if extra:
                details.append(
                    f"{source.name}: WalkMe holds {len(extra)} ids the source does not"
                    + _attribution(extra, batch)
                )
            if missing:
                details.append(
                    f"{source.name}: WalkMe lacks {len(missing)} ids of the source"
                    + _attribution(missing, batch)
                )
            held = run.stored.members.get(source.name, set())
            if held != members:
                details.append(
                    f"{source.name}: the PostgreSQL snapshot holds {len(held - members)} ids"
                    f" WalkMe does not and lacks {len(members - held)} WalkMe holds"
                    + _attribution((held - members) | (members - held), batch)
                )
        problems.append(f"{run.gave_up}:\n  " + "\n  ".join(details))
    if len(run.walkme) != SEGMENTS or len(run.guids) != SEGMENTS:
        by_name = sorted(Counter(s["name"] for s in run.walkme).items())
        problems.append(f"WalkMe holds {len(run.walkme)} segments, expected {SEGMENTS}: {by_name}")
    if run.replayed.violations:
        problems.append(
            f"{run.replayed.violating_ids} ids sent more than once outside the killed replica's"
            " in-flight batches:\n  " + "\n  ".join(run.replayed.violations[:20])
        )
    for guid, members in run.walkme_members.items():
        if run.replayed.final.get(guid) != members:
            problems.append(f"replaying the applied log does not give {run.names[guid]}'s members")
    rows = {row["segment"]: row for row in run.status["segments"]}
    for source in run.sources:
        row = rows.get(source.name, {})
        stored = (run.stored.guids.get(source.name), len(run.stored.members.get(source.name, ())))
        if (row.get("segment_guid"), row.get("members")) != stored:
            problems.append(
                f"syncd status --json shows {source.name} as {row.get('segment_guid')} with"
                f" {row.get('members')} members; the members table: {stored[0]} with {stored[1]}"
            )
    counts = run.counts
    if not any(c["segment.skipped"] for c in counts.values()):
        problems.append("no replica logged segment.skipped: the replicas never met a lease")
    for index, c in sorted(counts.items()):
        if not c["segment.synced"]:
            problems.append(f"replica {index} synced no segment: the work was not shared")
        if c["segment.internal_error"]:
            problems.append(f"replica {index} logged segment.internal_error")
        failed = [
            e
            for e in run.events[index]
            if e.get("event") == "segment.failed" and not e.get("interrupted")
        ]
        for entry in failed[:5]:
            problems.append(f"replica {index}: a run failed: {entry}")
        # cycle.finished's "failed" must count failed (or held) runs, not segments this
        # replica skipped because another one was syncing them.
        said_failed = sum(
            int(e.get("failed", 0)) for e in run.events[index] if e.get("event") == "cycle.finished"
        )
        not_synced = c["segment.failed"] + c["segment.held"]
        if said_failed > not_synced:
            problems.append(
                f"replica {index}: its cycle.finished lines report {said_failed} failed runs in"
                f" all, but it logged {c['segment.failed']} segment.failed and"
                f" {c['segment.held']} segment.held lines (and {c['segment.skipped']}"
                " segment.skipped): skipped segments are counted as failed"
            )
    for replica in run.replicas:
        out, err = replica.stdout(), replica.stderr()
        if "Traceback" in out or "Traceback" in err:
            problems.append(f"a Traceback in replica {replica.index}'s output:\n{replica.tail()}")
        if CLIENT_SECRET in out or CLIENT_SECRET in err:
            problems.append(f"the client secret appeared in replica {replica.index}'s output")
    for index, code in sorted(run.exits.items()):
        if code != 0:
            problems.append(
                f"replica {index} exited with {code} on SIGTERM (None: still running"
                f" {STOP_WITHIN_S:.0f} s later)"
            )
    return problems


def _status_json(env: dict[str, str], cwd: Path) -> dict[str, Any]:
    done = run_cli("status", "--json", env=env, cwd=cwd, timeout=60)
    assert done.returncode == 0, f"syncd status --json: {done.returncode}\n{done.stderr}"
    status: dict[str, Any] = json.loads(done.stdout)
    return status


def _start_replicas(
    sandbox: RecordingSandbox, url: str, segments_file: Path, tmp_path: Path
) -> list[Replica]:
    replicas = []
    for index, api_port in enumerate(sandbox.ports):
        admin_port = free_port()
        env = replica_env(
            api_port=api_port,
            state_url=url,
            segments_file=segments_file,
            work_dir=tmp_path / f"work-{index}",
            admin_port=admin_port,
            schedule=SCHEDULE,
            lease_ttl=str(LEASE_TTL),
            batch_size=str(BATCH),
            max_remove_fraction="1.0",
            http_timeout="20",
            retry_max_wait="2",
        )
        replicas.append(
            Replica.start(index, tmp_path / f"replica-{index}", env, api_port, admin_port)
        )

    def all_started() -> bool:
        for replica in replicas:
            if replica.process.poll() is not None:
                raise AssertionError(
                    f"replica {replica.index} exited with {replica.process.returncode}"
                    f" before starting\n{replica.tail()}"
                )
        return all(replica.count("daemon.started") for replica in replicas)

    wait_until(all_started, 30, "the three replicas to start")
    return replicas


def _await_convergence(
    sandbox: RecordingSandbox, sources: list[SourceFile], url: str, churn_stopped: float
) -> tuple[float | None, str]:
    """Seconds after churn stopped until converged, or None and why it gave up."""
    deadline = churn_stopped + CONVERGE_WITHIN_S
    while True:
        remaining = convergence_problems(sandbox, sources, url)
        now = time.monotonic()
        if not remaining:
            return now - churn_stopped, ""
        if now > deadline:
            return None, f"not converged {CONVERGE_WITHIN_S:.0f} s after churn stopped"
        quiet = now - max(churn_stopped, sandbox.last_change_at())
        if quiet > STUCK_AFTER_S:
            # Nothing sent for a lease TTL plus two cycles: it has settled, and
            # waiting out the rest of the minute would change nothing.
            return None, (
                f"not converged: WalkMe received no change for {quiet:.0f} s"
                f" ({now - churn_stopped:.0f} s after churn stopped), so it settled diverged"
            )
        time.sleep(0.5)


def test_three_replicas_share_one_postgres_through_churn_and_a_sigkill(
    fresh_database: str, tmp_path: Path
) -> None:
    database_url = fresh_database
    began = time.monotonic()
    rng = random.Random(SEED)
    sources = make_sources(tmp_path / "sources", rng)
    mappings = [{"name": s.name, "source": {"type": "file", "path": str(s.path)}} for s in sources]
    segments_file = tmp_path / "segments.json"
    segments_file.write_text(json.dumps(mappings), encoding="utf-8")

    replicas: list[Replica] = []
    churner: Churner | None = None
    with recording_sandbox(REPLICAS, Faults(delay=DELAY)) as sandbox:
        try:
            replicas = _start_replicas(sandbox, database_url, segments_file, tmp_path)
            by_port = {replica.api_port: replica for replica in replicas}
            churn_started = time.monotonic()
            churner = Churner(sources, rng, churn_started, churn_started + CHURN_S)
            thread = threading.Thread(target=churner.run, name="churn", daemon=True)
            thread.start()

            # Half way: SIGKILL whichever replica next has a batch applied by WalkMe,
            # before it hears WalkMe's answer.
            time.sleep(max(0.0, churn_started + KILL_AFTER_S - time.monotonic()))
            sandbox.arm_kill({replica.api_port: replica.pid for replica in replicas})
            assert sandbox.killed.wait(30), "no replica sent a batch within 30 s of arming"
            kill = sandbox.kill
            assert kill is not None
            victim = by_port[kill.port]
            held = leases_of(database_url, victim.pid)  # before anyone takes them over
            victim.process.wait(timeout=10)

            thread.join(timeout=CHURN_S + 10)
            assert not thread.is_alive(), "the churn thread did not finish"
            if churner.error is not None:
                raise churner.error
            converged_after, gave_up = _await_convergence(
                sandbox, sources, database_url, time.monotonic()
            )
            status = _status_json(replicas[0].env, tmp_path)
            exits = {
                replica.index: replica.terminate(STOP_WITHIN_S)
                for replica in replicas
                if replica is not victim
            }
        finally:
            if churner is not None:
                churner.stop.set()
            for replica in replicas:
                replica.close()
        walkme = walkme_segments(sandbox)
        run = Run(
            sources=sources,
            replicas=replicas,
            churner=churner,
            churn_started=churn_started,
            kill=kill,
            victim=victim,
            held=held,
            converged_after=converged_after,
            gave_up=gave_up,
            exits=exits,
            status=status,
            stored=snapshot(database_url),
            changes=sandbox.applied_changes(),
            walkme=walkme,
            walkme_members={s["guid"]: sandbox.members(s["guid"]) for s in walkme},
            request_counts=sandbox.request_counts(),
            setup_s=churn_started - began,
            wall_s=time.monotonic() - began,
        )
    print(report(run))
    problems = verdict(run)
    if problems:
        pytest.fail("\n".join(problems), pytrace=False)
