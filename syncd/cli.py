"""The ``syncd`` command line: run, sync, check, status, history, explain, reset,
delete, prune, demo.

Interactive commands print their output on stdout and their log lines on
stderr; ``syncd run`` logs on stdout, as a container is expected to.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import secrets
import signal
import sys
from collections.abc import Callable, Coroutine, Sequence
from typing import Any
from urllib.parse import unquote, urlsplit

import structlog

from syncd import __version__
from syncd.app import Runtime, open_runtime
from syncd.engine import BrokenMapping, Engine, Outcome, Plan, SegmentInUse, force_command
from syncd.engine.explain import explain
from syncd.logs import configure_logging, redact, redact_credentials, scrub
from syncd.notify import redact_receiver
from syncd.reports import out as _out
from syncd.reports import print_explanations, print_history, print_status
from syncd.settings import (
    ENV_PREFIX,
    ConfigError,
    SegmentMapping,
    Settings,
    load_settings,
    printable,
)
from syncd.snowflake_url import parse_snowflake_url
from syncd.state import SegmentState, StateError, open_store
from syncd.state.sqlite import sqlite_path
from syncd.urls import describe_url
from syncd.walkme import WalkMeError

EXIT_OK, EXIT_FAILED, EXIT_CONFIG = 0, 1, 2
EXIT_WOULD_HOLD = 3  # `sync --dry-run`: the plan is fine but the removal guard would hold it
# What an interactive `syncd sync` stops on: finish the batch in flight, record it, exit.
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)

log = structlog.get_logger("syncd.cli")


def _configured(*, logs_on_stdout: bool = False) -> tuple[Settings, list[SegmentMapping]]:
    settings = load_settings()
    _redact_secrets(settings)
    mappings = settings.mappings()
    configure_logging(
        settings.log_format, settings.log_level, sys.stdout if logs_on_stdout else sys.stderr
    )
    return settings, mappings


# WalkMe settings, which commands that only read local state never use: stand-ins
# let them start without credentials. A value that is set is still used (and checked).
_WALKME_SECRETS = ("WALKME_CLIENT_SECRET", "WALKME_CLIENT_SECRET_FILE")
_STAND_IN_GUID = "00000000-0000-0000-0000-000000000000"


def _configured_locally() -> tuple[Settings, list[SegmentMapping] | None]:
    """The settings of ``status``, ``history`` and ``reset``: the state URL is enough;
    mappings are read when given (None: not given). These never create a state store."""
    given = {name.upper() for name in os.environ if os.environ[name]}
    stand_ins: dict[str, str] = {}
    if f"{ENV_PREFIX}WALKME_CLIENT_ID" not in given:
        stand_ins["walkme_client_id"] = "unused-by-this-command"
    if f"{ENV_PREFIX}WALKME_SYSTEM_GUID" not in given:
        stand_ins["walkme_system_guid"] = _STAND_IN_GUID
    if not any(f"{ENV_PREFIX}{name}" in given for name in _WALKME_SECRETS):
        stand_ins["walkme_client_secret"] = secrets.token_hex(16)
    settings = load_settings(**stand_ins)
    _redact_secrets(settings)
    given_mappings = settings.segments is not None or settings.segments_file is not None
    mappings = settings.mappings() if given_mappings else None
    configure_logging(settings.log_format, settings.log_level, sys.stderr)
    url = settings.state_url
    if url.startswith("sqlite:") and not sqlite_path(url).is_file():
        raise ConfigError(
            f"SYNCD_STATE_URL: no state store at {sqlite_path(url).absolute()}: set it to"
            " the database `syncd run` uses (this command reads state, never creates it)"
        )
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
    notify_url = settings.notification_url()  # load_settings read it once already
    if notify_url is not None:
        redact_receiver(notify_url.get_secret_value())
    warehouse = settings.warehouse_url.get_secret_value() if settings.warehouse_url else ""
    for url in (settings.state_url, warehouse):
        try:
            password = urlsplit(url).password
        except ValueError:
            continue
        if password:
            redact(password)
            redact(unquote(password))
    if warehouse.startswith("snowflake://"):
        try:
            hidden = parse_snowflake_url(warehouse).secrets()  # a key's passphrase too
        except ValueError:
            hidden = []  # a key file changed since start: its run fails, saying so
        for secret in hidden:
            redact(secret)


# -- run ---------------------------------------------------------------------------


async def cmd_run(_: argparse.Namespace) -> int:
    from syncd.scheduler import Daemon  # the scheduler and servers load only for `run`

    settings, mappings = _configured(logs_on_stdout=True)
    async with open_runtime(settings, mappings) as runtime:
        return await Daemon(settings, runtime.engine, runtime.store, runtime.notifier).run()


# -- sync --------------------------------------------------------------------------


async def cmd_sync(args: argparse.Namespace) -> int:
    settings, mappings = _configured()
    if args.force and not args.segment:
        raise ConfigError("--force needs --segment NAME: it applies one held plan on purpose")
    async with open_runtime(settings, mappings) as runtime:
        _stop_on_signals(runtime.engine)
        _check_segments(args.segment, (await runtime.engine.mapping_set()).names)
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
    if all(o.result in done for o in outcomes):
        if any(o.plan is not None and o.plan.held is not None for o in outcomes):
            return EXIT_WOULD_HOLD  # only a dry run plans without sending
        return EXIT_OK
    return EXIT_FAILED


def _check_segments(names: list[str] | None, known: set[str]) -> None:
    """Each ``--segment NAME`` given must be a configured segment."""
    for name in names or []:
        if name not in known:
            raise ConfigError(
                f"--segment {name!r}: no such segment in the configuration"
                f" (configured: {', '.join(printable(n) for n in sorted(known))})"
            )


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
    if outcome.transform_examples:
        _out(f"  transform  e.g. {printable(', '.join(outcome.transform_examples))}")
    if outcome.previous_transform is not None:
        _out(
            f"  transform changed since the last sync (was {outcome.previous_transform}):"
            " the plan is the difference"
        )
    _out(f"  add    {plan.adds:>10}  {_examples(plan.add_examples, plan.adds)}")
    _out(f"  remove {plan.removes:>10}  {_examples(plan.remove_examples, plan.removes)}")
    if outcome.skipped.count:
        _out(f"  skip   {outcome.skipped.count:>10}  {'; '.join(outcome.skipped.examples)}")
    if outcome.collapsed:
        collapsed = outcome.collapsed
        _out(f"  collapsed {collapsed:>7}  sent once: equal to another id after the transform")
    _out(f"  requests {_requests_needed(plan, batch)} (batches of at most {batch})")
    if plan.held is not None:
        _out(f"  HELD by the removal guard: {plan.held.reason}")
        _out(f"  {force_command(outcome.segment)} applies it once")


def _examples(examples: list[str], total: int) -> str:
    if not examples:
        return ""
    more = ", ..." if total > len(examples) else ""
    return "e.g. " + ", ".join(examples) + more


# -- check -------------------------------------------------------------------------


async def cmd_check(_: argparse.Namespace) -> int:
    settings, mappings = _configured()
    schedules = ", ".join(schedule.text for schedule in settings.schedules(mappings))
    _out(f"ok    configuration: {len(mappings)} segment(s), schedule {schedules}")
    try:
        async with open_runtime(settings, mappings, fail_fast=True) as runtime:
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


async def cmd_status(args: argparse.Namespace) -> int:
    settings, mappings = _configured_locally()
    await print_status(settings, mappings, as_json=args.json)
    return EXIT_OK


# -- explain -----------------------------------------------------------------------


async def cmd_explain(args: argparse.Namespace) -> int:
    member = args.id.strip()  # as the id rules leave a source value
    if not member:
        raise ConfigError("--id: empty; give the user id to explain")
    settings, mappings = _configured_locally()
    if mappings is None:
        raise ConfigError(
            f"explain reads each segment's source: set {ENV_PREFIX}SEGMENTS or"
            f" {ENV_PREFIX}SEGMENTS_FILE as `syncd run` has them"
        )
    async with open_runtime(settings, mappings) as runtime:
        found = await runtime.engine.mapping_set()
        _check_segments(args.segment, found.names)
        every: dict[str, SegmentMapping | BrokenMapping] = {**found.usable, **found.broken}
        chosen = [every[name] for name in dict.fromkeys(args.segment or every)]
        explained = await explain(settings, runtime.store, runtime.client, chosen, member)
    print_explanations(member, explained, as_json=args.json)
    return EXIT_OK


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
    settings, _ = _configured_locally()
    store = await open_store(settings.state_url)
    try:
        runs = await store.history(args.segment, args.limit)
    finally:
        await store.close()
    print_history(args.segment, runs, as_json=args.json)
    return EXIT_OK


# -- reset -------------------------------------------------------------------------


async def cmd_reset(args: argparse.Namespace) -> int:
    settings, _ = _configured_locally()
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


_EXIT_STATUSES = {
    "run": "0 stopped by a signal, 2 bad configuration",
    "sync": "0 all synced, 1 a segment failed or was held by the removal guard,"
    " 2 bad configuration, 3 (--dry-run only) the plan is fine but the removal guard"
    " would hold it",
    "check": "0 all fine, 1 something failed, 2 bad configuration",
    "status": "0, 1 the state store failed, 2 bad configuration or no state store",
    "history": "0, 1 the state store failed, 2 bad configuration or no state store",
    "explain": "0 (also when a source cannot be read: the answer says so), 1 the state store"
    " failed, 2 bad configuration, unknown segment, empty id or no state store",
    "reset": "0, 2 bad configuration, unknown segment or no state store",
    "delete": "0, 1 WalkMe refused or the segment is in use, 2 bad configuration",
    "prune": "0, 1 a delete failed, 2 bad configuration",
    "demo": "0",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="syncd",
        description="Keeps WalkMe segments equal to Heap segments. Configured by SYNCD_* "
        "environment variables (see README).",
        epilog="exit statuses: "
        + "; ".join(f"{name}: {statuses}" for name, statuses in _EXIT_STATUSES.items()),
    )
    parser.add_argument("--version", action="version", version=f"syncd {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name: str, handler: Command, help_text: str) -> argparse.ArgumentParser:
        sub = commands.add_parser(
            name,
            help=help_text,
            description=help_text,
            epilog=f"exit status: {_EXIT_STATUSES[name]}",
        )
        sub.set_defaults(handler=handler)
        return sub

    add(
        "run",
        cmd_run,
        "run the daemon: sync at start, then each segment on its schedule (a mapping's"
        " own, else SYNCD_SCHEDULE; logs on stdout)",
    )
    sync = add("sync", cmd_sync, "sync once now and exit")
    sync.add_argument("--segment", action="append", metavar="NAME", help="only this segment")
    sync.add_argument(
        "--dry-run", action="store_true", help="print the plan, send nothing (exit 3: held)"
    )
    sync.add_argument(
        "--force", action="store_true", help="apply a plan the removal guard holds (once)"
    )
    add("check", cmd_check, "check configuration, state store, token and WalkMe access")
    status = add("status", cmd_status, "show each segment's state (needs only SYNCD_STATE_URL)")
    status.add_argument("--json", action="store_true", help="machine-readable output")
    history = add(
        "history",
        cmd_history,
        "show a segment's past runs, newest first (needs only SYNCD_STATE_URL)",
    )
    history.add_argument("--segment", required=True, metavar="NAME")
    history.add_argument("--limit", type=int, default=20, metavar="N")
    history.add_argument("--json", action="store_true", help="machine-readable output")
    explain_cmd = add(
        "explain",
        cmd_explain,
        "why an id is (not) in each segment, and what the next run would do with it"
        " (reads the sources as a dry run, sends and writes nothing)",
    )
    explain_cmd.add_argument("--id", required=True, metavar="ID", help="the user id")
    explain_cmd.add_argument(
        "--segment", action="append", metavar="NAME", help="only this segment (repeatable)"
    )
    explain_cmd.add_argument("--json", action="store_true", help="machine-readable output")
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


def _errors_as_json() -> bool:
    """A start-up failure is one line on stderr: a JSON log line (logging set up for it)
    when SYNCD_LOG_FORMAT=json, so a log pipeline keeps it; else plain text."""
    if os.environ.get(f"{ENV_PREFIX}LOG_FORMAT", "").strip().lower() != "json":
        return False
    configure_logging("json", "info", sys.stderr)
    return True


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        handler: Command = args.handler
        return asyncio.run(handler(args))
    except ConfigError as exc:
        message = scrub(f"configuration error: {exc}")
        if _errors_as_json():
            log.error("config.invalid", error=message)
        else:
            print(f"syncd: {message}", file=sys.stderr, flush=True)
        return EXIT_CONFIG
    except StateError as exc:
        message = scrub(str(exc))
        if _errors_as_json():
            log.error("state.unavailable", error=message)
        else:
            print(f"syncd: {message}", file=sys.stderr, flush=True)
        return EXIT_FAILED
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # Output piped into `head` and the like: not an error worth a traceback.
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - silences the flush at exit
        return EXIT_OK
