"""``syncd.settings``: every SYNCD_* variable, the mappings, and the error messages."""

from __future__ import annotations

import json
import re
from pathlib import Path
from urllib.parse import quote

import pytest
from apscheduler.triggers.cron import CronTrigger
from apscheduler.triggers.interval import IntervalTrigger

from syncd.settings import ConfigError, FileSourceConfig, Settings, load_settings
from syncd.urls import describe_url
from tests.unit.conftest import SECRET, SYSTEM_GUID


def assert_one_line_naming(exc: ConfigError, *names: str) -> None:
    message = str(exc)
    assert message, "a ConfigError must say something"
    assert len(message.splitlines()) == 1, f"not one line: {message!r}"
    for name in names:
        assert name in message, f"{name!r} not in {message!r}"
    assert SECRET not in message


def load_error(*names: str) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        load_settings()
    assert_one_line_naming(info.value, *names)
    return info.value


def mappings_error(*names: str) -> ConfigError:
    settings = load_settings()
    with pytest.raises(ConfigError) as info:
        settings.mappings()
    assert_one_line_naming(info.value, *names)
    return info.value


def file_mapping(name: str = "vip", **extra: object) -> dict[str, object]:
    return {"name": name, "source": {"type": "file", "path": f"{name}.txt"}, **extra}


def set_segments(monkeypatch: pytest.MonkeyPatch, mappings: object) -> None:
    monkeypatch.setenv("SYNCD_SEGMENTS", json.dumps(mappings))


# -- defaults and required variables -------------------------------------------------


def test_defaults(env: pytest.MonkeyPatch) -> None:
    settings = load_settings()
    assert settings.walkme_client_id == "client-1"
    assert settings.client_secret().get_secret_value() == SECRET
    assert settings.walkme_system_guid == SYSTEM_GUID
    assert settings.walkme_api_url == "https://api.walkme.com"
    assert settings.token_url == "https://api.walkme.com/accounts/connect/token"
    assert settings.schedule == "15m"
    assert settings.parsed_schedule.interval_seconds == 15 * 60
    assert settings.state_url == "sqlite:///syncd.db"
    assert settings.batch_size == 25_000
    assert settings.concurrency == 4
    assert settings.log_format == "json"
    assert settings.log_level == "info"
    assert settings.admin_port == 9090


@pytest.mark.parametrize("variable", ["SYNCD_WALKME_CLIENT_ID", "SYNCD_WALKME_SYSTEM_GUID"])
def test_required_variable_missing(env: pytest.MonkeyPatch, variable: str) -> None:
    env.delenv(variable)
    load_error(variable)


def test_secret_missing_names_both_variables(env: pytest.MonkeyPatch) -> None:
    env.delenv("SYNCD_WALKME_CLIENT_SECRET")
    load_error("SYNCD_WALKME_CLIENT_SECRET", "SYNCD_WALKME_CLIENT_SECRET_FILE")


def test_empty_client_id_rejected(env: pytest.MonkeyPatch) -> None:
    env.setenv("SYNCD_WALKME_CLIENT_ID", "")
    load_error("SYNCD_WALKME_CLIENT_ID")


def test_empty_client_secret_rejected(env: pytest.MonkeyPatch) -> None:
    # An empty secret can never get a token; it must stop the start like an empty id.
    env.setenv("SYNCD_WALKME_CLIENT_SECRET", "")
    with pytest.raises(ConfigError) as info:
        load_settings().client_secret()
    assert_one_line_naming(info.value, "SYNCD_WALKME_CLIENT_SECRET")


# -- the secret ----------------------------------------------------------------------


def test_secret_from_file_is_stripped(env: pytest.MonkeyPatch, tmp_path: Path) -> None:
    env.delenv("SYNCD_WALKME_CLIENT_SECRET")
    secret_file = tmp_path / "secret"
    secret_file.write_text("  from-a-file\n", encoding="utf-8")
    env.setenv("SYNCD_WALKME_CLIENT_SECRET_FILE", str(secret_file))
    assert load_settings().client_secret().get_secret_value() == "from-a-file"


def test_secret_file_missing(env: pytest.MonkeyPatch, tmp_path: Path) -> None:
    env.delenv("SYNCD_WALKME_CLIENT_SECRET")
    env.setenv("SYNCD_WALKME_CLIENT_SECRET_FILE", str(tmp_path / "nope"))
    load_error("SYNCD_WALKME_CLIENT_SECRET_FILE")


def test_secret_file_empty(env: pytest.MonkeyPatch, tmp_path: Path) -> None:
    env.delenv("SYNCD_WALKME_CLIENT_SECRET")
    secret_file = tmp_path / "secret"
    secret_file.write_text("\n", encoding="utf-8")
    env.setenv("SYNCD_WALKME_CLIENT_SECRET_FILE", str(secret_file))
    with pytest.raises(ConfigError) as info:
        load_settings().client_secret()
    assert_one_line_naming(info.value, "SYNCD_WALKME_CLIENT_SECRET_FILE", "empty")


def test_secret_file_not_utf8_is_a_config_error(env: pytest.MonkeyPatch, tmp_path: Path) -> None:
    env.delenv("SYNCD_WALKME_CLIENT_SECRET")
    secret_file = tmp_path / "secret"
    secret_file.write_bytes(b"\xff\xfe\x00binary")
    env.setenv("SYNCD_WALKME_CLIENT_SECRET_FILE", str(secret_file))
    with pytest.raises(ConfigError) as info:
        load_settings().client_secret()
    assert_one_line_naming(info.value, "SYNCD_WALKME_CLIENT_SECRET_FILE")


def test_secret_not_in_repr_or_str(env: pytest.MonkeyPatch) -> None:
    settings = load_settings()
    assert SECRET not in repr(settings)
    assert SECRET not in str(settings)
    assert SECRET not in repr(settings.client_secret())


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("SYNCD_BATCH_SIZE", "0"),
        ("SYNCD_SCHEDULE", "whenever"),
        ("SYNCD_WALKME_SYSTEM_GUID", "not-a-guid"),
        ("SYNCD_WALKME_API_URL", "api.walkme.com"),
        ("SYNCD_SEGMENTS", "[not json"),
    ],
)
def test_secret_never_in_config_error(env: pytest.MonkeyPatch, variable: str, value: str) -> None:
    env.setenv(variable, value)
    with pytest.raises(ConfigError) as info:
        load_settings().mappings()
    assert SECRET not in str(info.value)
    assert SECRET not in repr(info.value)


# -- the notify URL ------------------------------------------------------------------

NOTIFY_URL = "https://hooks.slack.com/services/T01/B02/zq8Xw3"


def test_notifications_are_off_by_default_and_fail_after_2_runs(env: pytest.MonkeyPatch) -> None:
    settings = load_settings()
    assert settings.notification_url() is None
    assert settings.notify_after_failures == 2
    assert settings.notify_timeout == 10


def test_notify_url_from_the_variable_is_kept_out_of_repr(env: pytest.MonkeyPatch) -> None:
    env.setenv("SYNCD_NOTIFY_URL", NOTIFY_URL)
    settings = load_settings()
    url = settings.notification_url()
    assert url is not None
    assert url.get_secret_value() == NOTIFY_URL
    assert "zq8Xw3" not in repr(settings)


def test_notify_url_from_a_file_is_stripped(env: pytest.MonkeyPatch, tmp_path: Path) -> None:
    path = tmp_path / "notify-url"
    path.write_text(f"  {NOTIFY_URL}\n", encoding="utf-8")
    env.setenv("SYNCD_NOTIFY_URL_FILE", str(path))
    url = load_settings().notification_url()
    assert url is not None
    assert url.get_secret_value() == NOTIFY_URL


def test_a_teams_workflow_url_with_a_query_is_accepted(env: pytest.MonkeyPatch) -> None:
    teams = (
        "https://prod-12.westeurope.logic.azure.com:443/workflows/abc/triggers/manual/paths"
        "/invoke?api-version=2016-06-01&sp=%2Ftriggers%2Fmanual%2Frun&sv=1.0&sig=s1g"
    )
    env.setenv("SYNCD_NOTIFY_URL", teams)
    url = load_settings().notification_url()
    assert url is not None
    assert url.get_secret_value() == teams


def test_warehouse_url_password_never_in_config_error(env: pytest.MonkeyPatch) -> None:
    # The warehouse URL carries a password (it is a SecretStr): never echo it back.
    env.setenv("SYNCD_WAREHOUSE_URL", f"mysql://syncd:{SECRET}@db.example/heap")
    with pytest.raises(ConfigError) as info:
        load_settings()
    assert_one_line_naming(info.value, "SYNCD_WAREHOUSE_URL")


# -- URLs ----------------------------------------------------------------------------


def test_api_url_trailing_slash_and_derived_token_url(env: pytest.MonkeyPatch) -> None:
    env.setenv("SYNCD_WALKME_API_URL", "https://eu.api.walkme.example/")
    settings = load_settings()
    assert settings.walkme_api_url == "https://eu.api.walkme.example"
    assert settings.token_url == "https://eu.api.walkme.example/accounts/connect/token"


def test_explicit_token_url(env: pytest.MonkeyPatch) -> None:
    env.setenv("SYNCD_WALKME_API_URL", "https://eu.api.walkme.example")
    env.setenv("SYNCD_WALKME_TOKEN_URL", "https://login.walkme.example/oauth/token")
    assert load_settings().token_url == "https://login.walkme.example/oauth/token"


@pytest.mark.parametrize("variable", ["SYNCD_WALKME_API_URL", "SYNCD_WALKME_TOKEN_URL"])
@pytest.mark.parametrize("value", ["ftp://api.walkme.com", "api.walkme.com", ""])
def test_bad_urls(env: pytest.MonkeyPatch, variable: str, value: str) -> None:
    env.setenv(variable, value)
    load_error(variable)


def test_system_guid_any_case_and_system_for(env: pytest.MonkeyPatch) -> None:
    env.setenv("SYNCD_WALKME_SYSTEM_GUID", SYSTEM_GUID.upper())
    set_segments(env, [file_mapping()])
    settings = load_settings()
    [mapping] = settings.mappings()
    assert settings.system_for(mapping) == SYSTEM_GUID


# -- schedule ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "seconds"),
    [("90s", 90), ("15m", 900), ("1h", 3600), ("1d", 86400), (" 2m ", 120)],
)
def test_schedule_interval(env: pytest.MonkeyPatch, value: str, seconds: int) -> None:
    env.setenv("SYNCD_SCHEDULE", value)
    schedule = load_settings().parsed_schedule
    assert schedule.interval_seconds == seconds
    trigger = schedule.trigger()
    assert isinstance(trigger, IntervalTrigger)
    assert trigger.interval.total_seconds() == seconds


def test_the_schedule_is_parsed_once_into_one_value(env: pytest.MonkeyPatch) -> None:
    """Every use (scheduler, staleness, in-use window) reads the same parsed value."""
    env.setenv("SYNCD_SCHEDULE", "0 3 * * 1-5")
    settings = load_settings()
    schedule = settings.parsed_schedule
    assert settings.parsed_schedule is schedule
    assert schedule.trigger() is schedule.trigger()  # the cron expression, parsed once
    assert schedule.typical_interval() in (86400.0, 3 * 86400.0)


def test_a_mapping_may_have_its_own_schedule(env: pytest.MonkeyPatch) -> None:
    """Its own schedule, else SYNCD_SCHEDULE's; one job per distinct schedule (15m and
    900s are one); staleness by each segment's own interval, SYNCD_STALE_AFTER for
    those on SYNCD_SCHEDULE."""
    env.setenv("SYNCD_SCHEDULE", "15m")
    env.setenv("SYNCD_STALE_AFTER", "600")
    env.setenv(
        "SYNCD_SEGMENTS",
        json.dumps(
            [
                {"name": name, "source": {"type": "file", "path": "ids.txt"}, **extra}
                for name, extra in [
                    ("default", {}),
                    ("same as default", {"schedule": "900s"}),
                    ("nightly", {"schedule": "0 3 * * *"}),
                    ("nightly again", {"schedule": " 0  3 * * * "}),
                    ("fast", {"schedule": "1m"}),
                ]
            ]
        ),
    )
    settings = load_settings()
    mappings = {m.name: m for m in settings.mappings()}
    assert [s.text for s in settings.schedules(mappings.values())] == ["15m", "0 3 * * *", "1m"]
    assert settings.schedule_for(mappings["default"]) is settings.parsed_schedule
    assert settings.schedule_for(mappings["nightly"]).typical_interval() == 86400.0
    assert settings.schedule_for(mappings["nightly"]) is settings.schedule_for(mappings["nightly"])
    assert {name: settings.stale_seconds_for(m) for name, m in mappings.items()} == {
        "default": 600.0,
        "same as default": 600.0,
        "nightly": 3 * 86400.0,
        "nightly again": 3 * 86400.0,
        "fast": 180.0,
    }


@pytest.mark.parametrize("value", ["*/5 * * * *", "0 3 * * 1-5", "30 2 1 * *"])
def test_schedule_cron(env: pytest.MonkeyPatch, value: str) -> None:
    env.setenv("SYNCD_SCHEDULE", value)
    schedule = load_settings().parsed_schedule
    assert schedule.interval_seconds is None
    assert isinstance(schedule.trigger(), CronTrigger)


# -- one variable's good and bad values ------------------------------------------------


# (variable, value, the setting read from it)
GOOD_VALUES: list[tuple[str, str, object]] = [
    ("SYNCD_BATCH_SIZE", "1", 1),
    ("SYNCD_BATCH_SIZE", "500", 500),
    ("SYNCD_BATCH_SIZE", "25000", 25_000),
    ("SYNCD_CONCURRENCY", "1", 1),
    ("SYNCD_CONCURRENCY", "16", 16),
    ("SYNCD_CONCURRENCY", "64", 64),
    ("SYNCD_LOG_FORMAT", "json", "json"),
    ("SYNCD_LOG_FORMAT", "console", "console"),
    ("SYNCD_LOG_LEVEL", "debug", "debug"),
    ("SYNCD_LOG_LEVEL", "INFO", "info"),
    ("SYNCD_LOG_LEVEL", "Warning", "warning"),
    ("SYNCD_LOG_LEVEL", "ERROR", "error"),
    ("SYNCD_ADMIN_PORT", "0", 0),
    ("SYNCD_ADMIN_PORT", "8081", 8081),
    ("SYNCD_ADMIN_PORT", "65535", 65535),
    ("SYNCD_STATE_URL", "sqlite:///state/syncd.db", "sqlite:///state/syncd.db"),
    ("SYNCD_STATE_URL", "sqlite:////var/lib/syncd.db", "sqlite:////var/lib/syncd.db"),
]


@pytest.mark.parametrize(
    ("variable", "value", "expected"), GOOD_VALUES, ids=[f"{v}={x!r}" for v, x, _ in GOOD_VALUES]
)
def test_a_good_value_is_read(
    env: pytest.MonkeyPatch, variable: str, value: str, expected: object
) -> None:
    """A number is read as one, a log level in lower case, a choice or URL as given."""
    env.setenv(variable, value)
    assert getattr(load_settings(), variable.removeprefix("SYNCD_").lower()) == expected


BAD_VALUES: list[tuple[str, str]] = [
    ("SYNCD_WALKME_SYSTEM_GUID", "5a1d0c2e3b4f4e6a8c7d9e0f1a2b3c4d"),
    ("SYNCD_WALKME_SYSTEM_GUID", "xyz"),
    ("SYNCD_WALKME_SYSTEM_GUID", SYSTEM_GUID + "0"),
    ("SYNCD_SCHEDULE", ""),
    ("SYNCD_SCHEDULE", "0s"),
    ("SYNCD_SCHEDULE", "0m"),
    ("SYNCD_SCHEDULE", "soon"),
    ("SYNCD_SCHEDULE", "15x"),
    ("SYNCD_SCHEDULE", "-5m"),
    ("SYNCD_SCHEDULE", "1.5h"),
    ("SYNCD_SCHEDULE", "* * * *"),
    ("SYNCD_SCHEDULE", "* * * * * *"),
    ("SYNCD_SCHEDULE", "61 * * * *"),
    ("SYNCD_SCHEDULE", "* 25 * * *"),
    ("SYNCD_BATCH_SIZE", "0"),
    ("SYNCD_BATCH_SIZE", "-1"),
    ("SYNCD_BATCH_SIZE", "25001"),
    ("SYNCD_BATCH_SIZE", "1000000"),
    ("SYNCD_BATCH_SIZE", "ten"),
    ("SYNCD_BATCH_SIZE", "1.5"),
    ("SYNCD_BATCH_SIZE", ""),
    ("SYNCD_CONCURRENCY", "0"),
    ("SYNCD_CONCURRENCY", "-3"),
    ("SYNCD_CONCURRENCY", "65"),
    ("SYNCD_CONCURRENCY", "many"),
    ("SYNCD_LOG_FORMAT", "xml"),
    ("SYNCD_LOG_FORMAT", "text"),
    ("SYNCD_LOG_FORMAT", ""),
    ("SYNCD_LOG_LEVEL", "loud"),
    ("SYNCD_LOG_LEVEL", "trace"),
    ("SYNCD_LOG_LEVEL", "5"),
    ("SYNCD_ADMIN_PORT", "-1"),
    ("SYNCD_ADMIN_PORT", "65536"),
    ("SYNCD_ADMIN_PORT", "http"),
    ("SYNCD_STATE_URL", "syncd.db"),
    ("SYNCD_STATE_URL", "sqlite://syncd.db"),
    ("SYNCD_STATE_URL", "nonsense://x"),
]


@pytest.mark.parametrize(
    ("variable", "value"), BAD_VALUES, ids=[f"{v}={x!r}" for v, x in BAD_VALUES]
)
def test_a_bad_value_is_one_line_naming_its_variable(
    env: pytest.MonkeyPatch, variable: str, value: str
) -> None:
    """Refused at load, in one line naming the variable (and never the secret)."""
    env.setenv(variable, value)
    load_error(variable)


@pytest.mark.parametrize("variable", ["SYNCD_ADMIN_HOST", "SYNCD_WEBHOOK_HOST"])
def test_listen_hosts_default_to_every_ipv4_interface(
    env: pytest.MonkeyPatch, variable: str
) -> None:
    default = getattr(load_settings(), variable.removeprefix("SYNCD_").lower())
    assert default == "0.0.0.0"  # noqa: S104 - what the containers need


@pytest.mark.parametrize("variable", ["SYNCD_ADMIN_HOST", "SYNCD_WEBHOOK_HOST"])
@pytest.mark.parametrize(
    "value",
    ["127.0.0.1", "::", "::1", "0.0.0.0", "localhost", "syncd-0.svc"],  # noqa: S104
)
def test_listen_hosts(env: pytest.MonkeyPatch, variable: str, value: str) -> None:
    env.setenv(variable, value)
    assert getattr(load_settings(), variable.removeprefix("SYNCD_").lower()) == value


@pytest.mark.parametrize("variable", ["SYNCD_ADMIN_HOST", "SYNCD_WEBHOOK_HOST"])
@pytest.mark.parametrize("value", ["", "[::1]", "0.0.0.0:9090", "two hosts", "http://x"])
def test_bad_listen_hosts(env: pytest.MonkeyPatch, variable: str, value: str) -> None:
    env.setenv(variable, value)
    load_error(variable)


# -- segment mappings ----------------------------------------------------------------


def test_segments_json(env: pytest.MonkeyPatch) -> None:
    guid = "0b7e6f1c-2d3a-4b5c-9d8e-7f6a5b4c3d2e"
    set_segments(
        env,
        [
            file_mapping("vip"),
            {
                "name": "trial users",
                "source": {"type": "file", "path": "/data/trial.csv", "column": "email"},
                "external_id": "trial-1",
                "segment_guid": guid,
                "system_guid": guid.upper(),
            },
        ],
    )
    settings = load_settings()
    first, second = settings.mappings()
    assert first.name == "vip"
    assert isinstance(first.source, FileSourceConfig)
    assert first.source.path == Path("vip.txt")
    assert first.source.column is None
    assert first.external_id is None
    assert first.segment_guid is None
    assert settings.system_for(first) == SYSTEM_GUID
    assert second.name == "trial users"
    assert isinstance(second.source, FileSourceConfig)
    assert second.source.column == "email"
    assert second.external_id == "trial-1"
    assert second.segment_guid == guid
    assert settings.system_for(second) == guid


def test_segments_file_json(env: pytest.MonkeyPatch, tmp_path: Path) -> None:
    path = tmp_path / "segments.json"
    path.write_text(json.dumps([file_mapping("a"), file_mapping("b")]), encoding="utf-8")
    env.setenv("SYNCD_SEGMENTS_FILE", str(path))
    assert [m.name for m in load_settings().mappings()] == ["a", "b"]


def test_segments_file_toml(env: pytest.MonkeyPatch, tmp_path: Path) -> None:
    path = tmp_path / "segments.toml"
    path.write_text(
        """
[[segments]]
name = "vip"
external_id = "vip-1"
source = { type = "file", path = "/data/vip.txt" }

[[segments]]
name = "trial"
[segments.source]
type = "file"
path = "/data/trial.csv"
column = "email"
""",
        encoding="utf-8",
    )
    env.setenv("SYNCD_SEGMENTS_FILE", str(path))
    vip, trial = load_settings().mappings()
    assert vip.name == "vip"
    assert vip.external_id == "vip-1"
    assert isinstance(vip.source, FileSourceConfig)
    assert vip.source.path == Path("/data/vip.txt")
    assert trial.name == "trial"
    assert isinstance(trial.source, FileSourceConfig)
    assert trial.source.column == "email"


def test_segments_file_toml_error_names_the_file_variable(
    env: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    path = tmp_path / "segments.toml"
    path.write_text('[[segments]]\nname = "vip"\nsource = { type = "file" }\n', encoding="utf-8")
    env.setenv("SYNCD_SEGMENTS_FILE", str(path))
    mappings_error("SYNCD_SEGMENTS_FILE", "mapping 1", "vip", "source.path")


@pytest.mark.parametrize("text", ['name = "x"\n', "[[segments]\n", '[segments]\nname = "x"\n'])
def test_segments_file_toml_malformed(env: pytest.MonkeyPatch, tmp_path: Path, text: str) -> None:
    path = tmp_path / "segments.toml"
    path.write_text(text, encoding="utf-8")
    env.setenv("SYNCD_SEGMENTS_FILE", str(path))
    mappings_error("SYNCD_SEGMENTS_FILE")


def test_segments_file_missing(env: pytest.MonkeyPatch, tmp_path: Path) -> None:
    env.setenv("SYNCD_SEGMENTS_FILE", str(tmp_path / "nope.json"))
    mappings_error("SYNCD_SEGMENTS_FILE")


def test_segments_file_bad_json(env: pytest.MonkeyPatch, tmp_path: Path) -> None:
    path = tmp_path / "segments.json"
    path.write_text("[{]", encoding="utf-8")
    env.setenv("SYNCD_SEGMENTS_FILE", str(path))
    mappings_error("SYNCD_SEGMENTS_FILE")


def test_no_segments(env: pytest.MonkeyPatch) -> None:
    mappings_error("SYNCD_SEGMENTS", "SYNCD_SEGMENTS_FILE")


def test_both_segments_variables(env: pytest.MonkeyPatch, tmp_path: Path) -> None:
    path = tmp_path / "segments.json"
    path.write_text(json.dumps([file_mapping()]), encoding="utf-8")
    set_segments(env, [file_mapping()])
    env.setenv("SYNCD_SEGMENTS_FILE", str(path))
    mappings_error("SYNCD_SEGMENTS", "SYNCD_SEGMENTS_FILE")


@pytest.mark.parametrize("text", ["[not json", '{"name": "vip"}', '"vip"', "42"])
def test_segments_not_a_json_array(env: pytest.MonkeyPatch, text: str) -> None:
    env.setenv("SYNCD_SEGMENTS", text)
    mappings_error("SYNCD_SEGMENTS")


def test_mapping_missing_source_path(env: pytest.MonkeyPatch) -> None:
    set_segments(env, [{"name": "vip", "source": {"type": "file"}}])
    mappings_error("SYNCD_SEGMENTS", "mapping 1", "'vip'", "source.path")


def test_mapping_unknown_source_type(env: pytest.MonkeyPatch) -> None:
    set_segments(env, [{"name": "vip", "source": {"type": "carrier-pigeon", "path": "x"}}])
    mappings_error("SYNCD_SEGMENTS", "mapping 1", "'vip'", "source", "carrier-pigeon")


def test_mapping_missing_source(env: pytest.MonkeyPatch) -> None:
    set_segments(env, [{"name": "vip"}])
    mappings_error("SYNCD_SEGMENTS", "mapping 1", "source")


def test_mapping_missing_name(env: pytest.MonkeyPatch) -> None:
    set_segments(env, [file_mapping("a"), {"source": {"type": "file", "path": "x"}}])
    mappings_error("SYNCD_SEGMENTS", "mapping 2", "name")


@pytest.mark.parametrize("name", ["", " vip", "vip ", "x" * 201])
def test_mapping_bad_name(env: pytest.MonkeyPatch, name: str) -> None:
    set_segments(env, [file_mapping(name)])
    mappings_error("SYNCD_SEGMENTS", "mapping 1", "name")


def test_mapping_duplicate_names(env: pytest.MonkeyPatch) -> None:
    set_segments(env, [file_mapping("vip"), file_mapping("other"), file_mapping("vip")])
    mappings_error("SYNCD_SEGMENTS", "'vip'")


@pytest.mark.parametrize("field", ["segment_guid", "system_guid"])
@pytest.mark.parametrize("value", ["not-a-guid", "5a1d0c2e3b4f4e6a8c7d9e0f1a2b3c4d", 12])
def test_mapping_bad_guid(env: pytest.MonkeyPatch, field: str, value: object) -> None:
    set_segments(env, [file_mapping("first"), file_mapping("vip", **{field: value})])
    mappings_error("SYNCD_SEGMENTS", "mapping 2", "'vip'", field)


def test_mapping_unknown_field(env: pytest.MonkeyPatch) -> None:
    set_segments(env, [file_mapping("vip", colour="blue")])
    mappings_error("SYNCD_SEGMENTS", "mapping 1", "'vip'", "colour")


def test_mapping_unknown_source_field(env: pytest.MonkeyPatch) -> None:
    set_segments(env, [{"name": "vip", "source": {"type": "file", "path": "x", "colum": "email"}}])
    mappings_error("SYNCD_SEGMENTS", "mapping 1", "'vip'", "colum")


@pytest.mark.parametrize("external_id", ["", "x" * 101])
def test_mapping_bad_external_id(env: pytest.MonkeyPatch, external_id: str) -> None:
    set_segments(env, [file_mapping("vip", external_id=external_id)])
    mappings_error("SYNCD_SEGMENTS", "mapping 1", "external_id")


def test_mapping_not_an_object(env: pytest.MonkeyPatch) -> None:
    set_segments(env, [file_mapping("a"), "vip"])
    mappings_error("SYNCD_SEGMENTS", "mapping 2")


def test_settings_is_frozen(env: pytest.MonkeyPatch) -> None:
    settings = load_settings()
    assert isinstance(settings, Settings)
    with pytest.raises(ValueError, match="frozen"):
        settings.batch_size = 5


@pytest.mark.parametrize("variable", ["warehouse_url", "state_url"])
@pytest.mark.parametrize("password", ["Kq9?Lm2Qz", "Ab3#Xy7Wv", "Rr4/Bb7Tt", "Pp8@Ss9Uu"])
def test_a_database_url_with_an_unencoded_password_stops_start_up_without_quoting_it(
    variable: str, password: str
) -> None:
    url = f"postgresql://syncd:{password}@db.example.com:5432/heap"
    with pytest.raises(ConfigError) as info:
        load_settings(**{**_URL_BASE, variable: url})
    message = str(info.value)
    assert message.startswith(f"SYNCD_{variable.upper()}: cannot be parsed; percent-encode")
    assert "\n" not in message
    for fragment in re.split(r"[?#/@]", password):
        assert fragment not in message
        assert fragment not in describe_url(url)
    # Percent-encoded, the same password is fine, and still never described.
    encoded = url.replace(password, quote(password, safe=""))
    assert getattr(load_settings(**{**_URL_BASE, variable: encoded}), variable) is not None
    assert describe_url(encoded) == "postgresql://db.example.com:5432/heap"


def test_describe_url_never_shows_a_scheme_that_is_not_one() -> None:
    assert describe_url("syncd:Kq9Lm2Qz@db.example.com://x") == "?://(unparsable URL)"


_URL_BASE: dict[str, object] = {
    "walkme_client_id": "id",
    "walkme_client_secret": "secret",
    "walkme_system_guid": "11111111-2222-3333-4444-555555555555",
}
