"""Which runs a person must hear about (``SYNCD_NOTIFY_URL``), and what they are told.

A segment's standing is ``ok``, ``failing`` (``SYNCD_NOTIFY_AFTER_FAILURES`` failed
runs in a row) or ``held`` (by the removal guard). A message goes out when a run
changes it (``failing``, ``held``, ``recovered`` when a run syncs again after
either) and when a run quarantined ids (``quarantined``), never otherwise. A run
stopped by a signal or a lost lease changes nothing: it neither failed nor synced.

The standing as last told is stored, and a message is sent only by the process
whose write of the new standing won (``StateStore.claim_notice``, a compare-and-set):
a restart, a second replica or ``syncd sync`` beside the daemon never repeat it.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import structlog

from syncd.engine.guard import force_command
from syncd.engine.outcome import Outcome
from syncd.logs import scrub, scrub_all
from syncd.notify import Notice, Notifier, NotifyEvent, count_failed
from syncd.settings import printable
from syncd.state import SegmentState, StateError, StateStore
from syncd.state.base import LeaseLost, NoticeState

log = structlog.get_logger("syncd.engine")

EXAMPLES_SHOWN = 5  # quarantined ids named, as many as segment.quarantined shows
TEXT_SHOWN = 300  # characters of an error or WalkMe answer quoted in a message


def next_state(
    seen: NoticeState, outcome: Outcome, after_failures: int
) -> tuple[NoticeState, list[NotifyEvent]]:
    """The notice state after this run, and what a person must be told of it."""
    standing, failures = seen.standing, seen.failures
    events: list[NotifyEvent] = []
    if outcome.interrupted:
        pass  # neither failed nor finished: the next run decides
    elif outcome.result == "synced":
        if standing != "ok":
            events.append("recovered")
        standing, failures = "ok", 0
    elif outcome.result == "held":
        if standing != "held":
            events.append("held")
        standing, failures = "held", 0
    else:
        failures += 1
        if failures >= after_failures and standing != "failing":
            events.append("failing")
            standing = "failing"
    if outcome.quarantined:
        events.append("quarantined")
    return NoticeState(standing, failures, seen.version), events


class RunNotices:
    """After each run: the new notice state, claimed in the store, and its messages."""

    def __init__(self, store: StateStore, notifier: Notifier, after_failures: int) -> None:
        self._store = store
        self._notifier = notifier
        self._after_failures = after_failures

    async def after_run(
        self, outcome: Outcome, state: SegmentState | None, holder: str | None
    ) -> None:
        """Decide, claim, queue: never raises for the store (a ``notify.failed`` line),
        never waits on the receiver."""
        name = outcome.segment
        try:
            seen = await self._store.notice_state(name)
            new, events = next_state(seen, outcome, self._after_failures)
            if new == seen and not events:
                return
            if not await self._store.claim_notice(name, seen, new, holder):
                return  # another process wrote first: the messages are its to send
            examples = (
                await self._store.quarantine_examples(name, EXAMPLES_SHOWN)
                if "quarantined" in events
                else []
            )
        except LeaseLost:
            return  # the segment is another run's now, and so is telling about it
        except StateError as exc:
            count_failed("unknown")
            log.error(
                "notify.failed",
                notice="unknown",
                receiver=self._notifier.receiver,
                attempts=0,
                error=f"cannot read or claim the segment's notice state: {exc}",
            )
            return
        for event in events:
            message = _Message(event, outcome, state, seen, new, examples)
            self._notifier.send(Notice(name, event, message.body()))


@dataclass(frozen=True, slots=True)
class _Message:
    """One message's body: ``text`` for Slack and Teams, the same facts under ``syncd``."""

    event: NotifyEvent
    outcome: Outcome
    state: SegmentState | None
    seen: NoticeState
    new: NoticeState
    examples: list[tuple[str, str, str]]

    def body(self) -> dict[str, Any]:
        outcome = self.outcome
        match self.event:
            case "failing":
                text, command, facts = self._failing()
            case "held":
                text, command, facts = self._held()
            case "quarantined":
                text, command, facts = self._quarantined()
            case "recovered":
                text, command, facts = self._recovered()
        name = _slack_text(printable(outcome.segment))
        fields: dict[str, Any] = {
            "event": self.event,
            "segment": outcome.segment,
            "standing": self.new.standing,
            "previous": self.seen.standing,
            "run_id": outcome.run_id,
            "at": datetime.now(UTC).isoformat(timespec="seconds"),
            "command": command,
            **facts,
        }
        message = f"syncd: segment “{name}” {text} `{command}`"
        # Texts in it were scrubbed when stored; this is the second line of defence.
        return {"text": scrub(message), "syncd": scrub_all(fields)}

    def _history(self) -> str:
        return f"syncd history --segment {shlex.quote(self.outcome.segment)}"

    def _failing(self) -> tuple[str, str, dict[str, Any]]:
        outcome, state = self.outcome, self.state
        error = _excerpt(outcome.error or "")
        last_success = state.last_success_at if state is not None else None
        since = last_success.isoformat(timespec="seconds") if last_success else None
        text = (
            f"is failing: its last {self.new.failures} runs failed"
            f" (last success: {since or 'never'}). Last error: {_slack_text(error)}."
            " Details:"
        )
        facts = {"failures": self.new.failures, "error": error, "last_success_at": since}
        return text, self._history(), facts

    def _held(self) -> tuple[str, str, dict[str, Any]]:
        hold = self.outcome.hold
        assert hold is not None  # a held run has the guard's verdict
        text = (
            f"is held by the removal guard, nothing was sent: {_slack_text(hold.reason)}"
            # What syncd delivered: an adopted segment's members WalkMe cannot show.
            f" (source {hold.source_ids} ids, {hold.snapshot_members} members delivered)."
            " Check the source; if the removals are right, apply them once:"
        )
        facts = {
            "reason": hold.reason,
            "planned_removes": hold.removes,
            "snapshot_members": hold.snapshot_members,
            "source_ids": hold.source_ids,
            "max_remove_fraction": hold.max_remove_fraction,
        }
        return text, force_command(self.outcome.segment), facts

    def _quarantined(self) -> tuple[str, str, dict[str, Any]]:
        outcome = self.outcome
        count = outcome.quarantined
        shown = self.examples[: min(count, EXAMPLES_SHOWN)]
        ids = [member for member, _, _ in shown]
        answer = _excerpt(shown[0][2]) if shown else ""
        total = self.state.quarantined if self.state is not None else count
        text = (
            f"has {count} ids WalkMe refused, set aside (quarantined), e.g."
            f" {_slack_text(', '.join(ids))}. WalkMe said: {_slack_text(answer)}."
            " They are sent again when their membership changes, or after a reset."
            " Details:"
        )
        facts = {
            "quarantined": count,
            "quarantined_total": total,
            "examples": ids,
            "walkme_answer": answer,
        }
        return text, "syncd status", facts

    def _recovered(self) -> tuple[str, str, dict[str, Any]]:
        outcome, state = self.outcome, self.state
        was = "failing" if self.seen.standing == "failing" else "held by the removal guard"
        members = state.members if state is not None else None
        held = "" if members is None else f" WalkMe holds {members} members"
        text = (
            f"recovered: synced again after being {was}.{held} ({outcome.added} added,"
            f" {outcome.removed} removed by this run). History:"
        )
        facts = {"members": members, "added": outcome.added, "removed": outcome.removed}
        return text, self._history(), facts


def _excerpt(text: str) -> str:
    return text if len(text) <= TEXT_SHOWN else text[:TEXT_SHOWN] + "..."


def _slack_text(text: str) -> str:
    """Text as Slack shows it literally: its control sequences (``<!channel>``,
    links) start with ``<``; Slack asks for these three escaped."""
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
