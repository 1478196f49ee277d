"""The README is the reference: every log event and every setting syncd has is in it."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
EMITTED = re.compile(r"\blog\.(?:debug|info|warning|error|exception)\(\s*\"([a-z_]+\.[a-z_]+)\"")
LISTED = re.compile(r"^\| `([a-z_]+\.[a-z_]+)` \|", re.MULTILINE)


def emitted_events() -> set[str]:
    events: set[str] = set()
    for path in (ROOT / "syncd").rglob("*.py"):
        events |= set(EMITTED.findall(path.read_text(encoding="utf-8")))
    return events


def listed_events() -> set[str]:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    section = readme.split("### Log events", 1)[1].split("\n## ", 1)[0]
    return set(LISTED.findall(section))


def test_the_scan_finds_the_core_events() -> None:
    # Guards the regex itself: if it stopped matching, the next test would pass vacuously.
    assert {"segment.synced", "segment.failed", "walkme.retry"} <= emitted_events()


def test_every_emitted_event_is_in_the_readme() -> None:
    missing = emitted_events() - listed_events()
    assert not missing, f"add these events to README.md's log catalogue: {sorted(missing)}"


def test_the_readme_lists_no_event_that_is_never_emitted() -> None:
    stale = listed_events() - emitted_events()
    assert not stale, f"README.md lists events the code no longer emits: {sorted(stale)}"


def test_the_readme_lists_every_setting() -> None:
    from syncd.settings import Settings

    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    missing = [f"SYNCD_{field.upper()}" for field in Settings.model_fields]
    missing = [name for name in missing if f"`{name}`" not in readme]
    assert not missing, f"document these settings in README.md: {missing}"
