"""``syncd.transforms``: a mapping's id transform, step by step, on whole chunks."""

from __future__ import annotations

import re

import pytest

from syncd.ids import SkippedIds, clean_ids, source_texts
from syncd.transforms import MAX_REGEX_INPUT, MAX_STEPS, IdTransform, stored_steps


def transformed(steps: list[str], ids: list[str]) -> tuple[list[str], SkippedIds]:
    skipped = SkippedIds()
    return IdTransform.parse(steps).apply(ids, skipped.add), skipped


@pytest.mark.parametrize(
    ("steps", "ids", "expected"),
    [
        (["lower"], ["Alice@Example.COM", "bob@x"], ["alice@example.com", "bob@x"]),
        (["upper"], ["abc-1", "Straße"], ["ABC-1", "STRASSE"]),
        (["strip_prefix:heap|"], ["heap|42", "43", "xheap|44"], ["42", "43", "xheap|44"]),
        (["strip_prefix:a:b"], ["a:b1", "a:c2"], ["1", "a:c2"]),  # text after the first ':'
        (["add_prefix:wm-"], ["1", "wm-2"], ["wm-1", "wm-wm-2"]),
        ([r"regex:user-(\d+)"], ["user-7", "user-08"], ["7", "08"]),
        ([r"regex:(?:id:)?(?P<id>\w+)"], ["id:ab", "cd"], ["ab", "cd"]),  # named group too
        # In order: the prefix is stripped before the case is changed, then one added.
        (["strip_prefix:U-", "lower", "add_prefix:u_"], ["U-Ann", "u-Bob"], ["u_ann", "u_u-bob"]),
        (["lower", "strip_prefix:u-"], ["U-Ann", "u-Bob"], ["ann", "bob"]),
        ([], ["As", "It", "Is"], ["As", "It", "Is"]),
    ],
)
def test_steps_apply_in_order(steps: list[str], ids: list[str], expected: list[str]) -> None:
    after, skipped = transformed(steps, ids)
    assert after == expected
    assert skipped.count == 0


def test_an_id_the_regex_does_not_match_whole_is_skipped_and_counted() -> None:
    after, skipped = transformed(
        [r"regex:user-(\d+)"], ["user-1", "admin-2", "user-3x", "xuser-4", "user-5"]
    )
    assert after == ["1", "5"]  # the whole id must match, not a part of it
    assert skipped.count == 3
    assert skipped.examples[0].startswith("'admin-2': does not match the transform's regex")
    assert r"'user-(\\d+)'" in skipped.examples[0]
    # The same where every id holds a match somewhere: still only whole ones count.
    after, skipped = transformed([r"regex:user-(\d+)"], ["xuser-4", "user-5", "user-6x"])
    assert (after, skipped.count) == (["5"], 2)


def test_an_id_left_blank_is_skipped_under_its_old_value() -> None:
    after, skipped = transformed(["strip_prefix:user-"], ["user-", "user-  ", "user-9"])
    assert after == ["9"]
    assert skipped.count == 2
    assert skipped.examples == [
        "'user-': nothing left after strip_prefix:user-",
        "'user-  ': nothing left after strip_prefix:user-",
    ]
    after, skipped = transformed(["regex:a(b*)c|(?:x)"], ["abc", "ac", "x"])
    assert after == ["b"]
    assert [e.split(":")[1].strip() for e in skipped.examples] == [
        "the transform's regex group is empty"
    ] * 2


def test_an_id_too_long_for_the_regex_is_skipped_not_matched() -> None:
    longest, too_long = "a" * MAX_REGEX_INPUT, "a" * (MAX_REGEX_INPUT + 1)
    after, skipped = transformed(["regex:(a+)"], [longest, too_long, "aa"])
    assert after == [longest, "aa"]
    assert skipped.count == 1
    assert f"longer than {MAX_REGEX_INPUT} characters" in skipped.examples[0]


def test_a_later_step_works_on_what_the_earlier_one_kept() -> None:
    after, skipped = transformed([r"regex:u(\d+)", "add_prefix:n"], ["u1", "v2", "u3"])
    assert after == ["n1", "n3"]
    assert skipped.count == 1


def test_transform_then_id_rules_on_raw_source_values() -> None:
    """What the engine does with a chunk: trim, transform, then the id rules (the
    length limit counts after the transform)."""
    raw: list[object] = ["  User-" + "A" * 100 + " ", None, "", 42, "User-B\x07"]
    skipped = SkippedIds()
    texts = source_texts(raw)
    assert texts == ["User-" + "A" * 100, "42", "User-B\x07"]
    ids = clean_ids(IdTransform.parse(["strip_prefix:User-"]).apply(texts, skipped.add), skipped)
    assert ids == ["A" * 100, "42"]
    assert skipped.count == 1
    assert "control character" in skipped.examples[0]


def test_example_shows_an_id_before_and_after() -> None:
    transform = IdTransform.parse(["lower", r"regex:(\w+)@x\.com"])
    assert transform.example("Ann@X.com") == "'Ann@X.com' -> 'ann'"
    assert transform.example("bob@y.com") == (
        "'bob@y.com': skipped, does not match the transform's regex '(\\\\w+)@x\\\\.com'"
    )


def test_the_fingerprint_covers_the_steps() -> None:
    source = "sha256-of-the-bytes"
    none, lower = IdTransform(), IdTransform.parse(["lower"])
    assert none.fingerprint(source) == source  # stored fingerprints stay valid
    assert lower.fingerprint(source) not in (None, source)
    assert lower.fingerprint(source) == IdTransform.parse(["lower"]).fingerprint(source)
    assert lower.fingerprint(source) != IdTransform.parse(["upper"]).fingerprint(source)
    assert lower.fingerprint(source) != lower.fingerprint("sha256-of-other-bytes")
    assert lower.fingerprint(None) is None  # a source without one stays without


def test_steps_as_stored() -> None:
    steps = ["lower", "strip_prefix:a:b", r"regex:(\d+)"]
    transform = IdTransform.parse(steps)
    assert stored_steps(transform.stored) == steps
    assert IdTransform().stored is None
    assert stored_steps(None) == []
    assert transform == IdTransform.parse(list(steps))
    assert not IdTransform()
    assert transform


@pytest.mark.parametrize(
    ("steps", "words"),
    [
        (["Lower"], ("step 1 'Lower'", "unknown step", "strip_prefix:<text>")),
        (["lower", "regex:("], ("step 2", "not a valid regular expression")),
        (["regex:"], ("needs a pattern",)),
        (["regex:a|b"], ("0 capturing groups", "(?:...)")),
        (["regex:(a)|(b)"], ("2 capturing groups",)),
        (["add_prefix:"], ("needs the text",)),
        (["strip_prefix: x"], ("whitespace", "never match")),
        (["upper:x"], ("upper takes no text",)),
        (["lower"] * (MAX_STEPS + 1), (f"at most {MAX_STEPS} steps",)),
    ],
)
def test_bad_steps_are_refused_naming_the_step(steps: list[str], words: tuple[str, ...]) -> None:
    with pytest.raises(ValueError, match=re.escape(words[0])) as caught:
        IdTransform.parse(steps)
    for word in words:
        assert word in str(caught.value)
