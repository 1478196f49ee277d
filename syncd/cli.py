"""The ``syncd`` command line: run, sync, check, status, reset, demo."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import math
import os
import signal
import sys
from collections.abc import Callable, Coroutine, Sequence
from typing import Any
from urllib.parse import unquote, urlsplit

import structlog

from syncd import __version__
from syncd.app import Runtime, open_runtime
from syncd.engine import Engine, Outcome, Plan, SegmentInUse, all_mappings
from syncd.logs import configure_logging, redact, redact_credentials, scrub
from syncd.settings import (
    ConfigError,
    SegmentMapping,
    Settings,
    describe_url,
    load_settings,
    printable,
)
from syncd.state import SegmentState, StateError, open_store
from syncd.walkme import WalkMeError

EXIT_OK, EXIT_FAILED, EXIT_CONFIG = 0, 1, 2
# What an interactive `syncd sync` stops on: finish the batch in flight, record it, exit.
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)

log = structlog.get_logger("syncd.cli")


def _configured() -> tuple[Settings, list[SegmentMapping]]:
    settings = load_settings()
    _redact_secrets(settings)
    mappings = settings.mappings()
    configure_logging(settings.log_format, settings.log_level)
    return settings, mappings


def _redact_secrets(settings: Settings) -> None:
    """Every secret in the settings, in every form, is scrubbed from all output."""
    try:
        redact_credentials(settings.walkme_client_id, settings.client_secret().get_secret_value())
        webhook = settings.webhook_secret()
    except ConfigError:
        webhook = None  # an unreadable secret file: the command that needs it says so
    if webhook is not None:
        redact(webhook.get_secret_value())
    warehouse = settings.warehouse_url.get_secret_value() if settings.warehouse_url else ""
    for url in (settings.state_url, warehouse):
        try:
            password = urlsplit(url).password
        except ValueError:
            continue
        if password:
            redact(password)
            redact(unquote(password))


def _out(line: str = "") -> None:
    # Status, history and check print texts stored by other processes: scrubbed here too.
    print(scrub(line), flush=True)


# -- run ---------------------------------------------------------------------------


async def cmd_run(_: argparse.Namespace) -> int:
    from syncd.scheduler import Daemon  # the scheduler and servers load only for `run`

    settings, mappings = _configured()
    async with open_runtime(settings, mappings) as runtime:
        return await Daemon(settings, runtime.engine, runtime.store).run()


# -- sync --------------------------------------------------------------------------


async def cmd_sync(args: argparse.Namespace) -> int:
    settings, mappings = _configured()
    if args.force and not args.segment:
        raise ConfigError("--force needs --segment NAME: it applies one held plan on purpose")
    async with open_runtime(settings, mappings) as runtime:
        _stop_on_signals(runtime.engine)
        known = (await runtime.engine.mapping_set()).names
        for name in args.segment or []:
            if name not in known:
                raise ConfigError(
                    f"--segment {name!r}: no such segment in the configuration"
                    f" (configured: {', '.join(printable(n) for n in sorted(known))})"
                )
        outcomes = await runtime.engine.sync_all(
            args.segment, dry_run=args.dry_run, force=args.force
        )
        if not args.dry_run:
            await runtime.engine.report_orphans()
    if args.dry_run:
        for outcome in outcomes:
            _print_plan(outcome, settings.batch_size)
    # A held segment is not synced: exit 1 so scripts notice.
    done = ("synced", "planned", "skipped")  # skipped: another replica is running it
    return EXIT_OK if all(o.result in done for o in outcomes) else EXIT_FAILED


def _stop_on_signals(engine: Engine) -> None:
    """The first signal stops the runs after their batch in flight; a second one
    acts as it would without syncd's handler (Ctrl-C twice: stop now)."""
    loop = asyncio.get_running_loop()

    def stop(signum: int) -> None:
        log.info("sync.stopping", signal=signal.Signals(signum).name)
        for each in STOP_SIGNALS:
            loop.remove_signal_handler(each)
        engine.stop()

    for signum in STOP_SIGNALS:
        loop.add_signal_handler(signum, stop, signum)


def _requests_needed(plan: Plan, batch: int) -> int:
    adds = math.ceil(plan.adds / batch)
    if plan.mode == "update":
        return adds + math.ceil(plan.removes / batch)
    return max(1, adds)


def _print_plan(outcome: Outcome, batch: int) -> None:
    plan = outcome.plan
    segment = printable(outcome.segment)
    if plan is None:
        _out(f"{segment}: cannot plan: {outcome.error}")
        return
    how = {
        "create": "create the WalkMe segment",
        "override": "rebuild the WalkMe segment (override, then add)",
        "update": "update the WalkMe segment",
    }[plan.mode]
    _out(f"{segment}: {how}; source has {plan.staged} ids")
    _out(f"  add    {plan.adds:>10}  {_examples(plan.add_examples, plan.adds)}")
    _out(f"  remove {plan.removes:>10}  {_examples(plan.remove_examples, plan.removes)}")
    if outcome.skipped.count:
        _out(f"  skip   {outcome.skipped.count:>10}  {'; '.join(outcome.skipped.examples)}")
    _out(f"  requests {_requests_needed(plan, batch)} (batches of at most {batch})")
    if plan.held is not None:
        _out(f"  HELD by the removal guard: {plan.held.reason}; --force applies it")


def _examples(examples: list[str], total: int) -> str:
    if not examples:
        return ""
    more = ", ..." if total > len(examples) else ""
    return "e.g. " + ", ".join(examples) + more


# -- check -------------------------------------------------------------------------


async def cmd_check(_: argparse.Namespace) -> int:
    settings, mappings = _configured()
    _out(f"ok    configuration: {len(mappings)} segment(s), schedule {settings.schedule}")
    try:
        async with open_runtime(settings, mappings) as runtime:
            _out(f"ok    state store: {describe_url(settings.state_url)}")
            try:
                await runtime.client.access_token()
                _out(f"ok    token from {settings.token_url}")
                systems = sorted({settings.system_for(m) for m in mappings})
                for system in systems:
                    segments = await runtime.client.list_segments(system)
                    _out(f"ok    system {system}: {len(segments)} segment(s) in WalkMe")
            except WalkMeError as exc:
                _out(f"FAIL  WalkMe: {exc}")
                return EXIT_FAILED
    except StateError as exc:
        _out(f"FAIL  state store: {exc}")
        return EXIT_FAILED
    return EXIT_OK


# -- status ------------------------------------------------------------------------


StatusRow = dict[str, Any]


def _status_row(state: SegmentState, configured: bool) -> StatusRow:
    return {
        "segment": state.name,
        "configured": configured,
        "segment_guid": state.segment_guid,
        "origin": state.origin,
        "members": state.members,
        "needs_rebuild": state.needs_override,
        "last_run_at": state.last_run_at.isoformat() if state.last_run_at else None,
        "last_result": state.last_result,
        "last_success_at": state.last_success_at.isoformat() if state.last_success_at else None,
        "last_error": state.last_error,
        "skipped": state.skipped,
        "skipped_examples": state.skipped_examples,
        "orphaned_at": state.orphaned_at.isoformat() if state.orphaned_at else None,
        "quarantined": state.quarantined,
    }


async def cmd_status(args: argparse.Namespace) -> int:
    settings, mappings = _configured()
    await print_status(settings, mappings, as_json=args.json)
    return EXIT_OK


async def print_status(
    settings: Settings, mappings: list[SegmentMapping], *, as_json: bool = False
) -> None:
    store = await open_store(settings.state_url)
    try:
        found = await all_mappings(settings, mappings, store)
        states = {state.name: state for state in await store.all()}
        quarantine = {
            name: await store.quarantine_examples(name, 5)
            for name, s in states.items()
            if s.quarantined
        }
    finally:
        await store.close()
    current = found.names
    rows: list[StatusRow] = [
        _status_row(states[name], True)
        if name in states
        else {"segment": name, "configured": True, "last_result": "never run"}
        for name in [*found.usable, *found.broken]
    ]
    for row in rows:
        if row["segment"] in found.broken:
            row["last_result"] = "invalid"
            row["last_error"] = found.broken[row["segment"]].error
        if row["segment"] in quarantine:
            row["quarantined_examples"] = [
                {"id": member, "action": action, "walkme_answer": reason[:200]}
                for member, action, reason in quarantine[row["segment"]]
            ]
    orphans = [_status_row(s, False) for name, s in states.items() if name not in current]
    if as_json:
        _out(json.dumps({"segments": rows, "orphans": orphans}, indent=2))
        return
    _print_table(rows)
    if orphans:
        _out("\nOrphans: WalkMe segments syncd wrote to that no mapping names any more")
        _print_table(orphans)
        _out("  `syncd prune` shows what would be deleted; `syncd prune --yes` deletes them.")


def _print_table(rows: list[StatusRow]) -> None:
    _out(f"{'SEGMENT':30} {'WALKME GUID':36} {'MEMBERS':>9} {'LAST RUN':25} {'RESULT':9} SKIPPED")
    for row in rows:
        _out(
            f"{printable(row['segment'])[:30]:30} {row.get('segment_guid') or '-':36}"
            f" {row.get('members', 0):>9} {row.get('last_run_at') or '-':25}"
            f" {row.get('last_result') or '-':9} {row.get('skipped', 0)}"
        )
        if row.get("last_error"):
            _out(f"    error: {printable(row['last_error'])}")
        if row.get("skipped_examples"):
            _out(f"    skipped ids: {printable('; '.join(row['skipped_examples']))}")
        if row.get("quarantined"):
            shown = ", ".join(repr(q["id"]) for q in row.get("quarantined_examples", []))
            _out(f"    quarantined (rejected by WalkMe): {row['quarantined']}: {shown}")
        if row.get("orphaned_at"):
            _out(f"    orphaned since {row['orphaned_at']} ({row.get('origin')})")


# -- delete, prune -----------------------------------------------------------------


async def cmd_delete(args: argparse.Namespace) -> int:
    settings, mappings = _configured()
    async with open_runtime(settings, mappings) as runtime:
        state = await runtime.store.get(args.segment)
        if state is None:
            raise ConfigError(f"--segment {args.segment!r}: syncd has no state for this segment")
        if args.segment in await runtime.engine.mappings():
            _out(f"note: {args.segment!r} is still configured; the next run creates it again")
        return await _delete([state], runtime, yes=args.yes)


async def cmd_prune(args: argparse.Namespace) -> int:
    settings, mappings = _configured()
    async with open_runtime(settings, mappings) as runtime:
        orphans = await runtime.engine.report_orphans()
        configured = set(await runtime.engine.mappings())
        claims = await runtime.engine.claims()
        for state in await runtime.store.all():
            if state.segment_guid and state.name not in configured and state.name in claims:
                _out(f"keep   {state.name!r} ({state.segment_guid}): {claims[state.name]}")
        chosen = [o for o in orphans if o.origin != "adopted" or args.include_adopted]
        for kept in (o for o in orphans if o not in chosen):
            _out(
                f"keep   {kept.name!r} ({kept.segment_guid}): adopted, not created by syncd;"
                " --include-adopted deletes it too"
            )
        if not chosen:
            _out("nothing to prune")
            return EXIT_OK
        return await _delete(chosen, runtime, yes=args.yes)


async def _delete(states: list[SegmentState], runtime: Runtime, *, yes: bool) -> int:
    failed = False
    if not yes:
        for state in states:
            reason = await runtime.engine.in_use(state.name)
            if reason is not None:
                _out(f"REFUSED {state.name!r} ({state.segment_guid}): in use: {reason}")
                failed = True
                continue
            _out(
                f"would delete {state.name!r}: WalkMe segment {state.segment_guid},"
                f" {state.members} members delivered"
            )
        _out("nothing deleted: add --yes to delete")
        return EXIT_FAILED if failed else EXIT_OK
    for state in states:
        try:
            existed = await runtime.engine.delete(state)
        except SegmentInUse as exc:
            _out(f"REFUSED {state.name!r} ({state.segment_guid}): in use: {exc}")
            failed = True
            continue
        except WalkMeError as exc:
            _out(f"FAIL   {state.name!r}: {exc}")
            failed = True
            continue
        gone = "deleted" if existed else "was already gone in WalkMe; state forgotten"
        _out(f"{state.name!r} ({state.segment_guid}): {gone}")
    return EXIT_FAILED if failed else EXIT_OK


# -- history -----------------------------------------------------------------------


async def cmd_history(args: argparse.Namespace) -> int:
    settings, _ = _configured()
    store = await open_store(settings.state_url)
    try:
        runs = await store.history(args.segment, args.limit)
    finally:
        await store.close()
    if args.json:
        rows = [
            {
                **dataclasses.asdict(run),
                "started_at": run.started_at and run.started_at.isoformat(),
                "ended_at": run.ended_at and run.ended_at.isoformat(),
            }
            for run in runs
        ]
        _out(json.dumps(rows, indent=2))
        return EXIT_OK
    if not runs:
        _out(f"no runs recorded for {args.segment!r}")
        return EXIT_OK
    _out(f"{'STARTED':25} {'RESULT':7} {'ADDED':>8} {'REMOVED':>8} {'REQUESTS':>8} RUN ID")
    for run in runs:
        started = run.started_at.isoformat() if run.started_at else "-"
        _out(
            f"{started:25} {run.result:7} {run.added:>8} {run.removed:>8} {run.requests:>8}"
            f" {run.run_id}"
        )
        if run.error:
            _out(f"    {printable(run.error)}")
    return EXIT_OK


# -- reset -------------------------------------------------------------------------


async def cmd_reset(args: argparse.Namespace) -> int:
    settings, _ = _configured()
    store = await open_store(settings.state_url)
    try:
        found = await store.reset(args.segment)
    finally:
        await store.close()
    if not found:
        raise ConfigError(f"--segment {args.segment!r}: syncd has no state for this segment")
    _out(
        f"{args.segment}: snapshot forgotten; the next run rebuilds the WalkMe segment"
        " with override"
    )
    return EXIT_OK


# -- demo --------------------------------------------------------------------------


async def cmd_demo(_: argparse.Namespace) -> int:
    from syncd.demo import run_demo  # the sandbox server is only loaded for the demo

    return await run_demo()


# -- entry point -------------------------------------------------------------------

Command = Callable[[argparse.Namespace], Coroutine[Any, Any, int]]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="syncd",
        description="Keeps WalkMe segments equal to Heap segments. Configured by SYNCD_* "
        "environment variables (see README).",
    )
    parser.add_argument("--version", action="version", version=f"syncd {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name: str, handler: Command, help_text: str) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help_text, description=help_text)
        sub.set_defaults(handler=handler)
        return sub

    add("run", cmd_run, "run the daemon: sync at start, then on SYNCD_SCHEDULE")
    sync = add("sync", cmd_sync, "sync once now and exit (0 all synced, 1 any failed)")
    sync.add_argument("--segment", action="append", metavar="NAME", help="only this segment")
    sync.add_argument("--dry-run", action="store_true", help="print the plan, send nothing")
    sync.add_argument(
        "--force", action="store_true", help="apply a plan the removal guard holds (once)"
    )
    add("check", cmd_check, "check configuration, state store, token and WalkMe access")
    status = add("status", cmd_status, "show each segment's state")
    status.add_argument("--json", action="store_true", help="machine-readable output")
    history = add("history", cmd_history, "show a segment's past runs, newest first")
    history.add_argument("--segment", required=True, metavar="NAME")
    history.add_argument("--limit", type=int, default=20, metavar="N")
    history.add_argument("--json", action="store_true", help="machine-readable output")
    reset = add("reset", cmd_reset, "forget a segment's snapshot; the next run rebuilds it")
    reset.add_argument("--segment", required=True, metavar="NAME")
    delete = add("delete", cmd_delete, "delete a segment in WalkMe and forget it")
    delete.add_argument("--segment", required=True, metavar="NAME")
    delete.add_argument("--yes", action="store_true", help="really delete (else show the plan)")
    prune = add("prune", cmd_prune, "delete orphaned segments (no longer configured)")
    prune.add_argument("--yes", action="store_true", help="really delete (else show the plan)")
    prune.add_argument(
        "--include-adopted", action="store_true", help="also segments syncd adopted, not created"
    )
    add("demo", cmd_demo, "a local sandbox WalkMe, sample segments, a few sync cycles")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        handler: Command = args.handler
        return asyncio.run(handler(args))
    except ConfigError as exc:
        print(scrub(f"syncd: configuration error: {exc}"), file=sys.stderr)
        return EXIT_CONFIG
    except StateError as exc:
        print(scrub(f"syncd: {exc}"), file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # Output piped into `head` and the like: not an error worth a traceback.
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - silences the flush at exit
        return EXIT_OK
