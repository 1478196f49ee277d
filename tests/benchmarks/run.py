"""The benchmark cases, their targets and the report.

Cases, each with a fresh sandbox process and a fresh state store:

* one segment of N members (``--sizes``), file source, one ``syncd sync`` per
  cycle: the first sync; no change (the file untouched: syncd's fingerprint
  shortcut); re-delivered unchanged (the same ids rewritten in a shuffled order:
  new bytes, same set); a 1% churn cycle (0.5% removed, 0.5% new); then a 0.1%
  churn cycle;
* the same cycles on the same files run by the peer (``peer.py``, a careful
  hand-written set-based script keeping a JSON snapshot), measured the same way,
  against its own sandbox (``--no-peer`` skips it);
* the Heap webhook source (``--no-webhook`` skips it): one ``syncd run`` daemon per
  store, its segment's N members posted as one signed Heap sync task, then a 0.1%
  churn task; each row times the sync a task triggers, from its last page's 200
  answer to the run's ``segment.synced`` line, with ``SYNCD_HEAP_WEBHOOK_DEBOUNCE``
  at its smallest (0);
* 100 segments of 10,000 members in one cycle (first sync, no change, 1% churn)
  with ``SYNCD_CONCURRENCY`` = 1, 4 and 8 (``--concurrency``), once with the
  sandbox answering at loopback speed and once 50 ms late per segment request
  (``--many-latency``): on loopback there is little waiting to overlap.

Targets: the steady-state targets (``targets``), at 1,000,000 and 10,000,000 members; every
cycle must send exactly the minimum number of segment requests (the README's
promise); a PostgreSQL row must take at most 1.5x its SQLite twin's wall time; a
concurrency above 1 must beat 1. Missed targets are reported; the command exits
1 only when a sync failed or WalkMe ended up holding the wrong members.

Every file-source cycle is one ``python -m syncd sync`` (or peer) process,
measured whole: wall time, CPU time and peak RSS of that process; segment
requests (create + update) as the sandbox counted them; the minimum possible; and
the ratio of wall time to a floor timed here in the same run (reading the source
ids and JSON-encoding the minimal request bodies, nothing else).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import os
import platform
import re
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from tests.benchmarks.data import (
    CHURN_01,
    CHURN_1,
    FIRST_SYNC,
    REDELIVERED,
    Step,
    floor_seconds,
    read_ids,
    series,
)
from tests.benchmarks.harness import (
    HEAP_PAGE_IDS,
    HeapDaemon,
    Measured,
    Sandbox,
    freeze_code,
    fresh_store,
    heap_pages,
    postgres_version,
    run_peer,
    run_sync,
    startup_seconds,
    sync_env,
)
from tests.support.postgres import postgres_url

LAST_RUN = Path(__file__).with_name("last_run.md")
STORES = ("sqlite", "postgresql")
PEER = "peer"  # the store column of the peer script's rows
DEFAULT_SIZES = (100_000, 1_000_000, 10_000_000)
MANY_SEGMENTS, MANY_MEMBERS = 100, 10_000
QUICK_MANY_SEGMENTS, QUICK_MANY_MEMBERS = 10, 1_000
WEBHOOK_FIRST = "webhook: first task"
WEBHOOK_CHURN = "webhook: 0.1% churn task"
WEBHOOK_CYCLES = (WEBHOOK_FIRST, WEBHOOK_CHURN)
# The smallest SYNCD_HEAP_WEBHOOK_DEBOUNCE allows: the rows then hold no debounce wait.
WEBHOOK_DEBOUNCE_S = 0.0


@dataclass(frozen=True)
class Check:
    label: str
    ok: bool
    miss: str = ""  # what was measured, when not ok


@dataclass
class Row:
    case: str
    store: str
    members: int
    measured: Measured
    requests: int
    minimum: int
    floor_s: float
    sandbox_cpu_s: float  # the fake WalkMe's CPU time during the cycle
    checks: list[Check] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)  # wrong results, not slowness

    @property
    def ratio(self) -> float:
        return self.measured.wall_s / self.floor_s if self.floor_s > 0 else float("inf")

    @property
    def met(self) -> bool:
        return not self.problems and all(check.ok for check in self.checks)


# --------------------------------------------------------------------------- targets


# The steady-state targets. Wall times are SQLite's (PostgreSQL's is "within 1.5x of
# SQLite's", checked by compare_stores); peak RSS applies to every file-source cycle.
WALL_TARGETS_S = {
    (1_000_000, FIRST_SYNC): 3.0,
    (1_000_000, REDELIVERED): 0.8,
    (1_000_000, CHURN_1[0]): 1.0,
    (10_000_000, CHURN_01[0]): 8.0,
    (1_000_000, WEBHOOK_CHURN): 1.0,
}
PEAK_RSS_TARGETS_MB = {1_000_000: 120, 10_000_000: 400}
POSTGRES_WITHIN = 1.5  # PostgreSQL's wall time / SQLite's, per cycle
EXACT_CHECK_MAX = 1_000_000  # members of a segment compared id by id after its last cycle


def targets(cycle: str, size: int, row: Row) -> list[Check]:
    """The steady-state targets for this cycle; every cycle must send exactly the minimum
    (the peer too: it is checked, not targeted)."""
    m = row.measured
    checks = [
        Check(f"= {row.minimum} req", row.requests == row.minimum, f"{row.requests} req"),
    ]
    if row.store == PEER:
        return checks
    wall_limit = WALL_TARGETS_S.get((size, cycle)) if row.store == "sqlite" else None
    if wall_limit is not None:
        checks.insert(0, Check(f"< {wall_limit:g} s", m.wall_s < wall_limit, f"{m.wall_s:.2f} s"))
    rss_limit = None if cycle in WEBHOOK_CYCLES else PEAK_RSS_TARGETS_MB.get(size)
    if rss_limit is not None:
        checks.append(
            Check(f"< {rss_limit} MB", m.peak_rss_mb < rss_limit, f"{m.peak_rss_mb:.0f} MB")
        )
    return checks


def check_members(sandbox: Sandbox, name: str, expected: Path, row: Row) -> None:
    """After a case's last cycle, WalkMe must hold exactly the ids of ``expected``
    (the cycles' size checks cannot see a wrong id swapped for another); up to
    ``EXACT_CHECK_MAX`` members, past which fetching them all costs more than it tells."""
    if row.members > EXACT_CHECK_MAX:
        return
    held, wanted = sandbox.members(name), set(read_ids(expected))
    if held != wanted:
        missing, extra = wanted - (held or set()), (held or set()) - wanted
        problem = (
            f"WalkMe holds the wrong members after the last cycle: {len(missing)} missing,"
            f" {len(extra)} extra"
        )
        print(f"{row.store} {row.members:,}: {problem}", file=sys.stderr, flush=True)
        row.problems.append(problem)


def problems(measured: Measured, sizes: dict[str, int], expected: dict[str, int]) -> list[str]:
    """What went wrong beyond slowness: a failed run, or WalkMe not holding the source."""
    found: list[str] = []
    if measured.exit_code != 0:
        found.append(f"exit {measured.exit_code}")
        found += measured.errors()
    wrong = [name for name, size in expected.items() if sizes.get(name) != size]
    if wrong:
        name = wrong[0]
        found.append(
            f"{len(wrong)} segment(s) wrong size in WalkMe, e.g. {name!r}:"
            f" {sizes.get(name)} != {expected[name]}"
        )
    return found


# ----------------------------------------------------------------------------- cases


@dataclass
class Options:
    sizes: list[int]
    stores: list[str]
    concurrency: list[int]
    many_segments: int
    many_members: int
    seed: int
    many_latencies: list[float]
    floor_repeats: int
    data_dir: Path | None
    profile: Path | None
    write: bool
    peer: bool = True
    webhook: bool = True


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def _point(link: Path, target: Path) -> None:
    """Make ``link`` the segment's source file, as if the source had been rewritten."""
    fresh = link.with_name(link.name + ".new")
    fresh.unlink(missing_ok=True)
    fresh.symlink_to(target)
    fresh.replace(link)


def _progress(row: Row) -> None:
    m = row.measured
    stamp = datetime.now().strftime("%H:%M:%S")
    verdict = "ok" if row.met else "MISSED " + _met(row)
    print(
        f"[{stamp}] {row.store:<10} {row.case:<34} {row.members:>11,}  wall {m.wall_s:7.2f} s"
        f"  cpu {m.cpu_s:7.2f} s  rss {m.peak_rss_mb:6.0f} MB  req {row.requests}/{row.minimum}"
        f"  floor {row.floor_s:6.2f} s  {verdict}",
        file=sys.stderr,
        flush=True,
    )


def _cycle(
    opts: Options,
    sandbox: Sandbox,
    title: str,
    store: str,
    members: int,
    segments: dict[str, Step],
    targeted: tuple[str, int] | None,
    measure: Callable[[], Measured],
) -> Row:
    """Measure one cycle (``measure`` runs it), the floor of the same work, and check
    the result; ``targeted`` is the (cycle, size) whose targets apply, if any."""
    before, sandbox_cpu = sandbox.segment_requests(), sandbox.cpu_seconds()
    measured = measure()
    row = Row(
        case=title,
        store=store,
        members=members,
        measured=measured,
        requests=sandbox.segment_requests() - before,
        sandbox_cpu_s=sandbox.cpu_seconds() - sandbox_cpu,
        minimum=sum(step.minimum_requests() for step in segments.values()),
        floor_s=floor_seconds(list(segments.items()), repeats=opts.floor_repeats),
    )
    row.problems = problems(
        measured, sandbox.sizes(), {name: step.members for name, step in segments.items()}
    )
    cycle, size = targeted or (next(iter(segments.values())).name, 0)
    row.checks = targets(cycle, size, row)
    _progress(row)
    return row


def _syncing(opts: Options, env: dict[str, str], case: Path, title: str) -> Callable[[], Measured]:
    """One ``syncd sync`` with ``env``, logged in ``case`` (and profiled, if asked)."""
    profile = None
    if opts.profile is not None:
        opts.profile.mkdir(parents=True, exist_ok=True)
        profile = opts.profile / f"{case.name}-{_slug(title)}.txt"
    return functools.partial(run_sync, env, case / f"{_slug(title)}.log", profile)


def run_single(opts: Options, root: Path, store: str, size: int, steps: list[Step]) -> list[Row]:
    """One segment of ``size`` members through its cycles, on a fresh sandbox and
    store; ``store`` ``PEER`` runs the peer script instead of syncd (no store)."""
    case = root / f"{store}-{size}"
    work = case / "work"
    work.mkdir(parents=True)
    name = f"Benchmark {size}"
    source = case / "source.txt"
    mapping = {"name": name, "source": {"type": "file", "path": str(source)}}
    rows: list[Row] = []
    try:
        with (
            Sandbox(case / "sandbox.log") as sandbox,
            contextlib.nullcontext("") if store == PEER else fresh_store(store, case) as state_url,
        ):
            for step in steps:
                _point(source, step.path)
                measure: Callable[[], Measured]
                if store == PEER:
                    log, snapshot = case / f"{_slug(step.name)}.log", case / "snapshot.json"
                    measure = functools.partial(run_peer, sandbox.url, name, source, snapshot, log)
                else:
                    env = sync_env(sandbox.url, state_url, [mapping], work)
                    measure = _syncing(opts, env, case, step.name)
                segments = {name: step}
                targeted = (step.name, size)
                rows.append(
                    _cycle(opts, sandbox, step.name, store, size, segments, targeted, measure)
                )
            check_members(sandbox, name, steps[-1].path, rows[-1])
    finally:
        shutil.rmtree(case, ignore_errors=True)
    return rows


def run_webhook(
    opts: Options, root: Path, store: str, size: int, first: Step, churn: Step
) -> list[Row]:
    """A ``syncd run`` with the Heap webhook source: ``first``'s members arrive as
    one Heap sync task, then ``churn``'s change as another; each row is the sync a
    task triggers, measured by ``HeapDaemon.sync_task``."""
    assert first.change is None
    assert churn.change is not None
    case = root / f"webhook-{store}-{size}"
    work = case / "work"
    work.mkdir(parents=True)
    name = f"Benchmark webhook {size}"
    tasks = [
        (WEBHOOK_FIRST, first, read_ids(first.path), []),
        (WEBHOOK_CHURN, churn, churn.change.adds, churn.change.removes),
    ]
    rows: list[Row] = []
    try:
        with (
            Sandbox(case / "sandbox.log") as sandbox,
            fresh_store(store, case) as state_url,
            HeapDaemon(sandbox.url, state_url, name, work, WEBHOOK_DEBOUNCE_S) as daemon,
        ):
            for cycle, step, adds, removes in tasks:
                pages = len(heap_pages(adds, removes))
                title = f"{cycle} ({pages} page{'s' if pages > 1 else ''})"
                measure = functools.partial(daemon.sync_task, adds, removes)
                rows.append(
                    _cycle(opts, sandbox, title, store, size, {name: step}, (cycle, size), measure)
                )
            check_members(sandbox, name, churn.path, rows[-1])
    finally:
        shutil.rmtree(case, ignore_errors=True)
    return rows


def run_many(
    opts: Options,
    root: Path,
    store: str,
    concurrency: int,
    latency: float,
    per_segment: list[list[Step]],
) -> list[Row]:
    """Many segments synced in one cycle with ``SYNCD_CONCURRENCY=concurrency``; the
    sandbox waits ``latency`` seconds before answering each segment request."""
    case = root / f"{store}-many-c{concurrency}-l{latency}"
    work, sources = case / "work", case / "sources"
    work.mkdir(parents=True)
    sources.mkdir()
    count, each = len(per_segment), per_segment[0][0].members
    names = [f"Segment {index:03d}" for index in range(count)]
    links = [sources / f"segment{index:03d}.txt" for index in range(count)]
    mappings = [
        {"name": name, "source": {"type": "file", "path": str(link)}}
        for name, link in zip(names, links, strict=True)
    ]
    label = f"{count}x{each // 1000}k" if each >= 1000 else f"{count}x{each}"
    delayed = f" +{latency * 1000:g} ms" if latency else ""
    rows: list[Row] = []
    try:
        with (
            Sandbox(case / "sandbox.log", latency) as sandbox,
            fresh_store(store, case) as state_url,
        ):
            for cycle in range(len(per_segment[0])):
                steps = [segment[cycle] for segment in per_segment]
                for link, step in zip(links, steps, strict=True):
                    _point(link, step.path)
                env = sync_env(sandbox.url, state_url, mappings, work, concurrency=concurrency)
                title = f"{label} {steps[0].name}{delayed}, c={concurrency}"
                segments = dict(zip(names, steps, strict=True))
                members = count * each
                measure = _syncing(opts, env, case, title)
                rows.append(_cycle(opts, sandbox, title, store, members, segments, None, measure))
    finally:
        shutil.rmtree(case, ignore_errors=True)
    return rows


def compare_concurrency(rows: list[Row]) -> None:
    """Concurrency > 1 must beat 1 on the same store and cycle, when the cycle sends
    anything (a cycle with nothing to send is all process start-up)."""
    baseline: dict[tuple[str, str], float] = {}
    for row in rows:
        cycle = row.case.rsplit(", c=", 1)[0]
        if row.case.endswith(", c=1"):
            baseline[(row.store, cycle)] = row.measured.wall_s
    for row in rows:
        cycle, _, c = row.case.rpartition(", c=")
        base = baseline.get((row.store, cycle))
        if c != "1" and base is not None and row.minimum > 0:
            speedup = base / row.measured.wall_s
            row.checks.append(Check("faster than c=1", speedup > 1.0, f"{speedup:.2f}x of c=1"))


def compare_stores(rows: list[Row]) -> None:
    """Each PostgreSQL row against its SQLite twin (same case, same members): at
    most ``POSTGRES_WITHIN`` times its wall time."""
    sqlite = {(row.case, row.members): row for row in rows if row.store == "sqlite"}
    for row in rows:
        twin = sqlite.get((row.case, row.members))
        if row.store == "postgresql" and twin is not None:
            ratio = row.measured.wall_s / twin.measured.wall_s
            row.checks.append(
                Check(f"<= {POSTGRES_WITHIN:g}x sqlite", ratio <= POSTGRES_WITHIN, f"{ratio:.2f}x")
            )


# ---------------------------------------------------------------------------- report


def _met(row: Row) -> str:
    if row.met:
        return "yes"
    misses = row.problems + [f"{c.label}: {c.miss}" for c in row.checks if not c.ok]
    return "**no**: " + "; ".join(misses)


def _markdown_table(head: str, align: str, body: Iterable[str]) -> str:
    """A Markdown table: its head row, its alignment row, then one line a row."""
    return "\n".join([head, align, *body])


def _table_line(row: Row) -> str:
    m = row.measured
    return (
        f"| {row.case} | {row.store} | {row.members:,} | {m.wall_s:.2f} | {m.cpu_s:.2f}"
        f" | {m.peak_rss_mb:.0f} | {row.requests} | {row.minimum} | {row.floor_s:.3f}"
        f" | {row.ratio:.1f}x | {row.sandbox_cpu_s:.2f}"
        f" | {', '.join(c.label for c in row.checks)} | {_met(row)} |"
    )


def table(rows: Sequence[Row]) -> str:
    return _markdown_table(
        "| case | store | members | wall s | cpu s | peak RSS MB | requests | minimum"
        " | floor s | ratio | sandbox cpu s | target | met? |",
        "|---|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|---|---|",
        map(_table_line, rows),
    )


def _cell(row: Row | None) -> str:
    if row is None:
        return "-"
    m = row.measured
    return f"{m.wall_s:.2f} s (cpu {m.cpu_s:.2f} s), {m.peak_rss_mb:.0f} MB"


def _ratio(numerator: Row | None, denominator: Row | None) -> str:
    if numerator is None or denominator is None or denominator.measured.wall_s <= 0:
        return "-"
    return f"{numerator.measured.wall_s / denominator.measured.wall_s:.2f}x"


def comparison(rows: Sequence[Row]) -> str:
    """Per case: the peer, syncd on SQLite and on PostgreSQL side by side; how much
    faster syncd is than the peer (peer wall / syncd wall) and PostgreSQL / SQLite."""
    cases: dict[tuple[int, str], dict[str, Row]] = {}
    for row in rows:
        cases.setdefault((row.members, row.case), {})[row.store] = row
    return _markdown_table(
        "| case | members | peer | syncd, sqlite | sqlite: syncd faster by"
        " | syncd, postgresql | postgresql: syncd faster by | postgresql / sqlite |",
        "|---|--:|--:|--:|--:|--:|--:|--:|",
        (_comparison_line(*key, by_store) for key, by_store in cases.items()),
    )


def _comparison_line(members: int, case: str, by_store: dict[str, Row]) -> str:
    peer, sqlite, pg = by_store.get(PEER), by_store.get("sqlite"), by_store.get("postgresql")
    return (
        f"| {case} | {members:,} | {_cell(peer)} | {_cell(sqlite)} | {_ratio(peer, sqlite)}"
        f" | {_cell(pg)} | {_ratio(peer, pg)} | {_ratio(pg, sqlite)} |"
    )


def webhook_table(rows: Sequence[Row]) -> str:
    """The webhook rows' timing split: the debounce set, and syncd's own run time."""
    return _markdown_table(
        "| case | store | members | debounce s | last page's 200 -> segment.synced s"
        " | the run's duration_s | requests | minimum |",
        "|---|---|--:|--:|--:|--:|--:|--:|",
        (_webhook_line(row) for row in rows if row.case.startswith(WEBHOOK_CYCLES)),
    )


def _webhook_line(row: Row) -> str:
    outcome = row.measured.outcomes[0] if row.measured.outcomes else {}
    duration = outcome.get("duration_s")
    return (
        f"| {row.case} | {row.store} | {row.members:,} | {WEBHOOK_DEBOUNCE_S:g}"
        f" | {row.measured.wall_s:.2f}"
        f" | {'-' if duration is None else f'{float(duration):.2f}'}"
        f" | {row.requests} | {row.minimum} |"
    )


def _load(values: Sequence[float]) -> str:
    return ", ".join(f"{value:.2f}" for value in values)


def machine(stores: Sequence[str], startup_s: float, load_at_start: Sequence[float]) -> list[str]:
    model = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    info = [
        f"- machine: {usable} usable CPUs (nproc), {model};"
        f" load average at start {_load(load_at_start)}",
        f"- {platform.python_implementation()} {platform.python_version()}"
        f" on {platform.system()} {platform.release()}; SQLite {sqlite3.sqlite_version}",
        f"- a Python process that only imports syncd's CLI takes {startup_s:.2f} s wall"
        " (best of 3): every `syncd sync` pays it",
    ]
    if "postgresql" in stores:
        info.append(f"- PostgreSQL {postgres_version()} ({_without_password(postgres_url())})")
    return info


def revision() -> str:
    """The syncd revision measured: the commit, and whether the tree had changes."""
    try:
        described = subprocess.run(
            ["git", "describe", "--always", "--dirty"],
            cwd=Path(__file__).resolve().parents[2],
            capture_output=True,
            text=True,
            check=True,
            timeout=30,
        )
    except (OSError, subprocess.SubprocessError):
        return "unknown (no git)"
    return described.stdout.strip()


def _without_password(url: str) -> str:
    return re.sub(r"://([^:/@]+):[^@]*@", r"://\1:***@", url)


def report(
    opts: Options,
    rows: Sequence[Row],
    started: datetime,
    seconds: float,
    argv: str,
    startup_s: float,
    code: str,
    load_at_start: Sequence[float],
) -> str:
    met = sum(row.met for row in rows)
    parts = [
        f"# syncd benchmarks, {started:%Y-%m-%d %H:%M} UTC",
        "",
        f"`python -m tests.benchmarks{' ' + argv if argv else ''}`",
        "",
        f"- syncd: {code}",
        *machine(opts.stores, startup_s, load_at_start),
        f"- benchmark wall-clock runtime: {seconds:.0f} s; load average at the end"
        f" {_load(os.getloadavg())}; {met} of {len(rows)}"
        " rows met their targets",
        "- wall, CPU and peak RSS are the `python -m syncd sync` process's own (os.wait4);"
        " PostgreSQL's server CPU is not in `cpu s`. Requests: create + update as the"
        " sandbox counted them; `sandbox cpu s`: the sandbox WalkMe's own CPU time in the"
        " cycle (part of the wall time, not of `cpu s`). Floor: reading the source ids and"
        " JSON-encoding the minimal request bodies in the benchmark process, best of"
        f" {opts.floor_repeats}."
        " Source files are in the page cache.",
    ]
    if opts.peer:
        parts.append(
            f"- `{PEER}` rows: `tests/benchmarks/peer.py`, a careful hand-written script"
            " (Python sets, urllib, its JSON snapshot rewritten with fsync and rename after"
            " each acknowledged batch, no fingerprint shortcut) on the same source files,"
            ' against its own sandbox, measured the same way. "syncd faster by" = peer'
            " wall / syncd wall."
        )
    if opts.webhook:
        parts.append(
            "- `webhook` rows: one `syncd run` per store (Heap webhook source, the receiver"
            " and the state store in one process); the members arrive as one signed Heap"
            f" sync task of {HEAP_PAGE_IDS:,} ids a page, then a 0.1% churn task. `wall s`"
            " runs from the task's last page's 200 answer to the timestamp of the run's"
            " `segment.synced` line; `SYNCD_HEAP_WEBHOOK_DEBOUNCE` is"
            f" {WEBHOOK_DEBOUNCE_S:g}, the smallest it takes, so no debounce wait is in it"
            " (the default adds 10 s). `cpu s` and `peak RSS` are the daemon's over that"
            " span (/proc; its high-water mark reset at the answer, so memory it kept from"
            " earlier work counts)."
        )
    if any(opts.many_latencies) and opts.concurrency:
        parts.append(
            "- `+N ms` rows: the sandbox waits N ms before answering each segment request,"
            " as a WalkMe across the internet would; the rest answer at loopback speed"
        )
    if opts.profile is not None:
        parts.append("- **profiled with py-spy: timings are not comparable**")
    parts += ["", table(rows), ""]
    parts += ["## syncd against the peer, and PostgreSQL against SQLite", "", comparison(rows), ""]
    if opts.webhook:
        parts += ["## The webhook source's timing", "", webhook_table(rows), ""]
    return "\n".join(parts)


# ------------------------------------------------------------------------------- CLI


def _ints(text: str) -> list[int]:
    return [int(part.replace("_", "")) for part in text.split(",") if part.strip()]


def parse_args(argv: Sequence[str] | None) -> Options:
    parser = argparse.ArgumentParser(
        prog="python -m tests.benchmarks",
        description="Benchmark `syncd sync` against the sandbox WalkMe on 127.0.0.1.",
    )
    parser.add_argument(
        "--sizes", type=_ints, default=list(DEFAULT_SIZES), help="members per case (comma list)"
    )
    parser.add_argument(
        "--stores",
        default=",".join(STORES),
        help="comma list of: sqlite, postgresql (SYNCD_TEST_POSTGRES_URL names the server)",
    )
    parser.add_argument(
        "--concurrency",
        default="1,4,8",
        help="SYNCD_CONCURRENCY values for the 100-segment case; 'none' skips it",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="smoke check: 100k only (peer and webhook cases included unless turned off),"
        " and 10 segments of 1,000 with c=1,4",
    )
    parser.add_argument("--seed", type=int, default=6)
    parser.add_argument(
        "--many-latency",
        default="0,0.05",
        metavar="S,...",
        help="seconds the sandbox waits before each segment answer in the many-segment"
        " case, one run per value (default 0,0.05: loopback, and WalkMe-like latency)",
    )
    parser.add_argument("--floor-repeats", type=int, default=3, metavar="N")
    parser.add_argument(
        "--data-dir", type=Path, help="keep generated source files here and reuse them"
    )
    parser.add_argument(
        "--profile",
        type=Path,
        metavar="DIR",
        help="record every sync with py-spy (raw format) into DIR; timings are then skewed",
    )
    parser.add_argument(
        "--peer",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also run the peer script (peer.py) on the single-segment cases (default on)",
    )
    parser.add_argument(
        "--webhook",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also run the Heap webhook-source case per size and store (default on)",
    )
    parser.add_argument("--write", action="store_true", help=f"also write {LAST_RUN.name}")
    args = parser.parse_args(argv)
    stores = [s.strip() for s in args.stores.split(",") if s.strip()]
    unknown = sorted(set(stores) - set(STORES))
    if unknown:
        parser.error(f"unknown store(s): {', '.join(unknown)}")
    concurrency = [] if args.concurrency == "none" else _ints(args.concurrency)
    sizes, segments, members = args.sizes, MANY_SEGMENTS, MANY_MEMBERS
    latencies = [float(part) for part in args.many_latency.split(",") if part.strip()] or [0.0]
    if args.quick:
        sizes, segments, members = [100_000], QUICK_MANY_SEGMENTS, QUICK_MANY_MEMBERS
        latencies = [0.0]
        concurrency = [c for c in concurrency if c in (1, 4)] if concurrency else []
    return Options(
        sizes=sizes,
        stores=stores,
        concurrency=concurrency,
        many_segments=segments,
        many_members=members,
        seed=args.seed,
        many_latencies=latencies,
        floor_repeats=max(1, args.floor_repeats),
        data_dir=args.data_dir,
        profile=args.profile,
        write=args.write,
        peer=args.peer,
        webhook=args.webhook,
    )


@contextlib.contextmanager
def _data_root(opts: Options, root: Path) -> Iterator[Path]:
    if opts.data_dir is not None:
        opts.data_dir.mkdir(parents=True, exist_ok=True)
        yield opts.data_dir
        return
    yield root / "data"


def main(argv: Sequence[str] | None = None) -> int:
    opts = parse_args(argv)
    started, clock, load_at_start = datetime.now(UTC), time.monotonic(), os.getloadavg()
    rows: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="syncd-bench-") as temp:
        root = Path(temp)
        (root / "code").mkdir()
        code = f"git {revision()}, sources sha256 {freeze_code(root / 'code')} (copied at start)"
        startup_s = startup_seconds(root)
        with _data_root(opts, root) as data:
            for size in opts.sizes:
                print(f"generating {size:,} ids...", file=sys.stderr, flush=True)
                folder = data / f"single-{size}-seed{opts.seed}"
                steps = series(folder, size, opts.seed, (CHURN_1, CHURN_01), redeliver=True)
                for store in [*opts.stores, *([PEER] if opts.peer else [])]:
                    rows += run_single(opts, root, store, size, steps)
                folders = [folder]
                if opts.webhook:
                    # Its own series: the 0.1% churn is a change against the first sync.
                    folders.append(data / f"webhook-{size}-seed{opts.seed}")
                    first, *_, churn = series(folders[-1], size, opts.seed, (CHURN_01,))
                    for store in opts.stores:
                        rows += run_webhook(opts, root, store, size, first, churn)
                if opts.data_dir is None:
                    for used in folders:
                        shutil.rmtree(used, ignore_errors=True)
            if opts.concurrency:
                each = opts.many_members
                per_segment = [
                    series(
                        data / f"many-{opts.many_segments}x{each}-seed{opts.seed}" / f"{index:03d}",
                        each,
                        opts.seed + index,
                        (CHURN_1,),
                        first_number=index * 2 * each,
                    )
                    for index in range(opts.many_segments)
                ]
                many: list[Row] = []
                for latency in opts.many_latencies:
                    for store in opts.stores:
                        for concurrency in opts.concurrency:
                            many += run_many(opts, root, store, concurrency, latency, per_segment)
                compare_concurrency(many)
                rows += many
    compare_stores(rows)
    seconds = time.monotonic() - clock
    argv_text = " ".join(sys.argv[1:] if argv is None else argv)
    text = report(opts, rows, started, seconds, argv_text, startup_s, code, load_at_start)
    print(text)
    if opts.write:
        LAST_RUN.write_text(text)
    # Missed targets are reported; only wrong results (failed syncs) fail the command.
    return 1 if any(row.problems for row in rows) else 0
