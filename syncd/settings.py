"""Configuration: every ``SYNCD_*`` environment variable and the segment mappings.

All validation happens here, before anything starts, so a bad setting stops the
process with one line that names the variable (or mapping field) to fix.
"""

from __future__ import annotations

import ipaddress
import json
import re
import tomllib
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from apscheduler.triggers.base import BaseTrigger
from apscheduler.triggers.cron import CronTrigger
from apscheduler.triggers.interval import IntervalTrigger
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    TypeAdapter,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, SettingsConfigDict

ENV_PREFIX = "SYNCD_"
MAX_BATCH_SIZE = 25_000  # WalkMe's documented limit of user ids per request
GUID_PATTERN = r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$"
_INTERVAL = re.compile(r"^\s*(\d+)\s*([smhd])\s*$")
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400}

WAREHOUSE_SCHEMES = ("postgresql", "postgres", "redshift", "snowflake")
HEAP_SEGMENT_ID_MAX = 2**63 - 1  # Heap: "segment.id is an int64"
SEGMENT_NAME_MAX = 200
# C0/C1 control characters: a WalkMe segment name is shown, and picked, in the Editor.
NAME_CONTROL_CHARACTERS = re.compile(r"[\x00-\x1f\x7f-\x9f]")

# Values never echoed in errors: the warehouse URL holds a password.
SECRET_FIELDS = frozenset(
    {"walkme_client_secret", "heap_webhook_secret", "warehouse_url", "state_url"}
)

Guid = Annotated[str, Field(pattern=GUID_PATTERN)]
# What a database URL that cannot be read reliably is told; it never quotes the URL.
URL_HINT = (
    "percent-encode any '/', '?', '#', '@' or '%' in the user name and password"
    " (e.g. '?' as %3F, '#' as %23, '@' as %40)"
)


class ConfigError(Exception):
    """A setting a user must fix; the message is one line naming it."""


# --- segment mappings -------------------------------------------------------------


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class FileSourceConfig(_Strict):
    """One id per line, or one named column of a CSV file with a header."""

    type: Literal["file"]
    path: Path
    column: str | None = Field(default=None, min_length=1)


class HeapWebhookSourceConfig(_Strict):
    """Membership Heap pushes to the webhook receiver (Heap Segments Sync)."""

    type: Literal["heap_webhook"]
    heap_segment_id: int = Field(ge=0, le=HEAP_SEGMENT_ID_MAX)


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

    @field_validator("name")
    @classmethod
    def _name_is_valid(cls, value: str) -> str:
        problem = segment_name_problem(value)
        if problem is not None:
            raise ValueError(problem)
        return value


def segment_name_problem(name: str) -> str | None:
    """Why ``name`` cannot name a segment (it becomes the WalkMe segment's name), or None.

    The one rule for every segment name: configured ones and those Heap sends.
    """
    if not 1 <= len(name) <= SEGMENT_NAME_MAX:
        return f"must be 1 to {SEGMENT_NAME_MAX} characters long"
    if name != name.strip():
        return "must not start or end with whitespace"
    if NAME_CONTROL_CHARACTERS.search(name):
        return "must not contain control characters"
    return None


_MAPPINGS = TypeAdapter(list[SegmentMapping])
# pydantic's union tags, left out of error paths: users never typed them.
_SOURCE_TAGS = {"file", "heap_webhook", "warehouse"}


# --- schedule ---------------------------------------------------------------------


@dataclass(frozen=True)
class Schedule:
    """``SYNCD_SCHEDULE``: an interval (``90s``, ``15m``, ``1h``, ``1d``) or 5-field cron."""

    text: str
    interval_seconds: int | None

    @classmethod
    def parse(cls, text: str) -> Schedule:
        match = _INTERVAL.match(text)
        if match:
            seconds = int(match.group(1)) * _UNIT_SECONDS[match.group(2)]
            if seconds <= 0:
                raise ValueError("an interval must be longer than 0")
            return cls(text.strip(), seconds)
        if len(text.split()) != 5:
            raise ValueError(
                f"{text!r} is neither an interval like 90s, 15m, 1h nor a 5-field cron expression"
            )
        try:
            CronTrigger.from_crontab(text)
        except ValueError as exc:
            raise ValueError(f"bad cron expression {text!r}: {exc}") from None
        return cls(text.strip(), None)

    def typical_interval(self) -> float:
        """Seconds between runs; for cron, the gap between its next two fire times."""
        if self.interval_seconds is not None:
            return float(self.interval_seconds)
        trigger = CronTrigger.from_crontab(self.text, timezone=UTC)
        first = trigger.get_next_fire_time(None, datetime.now(UTC))
        second = trigger.get_next_fire_time(first, first + timedelta(seconds=1))
        return float((second - first).total_seconds())

    def trigger(self) -> BaseTrigger:
        if self.interval_seconds is not None:
            return IntervalTrigger(seconds=self.interval_seconds)
        return CronTrigger.from_crontab(self.text, timezone=UTC)


# --- environment ------------------------------------------------------------------


class Settings(BaseSettings):
    """Everything syncd reads from its environment."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX, extra="ignore", frozen=True, validate_default=True
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
    stale_after: float | None = Field(default=None, gt=0)
    history_days: float = Field(default=30, gt=0)
    # The removal safety guard (per mapping: "max_remove_fraction"; 1.0 turns it off).
    max_remove_fraction: float = Field(default=0.5, ge=0, le=1)
    guard_min_members: int = Field(default=100, ge=0)
    # Heap Segments Sync webhook receiver: on when a secret is set.
    heap_webhook_secret: SecretStr | None = None
    heap_webhook_secret_file: Path | None = None
    webhook_host: str = "0.0.0.0"  # noqa: S104 - Heap posts from outside
    webhook_port: int = Field(default=8080, ge=0, le=65535)
    heap_webhook_path: str = Field(default="/heap/webhook", pattern=r"^/\S*$")
    heap_webhook_tolerance: float = Field(default=300.0, gt=0, le=86400)
    heap_webhook_max_body: int = Field(default=32 * 1024 * 1024, ge=1024)
    heap_webhook_debounce: float = Field(default=10.0, ge=0, le=3600)
    heap_auto_map: bool | None = None
    # Heap Connect tables: postgresql:// (PostgreSQL, Amazon Redshift) or snowflake://.
    warehouse_url: SecretStr | None = None
    # Longest wait for one step of reading a source (a chunk, a query's first rows).
    source_timeout: float = Field(default=600.0, gt=0, le=86400)

    @field_validator("walkme_api_url", "walkme_token_url")
    @classmethod
    def _http_url(cls, value: str | None) -> str | None:
        if value is None:
            return None
        if not re.match(r"^https?://[^/\s]+", value):
            raise ValueError(f"{value!r} is not an http(s) URL")
        return value.rstrip("/")

    @field_validator("walkme_client_secret", "heap_webhook_secret", "warehouse_url")
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
        if not value.startswith(("sqlite:///", "postgresql://", "postgres://")):
            raise ValueError(
                "expected sqlite:///relative.db, sqlite:////absolute.db or"
                " postgresql://user:password@host:port/database"
            )
        if not value.startswith("sqlite:") and not unambiguous_url(value):
            raise ValueError(f"cannot be parsed; {URL_HINT}")
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
                raise ValueError(f"cannot be parsed; {URL_HINT}")
        return value

    @model_validator(mode="after")
    def _secret_present(self) -> Settings:
        if self.walkme_client_secret is None and self.walkme_client_secret_file is None:
            raise ValueError(
                "SYNCD_WALKME_CLIENT_SECRET or SYNCD_WALKME_CLIENT_SECRET_FILE must be set"
            )
        return self

    # Derived values.

    @property
    def token_url(self) -> str:
        return self.walkme_token_url or f"{self.walkme_api_url}/accounts/connect/token"

    @property
    def parsed_schedule(self) -> Schedule:
        return Schedule.parse(self.schedule)

    @property
    def stale_seconds(self) -> float:
        if self.stale_after is not None:
            return self.stale_after
        return 3 * self.parsed_schedule.typical_interval()

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


def describe_url(url: str) -> str:
    """A URL without its user and password, safe for logs and errors: the parts
    shown come after the URL's only "@", so no piece of a password is among them."""
    scheme = url.split("://", 1)[0] if "://" in url else "?"
    if not re.fullmatch(r"[A-Za-z][A-Za-z0-9+.-]{0,20}", scheme):
        scheme = "?"
    if not unambiguous_url(url):
        return f"{scheme}://(unparsable URL)"
    parts = urlsplit(url)
    port = f":{parts.port}" if parts.port else ""
    return f"{scheme}://{parts.hostname or ''}{port}{parts.path}"


def unambiguous_url(url: str) -> bool:
    """Whether a database URL reads unambiguously as scheme://user:password@host:port/...

    A password holding a raw "/", "?" or "#" ends the host part early, leaving its
    "@" in the path, query or fragment; a raw "@" makes two of them. Drivers then
    misread the URL and quote the pieces, password included, in their errors.
    """
    try:
        parts = urlsplit(url)
        _ = parts.port  # raises on a port that is not a number
    except ValueError:
        return False
    return parts.netloc.count("@") <= 1 and "@" not in parts.path + parts.query + parts.fragment


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


def _json_array(text: str, where: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{where}: not valid JSON ({exc.msg} at char {exc.pos})") from None


def _read_mappings_file(path: Path) -> Any:
    where = f"SYNCD_SEGMENTS_FILE ({path})"
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"{where}: cannot read: {exc.strerror}") from None
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
        raise ConfigError(f"{label}: {field or 'mapping'}: {error['msg']}") from None
    names: set[str] = set()
    for mapping in mappings:
        if mapping.name in names:
            raise ConfigError(f"{where}: segment name {mapping.name!r} appears twice")
        names.add(mapping.name)
    return mappings


def load_settings(**overrides: Any) -> Settings:
    """Read the environment (plus explicit overrides); raise ConfigError on bad input."""
    try:
        return Settings(**overrides)
    except ValidationError as exc:
        raise ConfigError(describe_settings_error(exc)) from None


def describe_settings_error(exc: ValidationError) -> str:
    error = exc.errors()[0]
    field = str(error["loc"][0]) if error["loc"] else ""
    message = error["msg"].removeprefix("Value error, ")
    if not field:
        return message
    name = f"{ENV_PREFIX}{field.upper()}"
    if error["type"] == "missing":
        return f"{name} is required but not set"
    shown = error.get("input")
    if field not in SECRET_FIELDS and isinstance(shown, str | int | float):
        return f"{name}: {message} (got {shown!r})"
    return f"{name}: {message}"
