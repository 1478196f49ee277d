"""The removal guard: a source truncated to nothing or to 10% holds the
segment (one `segment.held` line, nothing removed in WalkMe, `syncd sync` exits 1);
`--segment X --force` applies the plan once; restoring the file clears the hold."""

from __future__ import annotations

from typing import Any

from tests.support.chaos import Scenario, ScenarioFactory
from tests.support.ids import make_ids
from tests.support.logs import parse_events


def sync(scenario: Scenario, env: dict[str, str], *args: str) -> tuple[int, list[dict[str, Any]]]:
    result = scenario.syncd("sync", *args, env=env)
    assert "Traceback" not in result.stderr, result.stderr
    return result.returncode, parse_events(result.stderr)


def only(events: list[dict[str, Any]], name: str, segment: str) -> dict[str, Any]:
    found = [e for e in events if e["event"] == name and e.get("segment") == segment]
    assert len(found) == 1, f"{len(found)} {name} lines for {segment}: {events}"
    return found[0]


def test_removal_guard_holds_then_force_then_restore(make_scenario: ScenarioFactory) -> None:
    scenario = make_scenario()
    sandbox = scenario.sandbox
    full = make_ids(2_000, "k")
    other = make_ids(300, "o")
    scenario.add_segment("Guarded", full)
    scenario.add_segment("Bystander", other)
    env = scenario.env()

    code, _ = sync(scenario, env)
    assert code == 0
    scenario.assert_converged({"Guarded": set(full), "Bystander": set(other)})

    for label, truncated in (("empty", []), ("10%", full[:200])):
        scenario.source("Guarded", truncated)
        other = [*other, f"more-{label}@example.com"]
        scenario.source("Bystander", other)
        sandbox.clear_requests()
        code, events = sync(scenario, env)
        assert code == 1, f"{label}: a held segment must make `syncd sync` exit 1"
        held = only(events, "segment.held", "Guarded")
        assert held["level"] == "warning"
        assert held["snapshot_members"] == len(full)
        assert held["source_ids"] == len(truncated)
        assert held["planned_removes"] == len(full) - len(truncated)
        assert "--force" in held["hint"]
        assert not [
            e
            for e in events
            if e["event"] in ("segment.synced", "segment.failed") and e.get("segment") == "Guarded"
        ]
        # Nothing removed in WalkMe; the other segment synced all the same.
        assert scenario.members("Guarded") == set(full)
        assert sandbox.count("update", action="remove") == 0
        only(events, "segment.synced", "Bystander")
        row = scenario.status(env)["Guarded"]
        assert row["last_result"] == "held", row
        assert row["members"] == len(full)

    # Restoring the file clears the hold: synced, nothing sent.
    scenario.source("Guarded", full)
    sandbox.clear_requests()
    code, events = sync(scenario, env)
    assert code == 0
    only(events, "segment.synced", "Guarded")
    assert sandbox.writes() == 0
    assert scenario.status(env)["Guarded"]["last_result"] == "synced"

    # Truncated again, then applied on purpose with --force.
    scenario.source("Guarded", full[:200])
    code, _ = sync(scenario, env)
    assert code == 1
    sandbox.clear_requests()
    code, events = sync(scenario, env, "--segment", "Guarded", "--force")
    assert code == 0
    synced = only(events, "segment.synced", "Guarded")
    assert synced["removed"] == 1_800
    scenario.assert_converged({"Guarded": set(full[:200]), "Bystander": set(other)})

    # --force applies once: restoring needs no force (adds are never held).
    scenario.source("Guarded", full)
    code, _ = sync(scenario, env)
    assert code == 0
    scenario.assert_converged({"Guarded": set(full), "Bystander": set(other)})
