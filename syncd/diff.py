"""The diff: a source's ids against the snapshot, streamed, in bounded memory.

Both sides are spilled to a private work directory as they are read, one id per
line, and each id is given a 128-bit key: two 64-bit Polars hashes of it, with
seeds drawn at random and kept in the state store beside the segment's source
digest (below), never shown. The comparison is on the keys, in Polars' compiled
code (one ``is_in`` each way), so no Python object is made per id for it; only the
ids that differ are read back from the spill files, by position. A side of up to
``KEYED_IN_MEMORY`` ids is keyed as it is read (16 bytes per id); a larger one is
split by hash into partitions of about ``PARTITION_IDS`` ids, compared one at a
time, so memory depends on the partition size, not on the segment's. The adds and
removes are written to files and read back in batches, so the engine never holds
more than one batch of them.

Why keys may stand for ids: two different ids get one key only if both hashes
collide: about n² / 2^129 for n ids if the two are independent (below 10^-24 for
10^7 ids), and an attacker choosing ids cannot aim at seeds that never leave the
state store.

The same hashes make the source's digest (``SourceDigest``): when a source reads
exactly as it did for the last successful run (a warehouse query re-run, a file
rewritten in another order), the snapshot is not read at all.

Quarantined ids (WalkMe refused them) are left out of the plan until their
membership changes; the diff reports which of them changed, so the store can
release them.
"""

from __future__ import annotations

import asyncio
import math
import os
import secrets
import shutil
import tempfile
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Literal, TextIO

from syncd.ids import IdText
from syncd.idtext import column, text_of
from syncd.processes import alive

if TYPE_CHECKING:
    # Imported where a diff is computed: a run whose source is unchanged never
    # pays for loading Polars.
    import polars as pl

KEYED_IN_MEMORY = 2_000_000  # ids per side keyed whole: 32 MB of keys, both sides
PARTITION_IDS = 1_000_000  # ids per partition of a larger side
SORTED_WHOLE = 100_000  # adds or removes up to this many are written in one sorted run
READ_BYTES = 1 << 22  # spill files are read back a block at a time
SPILL_PREFIX = "syncd-diff-"  # + pid: spills of dead processes can be found and removed

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
    digest: str | None = field(default=None, repr=False)  # the source's (SourceDigest)
    unchanged: bool = False  # the source's digest was the stored one: nothing compared

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
    """Partitions for a side of this many ids: one while it can be keyed whole."""
    return 1 if ids <= KEYED_IN_MEMORY else math.ceil(ids / PARTITION_IDS)


_DIGEST_VERSION = "set1"


class SourceDigest:
    """An order-free digest of the ids a source gave (repeats included): their count
    and the sums, modulo 2^64, of the two hashes that make their keys.

    Two reads with equal digests gave the same ids, so against a snapshot that the
    first one's run brought up to date the second has nothing to send: the run skips
    reading the snapshot. The sums are a multiset hash: ids chosen so that their
    sums collide would need the seeds, which are drawn at random, kept in the state
    store with the digest and nowhere else (never logged or shown). Polars' version
    is part of it, as its hashes are stable only within one version.
    """

    def __init__(self, stored: str | None) -> None:
        import polars as pl

        parts = (stored or "").split(":")
        if len(parts) == 7 and parts[:2] == [_DIGEST_VERSION, pl.__version__]:
            self.seeds = (int(parts[2]), int(parts[3]))
        else:
            self.seeds = (secrets.randbits(63), secrets.randbits(63))
        self._count = 0
        self._sums = [0, 0]

    def add(self, hashes: tuple[pl.Series, pl.Series]) -> None:
        import polars as pl

        self._count += len(hashes[0])
        # Halves summed apart, all four in one pass: no sum overflows below 2^32 ids.
        halves = pl.DataFrame({"first": hashes[0], "second": hashes[1]}).select(
            high_first=(pl.col("first") // (1 << 32)).sum(),
            low_first=(pl.col("first") % (1 << 32)).sum(),
            high_second=(pl.col("second") // (1 << 32)).sum(),
            low_second=(pl.col("second") % (1 << 32)).sum(),
        )
        for index, name in enumerate(("first", "second")):
            high, low = int(halves[f"high_{name}"][0]), int(halves[f"low_{name}"][0])
            self._sums[index] = (self._sums[index] + (high << 32) + low) % (1 << 64)

    def __str__(self) -> str:
        import polars as pl

        fields = (_DIGEST_VERSION, pl.__version__, *self.seeds, self._count, *self._sums)
        return ":".join(map(str, fields))

    def __repr__(self) -> str:
        return "SourceDigest(...)"  # its seeds stay out of every output


class _Keyer:
    """128-bit keys for ids, and a partition for each, from the digest's seeds."""

    def __init__(self, seeds: tuple[int, int]) -> None:
        self._high, self._low = seeds
        self._part = secrets.randbits(63)

    def hashes(self, ids: pl.Series) -> tuple[pl.Series, pl.Series]:
        return ids.hash(self._high), ids.hash(self._low)

    def keys(self, ids: pl.Series, hashes: tuple[pl.Series, pl.Series] | None = None) -> pl.Series:
        import polars as pl

        high, low = hashes or self.hashes(ids)
        shift = pl.Series([1 << 64], dtype=pl.UInt128)
        return high.cast(pl.UInt128) * shift + low.cast(pl.UInt128)

    def partitions(self, ids: pl.Series, parts: int) -> pl.Series:
        return ids.hash(self._part) % parts


@dataclass
class _Side:
    """One side spilled to ``path``, line i being id i; its keys while it is small."""

    path: Path
    count: int = 0
    keys: list[pl.Series] | None = field(default_factory=list)


def _write(handle: TextIO, ids: pl.Series) -> None:
    if len(ids):
        handle.write(text_of(ids) + "\n")


def _read_blocks(path: Path) -> Iterator[pl.Series]:
    """A spill file's ids in order, a block at a time."""
    with path.open(encoding="utf-8", newline="\n") as handle:
        rest = ""
        while block := handle.read(READ_BYTES):
            text = rest + block
            end = text.rfind("\n")
            rest = text[end + 1 :]
            if end > 0:
                yield column(text[:end])
        if rest:
            yield column(rest)


async def compute_diff(
    source: AsyncIterator[IdText],
    snapshot: AsyncIterator[IdText],
    quarantined: Quarantined,
    work_dir: Path | None = None,
    *,
    stored_digest: str | None = None,
) -> Diff:
    """Compare the (cleaned) source ids with the snapshot; the caller closes the Diff.

    With ``stored_digest`` (the digest of the read whose run brought the snapshot up
    to date), a source whose digest equals it is not compared: ``Diff.unchanged``.
    """
    diff = Diff(Path(tempfile.mkdtemp(prefix=f"{SPILL_PREFIX}{os.getpid()}-", dir=work_dir)))
    try:
        digest = SourceDigest(stored_digest)
        keyer = _Keyer(digest.seeds)
        source_side = await _spill(source, diff.workdir / "source", keyer, digest)
        diff.digest = str(digest)
        if stored_digest is not None and diff.digest == stored_digest:
            diff.unchanged = True
            return diff
        snapshot_side = await _spill(snapshot, diff.workdir / "snapshot", keyer)
        await asyncio.to_thread(_compare, diff, source_side, snapshot_side, quarantined, keyer)
    except BaseException:
        diff.close()
        raise
    return diff


async def _spill(
    chunks: AsyncIterator[IdText], path: Path, keyer: _Keyer, digest: SourceDigest | None = None
) -> _Side:
    side = _Side(path)
    with path.open("w", encoding="utf-8", newline="\n") as handle:
        async for chunk in chunks:
            if not chunk:
                continue
            handle.write(chunk + "\n")
            ids = chunk.column()
            side.count += len(ids)
            hashes = keyer.hashes(ids)
            if digest is not None:
                digest.add(hashes)
            if side.keys is not None:
                if side.count > KEYED_IN_MEMORY:
                    side.keys = None  # partitioned later, from the spill file
                else:
                    side.keys.append(keyer.keys(ids, hashes))
    return side


def _compare(
    diff: Diff, source: _Side, snapshot: _Side, quarantined: Quarantined, keyer: _Keyer
) -> None:
    """Partition by partition: removes = snapshot - source, adds = source - snapshot."""
    parts = partitions_for(max(source.count, snapshot.count))
    if parts == 1:
        pairs: Iterator[tuple[_Keyed, _Keyed]] = iter(
            [(_Keyed.of(source, keyer), _Keyed.of(snapshot, keyer))]
        )
    else:
        pairs = zip(
            _partition(source.path, parts, keyer), _partition(snapshot.path, parts, keyer),
            strict=True,
        )
    quarantine = _QuarantineKeys(quarantined, keyer)
    with (
        diff.path("add").open("w", encoding="utf-8", newline="\n") as adds,
        diff.path("remove").open("w", encoding="utf-8", newline="\n") as removes,
    ):
        for wanted, held in pairs:
            quarantine.seen_in_source(wanted.keys)
            kept = held.keys.is_in(wanted.keys.implode())
            new = _first_of(~wanted.keys.is_in(held.keys.implode()), wanted.keys)
            # The snapshot holds each id once: it counts the wanted ids it holds.
            diff.distinct += int(kept.sum()) + int(new.sum())
            added = new & ~wanted.keys.is_in(quarantine.add.implode())
            gone = ~kept & ~held.keys.is_in(quarantine.remove.implode())
            diff.adds += _select(wanted, added, adds)
            diff.removes += _select(held, gone, removes)
            del wanted, held
    diff.released = quarantine.released()


def _first_of(mask: pl.Series, keys: pl.Series) -> pl.Series:
    """``mask`` left true only at the first of each key it covers: the duplicates of
    the few ids it holds (all of them in a first sync) are found among those alone."""
    positions = mask.arg_true()
    return mask.scatter(positions, keys.gather(positions).is_first_distinct())


@dataclass
class _Keyed:
    """A side (or one partition of it): its keys, and where its ids are."""

    keys: pl.Series
    path: Path | None = None  # the spill file, line i being the id of keys[i]
    ids: pl.Series | None = None  # or the ids themselves

    @classmethod
    def of(cls, side: _Side, keyer: _Keyer) -> _Keyed:
        import polars as pl

        assert side.keys is not None
        # Not rechunked: the chunks are not copied into one more array.
        keys = pl.concat(side.keys, rechunk=False) if side.keys else keyer.keys(column(""))
        return cls(keys, path=side.path)

    def selected(self, mask: pl.Series) -> Iterator[pl.Series]:
        """The ids where ``mask`` holds, a block of the spill file at a time."""
        if self.ids is not None:
            yield self.ids.filter(mask)
            return
        assert self.path is not None
        start = 0
        for block in _read_blocks(self.path):
            yield block.filter(mask.slice(start, len(block)))
            start += len(block)


def _select(side: _Keyed, mask: pl.Series, out: TextIO) -> int:
    """Write the ids where ``mask`` holds; how many. Up to ``SORTED_WHOLE`` of them
    are written sorted as a whole, more (a first sync) block by block, so a first
    sync never holds all its ids at once; either way a batch appends to the
    snapshot's index in runs of increasing ids."""
    import polars as pl

    count = int(mask.sum())
    if not count:
        return 0
    if count <= SORTED_WHOLE:
        _write(out, pl.concat(list(side.selected(mask))).sort())
    else:
        for ids in side.selected(mask):
            _write(out, ids.sort())
    return count


def _partition(path: Path, parts: int, keyer: _Keyer) -> Iterator[_Keyed]:
    """Split a spill file by hash (one id's copies all land in one partition), then
    yield each partition's ids and keys in turn."""
    import polars as pl

    paths = [path.with_suffix(f".{part}") for part in range(parts)]
    handles = [part.open("w", encoding="utf-8", newline="\n") for part in paths]
    try:
        for block in _read_blocks(path):
            placed = block.to_frame("id").with_columns(part=keyer.partitions(block, parts))
            for (part,), rows in placed.partition_by("part", as_dict=True).items():
                _write(handles[int(part)], rows["id"])
    finally:
        for handle in handles:
            handle.close()
    path.unlink()
    for part_path in paths:
        series = list(_read_blocks(part_path))
        part_path.unlink()
        joined = pl.concat(series) if series else column("")
        yield _Keyed(keyer.keys(joined), ids=joined)


class _QuarantineKeys:
    """The quarantined ids' keys, and which of them the source still wants."""

    def __init__(self, quarantined: Quarantined, keyer: _Keyer) -> None:
        self._ids = {
            kind: column("\n".join(sorted(ids)))
            for kind, ids in (("add", quarantined.add), ("remove", quarantined.remove))
        }
        self.add = keyer.keys(self._ids["add"])
        self.remove = keyer.keys(self._ids["remove"])
        self._wanted = {"add": self.add.is_in([]), "remove": self.remove.is_in([])}

    def seen_in_source(self, source_keys: pl.Series) -> None:
        for kind, keys in (("add", self.add), ("remove", self.remove)):
            if len(keys):
                self._wanted[kind] |= keys.is_in(source_keys.implode())

    def released(self) -> Quarantined:
        """Quarantined adds the source no longer wants, quarantined removes it wants
        again: their membership changed, so they are tried again."""
        return Quarantined(
            add=frozenset(self._ids["add"].filter(~self._wanted["add"]).to_list()),
            remove=frozenset(self._ids["remove"].filter(self._wanted["remove"]).to_list()),
        )
