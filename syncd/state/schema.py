"""The schema, once for both stores: its migrations, and rows mapped to the
dataclasses by column name.

A migration's SQL names types as ``{BIGINT}``, ``{TIMESTAMP}``... and each
dialect fills them in; a step the two databases must take differently (a SQLite
table rebuild against an ALTER) gives each its own SQL.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING

from syncd.state.base import RunRecord, SegmentState

if TYPE_CHECKING:
    from syncd.state.sql import Dialect, Row

SCHEMA_VERSION = 9

# The schema's {TYPE} names, as (SQLite, PostgreSQL) spell them.
_TYPES = {
    "BOOLEAN": ("INTEGER", "BOOLEAN"),
    "FALSE": ("0", "FALSE"),
    "BIGINT": ("INTEGER", "BIGINT"),
    "REAL": ("REAL", "DOUBLE PRECISION"),
    "TIMESTAMP": ("TEXT", "TIMESTAMPTZ"),
    "ID": ("TEXT", 'TEXT COLLATE "C"'),  # ids sort by code point: keyset paging needs it
    "TEXTS": ("TEXT", "TEXT[]"),  # a list of strings (SQLite: encoded, see the dialect)
    "WITHOUT_ROWID": (" WITHOUT ROWID", ""),
}


@dataclass(frozen=True)
class Migration:
    """One step from the previous version; ``sql`` for both dialects unless one
    has its own."""

    sql: str = ""
    sqlite: str | None = None
    postgresql: str | None = None

    def render(self, dialect: Dialect) -> str:
        own: str | None = getattr(self, dialect.name)
        column = 0 if dialect.name == "sqlite" else 1
        types = {name: spelt[column] for name, spelt in _TYPES.items()}
        return (self.sql if own is None else own).format_map(types)


# Each entry migrates from the previous version; index + 1 is the version it makes.
MIGRATIONS = [
    Migration(
        """
CREATE TABLE segments (
    name TEXT PRIMARY KEY,
    system_guid TEXT NOT NULL,
    segment_guid TEXT,
    external_id TEXT,
    origin TEXT,
    needs_override {BOOLEAN} NOT NULL DEFAULT {FALSE},
    members {BIGINT} NOT NULL DEFAULT 0,
    last_run_at {TIMESTAMP},
    last_result TEXT,
    last_error TEXT,
    last_success_at {TIMESTAMP},
    skipped {BIGINT} NOT NULL DEFAULT 0,
    skipped_examples TEXT NOT NULL DEFAULT '[]',
    orphaned_at {TIMESTAMP},
    source_fingerprint TEXT
);
CREATE TABLE members (
    segment TEXT NOT NULL,
    id {ID} NOT NULL,
    PRIMARY KEY (segment, id)
){WITHOUT_ROWID};
CREATE TABLE runs (
    run_id TEXT PRIMARY KEY,
    segment TEXT NOT NULL,
    started_at {TIMESTAMP} NOT NULL,
    ended_at {TIMESTAMP},
    result TEXT NOT NULL,
    added {BIGINT} NOT NULL DEFAULT 0,
    removed {BIGINT} NOT NULL DEFAULT 0,
    requests {BIGINT} NOT NULL DEFAULT 0,
    skipped {BIGINT} NOT NULL DEFAULT 0,
    quarantined {BIGINT} NOT NULL DEFAULT 0,
    error TEXT
);
CREATE INDEX runs_by_segment ON runs (segment, started_at);
CREATE TABLE quarantine (
    segment TEXT NOT NULL,
    action TEXT NOT NULL,
    id TEXT NOT NULL,
    reason TEXT NOT NULL,
    since {TIMESTAMP} NOT NULL,
    PRIMARY KEY (segment, action, id)
){WITHOUT_ROWID};
CREATE TABLE pending (
    segment TEXT PRIMARY KEY,
    action TEXT NOT NULL,
    ids {TEXTS} NOT NULL
);
CREATE TABLE leases (
    segment TEXT PRIMARY KEY,
    holder TEXT NOT NULL,
    expires_at {REAL} NOT NULL
);
CREATE TABLE heap_segments (
    heap_segment_id {BIGINT} PRIMARY KEY,
    name TEXT NOT NULL,
    mapping_name TEXT NOT NULL,
    members {BIGINT} NOT NULL DEFAULT 0,
    complete_tasks {BIGINT} NOT NULL DEFAULT 0,
    updated_at {TIMESTAMP} NOT NULL
);
CREATE TABLE heap_members (
    heap_segment_id {BIGINT} NOT NULL,
    id {ID} NOT NULL,
    PRIMARY KEY (heap_segment_id, id)
){WITHOUT_ROWID};
CREATE TABLE heap_pages (
    sync_task_id TEXT NOT NULL,
    page_number INTEGER NOT NULL,
    heap_segment_id {BIGINT} NOT NULL,
    total_pages INTEGER NOT NULL,
    received_at {TIMESTAMP} NOT NULL,
    PRIMARY KEY (sync_task_id, page_number)
);
"""
    ),
    # Due marks: a run asked for while another process held the lease. SQLite's
    # leases move to the boot clock (see sqlite._lease_clock): a lease stamped by
    # another boot, or by the wall clock before this version (boot ''), is expired.
    Migration(
        sqlite="""
ALTER TABLE leases ADD COLUMN boot TEXT NOT NULL DEFAULT '';
CREATE TABLE due (
    segment TEXT PRIMARY KEY,
    boot TEXT NOT NULL,
    due_at REAL NOT NULL
);
""",
        postgresql="""
CREATE TABLE due (
    segment TEXT PRIMARY KEY,
    due_at DOUBLE PRECISION NOT NULL
);
""",
    ),
    # Replica heartbeats: which live replica maps which segments.
    Migration(
        """
CREATE TABLE replicas (
    replica_id TEXT PRIMARY KEY,
    mappings {TEXTS} NOT NULL,
    seen_at {REAL} NOT NULL,
    expires_at {REAL} NOT NULL
);
"""
    ),
    # Page receipts keyed by Heap segment too: two segments' tasks may share an id.
    Migration(
        sqlite="""
CREATE TABLE heap_pages_by_segment (
    heap_segment_id INTEGER NOT NULL,
    sync_task_id TEXT NOT NULL,
    page_number INTEGER NOT NULL,
    total_pages INTEGER NOT NULL,
    received_at TEXT NOT NULL,
    PRIMARY KEY (heap_segment_id, sync_task_id, page_number)
);
INSERT INTO heap_pages_by_segment
    SELECT heap_segment_id, sync_task_id, page_number, total_pages, received_at FROM heap_pages;
DROP TABLE heap_pages;
ALTER TABLE heap_pages_by_segment RENAME TO heap_pages;
""",
        postgresql="""
ALTER TABLE heap_pages DROP CONSTRAINT heap_pages_pkey;
ALTER TABLE heap_pages ADD PRIMARY KEY (heap_segment_id, sync_task_id, page_number);
""",
    ),
    # Runs in the order they were begun, for history's ties (SQLite's rowid is that).
    Migration(
        sqlite="",
        postgresql="ALTER TABLE runs ADD COLUMN seq BIGINT GENERATED ALWAYS AS IDENTITY;",
    ),
    # The run that delivered each member, for `syncd explain` (NULL: delivered before
    # this version). The run id, not runs.seq: SQLite's seq is the rowid, which a
    # pruned history can hand out again, and a member outlives its run's record.
    Migration("ALTER TABLE members ADD COLUMN delivered_by TEXT;"),
    # Id transforms: ids that became one, and the steps of the last synced run (to
    # tell a transform change); each replica's next scheduled run per segment.
    Migration(
        """
ALTER TABLE segments ADD COLUMN collapsed {BIGINT} NOT NULL DEFAULT 0;
ALTER TABLE segments ADD COLUMN id_transform TEXT;
ALTER TABLE replicas ADD COLUMN next_runs TEXT NOT NULL DEFAULT '{{}}';
"""
    ),
    # What a person was last told about each segment (SYNCD_NOTIFY_URL).
    Migration(
        """
CREATE TABLE notices (
    segment TEXT PRIMARY KEY,
    standing TEXT NOT NULL,
    failures {BIGINT} NOT NULL,
    version {BIGINT} NOT NULL
);
"""
    ),
    # The digest of the id set the last successful run read (syncd.diff.SourceDigest):
    # an unchanged set skips the snapshot. Holds its seeds: never shown.
    Migration("ALTER TABLE segments ADD COLUMN source_digest TEXT;"),
]
assert len(MIGRATIONS) == SCHEMA_VERSION


def migrations(dialect: Dialect) -> list[str]:
    """Every migration's SQL for this dialect, oldest first."""
    return [migration.render(dialect) for migration in MIGRATIONS]


# -- rows, by column name -----------------------------------------------------------

_QUARANTINED = "(SELECT count(*) FROM quarantine q WHERE q.segment = segments.name)"
SEGMENT_COLUMNS = ", ".join(
    f"{_QUARANTINED} AS quarantined" if f.name == "quarantined" else f.name
    for f in fields(SegmentState)
)
RUN_COLUMNS = ", ".join(f.name for f in fields(RunRecord))
_SEGMENT_TIMES = ("last_run_at", "last_success_at", "orphaned_at")


def segment_state(row: Row, dialect: Dialect) -> SegmentState:
    values = {f.name: row[f.name] for f in fields(SegmentState)}
    for name in _SEGMENT_TIMES:
        values[name] = dialect.time_value(values[name])
    values["needs_override"] = bool(values["needs_override"])
    values["skipped_examples"] = json.loads(values["skipped_examples"])
    return SegmentState(**values)


def run_record(row: Row, dialect: Dialect) -> RunRecord:
    values = {f.name: row[f.name] for f in fields(RunRecord)}
    for name in ("started_at", "ended_at"):
        values[name] = dialect.time_value(values[name])
    return RunRecord(**values)
