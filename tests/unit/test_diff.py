"""``syncd.diff``: the source's ids against the snapshot, streamed and partitioned."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import math
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from pathlib import Path
from unittest import mock

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import syncd.diff
from syncd.diff import Diff, Kind, Quarantined, compute_diff
from syncd.ids import MAX_ID_LENGTH, IdText, SkippedIds, clean_ids
from syncd.idtext import column


async def chunks(*parts: Iterable[str]) -> AsyncIterator[IdText]:
    for part in parts:
        yield IdText.of(list(part))


@contextlib.asynccontextmanager
async def diffed(
    source: list[list[str]],
    snapshot: list[list[str]],
    work_dir: Path,
    quarantined: Quarantined | None = None,
) -> AsyncIterator[Diff]:
    """The diff of ``source`` against ``snapshot`` (chunks of ids), closed after use."""
    diff = await compute_diff(
        chunks(*source), chunks(*snapshot), quarantined or Quarantined(), work_dir
    )
    try:
        yield diff
    finally:
        diff.close()


def leftovers(folder: Path) -> list[Path]:
    return list(folder.iterdir())


def everything(diff: Diff, kind: Kind) -> list[str]:
    return [member for batch in diff.batches(kind, 1000) for member in batch]


def summary(diff: Diff) -> tuple[set[str], set[str], int, int, int, Quarantined]:
    adds, removes = everything(diff, "add"), everything(diff, "remove")
    assert len(adds) == len(set(adds))
    assert len(removes) == len(set(removes))
    return set(adds), set(removes), diff.adds, diff.removes, diff.distinct, diff.released


async def test_adds_removes_and_distinct(tmp_path: Path) -> None:
    async with diffed([["a", "b", "c"], ["d"], []], [["c", "d", "e"], ["f"]], tmp_path) as diff:
        assert (diff.distinct, diff.adds, diff.removes) == (4, 2, 2)
        assert (diff.count("add"), diff.count("remove")) == (2, 2)
        assert sorted(everything(diff, "add")) == ["a", "b"]
        assert sorted(everything(diff, "remove")) == ["e", "f"]
        assert diff.released == Quarantined()


async def test_an_empty_chunk_does_not_end_the_source(tmp_path: Path) -> None:
    """A chunk left empty (every id in it skipped by the id rules) is passed over:
    the chunks after it are still read."""
    async with diffed([["a"], [], ["b"], [], ["c"]], [["c", "d"]], tmp_path) as diff:
        assert (diff.distinct, diff.adds, diff.removes) == (3, 2, 1)
        assert everything(diff, "add") == ["a", "b"]


async def test_nothing_to_do(tmp_path: Path) -> None:
    async with diffed([["a", "b"]], [["b", "a"]], tmp_path) as diff:
        assert (diff.distinct, diff.adds, diff.removes) == (2, 0, 0)
        assert list(diff.batches("add", 3)) == []
        assert list(diff.batches("remove", 3)) == []
        assert diff.examples("add", 5) == []


async def test_empty_source_removes_everything(tmp_path: Path) -> None:
    async with diffed([], [["a", "b"]], tmp_path) as diff:
        assert (diff.distinct, diff.adds, diff.removes) == (0, 0, 2)
        assert sorted(everything(diff, "remove")) == ["a", "b"]


async def test_duplicates_in_the_source_count_once(tmp_path: Path) -> None:
    async with diffed([["a", "a", "b"], ["b", "a"], ["c", "c"]], [["c"]], tmp_path) as diff:
        assert (diff.distinct, diff.adds, diff.removes) == (3, 2, 0)
        assert sorted(everything(diff, "add")) == ["a", "b"]


@pytest.mark.parametrize("size", [1, 2, 3, 4, 7, 10, 11, 1000])
async def test_batches_cover_exactly_the_ids(tmp_path: Path, size: int) -> None:
    new = [f"n{i}" for i in range(10)]
    old = [f"o{i}" for i in range(7)]
    async with diffed([new[:6], new[6:]], [old], tmp_path) as diff:
        sides: list[tuple[Kind, list[str]]] = [("add", new), ("remove", old)]
        for kind, expected in sides:
            batches = list(diff.batches(kind, size))
            flat = [member for batch in batches for member in batch]
            assert sorted(flat) == sorted(expected)
            assert all(0 < len(batch) <= size for batch in batches)
            assert len(batches) == math.ceil(len(expected) / size)
        # Read twice, the same batches (the engine reads them once, a dry run again).
        assert list(diff.batches("add", size)) == list(diff.batches("add", size))


async def test_counts_tell_adds_from_removes(tmp_path: Path) -> None:
    """``count`` answers for the kind asked: three adds and one remove are not swapped."""
    async with diffed([["a", "b", "c", "keep"]], [["keep", "gone"]], tmp_path) as diff:
        assert (diff.count("add"), diff.count("remove")) == (3, 1)


async def test_examples(tmp_path: Path) -> None:
    async with diffed([["a", "b", "c", "d"]], [["x", "y"]], tmp_path) as diff:
        examples = diff.examples("add", 2)
        assert len(examples) == 2
        assert set(examples) <= {"a", "b", "c", "d"}
        assert sorted(diff.examples("add", 10)) == ["a", "b", "c", "d"]
        assert sorted(diff.examples("remove", 10)) == ["x", "y"]
        assert len(diff.examples("remove", 1)) == 1


# -- quarantine --------------------------------------------------------------------------


async def test_quarantined_add_stays_out_while_in_the_source(tmp_path: Path) -> None:
    held = Quarantined(add=frozenset({"bad", "also-bad"}))
    async with diffed([["bad", "good", "also-bad"]], [["old"]], tmp_path, held) as diff:
        assert sorted(everything(diff, "add")) == ["good"]
        assert diff.adds == 1
        assert diff.distinct == 3  # still counted as source ids
        assert diff.released == Quarantined()


async def test_quarantined_add_released_when_gone_from_the_source(tmp_path: Path) -> None:
    held = Quarantined(add=frozenset({"bad", "still-bad"}))
    async with diffed([["good", "still-bad"]], [], tmp_path, held) as diff:
        assert sorted(everything(diff, "add")) == ["good"]
        assert diff.released == Quarantined(add=frozenset({"bad"}))


async def test_quarantined_remove_stays_out_while_gone(tmp_path: Path) -> None:
    held = Quarantined(remove=frozenset({"stuck"}))
    async with diffed([["kept"]], [["kept", "stuck", "gone"]], tmp_path, held) as diff:
        assert sorted(everything(diff, "remove")) == ["gone"]
        assert diff.removes == 1
        assert diff.released == Quarantined()


async def test_quarantined_remove_released_when_back_in_the_source(tmp_path: Path) -> None:
    held = Quarantined(remove=frozenset({"stuck", "other"}))
    async with diffed([["kept", "stuck"]], [["kept", "stuck", "other"]], tmp_path, held) as diff:
        assert everything(diff, "remove") == []
        assert everything(diff, "add") == []  # in the snapshot already
        assert diff.released == Quarantined(remove=frozenset({"stuck"}))


async def test_quarantine_of_both_kinds_together(tmp_path: Path) -> None:
    held = Quarantined(add=frozenset({"a1", "a2"}), remove=frozenset({"r1", "r2"}))
    source = [["a1", "new", "r2", "same"]]
    snapshot = [["r1", "r2", "same", "old"]]
    async with diffed(source, snapshot, tmp_path, held) as diff:
        assert sorted(everything(diff, "add")) == ["new"]
        assert sorted(everything(diff, "remove")) == ["old"]
        assert diff.released == Quarantined(add=frozenset({"a2"}), remove=frozenset({"r2"}))


# -- partitions and the work directory ------------------------------------------------------
# (A side larger than KEYED_IN_MEMORY is split by hash into partitions of about
# PARTITION_IDS; the tests make both tiny so a handful of ids makes many partitions.)


def partition_tiny(monkeypatch: pytest.MonkeyPatch, keyed: int, partition: int) -> None:
    monkeypatch.setattr(syncd.diff, "KEYED_IN_MEMORY", keyed)
    monkeypatch.setattr(syncd.diff, "PARTITION_IDS", partition)


def count_partitions(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """How many partitions each split of a spill file made, in order."""
    parts: list[int] = []
    split_file = syncd.diff._partition

    def counted(path: Path, count: int, keyer: syncd.diff._Keyer) -> Iterator[syncd.diff._Keyed]:
        parts.append(count)
        return split_file(path, count, keyer)

    monkeypatch.setattr(syncd.diff, "_partition", counted)
    return parts


async def test_many_partitions_give_the_same_diff(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    new = [f"user-{i}" for i in range(0, 150)] + ["é", "日本", "🎉", "a,b", 'q"', "50%"]
    old = [f"user-{i}" for i in range(100, 230)] + ["日本", "gone'", "gone%"]
    held = Quarantined(
        add=frozenset({"user-5", "user-999"}), remove=frozenset({"user-200", "user-120"})
    )
    source = [new[i : i + 13] + new[:3] for i in range(0, len(new), 13)]  # with duplicates
    snapshot = [old[i : i + 17] for i in range(0, len(old), 17)]

    async with diffed(source, snapshot, tmp_path, held) as whole:
        parts = count_partitions(monkeypatch)
        partition_tiny(monkeypatch, keyed=20, partition=7)
        async with diffed(source, snapshot, tmp_path, held) as split:
            assert len(parts) == 2
            assert min(parts) > 10  # both sides were cut into many partitions
            assert_same_plan(split, whole, new, old)


def assert_same_plan(split: Diff, whole: Diff, new: list[str], old: list[str]) -> None:
    """A partitioned diff plans what the whole one does."""
    assert summary(split) == summary(whole)
    assert summary(whole)[0] == set(new) - set(old) - {"user-5"}
    assert summary(whole)[1] == set(old) - set(new) - {"user-200"}
    assert split.distinct == whole.distinct == len(set(new))
    assert split.released == whole.released
    for size in (1, 5, 1000):
        batches = list(split.batches("add", size))
        assert all(len(batch) <= size for batch in batches)
        assert len(batches) == math.ceil(split.adds / size)


async def test_partitions_decided_by_the_larger_side(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    partition_tiny(monkeypatch, keyed=10, partition=3)
    parts = count_partitions(monkeypatch)
    old = [f"o{i}" for i in range(40)]
    async with diffed([["o1", "new"]], [old[:20], old[20:]], tmp_path) as diff:
        assert parts == [14, 14]
        assert sorted(everything(diff, "add")) == ["new"]
        assert sorted(everything(diff, "remove")) == sorted(set(old) - {"o1"})


def test_partition_count_grows_with_the_larger_side() -> None:
    """One partition while a side can be keyed whole, then one per ``PARTITION_IDS``."""
    keyed, size = syncd.diff.KEYED_IN_MEMORY, syncd.diff.PARTITION_IDS
    assert [syncd.diff.partitions_for(ids) for ids in (0, 1, keyed)] == [1, 1, 1]
    assert syncd.diff.partitions_for(keyed + 1) == math.ceil((keyed + 1) / size)
    assert syncd.diff.partitions_for(10 * keyed) == 10 * keyed // size


def test_a_key_is_both_seeded_hashes_side_by_side() -> None:
    """An id's 128-bit key holds its two 64-bit hashes whole (the first above the
    second), so two ids share a key only if both hashes collide."""
    ids = column("a\nb\n日本\n" + "x" * 100)
    seeds = (3, 2**63 - 5)
    high, low = (ids.hash(seed).to_list() for seed in seeds)
    expected = [(first << 64) | second for first, second in zip(high, low, strict=True)]
    assert syncd.diff._Keyer(seeds).keys(ids).to_list() == expected


def test_partitioning_keeps_every_copy_of_an_id_in_one_partition(tmp_path: Path) -> None:
    """Each id lands in exactly one partition file, with all its copies, so a partition
    is compared alone; the spill file and the partition files are removed."""
    spill = tmp_path / "source"
    ids = [f"id{i}" for i in range(200)]
    spill.write_text("\n".join(ids + ids[:50]) + "\n", encoding="utf-8")
    partitions = [
        part.ids.to_list()
        for part in syncd.diff._partition(spill, 5, syncd.diff._Keyer((1, 2)))
        if part.ids is not None
    ]
    assert len(partitions) == 5
    assert all(partitions)  # 200 ids over 5 partitions: none is empty
    assert sorted(member for part in partitions for member in part) == sorted(ids + ids[:50])
    for member in ids[:50]:
        assert sum(part.count(member) for part in partitions) == 2
        assert sum(member in part for part in partitions) == 1
    assert leftovers(tmp_path) == []


async def test_a_side_that_can_be_keyed_whole_is_not_partitioned(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``KEYED_IN_MEMORY`` ids on the larger side are compared as one partition."""
    partition_tiny(monkeypatch, keyed=4, partition=1)
    parts = count_partitions(monkeypatch)
    async with diffed([["a", "b"], ["c", "d"]], [["d"]], tmp_path) as diff:
        assert parts == []
        assert sorted(everything(diff, "add")) == ["a", "b", "c"]


async def test_ids_come_out_sorted(tmp_path: Path) -> None:
    """Adds and removes are written sorted (a first sync then appends to the snapshot's
    index), whatever order the source gave them in."""
    new = [f"n{i:03}" for i in range(60)]
    old = [f"o{i:03}" for i in range(60)]
    async with diffed([[n] for n in new[::-1]], [[o] for o in old[::-1]], tmp_path) as diff:
        assert everything(diff, "add") == new
        assert everything(diff, "remove") == old


async def test_ids_read_back_whole_across_read_blocks(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Spill files are read a few bytes at a time: an id cut by a block boundary is
    still one id, and the file is not read in one piece."""
    monkeypatch.setattr(syncd.diff, "READ_BYTES", 7)
    spill = tmp_path / "spill"
    ids = ["alpha", "b", "日本語のid", "🎉🎉", "long-id-over-one-block"]
    spill.write_text("\n".join(ids) + "\n", encoding="utf-8")
    blocks = [block.to_list() for block in syncd.diff._read_blocks(spill)]
    assert [member for block in blocks for member in block] == ids
    assert len(blocks) > 3
    partition_tiny(monkeypatch, keyed=2, partition=2)
    async with diffed([ids[:3], ids[3:]], [["b", "gone"]], tmp_path) as diff:
        assert sorted(everything(diff, "add")) == sorted(set(ids) - {"b"})
        assert everything(diff, "remove") == ["gone"]


async def test_ids_picked_from_spill_files_read_in_many_blocks_are_the_right_ones(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Sides keyed whole are read back from their spill files a block at a time:
    each block is matched to its own stretch of the comparison, so the ids picked
    from every block (adds from the source's, removes from the snapshot's) are
    exactly the ones that differ."""
    monkeypatch.setattr(syncd.diff, "READ_BYTES", 40)  # 8 ids of 4 characters a block
    old = [f"o{i:03}" for i in range(60)]
    source = [member if i % 3 == 0 else f"n{i:03}" for i, member in enumerate(old)]
    async with diffed([source[:25], source[25:]], [old[:30], old[30:]], tmp_path) as diff:
        assert everything(diff, "add") == sorted(set(source) - set(old))
        assert everything(diff, "remove") == sorted(set(old) - set(source))


async def test_work_directory_is_named_for_this_process(tmp_path: Path) -> None:
    """The spill folder carries the prefix and this pid, so a later start can tell a
    dead process's spill from a live one's and remove it."""
    async with diffed([["a"]], [["b"]], tmp_path) as diff:
        assert diff.workdir.name.startswith(f"{syncd.diff.SPILL_PREFIX}{os.getpid()}-")


async def test_close_removes_the_work_directory(tmp_path: Path) -> None:
    diff = await compute_diff(chunks(["a"]), chunks(["b"]), Quarantined(), tmp_path)
    assert diff.workdir.parent == tmp_path
    assert diff.workdir.is_dir()
    diff.close()
    assert not diff.workdir.exists()
    assert leftovers(tmp_path) == []
    diff.close()  # twice is fine


async def test_a_failing_source_leaves_no_work_directory(tmp_path: Path) -> None:
    async def failing() -> AsyncIterator[IdText]:
        yield IdText.of(["a", "b"])
        raise RuntimeError("source broke")

    with pytest.raises(RuntimeError, match="source broke"):
        await compute_diff(failing(), chunks(["x"]), Quarantined(), tmp_path)
    assert leftovers(tmp_path) == []


def dead_pid() -> int:
    """The pid of a process that has exited (and been reaped)."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_stale_spills_of_dead_processes_are_removed(tmp_path: Path) -> None:
    """Only folders of dead syncd processes go; this process's, a live process's,
    malformed names and other folders stay, and the count says how many went."""
    prefix = syncd.diff.SPILL_PREFIX
    dead = [tmp_path / f"{prefix}{dead_pid()}-abc", tmp_path / f"{prefix}{dead_pid()}-def"]
    kept = [
        tmp_path / f"{prefix}{os.getpid()}-own",
        tmp_path / f"{prefix}{os.getppid()}-parent",
        tmp_path / f"{prefix}notapid-x",
        tmp_path / "other-123-x",
    ]
    for folder in dead + kept:
        folder.mkdir()
        (folder / "source").write_text("a\n", encoding="utf-8")
    assert syncd.diff.remove_stale_spills(tmp_path) == 2
    assert sorted(leftovers(tmp_path)) == sorted(kept)


def test_stale_spill_removed_by_another_process_first_is_no_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two processes starting on one host may clean the same dead spill: the one that
    finds it already gone carries on."""
    folder = tmp_path / f"{syncd.diff.SPILL_PREFIX}{dead_pid()}-abc"
    folder.mkdir()

    def dead_and_cleaned_by_another(pid: int) -> bool:
        shutil.rmtree(folder)
        return False

    monkeypatch.setattr(syncd.diff, "alive", dead_and_cleaned_by_another)
    assert syncd.diff.remove_stale_spills(tmp_path) == 1
    assert leftovers(tmp_path) == []


def test_stale_spills_default_to_the_temporary_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without a work directory, the system's temporary directory is cleaned."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    (tmp_path / f"{syncd.diff.SPILL_PREFIX}{dead_pid()}-abc").mkdir()
    assert syncd.diff.remove_stale_spills() == 1
    assert leftovers(tmp_path) == []


# -- property ------------------------------------------------------------------------------

# Short ids that overlap between old and new, and unicode of every kind (no
# surrogates: those are not text a source can hand over).
SHORT = st.text(alphabet="abcé日🎉,'\"% ", min_size=1, max_size=3)
UNICODE = st.text(st.characters(codec="utf-8"), min_size=1, max_size=4)
LONG = st.text(alphabet="xyz ", min_size=95, max_size=120)  # around the 100-char limit
RAW = st.lists(st.one_of(SHORT, SHORT, UNICODE, LONG), max_size=30)


def cleaned(raw: list[str]) -> list[list[str]]:
    """Through the id rules in chunks of 5, as the engine reads a source."""
    return [clean_ids(raw[i : i + 5], SkippedIds()) for i in range(0, len(raw), 5)]


async def apply(
    raw_old: list[str], raw_new: list[str], size: int, quarantined: Quarantined, partition: int
) -> tuple[set[str], set[str], Diff, list[list[str]], list[list[str]]]:
    old = {member for chunk in cleaned(raw_old) for member in chunk}
    source = cleaned(raw_new)
    new = {member for chunk in source for member in chunk}
    with (
        tempfile.TemporaryDirectory() as folder,
        mock.patch.object(syncd.diff, "PARTITION_IDS", partition),
        mock.patch.object(syncd.diff, "KEYED_IN_MEMORY", partition),
    ):
        diff = await compute_diff(chunks(*source), chunks(sorted(old)), quarantined, Path(folder))
        try:
            removes = list(diff.batches("remove", size))
            adds = list(diff.batches("add", size))
        finally:
            diff.close()
        assert leftovers(Path(folder)) == []
    return old, new, diff, adds, removes


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    raw_old=RAW,
    raw_new=RAW,
    size=st.integers(min_value=1, max_value=7),
    partition=st.sampled_from([400_000, 4]),
)
def test_applying_the_diff_turns_old_into_new(
    raw_old: list[str], raw_new: list[str], size: int, partition: int
) -> None:
    old, new, diff, adds, removes = asyncio.run(
        apply(raw_old, raw_new, size, Quarantined(), partition)
    )
    result = set(old)
    for batch in removes:
        result.difference_update(batch)
    for batch in adds:
        result.update(batch)
    assert result == new
    assert all(0 < len(batch) <= size for batch in adds + removes)
    assert len(adds) + len(removes) == math.ceil(diff.adds / size) + math.ceil(diff.removes / size)
    flat_adds = [member for batch in adds for member in batch]
    flat_removes = [member for batch in removes for member in batch]
    assert sorted(flat_adds) == sorted(new - old)
    assert sorted(flat_removes) == sorted(old - new)
    assert (diff.adds, diff.removes, diff.distinct) == (len(new - old), len(old - new), len(new))
    assert all(0 < len(member) <= MAX_ID_LENGTH for member in flat_adds + flat_removes)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    raw_old=RAW,
    raw_new=RAW,
    size=st.integers(min_value=1, max_value=7),
    partition=st.sampled_from([400_000, 4]),
    data=st.data(),
)
def test_quarantined_ids_wait_until_their_membership_changes(
    raw_old: list[str], raw_new: list[str], size: int, partition: int, data: st.DataObject
) -> None:
    pool = sorted({m for chunk in cleaned(raw_old + raw_new) for m in chunk} | {"elsewhere"})
    held = Quarantined(
        add=frozenset(data.draw(st.sets(st.sampled_from(pool)))),
        remove=frozenset(data.draw(st.sets(st.sampled_from(pool)))),
    )
    old, new, diff, adds, removes = asyncio.run(apply(raw_old, raw_new, size, held, partition))
    assert {m for batch in adds for m in batch} == (new - old) - held.add
    assert {m for batch in removes for m in batch} == (old - new) - held.remove
    assert diff.released == Quarantined(add=held.add - new, remove=held.remove & new)
    assert all(0 < len(batch) <= size for batch in adds + removes)


# -- the source digest: an unchanged id set skips the snapshot ---------------------------------


async def never_read() -> AsyncIterator[IdText]:
    raise AssertionError("the snapshot was read")
    yield IdText()  # an async generator


async def digest_of(source: list[list[str]], work_dir: Path, stored: str | None = None) -> Diff:
    diff = await compute_diff(
        chunks(*source), chunks(["x"]), Quarantined(), work_dir, stored_digest=stored
    )
    diff.close()
    return diff


async def test_a_source_read_again_in_another_order_skips_the_snapshot(tmp_path: Path) -> None:
    ids = [f"user-{i}" for i in range(500)]
    first = await digest_of([ids[:200], ids[200:]], tmp_path)
    assert first.digest is not None
    assert not first.unchanged
    shuffled = ids[::-1]
    again = await compute_diff(
        chunks(shuffled[:7], shuffled[7:]),
        never_read(),
        Quarantined(),
        tmp_path,
        stored_digest=first.digest,
    )
    again.close()
    assert again.unchanged
    assert again.digest == first.digest
    assert (again.adds, again.removes) == (0, 0)
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize(
    "change",
    [
        lambda ids: [*ids[:-1], "user-new"],  # one id replaced
        lambda ids: ids[:-1],  # one gone
        lambda ids: [*ids, ids[0]],  # one repeated: the count differs
        lambda ids: [*ids[:-2], ids[-1], ids[-1]],  # one gone, one repeated: same count
    ],
)
async def test_any_other_read_is_compared_in_full(
    tmp_path: Path, change: Callable[[list[str]], list[str]]
) -> None:
    ids = [f"user-{i}" for i in range(300)]
    first = await digest_of([ids], tmp_path)
    other = await digest_of([change(ids)], tmp_path, first.digest)
    assert not other.unchanged
    assert other.digest != first.digest


async def test_a_digest_of_other_seeds_or_another_polars_is_not_trusted(tmp_path: Path) -> None:
    """The seeds come from the stored digest; one written by another Polars version
    (its hashes may differ) or unreadable gets fresh seeds, so it never matches."""
    ids = [["a", "b", "c"]]
    first = await digest_of(ids, tmp_path)
    assert first.digest is not None
    version, polars_version, *rest = first.digest.split(":")
    for stored in (
        ":".join([version, "0.0.1", *rest]),
        "garbage",
        ":".join([version, polars_version, "1", "2", *rest[2:]]),
    ):
        assert not (await digest_of(ids, tmp_path, stored)).unchanged
    fresh = await digest_of(ids, tmp_path)
    assert fresh.digest != first.digest  # seeds drawn anew without a stored digest
    assert repr(syncd.diff.SourceDigest(first.digest)) == "SourceDigest(...)"
    assert first.digest not in repr(first)


async def test_the_digest_is_the_count_and_the_sums_of_both_seeded_hashes(
    tmp_path: Path,
) -> None:
    """The digest holds the seeds it was given, the ids' count (repeats included) and
    each seeded hash's sum modulo 2^64 (carried across the halves it is summed in),
    however the ids were cut into chunks: the same ids give it in any later run."""
    import polars as pl

    ids = [f"user-{i}" for i in range(300)] + ["user-7", "日本", "🎉"]
    seeds = (11, 2**63 - 25)
    stored = f"set1:{pl.__version__}:{seeds[0]}:{seeds[1]}:0:0:0"
    sums = [sum(pl.Series(ids).hash(seed).to_list()) % (1 << 64) for seed in seeds]
    assert all(total.bit_length() > 60 for total in sums)  # the high halves carry
    expected = f"set1:{pl.__version__}:{seeds[0]}:{seeds[1]}:{len(ids)}:{sums[0]}:{sums[1]}"
    for cut in (1, 7, len(ids)):
        chunked = [ids[i : i + cut] for i in range(0, len(ids), cut)]
        assert (await digest_of(chunked, tmp_path, stored)).digest == expected


async def test_a_plan_of_exactly_sorted_whole_ids_is_one_sorted_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Up to SORTED_WHOLE ids, the bound included, are written sorted as a whole,
    even when their spill file is read back in many blocks."""
    monkeypatch.setattr(syncd.diff, "SORTED_WHOLE", 60)
    monkeypatch.setattr(syncd.diff, "READ_BYTES", 40)
    new = [f"n{i:03}" for i in range(60)]
    async with diffed([new[::-1]], [], tmp_path) as diff:
        assert everything(diff, "add") == new


async def test_a_large_plan_is_written_block_by_block_each_block_sorted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Past SORTED_WHOLE ids (a first sync), the adds are sorted within each block of
    the spill file rather than all at once: every id once, runs of increasing ids."""
    monkeypatch.setattr(syncd.diff, "SORTED_WHOLE", 5)
    monkeypatch.setattr(syncd.diff, "READ_BYTES", 40)
    new = [f"n{i:03}" for i in range(60)]
    async with diffed([new[::-1]], [], tmp_path) as diff:
        written = everything(diff, "add")
        assert sorted(written) == new
        assert written != new  # not one sorted run...
        runs = sum(1 for a, b in itertools.pairwise(written) if b < a) + 1
        assert 1 < runs < len(new) // 3  # ...but a few long ones, block by block
