"""Property: applying every staged batch turns any snapshot into exactly the new set."""

from __future__ import annotations

import asyncio
import math
import tempfile
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from syncd.state import open_store

SYSTEM = "5a1d0c2e-3b4f-4e6a-8c7d-9e0f1a2b3c4d"
GUID = "0b7e6f1c-2d3a-4b5c-9d8e-7f6a5b4c3d2e"

ids = st.sets(st.text(alphabet="abcdefgh0123", min_size=1, max_size=3), max_size=30)


async def apply_diff(
    directory: Path, old: set[str], new: set[str], size: int
) -> tuple[set[str], list[list[str]], list[list[str]], int, int, int]:
    store = await open_store("sqlite:///" + str(directory / "s.db"))
    try:
        await store.begin_run("seg", "r0", SYSTEM, None)
        await store.record_batch("seg", "r0", "create", sorted(old), GUID)
        await store.begin_run("seg", "r1", SYSTEM, None)
        removes: list[list[str]] = []
        adds: list[list[str]] = []
        async with store.stage("seg") as stage:
            # Staged in chunks, with duplicates, as sources hand them over.
            ordered = sorted(new)
            for start in range(0, len(ordered), 4):
                await stage.add(ordered[start : start + 4] + ordered[:1])
            pending_adds = await stage.pending("add")
            pending_removes = await stage.pending("remove")
            async for batch in stage.batches("remove", size):
                removes.append(batch)
                await store.record_batch("seg", "r1", "remove", batch)
            async for batch in stage.batches("add", size):
                adds.append(batch)
                await store.record_batch("seg", "r1", "add", batch)
        # Read the snapshot back: against an empty stage, all of it is pending removal.
        async with store.stage("seg") as empty:
            result = {m async for batch in empty.batches("remove", 1000) for m in batch}
        state = await store.get("seg")
        assert state is not None
        return result, adds, removes, pending_adds, pending_removes, state.members
    finally:
        await store.close()


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(old=ids, new=ids, size=st.integers(min_value=1, max_value=7))
def test_batches_turn_old_into_new(old: set[str], new: set[str], size: int) -> None:
    with tempfile.TemporaryDirectory() as directory:
        result, adds, removes, pending_adds, pending_removes, members = asyncio.run(
            apply_diff(Path(directory), old, new, size)
        )
    to_add, to_remove = new - old, old - new
    assert result == new
    assert members == len(new)
    assert pending_adds == len(to_add)
    assert pending_removes == len(to_remove)
    assert all(0 < len(batch) <= size for batch in adds + removes)
    assert [m for batch in adds for m in batch] == sorted(to_add)
    assert [m for batch in removes for m in batch] == sorted(to_remove)
    assert len(adds) + len(removes) == math.ceil(len(to_add) / size) + math.ceil(
        len(to_remove) / size
    )
