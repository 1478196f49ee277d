"""The id rules: what a user id must look like before it may be sent to WalkMe."""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field

ID_RULES_VERSION = 2  # bump when the rules change: stored source fingerprints then expire
MAX_ID_LENGTH = 100  # WalkMe: "Up to 100 characters per ID value"
EXAMPLES_KEPT = 5
# C0/C1 control characters cannot be a real user id and break WalkMe's matching.
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")
# The same, less the newline: used on a whole chunk joined by newlines.
_CONTROL_IN_CHUNK = re.compile(r"[\x00-\x09\x0b-\x1f\x7f-\x9f]")


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
    values = raw if isinstance(raw, list) else list(raw)
    if set(map(type, values)) <= {str}:
        # The common case, checked chunk-wide so the per-id work stays in C.
        stripped = list(filter(None, map(str.strip, values)))
        joined = "\n".join(stripped)
        if (
            max(map(len, stripped), default=0) <= MAX_ID_LENGTH
            and joined.count("\n") == max(len(stripped) - 1, 0)  # no newline inside an id
            and not _CONTROL_IN_CHUNK.search(joined)
        ):
            return stripped
    kept: list[str] = []
    for text in source_texts(values):
        if len(text) > MAX_ID_LENGTH:
            skipped.add(text, f"longer than {MAX_ID_LENGTH} characters ({len(text)})")
        elif _CONTROL.search(text):
            skipped.add(text, "contains a control character")
        else:
            kept.append(text)
    return kept


def source_texts(values: list[object]) -> list[str]:
    """A chunk of source values as trimmed text, NULLs and empty values dropped (what
    an id transform starts from); a value that is no id raises :class:`NotAnId`."""
    if set(map(type, values)) <= {str}:
        return list(filter(None, map(str.strip, values)))  # type: ignore[arg-type]
    texts = (_text(value).strip() for value in values if value is not None)
    return list(filter(None, texts))


def _text(value: object) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    raise NotAnId(
        f"a value of type {type(value).__name__} is neither text nor an integer;"
        " convert it to text in the source (in SQL: CAST(column AS TEXT))"
    )
