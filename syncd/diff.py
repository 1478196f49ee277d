"""The diff: a source's ids against the snapshot, streamed, in bounded memory.

Both sides are split by hash into partitions of at most ``PARTITION_IDS`` ids,
spilled to a private work directory, and compared one partition at a time with
Python sets (the set operations run in C). Memory therefore depends on the
partition size, not on the segment's: a 10,000,000-member segment is 25
partitions. The adds and removes are written to files and read back in batches,
so the engine never holds more than one batch of them either.

Quarantined ids (WalkMe refused them) are left out of the plan until their
membership changes; the diff reports which of them changed, so the store can
release them.
"""

from __future__ import annotations

import asyncio
import math
import shutil
import tempfile
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

PARTITION_IDS = 400_000  # ~40 MB of Python strings and set per partition
READ_IDS = 25_000  # ids read back from a spill file at a time

Kind = Literal["add", "remove"]


@dataclass(frozen=True)
class Quarantined:
    """Ids WalkMe rejected earlier, by the action it rejected."""

    add: frozenset[str] = frozenset()
    remove: frozenset[str] = frozenset()


@dataclass
class Diff:
    """The plan for one run: counts, plus the ids themselves in spill files."""

    workdir: Path
    distinct: int = 0  # distinct source ids, after the id rules
    adds: int = 0
    removes: int = 0
    released: Quarantined = field(default_factory=Quarantined)

    def path(self, kind: Kind) -> Path:
        return self.workdir / f"{kind}s"

    def count(self, kind: Kind) -> int:
        return self.adds if kind == "add" else self.removes

    def batches(self, kind: Kind, size: int) -> Iterator[list[str]]:
        """The ids to add (or remove), ``size`` at a time, in a stable order."""
        with self.path(kind).open(encoding="utf-8", newline="\n") as handle:
            batch: list[str] = []
            for line in handle:
                batch.append(line[:-1])
                if len(batch) >= size:
                    yield batch
                    batch = []
            if batch:
                yield batch

    def examples(self, kind: Kind, limit: int) -> list[str]:
        return next(self.batches(kind, limit), [])

    def close(self) -> None:
        shutil.rmtree(self.workdir, ignore_errors=True)


def partitions_for(ids: int) -> int:
    return max(1, math.ceil(ids / PARTITION_IDS))


class _Spill:
    """Newline-separated ids in ``parts`` files, by hash."""

    def __init__(self, folder: Path, name: str, parts: int) -> None:
        self.parts = parts
        self.paths = [folder / f"{name}.{part}" for part in range(parts)]
        self._files = [path.open("w", encoding="utf-8", newline="\n") for path in self.paths]
        self.written = 0

    def write(self, ids: list[str]) -> None:
        self.written += len(ids)
        if self.parts == 1:
            self._files[0].write("\n".join(ids) + "\n" if ids else "")
            return
        buckets: list[list[str]] = [[] for _ in range(self.parts)]
        parts = self.parts
        for member in ids:
            # hash() is salted per process; both sides are split in this process.
            buckets[hash(member) % parts].append(member)
        for bucket, handle in zip(buckets, self._files, strict=True):
            if bucket:
                handle.write("\n".join(bucket) + "\n")

    def close(self) -> None:
        for handle in self._files:
            handle.close()


def _read_set(path: Path) -> set[str]:
    text = path.read_text(encoding="utf-8")
    ids = set(text.split("\n"))
    ids.discard("")
    return ids


def _read_chunks(path: Path) -> Iterator[list[str]]:
    with path.open(encoding="utf-8", newline="\n") as handle:
        chunk: list[str] = []
        for line in handle:
            chunk.append(line[:-1])
            if len(chunk) >= READ_IDS:
                yield chunk
                chunk = []
        if chunk:
            yield chunk


async def compute_diff(
    source: AsyncIterator[list[str]],
    snapshot: AsyncIterator[list[str]],
    snapshot_size: int,
    quarantined: Quarantined,
    work_dir: Path | None = None,
) -> Diff:
    """Compare the (cleaned) source ids with the snapshot; the caller closes the Diff."""
    diff = Diff(Path(tempfile.mkdtemp(prefix="syncd-diff-", dir=work_dir)))
    try:
        await _compute(diff, source, snapshot, snapshot_size, quarantined)
    except BaseException:
        diff.close()
        raise
    return diff


async def _compute(
    diff: Diff,
    source: AsyncIterator[list[str]],
    snapshot: AsyncIterator[list[str]],
    snapshot_size: int,
    quarantined: Quarantined,
) -> None:
    folder = diff.workdir
    # The source is spilled whole first: its size decides the partitioning.
    raw = _Spill(folder, "raw", 1)
    try:
        async for chunk in source:
            raw.write(chunk)
    finally:
        raw.close()
    parts = partitions_for(max(raw.written, snapshot_size))
    if parts == 1:
        source_paths = raw.paths
    else:
        split = _Spill(folder, "source", parts)
        try:
            for chunk in _read_chunks(raw.paths[0]):
                split.write(chunk)
        finally:
            split.close()
        raw.paths[0].unlink()
        source_paths = split.paths

    snap = _Spill(folder, "snapshot", parts)
    try:
        async for chunk in snapshot:
            snap.write(chunk)
    finally:
        snap.close()

    await asyncio.to_thread(_compare, diff, source_paths, snap.paths, quarantined)


def _compare(
    diff: Diff, source_paths: list[Path], snapshot_paths: list[Path], quarantined: Quarantined
) -> None:
    """Partition by partition: removes = snapshot - source, adds = source - snapshot."""
    kept_add: set[str] = set()  # quarantined adds still wanted: stay quarantined
    returned: set[str] = set()  # quarantined removes back in the source: released
    with (
        diff.path("add").open("w", encoding="utf-8", newline="\n") as adds,
        diff.path("remove").open("w", encoding="utf-8", newline="\n") as removes,
    ):
        for source_path, snapshot_path in zip(source_paths, snapshot_paths, strict=True):
            wanted = _read_set(source_path)
            source_path.unlink()
            diff.distinct += len(wanted)
            kept_add |= quarantined.add & wanted
            returned |= quarantined.remove & wanted
            for chunk in _read_chunks(snapshot_path):
                gone = [member for member in chunk if member not in wanted]
                gone = [member for member in gone if member not in quarantined.remove]
                if gone:
                    removes.write("\n".join(gone) + "\n")
                    diff.removes += len(gone)
                wanted.difference_update(chunk)
            snapshot_path.unlink()
            wanted -= quarantined.add
            if wanted:
                # Sorted, so a first sync appends to the snapshot's index in order.
                adds.write("\n".join(sorted(wanted)) + "\n")
                diff.adds += len(wanted)
    diff.released = Quarantined(
        add=frozenset(quarantined.add - kept_add), remove=frozenset(returned)
    )
