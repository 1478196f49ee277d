"""Log configuration: one JSON object per line (or colour for a terminal).

Configuration lives here; code elsewhere only calls ``structlog.get_logger()``.
Secrets are registered with :func:`redact` and scrubbed from every line, a
second line of defence behind never logging them in the first place.
"""

from __future__ import annotations

import base64
import json
import logging
import re
import sys
from collections.abc import MutableMapping
from typing import Any, TextIO
from urllib.parse import quote, quote_plus

import structlog
from structlog.typing import EventDict, Processor

_secrets: set[str] = set()
_MASK = "[redacted]"
# Credentials in the forms HTTP carries them, for values this process never saw
# (a token another process stored in an error text): scrubbed whatever the value.
# A plain word after "Basic" is prose ("Basic authentication failed"), not a credential.
_CREDENTIAL_FORMS = re.compile(
    r"(?i)(\b(?:bearer|basic)\s+|access_token[\"']?\s*[:=]\s*[\"']?)"
    r"(?![A-Za-z]+(?![A-Za-z0-9._~+/=%-]))[A-Za-z0-9._~+/=%-]{4,}"
)


def _forms(secret: str) -> set[str]:
    """The secret as it may appear in output: raw, URL-encoded, JSON-escaped."""
    return {secret, quote(secret, safe=""), quote_plus(secret), json.dumps(secret)[1:-1]}


def redact(secret: str) -> None:
    """Never let this value appear in any output (client secret, access token...),
    nor its URL-encoded or JSON-escaped forms."""
    if len(secret) >= 4:
        _secrets.update(_forms(secret))


def redact_credentials(client_id: str, secret: str) -> None:
    """The secret, and the HTTP Basic credential built from it."""
    redact(secret)
    redact(base64.b64encode(f"{client_id}:{secret}".encode()).decode())


def forget_redaction(secret: str) -> None:
    _secrets.difference_update(_forms(secret))


def scrub(text: str) -> str:
    """``text`` without any registered secret or credential: for every text syncd
    prints or stores (log lines, stored errors, WalkMe answers, CLI output)."""
    # Longest first: a secret inside a longer registered form is masked whole.
    for secret in sorted(_secrets, key=len, reverse=True):
        if secret in text:
            text = text.replace(secret, _MASK)
    return _CREDENTIAL_FORMS.sub(lambda match: match.group(1) + _MASK, text)


def scrub_all(value: Any) -> Any:
    """``value`` with every string in it scrubbed (dicts and lists walked through)."""
    if isinstance(value, str):
        return scrub(value)
    if isinstance(value, dict):
        return {key: scrub_all(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [scrub_all(item) for item in value]
    return value


def scrub_secrets(_: Any, __: str, event_dict: EventDict) -> EventDict:
    """structlog processor: replace any registered secret in any field."""
    scrubbed: MutableMapping[str, Any] = event_dict
    for key, value in list(scrubbed.items()):
        scrubbed[key] = scrub_all(value if not isinstance(value, BaseException) else repr(value))
    return event_dict


def configure_logging(
    log_format: str = "json", level: str = "info", stream: TextIO | None = None
) -> None:
    """Route structlog and stdlib logging (aiohttp, apscheduler) to one stream:
    ``stream``, else stdout."""
    stream = stream or sys.stdout
    shared: list[Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        scrub_secrets,
    ]
    renderer: Processor
    if log_format == "console":
        renderer = structlog.dev.ConsoleRenderer(colors=stream.isatty())
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
        logger_factory=structlog.PrintLoggerFactory(stream),
        cache_logger_on_first_use=False,
    )
    handler = logging.StreamHandler(stream)
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
    for noisy in ("apscheduler", "aiohttp.access", "snowflake.connector"):
        logging.getLogger(noisy).setLevel(max(numeric_level, logging.WARNING))
