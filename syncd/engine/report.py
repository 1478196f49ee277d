"""What a run tells operators: its outcome's log lines and metrics."""

from __future__ import annotations

import structlog

from syncd import metrics
from syncd.engine.outcome import Outcome
from syncd.state import SegmentState

log = structlog.get_logger("syncd.engine")


def log_outcome(outcome: Outcome) -> None:
    fields: dict[str, object] = {
        "added": outcome.added,
        "removed": outcome.removed,
        "skipped": outcome.skipped.count,
        "collapsed": outcome.collapsed,
        "requests": outcome.requests,
        "duration_s": outcome.duration_s,
        "quarantined": outcome.quarantined,
    }
    if outcome.skipped.count:
        log.warning(
            "segment.ids_skipped",
            skipped=outcome.skipped.count,
            examples=outcome.skipped.examples,
        )
    if outcome.result == "synced":
        log.info("segment.synced", unchanged=outcome.unchanged, **fields)
    elif outcome.hold is not None:
        hold = outcome.hold
        log.warning(
            "segment.held",
            reason=hold.reason,
            planned_removes=hold.removes,
            snapshot_members=hold.snapshot_members,
            source_ids=hold.source_ids,
            max_remove_fraction=hold.max_remove_fraction,
            hint=f"syncd sync --segment {outcome.segment!r} --force applies it once",
            **fields,
        )
    else:
        fields.update(error=outcome.error, interrupted=outcome.interrupted)
        if outcome.interrupted:
            # A shutdown mid-run is routine (deploys): no error-level line for it.
            log.warning("segment.failed", **fields)
        else:
            log.error("segment.failed", **fields)


def record_run_metrics(outcome: Outcome, state: SegmentState | None) -> None:
    name = outcome.segment
    metrics.segment_runs.labels(name, outcome.result).inc()
    counts = {
        "added": outcome.added,
        "removed": outcome.removed,
        "skipped": outcome.skipped.count,
        "quarantined": outcome.quarantined,
    }
    for action, count in counts.items():
        if count:
            metrics.segment_ids.labels(name, action).inc(count)
    if state is not None:
        set_segment_gauges(state)


def report(outcome: Outcome, state: SegmentState | None = None) -> None:
    """The run's metrics and log lines (``state``: the segment as the run left it)."""
    record_run_metrics(outcome, state)
    log_outcome(outcome)


def set_segment_gauges(state: SegmentState) -> None:
    metrics.segment_members.labels(state.name).set(state.members)
    if state.last_success_at is not None:
        metrics.last_success.labels(state.name).set(state.last_success_at.timestamp())
