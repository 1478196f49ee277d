"""The id rules: what a user id must look like before it may be sent to WalkMe."""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import polars as pl

ID_RULES_VERSION = 2  # bump when the rules change: stored source fingerprints then expire
MAX_ID_LENGTH = 100  # WalkMe: "Up to 100 characters per ID value"
EXAMPLES_KEPT = 5
# C0/C1 control characters cannot be a real user id and break WalkMe's matching.
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")
# The same, less the newline: used on a whole chunk joined by newlines.
_CONTROL_IN_CHUNK = re.compile(r"[\x00-\x09\x0b-\x1f\x7f-\x9f]")
# Whitespace (but a newline) at the start or end of a line of such a chunk.
_EDGE_SPACE = re.compile(r"(?m)^[^\S\n]|[^\S\n]$")
_EMPTY_LINES = re.compile(r"\n\n+")
_ASCII_ALLOWED = bytes(range(0x20, 0x7F)) + b"\n"  # printable ASCII, and the newline


class IdText(str):
    """Ids one per line, none empty, no newline at the end: how a chunk of ids travels
    from a source or the store to the diff without one Python object per id (ids
    never hold a newline: the id rules)."""

    _column: pl.Series | None = None  # split once, by whoever needs it first

    def column(self) -> pl.Series:
        """Its ids as a Polars column (``syncd.idtext``)."""
        if self._column is None:
            from syncd.idtext import column

            self._column = column(self)
        return self._column

    def ids(self) -> list[str]:
        return self.split("\n") if self else []

    @classmethod
    def of(cls, ids: list[str]) -> IdText:
        return cls("\n".join(ids))


class NotAnId(ValueError):
    """A source value that is neither text nor an integer: its repr is no user id."""


@dataclass
class SkippedIds:
    """Ids that cannot be sent, counted and with a few examples kept for users."""

    count: int = 0
    examples: list[str] = field(default_factory=list)

    def add(self, value: str, reason: str) -> None:
        self.count += 1
        if len(self.examples) < EXAMPLES_KEPT:
            shown = value if len(value) <= 40 else value[:37] + "..."
            self.examples.append(f"{shown!r}: {reason}")


def clean_ids(raw: Iterable[object], skipped: SkippedIds) -> list[str]:
    """Apply the id rules to a chunk of source values.

    Surrounding whitespace is stripped and empty values and NULLs dropped;
    integers become their digits; ids WalkMe cannot take are counted in ``skipped``.
    Any other value (a float, Decimal, bool, bytes, list...) raises :class:`NotAnId`:
    its Python repr is not the text the source holds, so it must not be sent.
    Duplicates are left to the diff, which keeps each id once.
    """
    texts = source_texts(raw if isinstance(raw, list) else list(raw))
    # The common case, checked chunk-wide so the per-id work stays in C.
    joined = "\n".join(texts)
    if (
        max(map(len, texts), default=0) <= MAX_ID_LENGTH
        and joined.count("\n") == max(len(texts) - 1, 0)  # no newline inside an id
        and not _has_control(joined)
    ):
        return texts
    kept: list[str] = []
    for text in texts:
        reason = skip_reason(text)
        if reason is None:
            kept.append(text)
        else:
            skipped.add(text, reason)
    return kept


def skip_reason(text: str) -> str | None:
    """Why the id rules skip this stripped, non-empty id; None: it may be sent."""
    if len(text) > MAX_ID_LENGTH:
        return f"longer than {MAX_ID_LENGTH} characters ({len(text)})"
    if _CONTROL.search(text):
        return "contains a control character"
    return None


def clean_text(text: str, skipped: SkippedIds) -> IdText:
    """The id rules applied to raw values given one per line (a file's lines, a
    page of a table), checked block-wide so that in the common case no Python
    object is made per id; any block needing more goes through :func:`clean_ids`."""
    if "\r" in text:
        text = text.replace("\r\n", "\n")  # strip would take the CR of CRLF lines anyway
    if "\n\n" in text:
        text = _EMPTY_LINES.sub("\n", text)
    text = text.strip("\n")
    if not text:
        return IdText()
    if not _has_control(text) and not _edge_space(text):
        from syncd.idtext import longest

        ids = IdText(text)
        if longest(ids.column()) <= MAX_ID_LENGTH:
            return ids
    return IdText.of(clean_ids(text.split("\n"), skipped))


def _has_control(text: str) -> bool:
    """Whether ``text`` holds a control character other than the newline."""
    if text.isascii():  # deleting every allowed byte leaves the others, in C
        return bool(text.encode("ascii").translate(None, _ASCII_ALLOWED))
    return _CONTROL_IN_CHUNK.search(text) is not None


def _edge_space(text: str) -> bool:
    """Whether a line of ``text`` (free of control characters) starts or ends with
    whitespace."""
    if text.isascii():  # the one ASCII whitespace left is the space
        return text[0] == " " or text[-1] == " " or " \n" in text or "\n " in text
    return _EDGE_SPACE.search(text) is not None


def source_texts(values: list[object]) -> list[str]:
    """A chunk of source values as trimmed text, NULLs and empty values dropped (what
    an id transform starts from); a value that is no id raises :class:`NotAnId`."""
    if set(map(type, values)) <= {str}:
        return list(filter(None, map(str.strip, values)))  # type: ignore[arg-type]
    texts = (value_text(value).strip() for value in values if value is not None)
    return list(filter(None, texts))


def value_text(value: object) -> str:
    """A source value as the text it holds (NotAnId: neither text nor an integer)."""
    if isinstance(value, str):
        return value
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    raise NotAnId(
        f"a value of type {type(value).__name__} is neither text nor an integer;"
        " convert it to text in the source (in SQL: CAST(column AS TEXT))"
    )
