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

_SEPARATOR = "\x1f"  # a control character: in no id


def column(text: str) -> pl.Series:
    """The ids of an id text (one per line, no empty line, no final newline).

    Polars' CSV reader splits lines several times faster than its string split; it
    is given a separator and no quote character, so each line is one value as it
    is. It would take a CR before a newline, and the separator would cut a line:
    ids hold neither (the id rules refuse control characters), and a text that did
    is split the slow, literal way. So is one the reader did not give line for line.
    """
    import polars as pl

    if not text:
        return pl.Series([], dtype=pl.String)
    if "\r" not in text and _SEPARATOR not in text:
        ids = pl.read_csv(
            text.encode(),
            has_header=False,
            separator=_SEPARATOR,
            quote_char=None,
            eol_char="\n",
            schema={"id": pl.String},
        )["id"]
        if len(ids) == text.count("\n") + 1 and not ids.null_count():
            return ids
    return pl.Series([text], dtype=pl.String).str.split("\n").explode()


def longest(ids: pl.Series) -> int:
    """The length in characters of the longest id of a column."""
    return int(ids.str.len_chars().max() or 0)  # type: ignore[arg-type]


def text_of(ids: pl.Series) -> str:
    """The ids of a column as an id text."""
    return str(ids.str.join("\n").item()) if len(ids) else ""
