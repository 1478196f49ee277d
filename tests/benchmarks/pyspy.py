"""Summarise py-spy ``-f raw`` profiles: which syncd functions the samples land in.

``python -m tests.benchmarks.pyspy PROFILE.txt [--top N]``

The raw format is one collapsed stack per line (``frame;frame;... count``). Three
views: self time per frame (where the CPU is); per syncd function, the samples
whose innermost syncd frame it is (its own code plus the library code it called:
sqlite3, json, asyncpg...); and inclusive time per syncd function. Profiles taken
with ``--threads --idle`` (as ``--profile`` does) also give a wall-clock view of the
main thread, where idle samples are time spent waiting on WalkMe, the database or
a worker thread.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

_FRAME = re.compile(r"^(?P<func>.*?) \((?P<file>[^():]*?)(?::(?P<line>\d+))?\)$")


def _short(frame: str) -> str:
    """``func (path/syncd/state/sqlite.py:123)`` -> ``syncd/state/sqlite.py:func``."""
    match = _FRAME.match(frame.strip())
    if match is None:
        return frame.strip()
    path = match["file"]
    index = path.rfind("syncd/")
    # syncd's own files keep their package path; libraries keep only the file name.
    path = path[index:] if index >= 0 else path.rsplit("/", 1)[-1]
    return f"{path}:{match['func']}"


def _is_syncd(frame: str) -> bool:
    return "syncd/" in frame and "/tests/" not in frame


# Innermost frames of a thread with nothing to do (py-spy --idle keeps them).
_IDLE = (
    "selectors.py:EpollSelector.select",
    "selectors.py:PollSelector.select",
    "concurrent/futures/thread.py:_worker",
    "thread.py:_worker",
    "threading.py:Condition.wait",
    "threading.py:Event.wait",
    "threading.py:Thread.join",
    "threading.py:Thread._wait_for_tstate_lock",
    "queue.py:Queue.get",
)


@dataclass
class Stack:
    thread: str
    frames: list[str]
    count: int

    @property
    def idle(self) -> bool:
        return not self.frames or _short(self.frames[-1]) in _IDLE


def parse(lines: Iterable[str]) -> list[Stack]:
    """Lines of ``py-spy record -f raw [--threads]``: ``[thread (id): name;]frames count``."""
    stacks: list[Stack] = []
    for line in lines:
        stack, _, count = line.rstrip("\n").rpartition(" ")
        if not count.isdigit():
            continue
        thread = ""
        frames = [f for f in stack.split(";") if f and not f.startswith("process ")]
        if frames and frames[0].startswith("thread "):
            thread = frames.pop(0).split(":", 1)[-1].strip()
            if frames and " (" not in frames[0]:
                thread = frames.pop(0)  # the thread's name, e.g. MainThread
        stacks.append(Stack(thread, frames, int(count)))
    return stacks


def _innermost_syncd(frames: list[str]) -> str:
    mine = [_short(f) for f in frames if _is_syncd(f)]
    return mine[-1] if mine else "(outside syncd: interpreter start-up, imports)"


def _section(title: str, counter: Counter[str], total: int, top: int) -> list[str]:
    lines = ["", title]
    for name, count in counter.most_common(top):
        lines.append(f"  {100 * count / max(total, 1):5.1f}%  {name}")
    return lines


def summarise(stacks: Sequence[Stack], top: int) -> str:
    main = [s for s in stacks if s.thread in ("MainThread", "")]
    busy = [s for s in stacks if not s.idle]
    main_total = sum(s.count for s in main)
    busy_total = sum(s.count for s in busy)
    out = [
        f"{sum(s.count for s in stacks)} samples; main thread {main_total},"
        f" of which idle (waiting on sockets or worker threads)"
        f" {sum(s.count for s in main if s.idle)}; busy in any thread {busy_total}"
    ]
    wall: Counter[str] = Counter()
    for s in main:
        # A suspended coroutine is not on the stack: idle time cannot be attributed.
        name = "(idle: the event loop waits)" if s.idle else _innermost_syncd(s.frames)
        wall[name] += s.count
    own: Counter[str] = Counter()
    innermost: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    for s in busy:
        own[_short(s.frames[-1])] += s.count
        innermost[_innermost_syncd(s.frames)] += s.count
        for name in {_short(f) for f in s.frames if _is_syncd(f)}:
            inclusive[name] += s.count
    out += _section("main thread, wall clock: innermost syncd frame", wall, main_total, top)
    out += _section(
        "busy samples, all threads: innermost syncd frame (its code + the libraries it calls)",
        innermost,
        busy_total,
        top,
    )
    out += _section("busy samples, all threads: self (innermost frame)", own, busy_total, top)
    out += _section(
        "busy samples, all threads: inclusive, syncd functions", inclusive, busy_total, top
    )
    return "\n".join(out)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.benchmarks.pyspy")
    parser.add_argument("profile", type=Path, nargs="+")
    parser.add_argument("--top", type=int, default=12)
    args = parser.parse_args(argv)
    for index, path in enumerate(args.profile):
        with path.open(encoding="utf-8", errors="replace") as handle:
            if len(args.profile) > 1:
                print(("\n" if index else "") + f"== {path.name}")
            print(summarise(parse(handle), args.top))
    return 0


if __name__ == "__main__":
    sys.exit(main())
