"""``syncd.idtext``: id texts as Polars columns, each line one value as it is."""

from __future__ import annotations

import pytest

from syncd.idtext import column, longest, text_of


@pytest.mark.parametrize(
    "text",
    [
        "a",
        "a\nb",
        ' x \n"q"\n#c\n,,\n日本\n🎉',  # spaces, quotes, comment and CSV characters kept
        "a\r\nb\rc",  # a CR the CSV reader would take: split literally
        "a\x1fb\nc",  # the reader's separator inside a line
        "a\n\nb",  # an empty line (no id text has one): kept as an empty value
        "\nz",
    ],
)
def test_each_line_is_one_value_as_it_is(text: str) -> None:
    ids = column(text)
    assert ids.to_list() == text.split("\n")
    assert text_of(ids) == text


def test_an_empty_text_has_no_ids() -> None:
    assert column("").to_list() == []
    assert text_of(column("")) == ""


def test_longest_counts_characters_not_bytes() -> None:
    assert longest(column("ab\n日本語\nc")) == 3
    assert longest(column("")) == 0
