"""The diff: a source's ids against the snapshot, streamed, in bounded memory.

Both sides are spilled to a private work directory, split into ranges of ids of
about ``PARTITION_IDS`` each (range bounds come from a sample of both sides), and
compared one range at a time with Python sets. Memory therefore depends on the
partition size, not on the segment's: a 10,000,000-member segment is 40 ranges.
Every per-id step (splitting, sorting, set operations) runs inside CPython's C
code; Python loops only over chunks. The adds and removes are written to files
and read back in batches, so the engine never holds more than one batch of them.

Quarantined ids (WalkMe refused them) are left out of the plan until their
membership changes; the diff reports which of them changed, so the store can
release them.
"""

from __future__ import annotations

import asyncio
import bisect
import math
import os
import shutil
import tempfile
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, TextIO

from syncd.processes import alive

PARTITION_IDS = 250_000  # ~50 MB of Python strings and sets while one partition is compared
READ_BYTES = 1 << 20  # spill files are read back a block at a time
SPILL_PREFIX = "syncd-diff-"  # + pid: spills of dead processes can be found and removed
SAMPLE_EVERY = 128  # every n-th id of each side joins the sample that sets range bounds

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


def remove_stale_spills(work_dir: Path | None = None) -> int:
    """Delete spill folders left by processes that died (SIGKILL skips cleanup)."""
    removed = 0
    for folder in Path(work_dir or tempfile.gettempdir()).glob(f"{SPILL_PREFIX}*"):
        pid = folder.name.removeprefix(SPILL_PREFIX).partition("-")[0]
        if pid.isdigit() and int(pid) != os.getpid() and not alive(int(pid)):
            shutil.rmtree(folder, ignore_errors=True)
            removed += 1
    return removed


def partitions_for(ids: int) -> int:
    return max(1, math.ceil(ids / PARTITION_IDS))


def _write(handle: TextIO, ids: list[str]) -> None:
    if ids:
        handle.write("\n".join(ids) + "\n")


def _read_set(path: Path) -> set[str]:
    ids = set(path.read_text(encoding="utf-8").split("\n"))
    ids.discard("")
    return ids


def _read_chunks(path: Path) -> Iterator[list[str]]:
    """Ids from a spill file, a block at a time (splitting stays in C)."""
    with path.open(encoding="utf-8", newline="\n") as handle:
        rest = ""
        while block := handle.read(READ_BYTES):
            lines = (rest + block).split("\n")
            rest = lines.pop()
            yield lines
        if rest:
            yield [rest]


async def compute_diff(
    source: AsyncIterator[list[str]],
    snapshot: AsyncIterator[list[str]],
    quarantined: Quarantined,
    work_dir: Path | None = None,
) -> Diff:
    """Compare the (cleaned) source ids with the snapshot; the caller closes the Diff."""
    diff = Diff(Path(tempfile.mkdtemp(prefix=f"{SPILL_PREFIX}{os.getpid()}-", dir=work_dir)))
    try:
        sample: list[str] = []
        source_ids = await _spill(source, diff.workdir / "source", sample)
        snapshot_ids = await _spill(snapshot, diff.workdir / "snapshot", sample)
        bounds = _bounds(sample, partitions_for(max(source_ids, snapshot_ids)))
        await asyncio.to_thread(_compare, diff, bounds, quarantined)
    except BaseException:
        diff.close()
        raise
    return diff


async def _spill(chunks: AsyncIterator[list[str]], path: Path, sample: list[str]) -> int:
    count = 0
    with path.open("w", encoding="utf-8", newline="\n") as handle:
        async for chunk in chunks:
            _write(handle, chunk)
            sample += chunk[::SAMPLE_EVERY]
            count += len(chunk)
    return count


def _bounds(sample: list[str], parts: int) -> list[str]:
    """``parts - 1`` ids that cut the sample into equal ranges."""
    if parts <= 1 or not sample:
        return []
    sample.sort()
    return sorted({sample[len(sample) * part // parts] for part in range(1, parts)})


def _split(path: Path, bounds: list[str]) -> list[Path]:
    """Cut a spill file into ranges: [..bounds[0]), [bounds[0]..bounds[1]), ..."""
    if not bounds:
        return [path]
    paths = [path.with_suffix(f".{part}") for part in range(len(bounds) + 1)]
    handles = [part.open("w", encoding="utf-8", newline="\n") for part in paths]
    try:
        for chunk in _read_chunks(path):
            chunk.sort()
            start = 0
            for handle, bound in zip(handles, bounds, strict=False):
                end = bisect.bisect_left(chunk, bound, start)
                _write(handle, chunk[start:end])
                start = end
            _write(handles[-1], chunk[start:])
    finally:
        for handle in handles:
            handle.close()
    path.unlink()
    return paths


def _compare(diff: Diff, bounds: list[str], quarantined: Quarantined) -> None:
    """Range by range: removes = snapshot - source, adds = source - snapshot."""
    sources = _split(diff.workdir / "source", bounds)
    snapshots = _split(diff.workdir / "snapshot", bounds)
    kept_add: set[str] = set()  # quarantined adds still wanted: stay quarantined
    returned: set[str] = set()  # quarantined removes back in the source: released
    with (
        diff.path("add").open("w", encoding="utf-8", newline="\n") as adds,
        diff.path("remove").open("w", encoding="utf-8", newline="\n") as removes,
    ):
        for source_path, snapshot_path in zip(sources, snapshots, strict=True):
            wanted = _read_set(source_path)
            source_path.unlink()
            diff.distinct += len(wanted)
            kept_add |= quarantined.add & wanted
            returned |= quarantined.remove & wanted
            held = _read_set(snapshot_path)
            snapshot_path.unlink()
            gone = held - wanted - quarantined.remove
            _write(removes, sorted(gone))
            diff.removes += len(gone)
            wanted -= held
            del held
            wanted -= quarantined.add
            # Sorted: ranges come in order, so a first sync appends to the snapshot's index.
            _write(adds, sorted(wanted))
            diff.adds += len(wanted)
    diff.released = Quarantined(
        add=frozenset(quarantined.add - kept_add), remove=frozenset(returned)
    )
