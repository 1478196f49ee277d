"""WalkMe turns slow: answers take 2.5 s while syncd gives up after 1 s
(SYNCD_HTTP_TIMEOUT=1), for a while, then it is back to normal.

A request syncd timed out on is still applied by WalkMe later: every retry must
be harmless, and a create must never become two segments.
"""

from __future__ import annotations

import time

from tests.support.chaos import ScenarioFactory
from tests.support.ids import make_ids
from tests.support.logs import run_endings
from tests.support.waiting import wait_until

SLOW_S = 2.5  # every segment call answers after this long while WalkMe is slow
TIMEOUT_S = 1  # SYNCD_HTTP_TIMEOUT


def test_slow_walkme_with_short_client_timeout_converges(make_scenario: ScenarioFactory) -> None:
    scenario = make_scenario()
    sandbox = scenario.sandbox
    # Slow from the moment the first create arrives, for 5 s: the create, the
    # look-ups before its retry and the first batches all time out.
    sandbox.slow_on_create = (SLOW_S, 5.0)
    sources = {
        "Slow A": make_ids(10_000, "a"),
        "Slow B": make_ids(3_000, "b"),
    }
    scenario.add_segment("Slow A", sources["Slow A"])
    scenario.add_segment("Slow B", sources["Slow B"], external_id="slow-b")
    env = scenario.env(schedule="2s", batch_size=2_000, http_timeout=TIMEOUT_S)
    daemon = scenario.daemon(env)

    expected = {name: set(ids) for name, ids in sources.items()}
    wait_until(lambda: scenario.converged(expected), 90, "convergence after the slow spell", 0.2)
    assert sandbox.slow_started_at is not None, "WalkMe never turned slow"

    # Back to normal: the next change goes through as usual.
    sources["Slow A"] = sources["Slow A"][1_500:] + make_ids(2_000, "a2")
    scenario.source("Slow A", sources["Slow A"])
    expected = {name: set(ids) for name, ids in sources.items()}
    wait_until(lambda: scenario.converged(expected), 60, "convergence of the change", 0.2)
    finished = daemon.count("cycle.finished")
    daemon.wait_for("cycle.finished", count=finished + 1, timeout=60)
    code, took = daemon.timed_terminate(30)
    assert code == 0, daemon.errors()[-3000:]
    assert took < 30

    scenario.assert_converged(expected)
    events = daemon.events()
    run_endings(events)
    timeouts = [e for e in events if e["event"] == "walkme.retry" and e["reason"] == "timeout"]
    assert len(timeouts) >= 3, "syncd never timed out on slow WalkMe"
    assert "Traceback" not in daemon.errors(), daemon.errors()[-3000:]
    print(
        f"\nslow: {len(timeouts)} timeouts retried; creates sent {sandbox.count('create')},"
        f" applied {sandbox.count('create', applied=True)}; {sandbox.request_counts()['total']}"
        " requests"
    )


def test_walkme_recovering_while_a_timed_out_create_is_pending_makes_one_segment(
    make_scenario: ScenarioFactory,
) -> None:
    """WalkMe is slow for a short spell that starts with the create: syncd times
    out after 1 s, WalkMe is fast again at 1.2 s, but that first create is only
    applied at 2.5 s. The look-up syncd makes before retrying the create (README:
    "before retrying, syncd looks the segment up, so it never creates two") runs
    while WalkMe has not applied it yet."""
    scenario = make_scenario()
    sandbox = scenario.sandbox
    sandbox.slow_on_create = (SLOW_S, 1.2)
    source = make_ids(3_000, "p")
    scenario.add_segment("Pending", source)  # no external_id, as in most mappings
    env = scenario.env(http_timeout=TIMEOUT_S)

    result = scenario.syncd("sync", env=env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    started = sandbox.slow_started_at
    assert started is not None, "WalkMe never turned slow"
    # Let the slow create land, as it does in WalkMe.
    wait_until(lambda: time.monotonic() > started + SLOW_S + 0.5, 10, "the slow create")

    creates = sandbox.count("create", applied=True)
    named = scenario.named("Pending")
    assert len(named) == 1, (
        f"{len(named)} WalkMe segments named 'Pending' ({creates} creates applied):"
        " a retried create made a second segment"
    )
    scenario.assert_converged({"Pending": set(source)})
