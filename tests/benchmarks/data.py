"""Source files for the benchmarks, and the floor a sync is compared with.

Ids look like real ones (``user00412345@example.com``), in a seeded random
order. A series is a segment's membership over several cycles: the first file,
the same file again, optionally the same ids rewritten in another order (new
bytes, same set), then churned versions (half the churn removed at random, half
new ids added). Series are cached in a folder with a manifest, so a kept
``--data-dir`` is generated once.
"""

from __future__ import annotations

import json
import math
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

ID_FORMAT = "user{:08d}@example.com"
BATCH = 25_000  # WalkMe's limit of ids per request, and syncd's default batch size
WRITE_CHUNK = 1_000_000

FIRST_SYNC = "first sync"
UNTOUCHED = "no change (file untouched)"  # syncd's fingerprint shortcut applies
REDELIVERED = "re-delivered unchanged"  # the same ids in a new order: new bytes, same set
# The cycles after those: (name, fraction of the segment that changes).
CHURN_1 = ("1% churn", 0.01)
CHURN_01 = ("0.1% churn", 0.001)


@dataclass(frozen=True)
class Change:
    """What a cycle must send: ids to add and ids to remove."""

    adds: list[str]
    removes: list[str]


@dataclass(frozen=True)
class Step:
    """One cycle's source file and what it changes against the previous one."""

    name: str
    path: Path
    members: int  # distinct ids in the file: the WalkMe segment's size after the cycle
    change: Change | None  # None: the first sync, every id is sent

    def minimum_requests(self) -> int:
        """The fewest segment requests this cycle can take (README: exactly these)."""
        if self.change is None:
            return max(1, math.ceil(self.members / BATCH))
        return math.ceil(len(self.change.adds) / BATCH) + math.ceil(
            len(self.change.removes) / BATCH
        )


def series(
    folder: Path,
    size: int,
    seed: int,
    churns: Sequence[tuple[str, float]],
    first_number: int = 0,
    redeliver: bool = False,
) -> list[Step]:
    """The first sync, an unchanged cycle (the same file), with ``redeliver`` a
    re-delivered one (the same ids shuffled into a new file), then one cycle per
    churn, cached in ``folder``.

    Ids are numbered from ``first_number``; added ids take fresh numbers after the
    segment's own range, so every add is new to the segment.
    """
    names = [FIRST_SYNC, UNTOUCHED, *([REDELIVERED] if redeliver else []), *(n for n, _ in churns)]
    manifest = folder / "manifest.json"
    if manifest.exists():
        cached = json.loads(manifest.read_text())
        if [entry["name"] for entry in cached["steps"]] == names:
            return _load(folder, cached)
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    current = list(range(first_number, first_number + size))
    rng.shuffle(current)
    next_number = first_number + size
    first = folder / "first.txt"
    _write_numbers(first, current)
    entries: list[dict[str, object]] = [
        {"name": FIRST_SYNC, "file": first.name, "members": size, "change": None},
        {"name": UNTOUCHED, "file": first.name, "members": size, "change": "none"},
    ]
    if redeliver:
        shuffled = current.copy()
        rng.shuffle(shuffled)
        again = folder / "redelivered.txt"
        _write_numbers(again, shuffled)
        entries.append({"name": REDELIVERED, "file": again.name, "members": size, "change": "none"})
    for index, (name, fraction) in enumerate(churns):
        half = max(1, round(size * fraction / 2))
        # The order is random, so the last ids are a random sample of the members.
        removed, kept = current[-half:], current[:-half]
        added = list(range(next_number, next_number + half))
        next_number += half
        current = added + kept
        path = folder / f"churn{index}.txt"
        _write_numbers(path, current)
        _write_numbers(folder / f"churn{index}.adds", added)
        _write_numbers(folder / f"churn{index}.removes", removed)
        entries.append(
            {"name": name, "file": path.name, "members": len(current), "change": f"churn{index}"}
        )
    manifest.write_text(json.dumps({"size": size, "seed": seed, "steps": entries}, indent=1))
    return _load(folder, json.loads(manifest.read_text()))


def _load(folder: Path, manifest: dict[str, object]) -> list[Step]:
    steps: list[Step] = []
    entries = manifest["steps"]
    assert isinstance(entries, list)
    for entry in entries:
        change: Change | None
        if entry["change"] is None:
            change = None
        elif entry["change"] == "none":
            change = Change([], [])
        else:
            stem = folder / str(entry["change"])
            change = Change(
                read_ids(stem.with_suffix(".adds")), read_ids(stem.with_suffix(".removes"))
            )
        steps.append(Step(entry["name"], folder / entry["file"], int(entry["members"]), change))
    return steps


def _write_numbers(path: Path, numbers: Sequence[int]) -> None:
    fmt = ID_FORMAT.format
    with path.open("w", encoding="utf-8", newline="\n") as handle:
        for start in range(0, len(numbers), WRITE_CHUNK):
            handle.write("\n".join(map(fmt, numbers[start : start + WRITE_CHUNK])) + "\n")


def read_ids(path: Path) -> list[str]:
    """The ids of a file written here, one a line, in file order."""
    ids = path.read_bytes().decode("utf-8").split("\n")
    if ids and not ids[-1]:
        ids.pop()
    return ids


# ------------------------------------------------------------------------ the floor


def floor_seconds(cycle: Sequence[tuple[str, Step]], batch: int = BATCH, repeats: int = 3) -> float:
    """The least work a cycle can do, timed here: read each segment's source ids
    (split into lines) and JSON-encode the minimal request bodies, nothing else.

    ``cycle`` is (segment name, step) per segment synced in the cycle. The best
    of ``repeats`` runs is kept: it is a floor.
    """
    best = math.inf
    for _ in range(repeats):
        started = time.perf_counter()
        for name, step in cycle:
            _minimal_work(name, step, batch)
        best = min(best, time.perf_counter() - started)
    return best


def _minimal_work(name: str, step: Step, batch: int) -> None:
    ids = read_ids(step.path)
    dumps = json.dumps
    if step.change is None:
        for start in range(0, max(len(ids), 1), batch):
            chunk = ids[start : start + batch]
            body = (
                {"name": name, "userIds": chunk}
                if start == 0
                else {"action": "add", "userIds": chunk}
            )
            dumps(body, separators=(",", ":")).encode()
        return
    for action, members in (("remove", step.change.removes), ("add", step.change.adds)):
        for start in range(0, len(members), batch):
            body = {"action": action, "userIds": members[start : start + batch]}
            dumps(body, separators=(",", ":")).encode()
