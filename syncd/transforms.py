"""Id transforms: a mapping's ``transform``, named steps applied in order to each
source id (already trimmed) before the id rules of ``syncd.ids``.

Steps: ``lower``, ``upper``, ``strip_prefix:<text>``, ``add_prefix:<text>`` and
``regex:<pattern>`` (the whole id must match; its one capturing group is kept).
Each step maps a whole chunk through C-level ``str`` and ``re`` methods; Python
loops only over the chunks where an id is skipped.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from operator import methodcaller

# Bump when a step's meaning changes: fingerprints stored with a transform then expire.
TRANSFORM_VERSION = 1
MAX_STEPS = 16
# The longest id a regex is run on: Python's re has no time limit, and even a plain
# pattern such as (.*)@.* takes time quadratic in the id's length. Longer ids are skipped.
MAX_REGEX_INPUT = 1000
STEPS_ACCEPTED = "lower, upper, strip_prefix:<text>, add_prefix:<text> or regex:<pattern>"

#: Counts an id that cannot be sent, with the reason (``SkippedIds.add``).
Skip = Callable[[str, str], None]
_Step = Callable[[list[str], Skip], list[str]]
_FIRST_GROUP = methodcaller("group", 1)


@dataclass(frozen=True)
class IdTransform:
    """A mapping's steps, parsed and compiled once at start; empty: ids as they are."""

    steps: tuple[str, ...] = ()
    _compiled: tuple[_Step, ...] = field(default=(), repr=False, compare=False)

    @classmethod
    def parse(cls, steps: Sequence[str]) -> IdTransform:
        """Raise ValueError naming the step (1-based) and what is accepted."""
        if len(steps) > MAX_STEPS:
            raise ValueError(f"at most {MAX_STEPS} steps, got {len(steps)}")
        compiled = []
        for number, step in enumerate(steps, 1):
            try:
                compiled.append(_compile(step))
            except ValueError as exc:
                raise ValueError(f"step {number} {step!r}: {exc}") from None
        return cls(tuple(steps), tuple(compiled))

    def __bool__(self) -> bool:
        return bool(self.steps)

    def apply(self, ids: list[str], skip: Skip) -> list[str]:
        """The chunk's ids after every step; ids a step cannot take go to ``skip``."""
        for step in self._compiled:
            ids = step(ids, skip)
        return ids

    def example(self, value: str) -> str:
        """One id before and after, for people: ``'A@X' -> 'a@x'`` or why it is skipped."""
        reasons: list[str] = []
        after = self.apply([value], lambda _, reason: reasons.append(reason))
        if not after:
            return f"{value!r}: skipped, {reasons[0]}"
        return f"{value!r} -> {after[0]!r}"

    @property
    def stored(self) -> str | None:
        """The steps as the state store keeps them (None: no transform)."""
        return json.dumps(list(self.steps)) if self.steps else None

    def fingerprint(self, source_fingerprint: str | None) -> str | None:
        """The source's fingerprint covering the transform too: the same bytes read
        through other steps are other ids. Without steps, the source's own (so
        fingerprints stored before transforms existed stay valid)."""
        if source_fingerprint is None or not self.steps:
            return source_fingerprint
        text = f"{source_fingerprint}|{TRANSFORM_VERSION}|{self.stored}"
        return hashlib.sha256(text.encode()).hexdigest()


def stored_steps(stored: str | None) -> list[str]:
    """The steps of :attr:`IdTransform.stored` (none for None)."""
    if stored is None:
        return []
    steps = json.loads(stored)
    assert isinstance(steps, list)
    return [str(step) for step in steps]


def _compile(step: str) -> _Step:
    name, colon, text = step.partition(":")
    if name in ("lower", "upper"):
        if colon:
            raise ValueError(f"{name} takes no text after ':'")
        method = str.lower if name == "lower" else str.upper
        return lambda ids, _: list(map(method, ids))
    if name in ("strip_prefix", "add_prefix"):
        if not text:
            raise ValueError(f"{name} needs the text after ':', e.g. {name}:user-")
        if text != text.lstrip():
            effect = "never match" if name == "strip_prefix" else "be trimmed off again"
            raise ValueError(
                f"the text must not start with whitespace: ids are trimmed, so it would {effect}"
            )
        return _strip_prefix(text) if name == "strip_prefix" else _add_prefix(text)
    if name == "regex":
        return _keep_group(_pattern(text))
    raise ValueError(f"unknown step: expected {STEPS_ACCEPTED}")


def _pattern(text: str) -> re.Pattern[str]:
    if not text:
        raise ValueError(r"regex needs a pattern after ':', e.g. regex:user-(\d+)")
    try:
        pattern = re.compile(text)
    except re.error as exc:
        raise ValueError(f"not a valid regular expression: {exc}") from None
    if pattern.groups != 1:
        raise ValueError(
            f"the regular expression has {pattern.groups} capturing groups: it needs exactly"
            " one, the part of the id that is kept (make the others non-capturing: (?:...))"
        )
    return pattern


def _add_prefix(text: str) -> _Step:
    prepend = text.__add__
    return lambda ids, _: list(map(prepend, ids))


def _strip_prefix(text: str) -> _Step:
    remove = methodcaller("removeprefix", text)

    def step(ids: list[str], skip: Skip) -> list[str]:
        after: list[str] = list(map(remove, ids))
        if all(map(str.strip, after)):
            return after
        reason = f"nothing left after strip_prefix:{text}"
        return _kept(ids, after, skip, reason)

    return step


def _keep_group(pattern: re.Pattern[str]) -> _Step:
    mismatch = f"does not match the transform's regex {pattern.pattern!r}"
    empty = "the transform's regex group is empty"
    too_long = f"longer than {MAX_REGEX_INPUT} characters: not matched against the regex"

    def step(ids: list[str], skip: Skip) -> list[str]:
        if max(map(len, ids), default=0) <= MAX_REGEX_INPUT:
            found = list(map(pattern.fullmatch, ids))
            if None not in found:
                groups: list[str] = list(map(_FIRST_GROUP, found))  # None: group unused
                if None not in groups and all(map(str.strip, groups)):
                    return groups
        kept = []
        for value in ids:
            if len(value) > MAX_REGEX_INPUT:
                skip(value, too_long)
                continue
            match = pattern.fullmatch(value)
            group = None if match is None else match.group(1)
            if group is None and match is None:
                skip(value, mismatch)
            elif group is None or not group.strip():
                skip(value, empty)
            else:
                kept.append(group)
        return kept

    return step


def _kept(before: list[str], after: list[str], skip: Skip, reason: str) -> list[str]:
    """``after`` without the ids a step left blank, each skipped under its old value."""
    kept = []
    for old, new in zip(before, after, strict=True):
        if new.strip():
            kept.append(new)
        else:
            skip(old, reason)
    return kept
