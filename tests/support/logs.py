"""syncd's JSON log lines: parsing them and checking how segment runs end."""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from typing import Any

# A run ends with one of these; a run skipped (another holder has the lease) is one line.
TERMINAL_EVENTS = ("segment.synced", "segment.failed", "segment.held", "segment.skipped")
# The fields every terminal line but a skipped one carries.
TERMINAL_FIELDS = ("segment", "added", "removed", "skipped", "requests", "duration_s")


def parse_events(text: str) -> list[dict[str, Any]]:
    """The JSON log lines of some output (anything else is ignored here)."""
    events: list[dict[str, Any]] = []
    for line in text.splitlines():
        try:
            event = json.loads(line)
        except ValueError:
            continue
        if isinstance(event, dict) and "event" in event:
            events.append(event)
    return events


def parse_log_lines(text: str) -> list[dict[str, Any]]:
    """Every non-empty line must be one JSON object with timestamp, level and event."""
    events: list[dict[str, Any]] = []
    for line in text.splitlines():
        if not line.strip():
            continue
        try:
            event = json.loads(line)
        except ValueError:
            raise AssertionError(f"log line is not JSON: {line!r}") from None
        assert isinstance(event, dict), line
        for key in ("timestamp", "level", "event"):
            assert key in event, f"log line without {key}: {line}"
        events.append(event)
    return events


def run_endings(events: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Each segment run (``run_id``) must end with exactly one terminal line, last;
    a synced, failed or held one carrying every ``TERMINAL_FIELDS``. Returns the
    terminal line of each run, by run_id."""
    runs: dict[str, list[dict[str, Any]]] = {}
    for event in events:
        if "run_id" in event and "segment" in event:
            runs.setdefault(event["run_id"], []).append(event)
    endings: dict[str, dict[str, Any]] = {}
    for run_id, lines in runs.items():
        terminal = [e for e in lines if e["event"] in TERMINAL_EVENTS]
        assert len(terminal) == 1, f"run {run_id}: {len(terminal)} terminal lines: {lines}"
        if terminal[0]["event"] != "segment.skipped":
            for key in TERMINAL_FIELDS:
                assert key in terminal[0], f"run {run_id}: {terminal[0]} lacks {key}"
        assert lines[-1] is terminal[0], f"run {run_id}: lines after the terminal one: {lines}"
        endings[run_id] = terminal[0]
    return endings


def count_events(events: list[dict[str, Any]], event: str, **fields: Any) -> int:
    """How many of ``events`` are ``event`` with every one of ``fields``."""
    return sum(
        1
        for e in events
        if e.get("event") == event and all(e.get(k) == v for k, v in fields.items())
    )


def named(events: Iterable[Mapping[str, Any]], event: str) -> list[Mapping[str, Any]]:
    """The ``events`` (parsed log lines, or structlog's captured entries) that are
    ``event``, in order."""
    return [e for e in events if e.get("event") == event]
