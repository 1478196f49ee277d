"""SIGTERM during a batch: `syncd run` exits 0 within 30 s and loses nothing.
"Nothing lost": the batch in flight is finished and recorded, the
snapshot equals WalkMe exactly, and the next run sends only what is left."""

from __future__ import annotations

import math
import subprocess

from syncd.sandbox import Faults
from tests.support.chaos import ScenarioFactory, storm
from tests.support.ids import make_ids
from tests.support.logs import run_endings
from tests.support.waiting import wait_until

BATCH = 5_000


def test_sigterm_during_a_batch_exits_0_and_loses_nothing(make_scenario: ScenarioFactory) -> None:
    scenario = make_scenario(faults=storm(77, retry_after=0.3, drop_rate=0.05, delay=0.02))
    sandbox = scenario.sandbox
    source = make_ids(60_000, "t")
    scenario.add_segment("Term", source)
    env = scenario.env(batch_size=BATCH)
    # WalkMe applies the 4th batch and holds its answer for 1.5 s: SIGTERM lands then.
    sandbox.stall_write(4, 1.5)
    daemon = scenario.daemon(env)
    wait_until(lambda: len(sandbox.stalled) == 1, 60, "the 4th batch in flight")
    code, took = daemon.timed_terminate(30)
    in_flight = set(sandbox.stalled[0].ids)

    assert code == 0, daemon.errors()[-3000:]
    assert took < 30, took
    assert "Traceback" not in daemon.errors(), daemon.errors()[-3000:]
    events = daemon.events()
    names = [e["event"] for e in events]
    assert "daemon.stopping" in names
    assert "daemon.stopped" in names
    endings = list(run_endings(events).values())
    assert len(endings) == 1
    assert endings[0]["event"] == "segment.failed"
    assert endings[0]["interrupted"] is True
    assert endings[0]["level"] == "warning"  # a deploy is routine, not an error
    assert not [e for e in events if e["level"] in ("error", "critical")]

    # Nothing lost: the held batch was waited for and recorded.
    guid = scenario.named("Term")[0]
    held = sandbox.members(guid)
    snapshot = scenario.snapshot("Term")
    assert in_flight <= held
    assert in_flight <= snapshot, "the batch in flight at SIGTERM was not recorded"
    assert snapshot == held
    assert 0 < len(held) < len(source), "the sync should have been interrupted"

    # The next run sends exactly what is left, nothing twice.
    sandbox.faults = Faults()
    sandbox.clear_requests()
    result = scenario.syncd("sync", env=env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    scenario.assert_converged({"Term": set(source)})
    assert sandbox.count("create") == 0
    assert sandbox.writes() == math.ceil((len(source) - len(held)) / BATCH)


def test_sigterm_while_walkme_is_down_exits_within_30s(make_scenario: ScenarioFactory) -> None:
    """WalkMe answers 503 with Retry-After: 2 to everything when SIGTERM arrives,
    with the suggested SYNCD_RETRY_ATTEMPTS=20 and SYNCD_RETRY_MAX_WAIT=2: the batch
    being retried is not acknowledged, so giving up on it loses nothing, and the
    daemon must still be gone within 30 s (the usual grace before SIGKILL)."""
    scenario = make_scenario(faults=Faults(delay=0.02))
    sandbox = scenario.sandbox
    source = make_ids(40_000, "o")
    scenario.add_segment("Outage", source)
    env = scenario.env(batch_size=BATCH, retry_attempts=20, retry_max_wait=2)
    daemon = scenario.daemon(env)
    wait_until(lambda: sandbox.writes() >= 2, 60, "two batches")
    sandbox.script(503, times=10_000, retry_after="2")
    wait_until(lambda: sandbox.count(status=503) >= 2, 30, "the outage")
    try:
        code, took = daemon.timed_terminate(31)
    except subprocess.TimeoutExpired as exc:
        daemon.process.kill()
        daemon.wait(10)
        raise AssertionError(
            f"syncd run still running 31 s after SIGTERM while WalkMe is down ({exc});"
            f" {sandbox.count(status=503)} attempts answered 503"
        ) from None
    sandbox.clear_script()

    assert code == 0, daemon.errors()[-3000:]
    assert took < 30, took
    guid = scenario.named("Outage")[0]
    assert scenario.snapshot("Outage") == sandbox.members(guid)
    result = scenario.syncd("sync", env=env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    scenario.assert_converged({"Outage": set(source)})
