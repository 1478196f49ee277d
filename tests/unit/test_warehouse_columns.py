"""Snowflake's column metadata is held to the same rule as PostgreSQL's: one column
of text or integers (NUMBER with scale 0), anything else refused by name."""

from __future__ import annotations

import pytest

from syncd.sources.base import SourceError
from syncd.sources.warehouse import _check_column, _snowflake_columns

# (name, type_code, display_size, internal_size, precision, scale, is_nullable)
TEXT = ("IDENTITY", 2, None, 16777216, None, None, True)
INTEGER = ("USER_ID", 0, None, None, 38, 0, True)
DECIMAL = ("SCORE", 0, None, None, 38, 2, True)
FLOAT = ("RATIO", 1, None, None, None, None, True)


@pytest.mark.parametrize("column", [TEXT, INTEGER])
def test_snowflake_text_and_integer_columns_are_accepted(column: tuple[object, ...]) -> None:
    _check_column(_snowflake_columns([column]))


@pytest.mark.parametrize(
    ("column", "kind"),
    [(DECIMAL, "NUMBER with scale 2"), (FLOAT, "Snowflake type code 1")],
)
def test_snowflake_decimal_and_float_columns_are_refused_by_name(
    column: tuple[object, ...], kind: str
) -> None:
    with pytest.raises(SourceError, match=f"column '{column[0]}' is of type {kind}"):
        _check_column(_snowflake_columns([column]))


def test_snowflake_two_columns_are_refused() -> None:
    with pytest.raises(SourceError, match="exactly one column, got 2"):
        _check_column(_snowflake_columns([TEXT, INTEGER]))
