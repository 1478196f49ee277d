"""``python -m syncd.sandbox``: the fake WalkMe in the foreground, for demos."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import sys
from typing import get_args

from syncd.sandbox.faults import Faults
from syncd.sandbox.server import (
    DEFAULT_CLIENT_ID,
    DEFAULT_CLIENT_SECRET,
    SANDBOX_SYSTEM_GUID,
    ListShape,
    WalkMeSandbox,
)


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m syncd.sandbox",
        description="Run a fake WalkMe Segments API.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="try the operator commands against it (another shell):\n"
        "  export SYNCD_WALKME_API_URL=http://127.0.0.1:8089\n"
        f"  export SYNCD_WALKME_CLIENT_ID={DEFAULT_CLIENT_ID}\n"
        f"  export SYNCD_WALKME_CLIENT_SECRET={DEFAULT_CLIENT_SECRET}\n"
        f"  export SYNCD_WALKME_SYSTEM_GUID={SANDBOX_SYSTEM_GUID}\n"
        "  syncd check",
    )
    add = parser.add_argument
    add("--host", default="127.0.0.1")
    add("--port", type=int, default=8089, help="0 picks a free port (default 8089)")
    add("--client-id", default=DEFAULT_CLIENT_ID, help=f"(default {DEFAULT_CLIENT_ID})")
    add(
        "--client-secret",
        default=DEFAULT_CLIENT_SECRET,
        help=f"(default {DEFAULT_CLIENT_SECRET}; not a real secret)",
    )
    add(
        "--system",
        action="append",
        dest="systems",
        metavar="GUID",
        help=f"system GUID to serve (repeatable; default {SANDBOX_SYSTEM_GUID})",
    )
    add("--token-lifetime", type=float, default=86400.0, metavar="S")
    add("--list-shape", choices=get_args(ListShape), default="data")
    add(
        "--no-create-guid",
        action="store_true",
        help='create answers {"success": true} only, without the new GUID',
    )
    add("--error-rate", type=float, default=0.0)
    add("--throttle-rate", type=float, default=0.0)
    add("--retry-after", type=float, default=1.0, metavar="S")
    add("--drop-rate", type=float, default=0.0)
    add("--delay", type=float, default=0.0, metavar="S")
    add("--faults-on-token", action="store_true")
    add("--seed", type=int, default=0)
    return parser.parse_args(argv)


# The options that are ``Faults`` fields, by their argparse names.
_FAULT_OPTIONS = (
    "seed",
    "error_rate",
    "throttle_rate",
    "retry_after",
    "drop_rate",
    "delay",
    "faults_on_token",
)


async def _serve(sandbox: WalkMeSandbox, host: str, port: int) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        # Not available on Windows' default loop; Ctrl-C still ends asyncio.run there.
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(signum, stop.set)
    url = await sandbox.start(host, port)
    try:
        print(f"sandbox listening on {url}", flush=True)
        await stop.wait()
    finally:
        await sandbox.stop()


def main(argv: list[str] | None = None) -> int:
    """Run the sandbox in the foreground until SIGTERM or SIGINT."""
    args = _parse_args(argv)
    try:
        faults = Faults.from_dict({name: getattr(args, name) for name in _FAULT_OPTIONS})
    except ValueError as exc:
        print(f"sandbox: {exc}", file=sys.stderr)
        return 2
    sandbox = WalkMeSandbox(
        client_id=args.client_id,
        client_secret=args.client_secret,
        systems=args.systems or (SANDBOX_SYSTEM_GUID,),
        token_lifetime=args.token_lifetime,
        faults=faults,
        list_shape=args.list_shape,
        create_returns_guid=not args.no_create_guid,
    )
    try:
        asyncio.run(_serve(sandbox, args.host, args.port))
    except OSError as exc:
        print(f"sandbox: cannot listen on {args.host}:{args.port}: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        pass
    return 0
