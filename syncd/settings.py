"""Configuration: every ``SYNCD_*`` environment variable and the segment mappings.

All validation happens here, before anything starts, so a bad setting stops the
process with one line that names the variable (or mapping field) to fix.
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
import tempfile
import tomllib
import unicodedata
from collections.abc import Iterable
from functools import cached_property
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    StrictInt,
    TypeAdapter,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, SettingsConfigDict

from syncd.schedule import Schedule
from syncd.snowflake_url import DRIVER_HINT, driver_installed, parse_snowflake_url
from syncd.transforms import STEPS_ACCEPTED, IdTransform
from syncd.urls import URL_HINT, unambiguous_url

ENV_PREFIX = "SYNCD_"
MAX_BATCH_SIZE = 25_000  # WalkMe's documented limit of user ids per request
GUID_PATTERN = r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$"
MAX_STALE_AFTER = 3650 * 86400.0  # ten years, in seconds: far below timedelta's limit
MAX_HISTORY_DAYS = 36500
MAX_MAPPINGS_FILE = 16 * 1024 * 1024  # bytes; thousands of mappings fit in far less
# Invisible characters that make one name look like another: zero-width spaces and
# joiners' lookalikes, the byte-order mark, and text-direction controls. (The
# zero-width joiner and non-joiner stay allowed: emoji and several scripts need them.)
_INVISIBLE = frozenset(
    "\u00ad\u061c\u180e\u200b\u200e\u200f\u2060\u2061\u2062\u2063\u2064\ufeff"
    + "".join(map(chr, range(0x202A, 0x202F)))
    + "".join(map(chr, range(0x2066, 0x206A)))
)

WAREHOUSE_SCHEMES = ("postgresql", "postgres", "redshift", "snowflake")
HEAP_SEGMENT_ID_MAX = 2**63 - 1  # Heap: "segment.id is an int64"
SEGMENT_NAME_MAX = 200
# C0/C1 control characters: a WalkMe segment name is shown, and picked, in the Editor.

# Values never echoed in errors: the warehouse URL holds a password.
SECRET_FIELDS = frozenset(
    {"walkme_client_secret", "heap_webhook_secret", "warehouse_url", "state_url", "notify_url"}
)
NOTIFY_URL_ACCEPTED = (
    "expected the http(s) URL of an incoming webhook, such as"
    " https://hooks.slack.com/services/..."
)



def _guid(value: str) -> str:
    if not re.match(GUID_PATTERN, value):
        raise ValueError(
            "not a GUID: expected 32 hex digits as 8-4-4-4-12, e.g."
            " 01234567-89ab-cdef-0123-456789abcdef (a system's is in its snippet URL,"
            " cdn.walkme.com/users/<GUID>/)"
        )
    return value


Guid = Annotated[str, AfterValidator(_guid)]
UNPARSABLE_URL = f"cannot be parsed; {URL_HINT}; and a port is a number from 0 to 65535"


class ConfigError(Exception):
    """A setting a user must fix; the message is one line naming it."""


def _unsafe(char: str) -> bool:
    # Control codes (newline, ESC, NUL...), line/paragraph separators, lone surrogates.
    return unicodedata.category(char) in ("Cc", "Cs", "Zl", "Zp") or char in _INVISIBLE


def without_unsafe(text: str) -> str:
    """``text`` with each control or invisible character replaced by a space."""
    return "".join(" " if _unsafe(char) else char for char in text)


def printable(text: str) -> str:
    """``text`` with control and invisible characters escaped (``\\x1b``, ``\\u202e``),
    safe to print on a terminal; text without them is returned as it is."""
    if not any(_unsafe(char) for char in text):
        return text
    return "".join(
        char.encode("unicode_escape").decode("ascii") if _unsafe(char) or char == "\\" else char
        for char in text
    )


def _check_text(value: str) -> str:
    """Refuse what a terminal or the WalkMe Editor would show wrongly or not at all."""
    for position, char in enumerate(value):
        if _unsafe(char):
            raise ValueError(
                f"holds U+{ord(char):04X} at position {position + 1}: control, line-break,"
                " text-direction and invisible characters are not accepted"
            )
    return value


# --- segment mappings -------------------------------------------------------------


class _Strict(BaseModel):
    model_config = ConfigDict(
        extra="forbid", frozen=True, allow_inf_nan=False, arbitrary_types_allowed=True
    )


class FileSourceConfig(_Strict):
    """One id per line, or one named column of a CSV file with a header."""

    type: Literal["file"]
    path: Path
    column: str | None = Field(default=None, min_length=1)

    @field_validator("path", mode="before")
    @classmethod
    def _path_text(cls, value: Any) -> Any:
        if isinstance(value, str):
            if not value.strip():
                raise ValueError("is empty")
            _check_text(value)
        return value

    @field_validator("column")
    @classmethod
    def _column_text(cls, value: str | None) -> str | None:
        return None if value is None else _check_text(value)


class HeapWebhookSourceConfig(_Strict):
    """Membership Heap pushes to the webhook receiver (Heap Segments Sync)."""

    type: Literal["heap_webhook"]
    heap_segment_id: StrictInt = Field(ge=0, le=HEAP_SEGMENT_ID_MAX)


class WarehouseSourceConfig(_Strict):
    """A SQL query against ``SYNCD_WAREHOUSE_URL`` returning one column of user ids."""

    type: Literal["warehouse"]
    query: str = Field(min_length=1)


SourceConfig = Annotated[
    FileSourceConfig | HeapWebhookSourceConfig | WarehouseSourceConfig,
    Field(discriminator="type"),
]


class SegmentMapping(_Strict):
    """One WalkMe segment and where its members come from."""

    name: str = Field(min_length=1, max_length=SEGMENT_NAME_MAX)
    source: SourceConfig
    external_id: str | None = Field(default=None, min_length=1, max_length=100)
    segment_guid: Guid | None = None
    system_guid: Guid | None = None
    max_remove_fraction: float | None = Field(default=None, ge=0, le=1)
    # Steps applied to each source id before the id rules, e.g. ["lower"].
    transform: IdTransform = IdTransform()
    # This segment's own SYNCD_SCHEDULE (interval or cron); None: SYNCD_SCHEDULE's.
    schedule: str | None = None

    @cached_property
    def own_schedule(self) -> Schedule | None:
        """``schedule`` as a value, parsed on first use (the validator proved it parses)."""
        return None if self.schedule is None else Schedule.parse(self.schedule)

    @field_validator("name")
    @classmethod
    def _name_is_valid(cls, value: str) -> str:
        problem = segment_name_problem(value)
        if problem is not None:
            raise ValueError(problem)
        return value

    @field_validator("external_id")
    @classmethod
    def _external_id_text(cls, value: str | None) -> str | None:
        if value is not None and value != value.strip():
            raise ValueError("must not start or end with whitespace")
        return None if value is None else _check_text(value)

    @field_validator("transform", mode="before")
    @classmethod
    def _transform(cls, value: Any) -> IdTransform:
        if not isinstance(value, list) or not all(isinstance(step, str) for step in value):
            raise ValueError(
                'expected a list of steps such as ["lower", "strip_prefix:user-"]'
                f" (each one of {STEPS_ACCEPTED})"
            )
        for number, step in enumerate(value, 1):
            try:
                _check_text(step)
            except ValueError as exc:
                raise ValueError(f"step {number} {step!r}: {exc}") from None
        return IdTransform.parse(value)

    @field_validator("schedule")
    @classmethod
    def _schedule(cls, value: str | None) -> str | None:
        if value is not None:
            Schedule.parse(value)
        return value

    @field_validator("max_remove_fraction", mode="before")
    @classmethod
    def _fraction_not_bool(cls, value: Any) -> Any:
        if isinstance(value, bool):
            raise ValueError("expected a number from 0 to 1, not true/false")
        return value


def segment_name_problem(name: str) -> str | None:
    """Why ``name`` cannot name a segment (it becomes the WalkMe segment's name), or None.

    The one rule for every segment name: configured ones and those Heap sends.
    """
    if not 1 <= len(name) <= SEGMENT_NAME_MAX:
        return f"must be 1 to {SEGMENT_NAME_MAX} characters long"
    if name != name.strip():
        return "must not start or end with whitespace"
    try:
        _check_text(name)
    except ValueError as exc:
        return str(exc)
    return None


_MAPPINGS = TypeAdapter(list[SegmentMapping])
# pydantic's union tags, left out of error paths: users never typed them.
_SOURCE_TAGS = {"file", "heap_webhook", "warehouse"}


# --- environment ------------------------------------------------------------------


class Settings(BaseSettings):
    """Everything syncd reads from its environment."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        extra="ignore",
        frozen=True,
        validate_default=True,
        allow_inf_nan=False,
    )

    walkme_client_id: str = Field(min_length=1)
    walkme_client_secret: SecretStr | None = None
    walkme_client_secret_file: Path | None = None
    walkme_system_guid: Guid
    walkme_api_url: str = "https://api.walkme.com"
    walkme_token_url: str | None = None
    segments: str | None = None
    segments_file: Path | None = None
    schedule: str = "15m"
    # A PostgreSQL URL may hold a password: kept out of repr().
    state_url: str = Field(default="sqlite:///syncd.db", repr=False)
    batch_size: int = Field(default=MAX_BATCH_SIZE, ge=1, le=MAX_BATCH_SIZE)
    concurrency: int = Field(default=4, ge=1, le=64)
    log_format: Literal["json", "console"] = "json"
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    # Every IPv4 interface by default: probes and Prometheus reach a container's own
    # address, so a loopback default would break the shipped manifests.
    admin_host: str = "0.0.0.0"  # noqa: S104
    admin_port: int = Field(default=9090, ge=0, le=65535)
    # Not named by the product issue; the knobs any HTTP client of a flaky API needs.
    http_timeout: float = Field(default=60.0, gt=0, le=3600)
    retry_attempts: int = Field(default=8, ge=1, le=100)
    retry_max_wait: float = Field(default=60.0, gt=0, le=3600)
    ca_bundle: Path | None = None
    # Replicas sharing PostgreSQL state: a run's lease lapses this long after its holder dies.
    lease_ttl: float = Field(default=60.0, ge=1, le=3600)
    # Where diffs spill ids to disk (a few bytes per member during a run).
    work_dir: Path | None = None
    # Operations: /readyz lists segments not synced for this long (default 3 intervals).
    stale_after: float | None = Field(default=None, gt=0, le=MAX_STALE_AFTER)
    history_days: float = Field(default=30, gt=0, le=MAX_HISTORY_DAYS)
    # The removal safety guard (per mapping: "max_remove_fraction"; 1.0 turns it off).
    max_remove_fraction: float = Field(default=0.5, ge=0, le=1)
    guard_min_members: int = Field(default=100, ge=0, le=10**12)
    # Heap Segments Sync webhook receiver: on when a secret is set.
    heap_webhook_secret: SecretStr | None = None
    heap_webhook_secret_file: Path | None = None
    webhook_host: str = "0.0.0.0"  # noqa: S104 - Heap posts from outside
    webhook_port: int = Field(default=8080, ge=0, le=65535)
    heap_webhook_path: str = Field(default="/heap/webhook", pattern=r"^/[!-~]*$")
    heap_webhook_tolerance: float = Field(default=300.0, gt=0, le=86400)
    heap_webhook_max_body: int = Field(default=32 * 1024 * 1024, ge=1024, le=2**31)
    heap_webhook_debounce: float = Field(default=10.0, ge=0, le=3600)
    heap_auto_map: bool | None = None
    # Heap Connect tables: postgresql:// (PostgreSQL, Amazon Redshift) or snowflake://.
    warehouse_url: SecretStr | None = None
    # Longest wait for one step of reading a source (a chunk, a query's first rows).
    source_timeout: float = Field(default=600.0, gt=0, le=86400)
    # Messages to a person (a Slack or Teams incoming webhook). The URL carries the
    # receiver's token: a secret, never echoed.
    notify_url: SecretStr | None = None
    notify_url_file: Path | None = None
    notify_after_failures: int = Field(default=2, ge=1, le=1000)
    # One delivery attempt's limit, and how long exit waits for messages still queued.
    notify_timeout: float = Field(default=10.0, gt=0, le=300)

    @field_validator("walkme_client_id")
    @classmethod
    def _client_id(cls, value: str) -> str:
        if value != value.strip():
            raise ValueError("must not start or end with whitespace")
        if ":" in value:
            raise ValueError("must not hold ':' (it separates id and secret in Basic auth)")
        return _check_text(value)

    @field_validator("walkme_api_url", "walkme_token_url")
    @classmethod
    def _http_url(cls, value: str | None) -> str | None:
        if value is None:
            return None
        accepted = "expected an http(s) URL such as https://api.walkme.com"
        if any(char.isspace() or _unsafe(char) for char in value):
            raise ValueError(f"holds spaces or control characters; {accepted}")
        try:
            parts = urlsplit(value)
            parts.port  # noqa: B018 - raises on a port that is not a number 0..65535
        except ValueError as exc:
            raise ValueError(f"{exc}; {accepted}") from None
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"not an http(s) URL with a host; {accepted}")
        if parts.query or parts.fragment or parts.username is not None:
            raise ValueError(f"must not hold a query, fragment or user; {accepted}")
        return value.rstrip("/")

    @field_validator(
        "walkme_client_secret_file",
        "heap_webhook_secret_file",
        "notify_url_file",
        "ca_bundle",
        mode="before",
    )
    @classmethod
    def _file_named(cls, value: Any) -> Any:
        if isinstance(value, str) and not value.strip():
            raise ValueError("is set but empty; expected the path of a readable file")
        return value

    @field_validator(
        "walkme_client_secret_file", "heap_webhook_secret_file", "notify_url_file", "ca_bundle"
    )
    @classmethod
    def _readable_file(cls, value: Path | None) -> Path | None:
        if value is None:
            return None
        if value.is_dir():
            raise ValueError(f"{value} is a directory; expected the path of a readable file")
        try:
            value.open("rb").close()
        except OSError as exc:
            raise ValueError(f"cannot read {value}: {exc.strerror}") from None
        return value

    @field_validator("work_dir")
    @classmethod
    def _writable_dir(cls, value: Path | None) -> Path | None:
        if value is None:
            return None
        if not value.is_dir():
            raise ValueError(f"{value} is not an existing directory")
        try:  # os.access says yes to root: only a real write tells
            tempfile.TemporaryFile(dir=value).close()
        except OSError as exc:
            raise ValueError(f"{value} is not writable: {exc.strerror}") from None
        return value

    @field_validator("walkme_client_secret", "heap_webhook_secret", "warehouse_url", "notify_url")
    @classmethod
    def _not_blank(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None and not value.get_secret_value().strip():
            raise ValueError("is set but empty")
        return value

    @field_validator("admin_host", "webhook_host")
    @classmethod
    def _listen_host(cls, value: str) -> str:
        try:
            ipaddress.ip_address(value)
        except ValueError:
            if not re.fullmatch(r"[A-Za-z0-9](?:[A-Za-z0-9.-]*[A-Za-z0-9])?", value):
                raise ValueError(
                    f"{value!r} is not an address to listen on: an IP address (0.0.0.0 every"
                    " IPv4 interface, :: every IPv6 one, 127.0.0.1 this host only, no"
                    " brackets) or a host name"
                ) from None
        return value

    @field_validator("log_level", mode="before")
    @classmethod
    def _lower(cls, value: Any) -> Any:
        return value.lower() if isinstance(value, str) else value

    @field_validator("schedule")
    @classmethod
    def _schedule(cls, value: str) -> str:
        Schedule.parse(value)
        return value

    @field_validator("state_url")
    @classmethod
    def _state_url(cls, value: str) -> str:
        accepted = (
            "expected sqlite:///relative.db, sqlite:////absolute.db or"
            " postgresql://user:password@host:port/database"
        )
        if any(_unsafe(char) for char in value):
            raise ValueError(f"holds control characters; {accepted}")
        if value.startswith("sqlite:///"):
            path = value.removeprefix("sqlite:///")
            if not path.strip() or path.endswith("/"):
                raise ValueError(f"names no database file; {accepted}")
            return value
        if not value.startswith(("postgresql://", "postgres://")):
            raise ValueError(accepted)
        # Messages never quote the URL: it may hold a password.
        if not unambiguous_url(value):
            raise ValueError(UNPARSABLE_URL)
        parts = urlsplit(value)
        if not parts.hostname and "host=" not in parts.query:
            raise ValueError(f"names no host; {accepted}")
        return value

    @field_validator("warehouse_url")
    @classmethod
    def _warehouse_url(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None:
            scheme = value.get_secret_value().split("://", 1)[0]
            if scheme not in WAREHOUSE_SCHEMES:
                raise ValueError(
                    f"unsupported scheme {scheme!r}: use postgresql:// (PostgreSQL, Redshift)"
                    " or snowflake://"
                )
            if not unambiguous_url(value.get_secret_value()):
                raise ValueError(UNPARSABLE_URL)
            if scheme == "snowflake":
                parse_snowflake_url(value.get_secret_value())
                if not driver_installed():
                    raise ValueError(DRIVER_HINT)
        return value

    @field_validator("notify_url")
    @classmethod
    def _notify_url(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None:
            problem = notify_url_problem(value.get_secret_value())
            if problem is not None:
                raise ValueError(problem)
        return value

    @model_validator(mode="after")
    def _secret_present(self) -> Settings:
        if self.walkme_client_secret is None and self.walkme_client_secret_file is None:
            raise ValueError(
                "SYNCD_WALKME_CLIENT_SECRET or SYNCD_WALKME_CLIENT_SECRET_FILE must be set"
            )
        return self

    @model_validator(mode="after")
    def _ports_differ(self) -> Settings:
        if self.receiver_on and self.admin_port == self.webhook_port != 0:
            raise ValueError(
                f"SYNCD_ADMIN_PORT and SYNCD_WEBHOOK_PORT are both {self.admin_port}:"
                " give each server its own port"
            )
        return self

    # Derived values.

    @property
    def token_url(self) -> str:
        return self.walkme_token_url or f"{self.walkme_api_url}/accounts/connect/token"

    @cached_property
    def parsed_schedule(self) -> Schedule:
        """The schedule as a value, parsed on first use (the validator proved it parses)."""
        return Schedule.parse(self.schedule)

    @property
    def stale_seconds(self) -> float:
        """When a segment on ``SYNCD_SCHEDULE`` counts as stale."""
        if self.stale_after is not None:
            return self.stale_after
        return 3 * self.parsed_schedule.typical_interval()

    def schedule_for(self, mapping: SegmentMapping) -> Schedule:
        """The mapping's own schedule, else ``SYNCD_SCHEDULE``."""
        return mapping.own_schedule or self.parsed_schedule

    def stale_seconds_for(self, mapping: SegmentMapping) -> float:
        """``SYNCD_STALE_AFTER`` (or 3 intervals) for a segment on ``SYNCD_SCHEDULE``;
        3 of its own intervals for a segment with a schedule of its own."""
        schedule = self.schedule_for(mapping)
        if schedule.key == self.parsed_schedule.key:
            return self.stale_seconds
        return 3 * schedule.typical_interval()

    def schedules(self, mappings: Iterable[SegmentMapping]) -> list[Schedule]:
        """``SYNCD_SCHEDULE`` first, then each other schedule the mappings have, once."""
        found = {self.parsed_schedule.key: self.parsed_schedule}
        for mapping in mappings:
            schedule = self.schedule_for(mapping)
            found.setdefault(schedule.key, schedule)
        return list(found.values())

    def client_secret(self) -> SecretStr:
        """The secret, from the variable or, for Docker/Kubernetes secrets, the file."""
        secret = _secret_value(
            self.walkme_client_secret, self.walkme_client_secret_file, "SYNCD_WALKME_CLIENT_SECRET"
        )
        assert secret is not None  # one of the two is set: checked by _secret_present
        return secret

    def webhook_secret(self) -> SecretStr | None:
        """The Heap webhook secret (variable or file); None leaves the receiver off."""
        return _secret_value(
            self.heap_webhook_secret, self.heap_webhook_secret_file, "SYNCD_HEAP_WEBHOOK_SECRET"
        )

    def notification_url(self) -> SecretStr | None:
        """Where messages for a person go (variable or file); None: no messages."""
        url = _secret_value(self.notify_url, self.notify_url_file, "SYNCD_NOTIFY_URL")
        if url is not None and self.notify_url is None:
            problem = notify_url_problem(url.get_secret_value())
            if problem is not None:
                raise ConfigError(f"SYNCD_NOTIFY_URL_FILE: {self.notify_url_file}: {problem}")
        return url

    @property
    def receiver_on(self) -> bool:
        """The Heap webhook receiver runs when its secret is configured."""
        return self.heap_webhook_secret is not None or self.heap_webhook_secret_file is not None

    @property
    def auto_map(self) -> bool:
        """``SYNCD_HEAP_AUTO_MAP``: default on whenever the receiver is on."""
        return self.receiver_on and self.heap_auto_map is not False

    def mappings(self) -> list[SegmentMapping]:
        """The segment mappings from ``SYNCD_SEGMENTS`` or ``SYNCD_SEGMENTS_FILE``."""
        if self.segments is not None and self.segments_file is not None:
            raise ConfigError("SYNCD_SEGMENTS and SYNCD_SEGMENTS_FILE are both set: keep one")
        if self.segments is not None:
            raw = _json_array(self.segments, "SYNCD_SEGMENTS")
            mappings = parse_mappings(raw, "SYNCD_SEGMENTS")
        elif self.segments_file is not None:
            where = "SYNCD_SEGMENTS_FILE"
            mappings = parse_mappings(_read_mappings_file(self.segments_file), where)
        elif self.auto_map:
            return []  # segments arrive from Heap's webhook and are mapped then
        else:
            raise ConfigError("no segments configured: set SYNCD_SEGMENTS or SYNCD_SEGMENTS_FILE")
        if not mappings and not self.auto_map:
            raise ConfigError(
                "SYNCD_SEGMENTS or SYNCD_SEGMENTS_FILE holds no mappings: add at least one"
            )
        self._check_sources(mappings)
        return mappings

    def _check_sources(self, mappings: list[SegmentMapping]) -> None:
        seen: dict[int, str] = {}
        for mapping in mappings:
            source = mapping.source
            if isinstance(source, WarehouseSourceConfig) and self.warehouse_url is None:
                raise ConfigError(
                    f"segment {mapping.name!r} reads a warehouse: set SYNCD_WAREHOUSE_URL"
                )
            if isinstance(source, HeapWebhookSourceConfig):
                if not self.receiver_on:
                    raise ConfigError(
                        f"segment {mapping.name!r} takes Heap's webhook: set"
                        " SYNCD_HEAP_WEBHOOK_SECRET (or _FILE) to turn the receiver on"
                    )
                if source.heap_segment_id in seen:
                    raise ConfigError(
                        f"segments {seen[source.heap_segment_id]!r} and {mapping.name!r} both"
                        f" take Heap segment {source.heap_segment_id}"
                    )
                seen[source.heap_segment_id] = mapping.name

    def system_for(self, mapping: SegmentMapping) -> str:
        return (mapping.system_guid or self.walkme_system_guid).lower()


def _secret_value(value: SecretStr | None, path: Path | None, name: str) -> SecretStr | None:
    if value is not None:
        return value
    if path is None:
        return None
    try:
        text = path.read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise ConfigError(f"{name}_FILE: cannot read {path}: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{name}_FILE: {path} is not UTF-8 text") from None
    if not text:
        raise ConfigError(f"{name}_FILE: {path} is empty")
    return SecretStr(text)


def notify_url_problem(url: str) -> str | None:
    """Why ``url`` cannot receive syncd's messages, or None; never quotes it (its path
    or query holds the receiver's token)."""
    if any(char.isspace() or _unsafe(char) for char in url):
        return f"holds spaces or control characters; {NOTIFY_URL_ACCEPTED}"
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises on a port that is not a number 0..65535
    except ValueError:
        return f"cannot be parsed (is the port a number?); {NOTIFY_URL_ACCEPTED}"
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return f"not an http(s) URL with a host; {NOTIFY_URL_ACCEPTED}"
    return None


def _json_array(text: str, where: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{where}: not valid JSON ({exc.msg} at char {exc.pos})") from None


def _read_mappings_file(path: Path) -> Any:
    where = f"SYNCD_SEGMENTS_FILE ({path})"
    try:
        with path.open("rb") as file:
            raw = file.read(MAX_MAPPINGS_FILE + 1)
    except OSError as exc:
        raise ConfigError(f"{where}: cannot read: {exc.strerror}") from None
    if len(raw) > MAX_MAPPINGS_FILE:
        raise ConfigError(f"{where}: larger than {MAX_MAPPINGS_FILE // 2**20} MiB")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"{where}: not UTF-8 text") from None
    if path.suffix.lower() == ".toml":
        try:
            document = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{where}: not valid TOML: {exc}") from None
        if "segments" not in document:
            raise ConfigError(f"{where}: expected [[segments]] tables")
        return document["segments"]
    return _json_array(text, where)


def parse_mappings(raw: Any, where: str) -> list[SegmentMapping]:
    """Validate a list of mappings; errors name the mapping and the field."""
    if not isinstance(raw, list):
        raise ConfigError(f"{where}: expected a JSON array of segment mappings")
    try:
        mappings = _MAPPINGS.validate_python(raw)
    except ValidationError as exc:
        error = exc.errors()[0]
        location = list(error["loc"])
        index = location.pop(0) if location and isinstance(location[0], int) else None
        label = where
        if isinstance(index, int):
            item = raw[index]
            name = item.get("name") if isinstance(item, dict) else None
            label += f" mapping {index + 1}" + (f" ({name!r})" if isinstance(name, str) else "")
        field = ".".join(str(part) for part in location if part not in _SOURCE_TAGS)
        message = error["msg"].removeprefix("Value error, ")
        raise ConfigError(f"{label}: {field or 'mapping'}: {message}") from None
    names: set[str] = set()
    external_ids: dict[tuple[str | None, str], str] = {}
    guids: dict[str, str] = {}
    for mapping in mappings:
        if mapping.name in names:
            raise ConfigError(f"{where}: segment name {mapping.name!r} appears twice")
        names.add(mapping.name)
        # Two mappings finding the same WalkMe segment would overwrite each other.
        if mapping.external_id is not None:
            key = ((mapping.system_guid or "").lower(), mapping.external_id)
            if key in external_ids:
                raise ConfigError(
                    f"{where}: segments {external_ids[key]!r} and {mapping.name!r} both have"
                    f" external_id {mapping.external_id!r}: give each its own"
                )
            external_ids[key] = mapping.name
        if mapping.segment_guid is not None:
            guid = mapping.segment_guid.lower()
            if guid in guids:
                raise ConfigError(
                    f"{where}: segments {guids[guid]!r} and {mapping.name!r} both have"
                    f" segment_guid {guid}: give each its own"
                )
            guids[guid] = mapping.name
    return mappings


def load_settings(**overrides: Any) -> Settings:
    """Read the environment (plus explicit overrides); raise ConfigError on bad input."""
    try:
        settings = Settings(**overrides)
    except ValidationError as exc:
        raise ConfigError(describe_settings_error(exc, _secret_given(overrides))) from None
    # Secret files are read now, so an empty one stops start-up, not a later request.
    settings.client_secret()
    settings.webhook_secret()
    settings.notification_url()
    return settings


def _secret_given(overrides: dict[str, Any]) -> bool:
    """Whether the client secret (or its file) is set: the check that names it runs only
    once every field is valid, too late to list it with the other missing variables."""
    fields = ("walkme_client_secret", "walkme_client_secret_file")
    given = {name.upper() for name, value in os.environ.items() if value}
    return any(overrides.get(field) is not None for field in fields) or any(
        f"{ENV_PREFIX}{field.upper()}" in given for field in fields
    )


def describe_settings_error(exc: ValidationError, secret_given: bool = True) -> str:
    # Every variable that is missing, at once: a newcomer sets them in one go.
    missing = [
        f"{ENV_PREFIX}{str(error['loc'][0]).upper()}"
        for error in exc.errors()
        if error["type"] == "missing" and error["loc"]
    ]
    if missing and not secret_given:
        missing.insert(1, "SYNCD_WALKME_CLIENT_SECRET (or SYNCD_WALKME_CLIENT_SECRET_FILE)")
    if len(missing) > 1:
        return f"{', '.join(missing)} are required but not set"
    error = exc.errors()[0]
    field = str(error["loc"][0]) if error["loc"] else ""
    message = error["msg"].removeprefix("Value error, ")
    if not field:
        return message
    name = f"{ENV_PREFIX}{field.upper()}"
    if error["type"] == "missing":
        return f"{name} is required but not set"
    shown = error.get("input")
    if (
        field not in SECRET_FIELDS
        and isinstance(shown, str | int | float)
        and (str(shown) not in message)
    ):
        quoted = repr(printable(shown) if isinstance(shown, str) else shown)
        if len(quoted) > 80:
            quoted = quoted[:77] + "..."
        return f"{name}: {message} (got {quoted})"
    return f"{name}: {message}"
