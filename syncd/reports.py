"""What ``syncd status``, ``syncd history`` and ``syncd explain`` print: tables for
people, JSON for scripts.

Only reads the state store. Every line goes through :func:`out`, which scrubs
secrets: the texts shown were stored by other processes.
"""

from __future__ import annotations

import dataclasses
import json
from datetime import UTC, datetime
from typing import Any

from syncd.engine import all_mappings, force_command
from syncd.engine.explain import Explanation
from syncd.logs import scrub
from syncd.settings import SegmentMapping, Settings, printable
from syncd.state import SegmentState, open_store
from syncd.state.base import ReplicaPresence, RunRecord

StatusRow = dict[str, Any]


def out(line: str = "") -> None:
    """One line of a command's output, on stdout (log lines go to stderr)."""
    print(scrub(line), flush=True)


def _status_row(state: SegmentState, configured: bool) -> StatusRow:
    row: StatusRow = {
        "segment": state.name,
        "configured": configured,
        "segment_guid": state.segment_guid,
        "origin": state.origin,
        "members": state.members,
        "needs_rebuild": state.needs_override,
        "last_run_at": state.last_run_at.isoformat() if state.last_run_at else None,
        "last_result": state.last_result,
        "last_success_at": state.last_success_at.isoformat() if state.last_success_at else None,
        "last_error": state.last_error,
        "skipped": state.skipped,
        "skipped_examples": state.skipped_examples,
        "collapsed": state.collapsed,
        "orphaned_at": state.orphaned_at.isoformat() if state.orphaned_at else None,
        "quarantined": state.quarantined,
    }
    if configured and state.last_result == "held":
        row["hint"] = f"{force_command(state.name)} applies the held plan once"
    return row


async def print_status(
    settings: Settings, mappings: list[SegmentMapping] | None, *, as_json: bool = False
) -> None:
    """Each configured segment's state, orphans apart; with no mappings given (None),
    every segment the state store knows, none of them called an orphan."""
    store = await open_store(settings.state_url)
    try:
        found = await all_mappings(settings, mappings or [], store)
        states = {state.name: state for state in await store.all()}
        next_runs = _next_runs(await store.live_replicas())
        quarantine = {
            name: await store.quarantine_examples(name, 5)
            for name, s in states.items()
            if s.quarantined
        }
    finally:
        await store.close()
    shown = [*found.usable, *found.broken]
    if mappings is None:
        shown += [name for name in states if name not in found.names]
    current = set(shown)
    rows: list[StatusRow] = [
        _status_row(states[name], True)
        if name in states
        else {"segment": name, "configured": True, "last_result": "never run"}
        for name in shown
    ]
    for row in rows:
        name = row["segment"]
        if name in found.usable:
            row["schedule"] = settings.schedule_for(found.usable[name]).text
        row["next_run"] = next_runs.get(name)
        if row["segment"] in found.broken:
            row["last_result"] = "invalid"
            row["last_error"] = found.broken[row["segment"]].error
        if row["segment"] in quarantine:
            row["quarantined_examples"] = [
                {"id": member, "action": action, "walkme_answer": reason[:200]}
                for member, action, reason in quarantine[row["segment"]]
            ]
    orphans = [_status_row(s, False) for name, s in states.items() if name not in current]
    if as_json:
        out(json.dumps({"segments": rows, "orphans": orphans}, indent=2))
        return
    _print_table(rows)
    if orphans:
        out("\nOrphans: WalkMe segments syncd wrote to that no mapping names any more")
        _print_table(orphans)
        out("  `syncd prune` shows what would be deleted; `syncd prune --yes` deletes them.")


def _next_runs(replicas: list[ReplicaPresence]) -> dict[str, str]:
    """When some live ``syncd run`` next runs each segment on schedule (the earliest
    of the replicas'), as ISO time; a segment no daemon runs has none."""
    earliest: dict[str, float] = {}
    for replica in replicas:
        for name, at in replica.next_runs.items():
            earliest[name] = min(at, earliest.get(name, at))
    return {
        name: datetime.fromtimestamp(at, UTC).isoformat(timespec="seconds")
        for name, at in earliest.items()
    }


def _print_table(rows: list[StatusRow]) -> None:
    out(
        f"{'SEGMENT':30} {'WALKME GUID':36} {'MEMBERS':>9} {'LAST RUN':25} {'RESULT':9}"
        f" {'NEXT RUN':25} SKIPPED"
    )
    for row in rows:
        out(
            f"{printable(row['segment'])[:30]:30} {row.get('segment_guid') or '-':36}"
            f" {row.get('members', 0):>9} {row.get('last_run_at') or '-':25}"
            f" {row.get('last_result') or '-':9} {row.get('next_run') or '-':25}"
            f" {row.get('skipped', 0)}"
        )
        if row.get("last_error"):
            out(f"    error: {printable(row['last_error'])}")
        if row.get("hint"):
            out(f"    {printable(row['hint'])}")
        if row.get("skipped_examples"):
            out(f"    skipped ids: {printable('; '.join(row['skipped_examples']))}")
        if row.get("collapsed"):
            out(f"    collapsed: {row['collapsed']} (ids equal to another after the transform)")
        if row.get("quarantined"):
            shown = ", ".join(repr(q["id"]) for q in row.get("quarantined_examples", []))
            out(f"    quarantined (rejected by WalkMe): {row['quarantined']}: {shown}")
        if row.get("orphaned_at"):
            out(f"    orphaned since {row['orphaned_at']} ({row.get('origin')})")


def print_history(segment: str, runs: list[RunRecord], *, as_json: bool = False) -> None:
    if as_json:
        rows = [
            {
                **dataclasses.asdict(run),
                "started_at": run.started_at and run.started_at.isoformat(),
                "ended_at": run.ended_at and run.ended_at.isoformat(),
            }
            for run in runs
        ]
        out(json.dumps(rows, indent=2))
        return
    if not runs:
        out(f"no runs recorded for {printable(segment)!r}")
        return
    out(
        f"{'STARTED':25} {'ENDED':25} {'RESULT':7} {'ADDED':>8} {'REMOVED':>8}"
        f" {'REQUESTS':>8} RUN ID"
    )
    for run in runs:
        started = run.started_at.isoformat() if run.started_at else "-"
        ended = run.ended_at.isoformat() if run.ended_at else "-"
        out(
            f"{started:25} {ended:25} {run.result:7} {run.added:>8} {run.removed:>8}"
            f" {run.requests:>8} {run.run_id}"
        )
        if run.error:
            out(f"    {printable(run.error)}")


def _explanation_row(found: Explanation) -> dict[str, Any]:
    delivered = found.delivered
    return {
        "segment": found.segment,
        "id_rules": found.id_rules,
        "source": {
            "describe": found.source,
            "error": found.error,
            "in_source": found.in_source,
            "values_found": found.found_in_source,
            "originals": found.originals,
        },
        "snapshot": {
            "delivered": delivered is not None,
            "run_id": delivered.run_id if delivered else None,
            "run_started_at": (
                delivered.run_started_at.isoformat()
                if delivered and delivered.run_started_at
                else None
            ),
        },
        "quarantine": [
            {
                "action": entry.action,
                "walkme_answer": entry.reason,
                "since": entry.since.isoformat() if entry.since else None,
            }
            for entry in found.quarantine
        ],
        "pending": found.pending,
        "plan": {"mode": found.mode, "held": found.held},
        "last_result": found.last_result,
        "next_run": {"action": found.next_run, "why": found.why},
    }


def print_explanations(member: str, found: list[Explanation], *, as_json: bool = False) -> None:
    """What ``syncd explain`` prints: one block per segment."""
    if as_json:
        rows = [_explanation_row(each) for each in found]
        out(json.dumps({"id": member, "segments": rows}, indent=2))
        return
    for each in found:
        out(f"{printable(each.segment)}: id {printable(member)!r}")
        for label, text in _explanation_lines(each):
            out(f"  {label:11} {printable(text)}")


def _explanation_lines(found: Explanation) -> list[tuple[str, str]]:
    lines: list[tuple[str, str]] = []
    if found.error is not None:
        lines.append(("source", f"cannot be read: {found.error}"))
    elif found.in_source:
        lines.append(("source", f"in {found.source} ({_originals(found)})"))
    elif found.found_in_source:
        lines.append(("source", f"in {found.source} but skipped by the id rules: {found.id_rules}"))
    else:
        lines.append(("source", f"not in {found.source}"))
    if found.id_rules is not None and not found.found_in_source:
        lines.append(("id rules", f"would skip it: {found.id_rules}"))
    delivered = found.delivered
    if delivered is None:
        lines.append(("snapshot", "not delivered"))
    elif delivered.run_id is None:
        lines.append(("snapshot", "delivered (before this version recorded by which run)"))
    elif delivered.run_started_at is None:
        lines.append(("snapshot", f"delivered by run {delivered.run_id} (its record pruned)"))
    else:
        started = delivered.run_started_at.isoformat()
        lines.append(("snapshot", f"delivered by run {delivered.run_id}, started {started}"))
    for entry in found.quarantine:
        since = entry.since.isoformat() if entry.since else "-"
        lines.append(
            ("quarantine", f"{entry.action} rejected by WalkMe since {since}: {entry.reason}")
        )
    if found.pending is not None:
        lines.append(("pending", f"in the {found.pending} batch whose answer was lost"))
    if found.last_result == "held":
        lines.append(
            ("last run", f"held by the removal guard; {force_command(found.segment)} applies it")
        )
    lines.append(("next run", f"{found.next_run}: {found.why}"))
    return lines


def _originals(found: Explanation) -> str:
    shown = ", ".join(repr(original) for original in found.originals)
    more = f"; {found.found_in_source} values in all" if found.found_in_source > 1 else ""
    return f"as {shown}{more}"
