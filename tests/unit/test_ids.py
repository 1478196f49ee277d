"""``syncd.ids.clean_ids``: the id rules applied before anything reaches WalkMe."""

from __future__ import annotations

from collections.abc import Sequence
from decimal import Decimal

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from syncd.ids import EXAMPLES_KEPT, MAX_ID_LENGTH, NotAnId, SkippedIds, clean_ids, clean_text


def clean(values: Sequence[object]) -> tuple[list[str], SkippedIds]:
    skipped = SkippedIds()
    return clean_ids(values, skipped), skipped


def test_strip_and_keep_order() -> None:
    kept, skipped = clean(["  a@x.com ", "b@x.com\n", "\tc@x.com", "d@x.com\r\n"])
    assert kept == ["a@x.com", "b@x.com", "c@x.com", "d@x.com"]
    assert skipped.count == 0
    assert skipped.examples == []


def test_empty_and_none_dropped_without_counting() -> None:
    kept, skipped = clean(["", "   ", None, "\n", "a"])
    assert kept == ["a"]
    assert skipped.count == 0


def test_numbers_become_strings() -> None:
    kept, _ = clean([42, 0, 1234567890123, "7"])
    assert kept == ["42", "0", "1234567890123", "7"]


def test_duplicates_left_to_the_store() -> None:
    kept, _ = clean(["a", "a", " a "])
    assert kept == ["a", "a", "a"]


def test_internal_spaces_and_unicode_kept() -> None:
    kept, skipped = clean(["Jane Doe", "jürgen@beispiel.de", "用户42"])
    assert kept == ["Jane Doe", "jürgen@beispiel.de", "用户42"]
    assert skipped.count == 0


def test_100_characters_ok_101_skipped() -> None:
    ok = "a" * MAX_ID_LENGTH
    too_long = "b" * (MAX_ID_LENGTH + 1)
    kept, skipped = clean([ok, too_long])
    assert MAX_ID_LENGTH == 100
    assert kept == [ok]
    assert skipped.count == 1
    [example] = skipped.examples
    assert "101" in example
    assert "100" in example


def test_length_counted_after_strip() -> None:
    kept, skipped = clean(["  " + "a" * 100 + "  "])
    assert kept == ["a" * 100]
    assert skipped.count == 0


def test_examples_capped_at_five_and_short() -> None:
    long_ids = [f"{i}" + "x" * 200 for i in range(12)]
    kept, skipped = clean(long_ids)
    assert kept == []
    assert skipped.count == 12
    assert EXAMPLES_KEPT == 5
    assert len(skipped.examples) == 5
    assert all(len(example) < 150 for example in skipped.examples)


def test_skipped_counts_accumulate_across_chunks() -> None:
    skipped = SkippedIds()
    for _ in range(3):
        clean_ids(["ok", "z" * 101, "bad\x00id"], skipped)
    assert skipped.count == 6
    assert len(skipped.examples) == 5


@pytest.mark.parametrize(
    "value", ["a\x00b", "a\tb", "a\nb", "a\rb", "a\x1bb", "a\x7fb", "a\x9fb", "a\x85b"]
)
def test_control_characters_skipped(value: str) -> None:
    kept, skipped = clean([value, "fine"])
    assert kept == ["fine"]
    assert skipped.count == 1
    assert "control" in skipped.examples[0]


@pytest.mark.parametrize(
    "value", [1.2345678901234568e16, Decimal("1E+20"), True, b"abc", ["a"], 42.0]
)
def test_a_value_neither_text_nor_integer_is_refused_not_sent_as_its_repr(value: object) -> None:
    with pytest.raises(NotAnId, match=f"a value of type {type(value).__name__} is neither"):
        clean(["a@x.com", value])


# -- clean_text: the same rules on a block of lines, checked block-wide ----------------------

LINE = st.text(
    st.sampled_from(["a", "é", "日", " ", "\t", "\r", "\x00", "\x1f", "\x85", "\xa0", "\u2003"]),
    max_size=4,
) | st.text(st.sampled_from("xy "), min_size=98, max_size=103)


@settings(max_examples=300, deadline=None)
@given(lines=st.lists(LINE, max_size=12), crlf=st.booleans())
def test_clean_text_applies_the_rules_exactly_as_clean_ids(lines: list[str], crlf: bool) -> None:
    """Whatever a block holds (spaces at the edges, control characters, over-long or
    empty lines, CRLF endings), its ids and its skipped count are those of its lines
    through clean_ids: the block-wide shortcut never changes the result."""
    text = ("\r\n" if crlf else "\n").join(lines)
    by_line, line_skips = clean(text.split("\n"))
    skipped = SkippedIds()
    assert clean_text(text, skipped).ids() == by_line
    assert skipped.count == line_skips.count


def test_clean_text_keeps_a_clean_block_as_it_is_without_splitting_it() -> None:
    """The common case: a block that needs nothing is passed on unchanged (the same
    text, not a rebuilt one), only empty lines and CRLF endings taken out."""
    block = "a@x.com\nb@x.com\n" + "c" * MAX_ID_LENGTH
    skipped = SkippedIds()
    assert clean_text(block, skipped) == block
    assert clean_text("\n\na@x.com\r\n\r\nb@x.com\n", skipped) == "a@x.com\nb@x.com"
    assert clean_text("", skipped) == clean_text("\n\n", skipped) == ""
    assert skipped.count == 0
    long_block = block + "\n" + "d" * (MAX_ID_LENGTH + 1)
    assert clean_text(long_block, skipped).ids() == block.split("\n")
    assert skipped.count == 1
