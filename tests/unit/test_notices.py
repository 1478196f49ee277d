"""Which runs a person hears about, and what the message says (``syncd.engine.notices``)."""

from __future__ import annotations

from collections.abc import Iterable
from datetime import UTC, datetime
from typing import Any

import pytest
import structlog
from pydantic import SecretStr

from syncd import metrics
from syncd.engine import Hold, Outcome
from syncd.engine.notices import RunNotices, next_state
from syncd.logs import forget_redaction, redact
from syncd.notify import Notice, Notifier
from syncd.state import SegmentState, StateError
from syncd.state.base import LeaseLost, NoticeState, Standing

AFTER = 2  # SYNCD_NOTIFY_AFTER_FAILURES of these tests


def run(result: str, *, interrupted: bool = False, quarantined: int = 0) -> Outcome:
    outcome = Outcome("Trial users", "failed", "run-1", interrupted=interrupted)
    outcome.result = result  # type: ignore[assignment]  # a run's possible results
    outcome.quarantined = quarantined
    return outcome


def replay(results: Iterable[str], start: NoticeState | None = None) -> list[list[str]]:
    """The events each run of ``results`` calls for, one run after another."""
    state = start or NoticeState()
    told: list[list[str]] = []
    for result in results:
        state, events = next_state(state, run(result), AFTER)
        told.append(list(events))
    return told


def test_failing_is_told_once_after_n_failed_runs_in_a_row() -> None:
    assert replay(["failed", "failed", "failed", "failed"]) == [[], ["failing"], [], []]


def test_a_run_that_finishes_between_failures_starts_the_count_again() -> None:
    assert replay(["failed", "synced", "failed", "held", "failed"]) == [[], [], [], ["held"], []]


def test_recovered_is_told_when_a_failing_segment_syncs_and_only_then() -> None:
    assert replay(["failed", "failed", "synced", "synced"]) == [[], ["failing"], ["recovered"], []]


def test_held_is_told_once_and_recovered_when_it_syncs_again() -> None:
    assert replay(["held", "held", "synced", "synced"]) == [["held"], [], ["recovered"], []]


def test_failing_and_held_each_told_when_one_turns_into_the_other() -> None:
    told = replay(["failed", "failed", "held", "failed", "failed", "synced"])
    assert told == [[], ["failing"], ["held"], [], ["failing"], ["recovered"]]


def test_a_first_run_that_syncs_tells_nothing() -> None:
    state, events = next_state(NoticeState(), run("synced"), AFTER)
    assert (state.standing, state.failures, events) == ("ok", 0, [])


@pytest.mark.parametrize("standing", ["ok", "failing", "held"])
def test_a_run_stopped_by_a_signal_changes_nothing(standing: Standing) -> None:
    seen = NoticeState(standing, 1, 7)
    assert next_state(seen, run("failed", interrupted=True), AFTER) == (seen, [])


def test_quarantined_ids_are_told_whatever_the_run_ended_with() -> None:
    assert next_state(NoticeState(), run("synced", quarantined=3), AFTER)[1] == ["quarantined"]
    failing = NoticeState("failing", 5, 3)
    assert next_state(failing, run("synced", quarantined=1), AFTER)[1] == [
        "recovered",
        "quarantined",
    ]


def test_one_failure_is_enough_with_n_of_1() -> None:
    assert next_state(NoticeState(), run("failed"), 1)[1] == ["failing"]


# -- the messages --------------------------------------------------------------------


class FakeStore:
    """The two notice calls and the quarantine examples, nothing else."""

    def __init__(
        self,
        seen: NoticeState,
        examples: list[tuple[str, str, str]],
        win: bool,
        fails: StateError | None = None,
    ) -> None:
        self.seen = seen
        self.claims: list[NoticeState] = []
        self.win = win
        self.examples = examples
        self.fails = fails  # raised by the claim

    async def notice_state(self, name: str) -> NoticeState:
        return self.seen

    async def claim_notice(
        self, name: str, seen: NoticeState, new: NoticeState, holder: str | None = None
    ) -> bool:
        assert seen == self.seen
        assert holder == "holder-1"
        if self.fails is not None:
            raise self.fails
        self.claims.append(new)
        return self.win

    async def quarantine_examples(self, name: str, limit: int) -> list[tuple[str, str, str]]:
        return self.examples[:limit]


class Outbox(Notifier):
    """A notifier that keeps what it is given."""

    def __init__(self) -> None:
        super().__init__(
            SecretStr("https://hooks.example.com/services/T/B/tok"), timeout_s=1, max_wait=0.01
        )
        self.sent: list[Notice] = []

    def send(self, notice: Notice) -> None:
        self.sent.append(notice)


def segment_state(**values: Any) -> SegmentState:
    base: dict[str, Any] = {
        "name": "Trial users",
        "system_guid": "s",
        "segment_guid": "g",
        "external_id": None,
        "origin": "created",
        "needs_override": False,
        "members": 1200,
        "last_success_at": datetime(2025, 3, 1, 9, 30, tzinfo=UTC),
    }
    return SegmentState(**(base | values))


async def told(
    outcome: Outcome,
    seen: NoticeState,
    state: SegmentState | None = None,
    examples: list[tuple[str, str, str]] | None = None,
    *,
    win: bool = True,
    fails: StateError | None = None,
) -> tuple[FakeStore, list[Notice]]:
    store = FakeStore(seen, examples or [], win, fails)
    outbox = Outbox()
    notices = RunNotices(store, outbox, AFTER)  # type: ignore[arg-type]
    await notices.after_run(outcome, state or segment_state(), "holder-1")
    return store, outbox.sent


async def test_failing_message_names_the_segment_the_error_and_the_command() -> None:
    outcome = run("failed")
    outcome.error = "cannot read /data/trial.txt: No such file or directory"
    store, sent = await told(outcome, NoticeState("ok", 1, 4))
    assert store.claims == [NoticeState("failing", 2, 4)]
    [notice] = sent
    assert (notice.segment, notice.event) == ("Trial users", "failing")
    facts = notice.body["syncd"]
    assert facts["failures"] == 2
    assert facts["error"] == outcome.error
    assert facts["last_success_at"] == "2025-03-01T09:30:00+00:00"
    assert facts["command"] == "syncd history --segment 'Trial users'"
    assert (facts["standing"], facts["previous"], facts["run_id"]) == ("failing", "ok", "run-1")
    text = notice.body["text"]
    for words in ("“Trial users”", "is failing", "last 2 runs", outcome.error, facts["command"]):
        assert words in text


async def test_held_message_gives_the_numbers_and_the_force_command() -> None:
    outcome = run("held")
    outcome.hold = Hold("900 of 1000 members would be removed", 900, 1000, 100, 0.5)
    [notice] = (await told(outcome, NoticeState()))[1]
    facts = notice.body["syncd"]
    assert facts["command"] == "syncd sync --segment 'Trial users' --force"
    assert (facts["planned_removes"], facts["snapshot_members"], facts["source_ids"]) == (
        900,
        1000,
        100,
    )
    assert facts["max_remove_fraction"] == 0.5
    assert "900 of 1000 members would be removed" in notice.body["text"]
    assert "(source 100 ids, 1000 members delivered)" in notice.body["text"]
    assert "`syncd sync --segment 'Trial users' --force`" in notice.body["text"]


async def test_quarantined_message_shows_only_this_runs_examples() -> None:
    outcome = run("synced", quarantined=2)
    examples = [
        ("bad-2", "add", '{"error": "invalid user id"}'),
        ("bad-1", "add", '{"error": "invalid user id"}'),
        ("older", "add", "an earlier run's"),
    ]
    [notice] = (await told(outcome, NoticeState(), segment_state(quarantined=3), examples))[1]
    facts = notice.body["syncd"]
    assert facts["examples"] == ["bad-2", "bad-1"]
    assert (facts["quarantined"], facts["quarantined_total"]) == (2, 3)
    assert facts["walkme_answer"] == '{"error": "invalid user id"}'
    assert "older" not in notice.body["text"]


async def test_recovered_message_says_from_what_and_the_members() -> None:
    outcome = run("synced")
    outcome.added, outcome.removed = 10, 3
    [notice] = (await told(outcome, NoticeState("held", 0, 2)))[1]
    facts = notice.body["syncd"]
    assert (facts["previous"], facts["standing"], facts["members"]) == ("held", "ok", 1200)
    assert "after being held by the removal guard" in notice.body["text"]
    assert "1200 members (10 added, 3 removed" in notice.body["text"]


async def test_nothing_is_sent_when_another_process_claimed_first() -> None:
    store, sent = await told(run("failed"), NoticeState("ok", 1, 4), win=False)
    assert store.claims == [NoticeState("failing", 2, 4)]
    assert sent == []


async def test_an_unchanged_state_is_neither_written_nor_told() -> None:
    store, sent = await told(run("synced"), NoticeState("ok", 0, 9))
    assert (store.claims, sent) == ([], [])


async def test_a_failure_below_n_is_counted_without_a_message() -> None:
    store, sent = await told(run("failed"), NoticeState())
    assert (store.claims, sent) == ([NoticeState("ok", 1, 0)], [])


async def test_slack_control_sequences_in_an_error_are_shown_not_obeyed() -> None:
    outcome = run("failed")
    outcome.error = "proxy said <!channel> <https://evil.example|click> & more"
    [notice] = (await told(outcome, NoticeState("ok", 1, 1)))[1]
    text = notice.body["text"]
    assert "<" not in text
    assert ">" not in text
    assert "&lt;!channel&gt; &lt;https://evil.example|click&gt; &amp; more" in text
    assert notice.body["syncd"]["error"] == outcome.error  # the fields keep the raw text


async def test_a_secret_in_an_error_never_reaches_the_message() -> None:
    secret = "tok-6b1f0c9e2a-never-in-a-message"
    redact(secret)
    try:
        outcome = run("failed")
        outcome.error = f"WalkMe echoed Authorization: {secret}"
        [notice] = (await told(outcome, NoticeState("ok", 1, 1)))[1]
    finally:
        forget_redaction(secret)
    assert secret not in repr(notice.body)
    assert "[redacted]" in notice.body["text"]
    assert "[redacted]" in notice.body["syncd"]["error"]


async def test_a_run_that_lost_its_lease_tells_nothing_and_logs_nothing() -> None:
    with structlog.testing.capture_logs() as logs:
        store, sent = await told(run("failed"), NoticeState("ok", 1), fails=LeaseLost("vip"))
    assert (store.claims, sent, logs) == ([], [], [])


async def test_a_store_failure_is_a_failed_line_and_a_metric_never_an_error() -> None:
    def unknown() -> float:
        labels = {"event": "unknown", "result": "failed"}
        return metrics.REGISTRY.get_sample_value("syncd_notifications_total", labels) or 0.0

    before = unknown()
    with structlog.testing.capture_logs() as logs:
        _, sent = await told(run("failed"), NoticeState("ok", 1), fails=StateError("db down"))
    assert sent == []
    [line] = logs
    assert (line["event"], line["notice"]) == ("notify.failed", "unknown")
    assert "db down" in line["error"]
    assert unknown() == before + 1
