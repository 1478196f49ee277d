"""State stores. ``open_store`` picks one from ``SYNCD_STATE_URL``."""

from __future__ import annotations

from syncd.state.base import Action, Origin, SegmentState, StateError
from syncd.state.sqlite import SqliteStore
from syncd.state.store import StateStore

__all__ = ["Action", "Origin", "SegmentState", "StateError", "StateStore", "open_store"]


async def open_store(url: str, pool_size: int = 8) -> StateStore:
    """Open (creating or migrating) the store; raises StateError with a clear message."""
    if url.startswith(("postgresql://", "postgres://")):
        from syncd.state.postgres import PostgresStore  # asyncpg loads only when used

        return await PostgresStore.open(url, pool_size)
    return await SqliteStore.open(url)
