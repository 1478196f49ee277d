"""`syncd run` through a storm of faults converges.

WalkMe answers 20% of segment calls 500/502/503 and 10% 429 with Retry-After in
both forms (delta-seconds and HTTP-date, picked at random); 10% of the calls it
applies are answered by a dropped connection (the ambiguous case), and the first
two creates always are; tokens live 3 s and are revoked early twice. Each kind of
fault is also scripted once, so every kind happens whatever the request order.
Sources change twice while the daemon runs. At the end every segment equals its
source, the snapshot equals WalkMe, and a fault-free `syncd sync` has nothing left
to send.
"""

from __future__ import annotations

import email.utils
import random
import re
import time
from collections import Counter

from syncd.sandbox import Faults
from tests.support.chaos import Scenario, ScenarioFactory, storm
from tests.support.ids import make_ids
from tests.support.logs import named, run_endings
from tests.support.waiting import wait_until

SEED = 20_240_611
BATCH = 2_000


def change(rng: random.Random, ids: list[str], remove: int, add: list[str]) -> list[str]:
    gone = set(rng.sample(ids, remove))
    return [member for member in ids if member not in gone] + add


def wait_converged(scenario: Scenario, expected: dict[str, list[str]], what: str) -> None:
    wanted = {name: set(ids) for name, ids in expected.items()}
    wait_until(lambda: scenario.converged(wanted), 120, what, step=0.2)


def test_storm_of_faults_converges(make_scenario: ScenarioFactory) -> None:
    rng = random.Random(SEED)
    faults = storm(SEED, retry_after=0.5, drop_rate=0.1, delay=0.01)
    scenario = make_scenario(token_lifetime=3.0, faults=faults)
    sandbox = scenario.sandbox
    sandbox.drop_after_apply("create", 2)  # the first two creates: applied, never answered
    sources = {
        "Storm A": make_ids(24_000, "a"),
        "Storm B": make_ids(6_000, "b"),
        "Storm C": make_ids(700, "c"),
        "Storm D": ["solo@example.com"],
    }
    for name, ids in sources.items():
        extra = {"external_id": "storm-b"} if name == "Storm B" else {}
        scenario.add_segment(name, ids, **extra)
    env = scenario.env(schedule="2s", batch_size=BATCH)
    daemon = scenario.daemon(env)

    # A token revoked early: WalkMe answers 401 to a token that has not expired.
    wait_until(lambda: sandbox.writes() >= 3, 60, "three segment writes")
    sandbox.revoke_tokens()
    wait_converged(scenario, sources, "the first sync through the storm")

    # Membership changes twice while the faults go on.
    sources["Storm A"] = change(rng, sources["Storm A"], 4_000, make_ids(3_000, "a2"))
    sources["Storm B"] = change(rng, sources["Storm B"], 2_000, make_ids(1_000, "b2"))
    sources["Storm C"] = sources["Storm C"] + make_ids(300, "c2")
    sources["Storm D"] = ["other-solo@example.com"]
    # Besides the random faults, each kind once for sure (scripts come first).
    for failure in (500, 502, 503):
        sandbox.script(failure)
    sandbox.script(429, retry_after="1")
    sandbox.script(429, retry_after=email.utils.formatdate(time.time() + 3, usegmt=True))
    for name, ids in sources.items():
        scenario.source(name, ids)
    base = sandbox.writes()
    wait_until(lambda: sandbox.writes() >= base + 2, 60, "writes of the second version")
    sandbox.revoke_tokens()
    wait_converged(scenario, sources, "the second version through the storm")

    sources["Storm A"] = change(rng, sources["Storm A"], 1_000, make_ids(2_500, "a3"))
    sources["Storm B"] = sources["Storm B"] + make_ids(2_100, "b3")
    for name in ("Storm A", "Storm B"):
        scenario.source(name, sources[name])
    wait_converged(scenario, sources, "the third version through the storm")

    # Let the run that delivered the last batch record it, then stop cleanly.
    synced = daemon.count("cycle.finished")
    daemon.wait_for("cycle.finished", count=synced + 1, timeout=60)
    code, took = daemon.timed_terminate(30)
    assert code == 0, daemon.errors()[-3000:]
    assert took < 30

    expected = {name: set(ids) for name, ids in sources.items()}
    scenario.assert_converged(expected)

    events = daemon.events()
    endings = run_endings(events)
    results = Counter(e["event"] for e in endings.values())
    assert "Traceback" not in daemon.errors(), daemon.errors()[-3000:]
    assert not named(events, "segment.internal_error")
    # Random faults never exhausted the generous retry budget.
    assert results["segment.failed"] == 0, [e for e in endings.values() if "error" in e]

    # The faults did happen, every kind of them.
    counts = sandbox.request_counts()
    by_status = counts["byStatus"]
    for status in ("500", "502", "503", "429", "401"):
        assert by_status.get(status, 0) > 0, f"no {status} answered: {by_status}"
    assert counts["dropped"] >= 3
    delta = [v for v in sandbox.retry_after_sent if re.fullmatch(r"\d+(\.\d+)?", v)]
    dates = [v for v in sandbox.retry_after_sent if v.endswith("GMT")]
    assert delta, sandbox.retry_after_sent
    assert dates, sandbox.retry_after_sent
    assert sandbox.tokens_issued >= 3, "tokens never expired mid-run"
    # Every 5xx/429 the daemon saw was retried (none was given up on).
    retried = Counter(e.get("status") for e in events if e["event"] == "walkme.retry")
    for code in (500, 502, 503, 429):
        assert retried[code] == by_status.get(str(code), 0), (code, retried, by_status)
    # Two creates were dropped after being applied: still one segment per mapping.
    assert sandbox.count("create", applied=True) >= 4

    print(
        f"\nstorm: {counts['total']} requests, by status {dict(sorted(by_status.items()))},"
        f" dropped {counts['dropped']}, tokens {sandbox.tokens_issued},"
        f" Retry-After sent {len(delta)} as seconds / {len(dates)} as HTTP-date,"
        f" runs {dict(results)}"
    )

    # The snapshot agrees with WalkMe: a fault-free pass has nothing to send.
    sandbox.faults = Faults()
    sandbox.clear_requests()
    result = scenario.syncd("sync", env=env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert sandbox.writes() == 0, sandbox.request_counts()
