"""WalkMe refuses some ids with 400.

A few bad ids in a 50,000-member segment end quarantined (and `syncd status`
shows them) while every other id is delivered, within about 2·k·log2(batch)
extra requests. A 400 that is not about ids fails the run with WalkMe's answer
logged, quarantines no good id, and once WalkMe accepts requests again the
segment converges."""

from __future__ import annotations

import math
import random

from tests.support.chaos import ScenarioFactory
from tests.support.ids import make_ids
from tests.support.logs import named, parse_events

SEED = 5_150
BATCH = 25_000


def test_rejected_ids_are_quarantined_and_the_rest_delivered(
    make_scenario: ScenarioFactory,
) -> None:
    rng = random.Random(SEED)
    source = make_ids(50_000, "q")
    bad = set(rng.sample(source, 5))
    scenario = make_scenario(rejected_ids=bad)
    sandbox = scenario.sandbox
    scenario.add_segment("Picky", source)
    env = scenario.env(batch_size=BATCH)

    result = scenario.syncd("sync", env=env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    good = set(source) - bad
    assert scenario.members("Picky") == good
    assert scenario.snapshot("Picky") == good
    assert scenario.quarantined("Picky") == bad

    events = parse_events(result.stderr)
    lines = named(events, "segment.quarantined")
    assert sum(e["count"] for e in lines) == len(bad)
    assert all(e["walkme_answer"] for e in lines)
    (ending,) = named(events, "segment.synced")
    assert ending["quarantined"] == len(bad)

    row = scenario.status(env)["Picky"]
    assert row["quarantined"] == len(bad)
    assert row["members"] == len(good)
    shown = {q["id"] for q in row["quarantined_examples"]}
    assert shown
    assert shown <= bad

    minimum = math.ceil(len(source) / BATCH)
    writes = sandbox.writes()
    extra = writes - minimum
    bound = 2 * len(bad) * math.ceil(math.log2(BATCH))
    print(
        f"\nbad ids: {len(bad)} of {len(source)} quarantined; {writes} segment writes,"
        f" minimum {minimum}, extra {extra} (2·k·log2(batch) = {bound});"
        f" {sandbox.count(status=400)} answered 400"
    )
    assert extra <= bound + 2, f"{extra} extra requests for {len(bad)} bad ids"

    # Quarantined ids stay out: the next run has nothing to send.
    sandbox.clear_requests()
    again = scenario.syncd("sync", env=env)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert sandbox.writes() == 0
    scenario.assert_converged({"Picky": good})


def test_400_not_about_ids_fails_the_run_and_quarantines_no_good_id(
    make_scenario: ScenarioFactory,
) -> None:
    scenario = make_scenario()
    sandbox = scenario.sandbox
    source = make_ids(3_000, "g")
    scenario.add_segment("Locked", source)
    env = scenario.env(batch_size=1_000)
    first = scenario.syncd("sync", env=env)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]

    # The source changes, and WalkMe answers every segment call 400 for a reason
    # that has nothing to do with the ids.
    source = source[200:] + make_ids(1_500, "g2")
    scenario.source("Locked", source)
    answer = {"error": "invalid_request", "message": "chaos-lock-7731: segment is locked"}
    sandbox.clear_requests()
    sandbox.script(400, times=1000, body=answer)
    result = scenario.syncd("sync", env=env)
    sent = sandbox.request_counts()["total"]
    sandbox.clear_script()

    assert result.returncode == 1, result.stdout[-3000:] + result.stderr[-3000:]
    events = parse_events(result.stderr)
    (ending,) = named(events, "segment.failed")
    assert "chaos-lock-7731" in ending["error"], ending
    rejected = named(events, "walkme.rejected")
    assert rejected
    assert all("chaos-lock-7731" in e["body"] for e in rejected)
    quarantined = scenario.quarantined("Locked")
    row = scenario.status(env)["Locked"]
    print(
        f"\n400 not about ids: {sent} requests before the run gave up;"
        f" {len(quarantined)} ids quarantined: {sorted(quarantined)}"
    )
    assert sent <= 2 * math.ceil(math.log2(1_000)) + 10, f"{sent} requests"
    problems: list[str] = []
    # README: "A 400 that is not about ids ... fails the run with WalkMe's answer
    # instead of quarantining good ids."
    if quarantined or row["quarantined"]:
        problems.append(f"good ids quarantined: {sorted(quarantined)} (status: {row})")

    # WalkMe accepts requests again: every good id gets where it belongs.
    again = scenario.syncd("sync", env=env)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    problems += [f"after WalkMe recovered: {p}" for p in scenario.problems({"Locked": set(source)})]
    assert not problems, "\n".join(problems)
