"""Id texts (``syncd.ids.IdText``) as Polars columns: the per-id work of the diff
and the id rules, done in compiled code.

Polars is imported on first use: a run whose source is unchanged never loads it.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import polars as pl

# Polars' allocator (jemalloc, prefixed) keeps freed pages for 10 s by default: the
# short-lived columns of each block would then add up in the RSS of a long diff.
# Read once, when Polars is first imported; a value set by the operator wins.
os.environ.setdefault("_RJEM_MALLOC_CONF", "dirty_decay_ms:0,muzzy_decay_ms:0")


def column(text: str) -> pl.Series:
    """The ids of an id text (one per line, no empty line, no final newline)."""
    import polars as pl

    if not text:
        return pl.Series([], dtype=pl.String)
    return pl.Series([text], dtype=pl.String).str.split("\n").explode()


def longest_line(text: str) -> int:
    """The length in characters of the longest line of ``text``."""
    return int(column(text).str.len_chars().max() or 0)  # type: ignore[arg-type]


def text_of(ids: pl.Series) -> str:
    """The ids of a column as an id text."""
    return str(ids.str.join("\n").item()) if len(ids) else ""
