"""Start and stop an aiohttp application on a TCP port: the admin server, the webhook
receiver and the sandbox share this."""

from __future__ import annotations

from typing import Any

from aiohttp import web


async def start_server(
    app: web.Application, host: str, port: int, **runner_options: Any
) -> tuple[web.AppRunner, str, int]:
    """Serve ``app`` on ``host:port`` and return its runner (``cleanup()`` stops it)
    and the address bound: port 0 asks the OS for a free one. A port that cannot be
    bound leaves nothing running."""
    runner = web.AppRunner(app, **runner_options)
    await runner.setup()
    try:
        await web.TCPSite(runner, host, port).start()
    except BaseException:
        await runner.cleanup()
        raise
    bound_host, bound_port = runner.addresses[0][:2]
    return runner, bound_host, bound_port
