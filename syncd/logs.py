"""Log configuration: one JSON object per line on stdout (or colour for a terminal).

Configuration lives here; code elsewhere only calls ``structlog.get_logger()``.
Secrets are registered with :func:`redact` and scrubbed from every line, a
second line of defence behind never logging them in the first place.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import MutableMapping
from typing import Any

import structlog
from structlog.typing import EventDict, Processor

_secrets: set[str] = set()
_MASK = "[redacted]"


def redact(secret: str) -> None:
    """Never let this value appear in a log line (client secret, access token...)."""
    if len(secret) >= 4:
        _secrets.add(secret)


def forget_redaction(secret: str) -> None:
    _secrets.discard(secret)


def _scrub(value: Any) -> Any:
    if isinstance(value, str):
        for secret in _secrets:
            if secret in value:
                value = value.replace(secret, _MASK)
        return value
    if isinstance(value, dict):
        return {key: _scrub(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_scrub(item) for item in value]
    return value


def scrub_secrets(_: Any, __: str, event_dict: EventDict) -> EventDict:
    """structlog processor: replace any registered secret in any field."""
    if not _secrets:
        return event_dict
    scrubbed: MutableMapping[str, Any] = event_dict
    for key, value in list(scrubbed.items()):
        scrubbed[key] = _scrub(value if not isinstance(value, BaseException) else repr(value))
    return event_dict


def configure_logging(log_format: str = "json", level: str = "info") -> None:
    """Route structlog and stdlib logging (aiohttp, apscheduler) to one stream."""
    shared: list[Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        scrub_secrets,
    ]
    renderer: Processor
    if log_format == "console":
        renderer = structlog.dev.ConsoleRenderer(colors=sys.stdout.isatty())
    else:
        renderer = structlog.processors.JSONRenderer()
    numeric_level = logging.getLevelName(level.upper())
    structlog.configure(
        processors=[
            *shared,
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(numeric_level),
        logger_factory=structlog.PrintLoggerFactory(sys.stdout),
        cache_logger_on_first_use=False,
    )
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=[*shared, structlog.stdlib.ExtraAdder()],
            processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, renderer],
        )
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(numeric_level)
    # Third-party chatter that users cannot act on.
    for noisy in ("apscheduler", "aiohttp.access"):
        logging.getLogger(noisy).setLevel(max(numeric_level, logging.WARNING))
