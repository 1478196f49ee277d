"""`syncd run` killed with SIGKILL at random points, 21 times (22 starts), while a
100,000-member segment changes between some of the restarts.

The kill points come from a seeded RNG and are of three kinds:

- ``startup``: a random moment after the process started (reading the source,
  staging, diffing, the token or list call, or the first batches);
- ``between``: after a random number of further batches WalkMe acknowledged;
- ``in-flight``: WalkMe applied a batch and holds its answer back; the kill
  lands while syncd waits for it (the batch is in WalkMe, not in the snapshot).

Between some restarts the source changes (ids leave, new ids arrive, some that
left come back). After the last restart the segment must equal the source, the
snapshot must equal WalkMe, and the requests sent over the minimum are printed.
"""

from __future__ import annotations

import math
import random
import time
from collections import Counter
from typing import Any

from syncd.sandbox import AppliedChange, Faults
from tests.support.chaos import Scenario, ScenarioFactory
from tests.support.ids import make_ids
from tests.support.logs import parse_events, run_endings
from tests.support.waiting import wait_until

SEED = 4_242
KILLS = 21  # plus the last, clean run: 22 restarts
MEMBERS = 100_000
BATCH = 2_500
STALL_S = 2.0  # how long a batch is held in flight before the kill
NAME = "Churn"


def batches(count: int) -> int:
    return math.ceil(count / BATCH)




def start_and_kill(
    scenario: Scenario, env: dict[str, str], rng: random.Random
) -> tuple[str, AppliedChange | None]:
    """Start `syncd run`, SIGKILL it at a random point; returns the kind of point
    and, when a batch was held in flight, that batch."""
    sandbox = scenario.sandbox
    kind = rng.choice(["startup", "between", "in-flight", "in-flight"])
    daemon = scenario.daemon(env)
    stalls = len(sandbox.stalled)

    def done() -> bool:
        return daemon.count("segment.synced") > 0

    if kind == "startup":
        time.sleep(rng.uniform(0.2, 1.6))
    elif kind == "between":
        target = sandbox.writes() + rng.randint(1, 6)
        wait_until(lambda: sandbox.writes() >= target or done(), 60, "acknowledged batches")
        time.sleep(rng.uniform(0.0, 0.04))
    else:
        sandbox.stall_write(sandbox.writes_received + rng.randint(1, 6), STALL_S)
        wait_until(lambda: len(sandbox.stalled) > stalls or done(), 60, "a batch in flight")
    assert daemon.alive(), daemon.output()[-3000:] + daemon.errors()[-3000:]
    daemon.kill()
    sandbox.cancel_stall()
    if len(sandbox.stalled) > stalls:
        return "in-flight", sandbox.stalled[-1]
    return ("idle" if kind == "in-flight" else kind), None  # idle: the sync had finished


def test_sigkill_at_random_points_converges(make_scenario: ScenarioFactory) -> None:
    kill_rng = random.Random(SEED)  # the kill points, whatever happens in between
    rng = random.Random(SEED + 1)  # the source changes
    scenario = make_scenario(faults=Faults(delay=0.03))
    sandbox = scenario.sandbox
    current = make_ids(MEMBERS)
    scenario.add_segment(NAME, current)
    # A killed daemon's segment lease outlives it, and the restarted daemon skips
    # the segment until it lapses (see the next test): keep that wait short here.
    env = scenario.env(batch_size=BATCH, lease_ttl=1, schedule="1s")

    # The fewest writes that make the changes WalkMe actually went through, run by
    # run: a write that moved nothing (a batch re-sent after its answer was lost)
    # is an extra one.
    minimum = 0
    walkme: set[str] = set()
    sent = 0
    per_run: list[int] = []  # extra writes of each run

    def progress() -> int:
        nonlocal walkme, sent
        time.sleep(0.1)  # a request the kill left in WalkMe's hands lands
        guids = scenario.named(NAME)
        now = sandbox.members(guids[0]) if len(guids) == 1 else set()
        needed = batches(len(now - walkme)) + batches(len(walkme - now))
        per_run.append(sandbox.writes() - sent - needed)
        walkme, sent = now, sandbox.writes()
        return needed

    crash_free = batches(len(current))  # the same file versions, each synced once
    left: list[str] = []  # ids that left the source (some come back)
    fresh = 0
    kinds: Counter[str] = Counter()
    changes = 0
    in_flight_then_changed = 0
    started = time.monotonic()

    for _ in range(KILLS):
        kind, stalled = start_and_kill(scenario, env, kill_rng)
        kinds[kind] += 1
        minimum += progress()

        # The segment keeps changing: always once a sync had finished (a kill with
        # nothing to do proves little), and at random otherwise.
        if kind == "idle" or rng.random() < 0.5:
            # Users leave and arrive; a few of those who left come back. When a
            # batch was in flight, some of its users change too.
            members = set(current)
            leaving = set(rng.sample(current, rng.randint(500, 6_000)))
            coming = make_ids(rng.randint(500, 6_000), "new", fresh)
            fresh += len(coming)
            back = rng.sample(left, min(len(left), rng.randint(0, 400)))
            if stalled is not None:
                action, ids = stalled.action, list(stalled.ids)
                if action == "remove":
                    back += rng.sample(ids, min(len(ids), 50))
                else:
                    still = [member for member in ids if member in members]
                    leaving |= set(rng.sample(still, min(len(still), 50)))
                in_flight_then_changed += 1
            new = (members - leaving) | set(coming) | set(back)
            crash_free += batches(len(new - members)) + batches(len(members - new))
            left = sorted((set(left) | leaving) - new)
            current = sorted(new)
            scenario.source(NAME, current)
            changes += 1

    # The last restart runs to the end and stops cleanly.
    final = scenario.daemon(env)
    final.wait_for("segment.synced", timeout=90)
    code, _ = final.timed_terminate(30)
    assert code == 0, final.errors()[-3000:]
    elapsed = time.monotonic() - started
    minimum += progress()

    counts = sandbox.request_counts()
    writes = sandbox.writes()
    extra = writes - minimum
    kills = sum(kinds.values())
    spill = [p for p in (scenario.folder / "work").rglob("*") if p.is_file()]
    spill_dirs = list((scenario.folder / "work").iterdir())
    report: dict[str, Any] = {
        "kills": kills,
        "kill points": dict(kinds),
        "source changes": changes,
        "changes right after an in-flight kill": in_flight_then_changed,
        "segment writes sent": writes,
        "minimum (run by run)": minimum,
        "extra writes": extra,
        "extra writes per kill": round(extra / kills, 2),
        "extra writes by run": "".join(map(str, per_run)),
        "a crash-free daemon syncing each version once would send": crash_free,
        "requests by kind": counts["byKind"],
        "tokens": sandbox.tokens_issued,
        "left in SYNCD_WORK_DIR": f"{len(spill_dirs)} dirs,"
        f" {sum(p.stat().st_size for p in spill) / 1e6:.1f} MB",
        "seconds": round(elapsed, 1),
    }
    print("\nSIGKILL x", kills, ":", "; ".join(f"{k}: {v}" for k, v in report.items()))

    problems = scenario.problems({NAME: set(current)})
    for daemon in scenario.started:
        if "Traceback" in daemon.errors():
            problems.append(f"a traceback: {daemon.errors()[-2000:]}")
    run_endings(final.events())
    # README: "a crash never loses work and re-sends at most the one batch that
    # was in flight".
    if extra > kills or max(per_run) > 1:
        problems.append(f"{extra} writes over the minimum for {kills} kills: {per_run} by run")
    assert not problems, "\n".join(problems)


def test_restart_right_after_sigkill_syncs_at_once(make_scenario: ScenarioFactory) -> None:
    """One container, SQLite state, `--restart unless-stopped`: syncd is killed
    (OOM, node drain) mid-sync and restarted at once. The restarted process must
    carry on from the snapshot now, not skip its own segment as "another replica
    is syncing it" until the dead process's lease lapses (SYNCD_LEASE_TTL, 60 s)
    and then wait for the next schedule tick (15 min by default)."""
    scenario = make_scenario(faults=Faults(delay=0.05))
    sandbox = scenario.sandbox
    source = make_ids(40_000, "r")
    scenario.add_segment("Restarted", source)
    env = scenario.env(batch_size=BATCH)  # default lease TTL; schedule 1h
    first = scenario.daemon(env)
    wait_until(lambda: sandbox.writes() >= 3, 60, "three batches")
    first.kill()

    problems: list[str] = []
    result = scenario.syncd("sync", env=env)
    if result.returncode == 0 and not scenario.converged({"Restarted": set(source)}):
        skipped = [e for e in parse_events(result.stderr) if e["event"] == "segment.skipped"]
        problems.append(f"`syncd sync` right after the kill exited 0 without syncing: {skipped}")
    if not scenario.converged({"Restarted": set(source)}):
        second = scenario.daemon(env)
        try:
            second.wait_for("segment.synced", timeout=8)
        except AssertionError:
            skipped = [e for e in second.events() if e["event"] == "segment.skipped"]
            problems.append(f"the restarted daemon did not sync within 8 s of its start: {skipped}")
        code, _ = second.timed_terminate(30)
        assert code == 0, second.errors()[-3000:]
    assert not problems, "\n".join(problems)
    scenario.assert_converged({"Restarted": set(source)})


def test_batch_in_flight_at_kill_then_membership_changes(make_scenario: ScenarioFactory) -> None:
    """The deterministic core of the random test above. WalkMe applied a batch but
    syncd was killed before the answer, so the snapshot does not have it. Before
    the restart, some users of that batch change: those added leave the source,
    those removed come back. The restart must still make WalkMe equal the source."""
    scenario = make_scenario(faults=Faults(delay=0.02))
    sandbox = scenario.sandbox
    source = make_ids(20_000, "f")
    scenario.add_segment("Flight", source)
    env = scenario.env(batch_size=BATCH, lease_ttl=1)
    problems: list[str] = []

    def kill_in_flight(write: int) -> list[str]:
        sandbox.stall_write(sandbox.writes_received + write, 1.0)
        daemon = scenario.daemon(env)
        wait_until(lambda: len(sandbox.stalled) > stalls, 60, "a batch held in flight")
        daemon.kill()
        sandbox.cancel_stall()
        time.sleep(1.2)  # the dead process's lease (TTL 1 s) lapses
        return list(sandbox.stalled[-1].ids)

    def restart(what: str, expected: list[str]) -> None:
        daemon = scenario.daemon(env)
        daemon.wait_for("segment.synced", timeout=60)
        code, _ = daemon.timed_terminate(30)
        assert code == 0, daemon.errors()[-3000:]
        problems.extend(f"{what}: {p}" for p in scenario.problems({"Flight": set(expected)}))

    # An add batch in flight; 100 of its users leave before the restart.
    stalls = len(sandbox.stalled)
    in_flight = kill_in_flight(2)
    leaving = set(in_flight[:100])
    source = [member for member in source if member not in leaving]
    scenario.source("Flight", source)
    restart("add in flight, then 100 of its users left", source)

    # A remove batch in flight; 100 of its users come back before the restart.
    removed = source[:6_000]
    source = source[6_000:]
    scenario.source("Flight", source)
    stalls = len(sandbox.stalled)
    in_flight = kill_in_flight(1)
    assert set(in_flight) <= set(removed)
    source = source + in_flight[:100]
    scenario.source("Flight", source)
    restart("remove in flight, then 100 of its users came back", source)

    assert not problems, "\n".join(problems)
