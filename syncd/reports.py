"""What ``syncd status`` and ``syncd history`` print: tables for people, JSON for scripts.

Only reads the state store. Every line goes through :func:`out`, which scrubs
secrets: the texts shown were stored by other processes.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

from syncd.engine import all_mappings, force_command
from syncd.logs import scrub
from syncd.settings import SegmentMapping, Settings, printable
from syncd.state import SegmentState, open_store
from syncd.state.base import RunRecord

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


def _print_table(rows: list[StatusRow]) -> None:
    out(f"{'SEGMENT':30} {'WALKME GUID':36} {'MEMBERS':>9} {'LAST RUN':25} {'RESULT':9} SKIPPED")
    for row in rows:
        out(
            f"{printable(row['segment'])[:30]:30} {row.get('segment_guid') or '-':36}"
            f" {row.get('members', 0):>9} {row.get('last_run_at') or '-':25}"
            f" {row.get('last_result') or '-':9} {row.get('skipped', 0)}"
        )
        if row.get("last_error"):
            out(f"    error: {printable(row['last_error'])}")
        if row.get("hint"):
            out(f"    {printable(row['hint'])}")
        if row.get("skipped_examples"):
            out(f"    skipped ids: {printable('; '.join(row['skipped_examples']))}")
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
