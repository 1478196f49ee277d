"""Every bad setting or mapping: ``syncd check`` exits 2 with one line naming the
variable (or the mapping and field) and what is accepted, and no traceback."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.unit.conftest import FILE_MAPPING
from tests.unit.test_cli import run_config_error

pytestmark = pytest.mark.usefixtures("restore_logging")


@pytest.fixture(autouse=True)
def _nothing_to_reach(env: pytest.MonkeyPatch) -> None:
    """A value let through by mistake makes `check` fail fast, not wait on the network."""
    env.setenv("SYNCD_WALKME_API_URL", "http://127.0.0.1:9")
    env.setenv("SYNCD_RETRY_ATTEMPTS", "1")


GUID = "0b7e6f1c-2d3a-4b5c-9d8e-7f6a5b4c3d2e"
OTHER_GUID = "11111111-2222-4333-8444-555555555555"

# (variable, value, words the one line must hold)
BAD_VARIABLES: list[tuple[str, str, tuple[str, ...]]] = [
    ("SYNCD_SCHEDULE", "999999999999d", ("at most",)),
    ("SYNCD_SCHEDULE", "367d", ("at most",)),
    ("SYNCD_SCHEDULE", "0 0 31 2 *", ("never fires",)),
    ("SYNCD_SCHEDULE", "0 0 30 2 *", ("never fires",)),
    ("SYNCD_SCHEDULE", "0s", ()),
    ("SYNCD_SCHEDULE", "-5m", ()),
    ("SYNCD_SCHEDULE", "", ()),
    ("SYNCD_STALE_AFTER", "inf", ()),
    ("SYNCD_STALE_AFTER", "nan", ()),
    ("SYNCD_STALE_AFTER", "-1", ()),
    ("SYNCD_STALE_AFTER", "0", ()),
    ("SYNCD_STALE_AFTER", "1e300", ()),
    ("SYNCD_HISTORY_DAYS", "inf", ()),
    ("SYNCD_HISTORY_DAYS", "nan", ()),
    ("SYNCD_HISTORY_DAYS", "1e20", ()),
    ("SYNCD_HISTORY_DAYS", "0", ()),
    ("SYNCD_HTTP_TIMEOUT", "nan", ()),
    ("SYNCD_HTTP_TIMEOUT", "inf", ()),
    ("SYNCD_HTTP_TIMEOUT", "0", ()),
    ("SYNCD_RETRY_MAX_WAIT", "inf", ()),
    ("SYNCD_RETRY_ATTEMPTS", "0", ()),
    ("SYNCD_LEASE_TTL", "nan", ()),
    ("SYNCD_LEASE_TTL", "0", ()),
    ("SYNCD_MAX_REMOVE_FRACTION", "nan", ()),
    ("SYNCD_MAX_REMOVE_FRACTION", "1.5", ()),
    ("SYNCD_MAX_REMOVE_FRACTION", "-0.1", ()),
    ("SYNCD_GUARD_MIN_MEMBERS", "-1", ()),
    ("SYNCD_GUARD_MIN_MEMBERS", "99999999999999999999", ()),
    ("SYNCD_BATCH_SIZE", "99999999999999999999999", ()),
    ("SYNCD_BATCH_SIZE", "1.5", ()),
    ("SYNCD_CONCURRENCY", "65", ()),
    ("SYNCD_HEAP_WEBHOOK_TOLERANCE", "inf", ()),
    ("SYNCD_HEAP_WEBHOOK_DEBOUNCE", "nan", ()),
    ("SYNCD_HEAP_WEBHOOK_MAX_BODY", "10", ()),
    ("SYNCD_HEAP_WEBHOOK_MAX_BODY", "99999999999999", ()),
    ("SYNCD_HEAP_WEBHOOK_PATH", "no-slash", ()),
    ("SYNCD_HEAP_WEBHOOK_PATH", "/a b", ()),
    ("SYNCD_HEAP_WEBHOOK_PATH", "/a\x1b[2J", ()),
    ("SYNCD_HEAP_WEBHOOK_SECRET", "   ", ("empty",)),
    ("SYNCD_HEAP_AUTO_MAP", "maybe", ()),
    ("SYNCD_ADMIN_PORT", "65536", ()),
    ("SYNCD_ADMIN_PORT", "-1", ()),
    ("SYNCD_ADMIN_PORT", "http", ()),
    ("SYNCD_WEBHOOK_PORT", "65536", ()),
    ("SYNCD_LOG_LEVEL", "verbose", ()),
    ("SYNCD_STATE_URL", "sqlite:///", ("sqlite:///relative.db",)),
    ("SYNCD_STATE_URL", "sqlite:///some/dir/", ("sqlite:///relative.db",)),
    ("SYNCD_STATE_URL", "sqlite:///a\nb.db", ("control",)),
    ("SYNCD_STATE_URL", "mysql://db/x", ("postgresql://",)),
    ("SYNCD_STATE_URL", "postgresql://user@db:99999/x", ("port",)),
    ("SYNCD_STATE_URL", "postgresql:///x", ("host",)),
    ("SYNCD_WALKME_API_URL", "ftp://api.walkme.com", ("http",)),
    ("SYNCD_WALKME_API_URL", "https://", ("host",)),
    ("SYNCD_WALKME_API_URL", "https://api walkme.com", ("spaces",)),
    ("SYNCD_WALKME_API_URL", "http://api.walkme.com/a b", ("spaces",)),
    ("SYNCD_WALKME_API_URL", "https://api.walkme.com:99999", ("Port",)),
    ("SYNCD_WALKME_API_URL", "https://me:pw@api.walkme.com", ("user",)),
    ("SYNCD_WALKME_TOKEN_URL", "token", ("http",)),
    ("SYNCD_WALKME_SYSTEM_GUID", "zz", ()),
    ("SYNCD_WALKME_SYSTEM_GUID", "", ()),
    ("SYNCD_WALKME_CLIENT_ID", "", ()),
    ("SYNCD_WALKME_CLIENT_ID", " client-1", ("whitespace",)),
    ("SYNCD_WALKME_CLIENT_ID", "client:1", ("':'",)),
    ("SYNCD_WALKME_CLIENT_ID", "client\x1b1", ("U+001B",)),
    ("SYNCD_NOTIFY_URL", "hooks.slack.com/services/T/B/x", ("http(s) URL",)),
    ("SYNCD_NOTIFY_URL", "ftp://hooks.slack.com/x", ("http(s) URL",)),
    ("SYNCD_NOTIFY_URL", "https://", ("host",)),
    ("SYNCD_NOTIFY_URL", "https://hooks.slack.com/a b", ("spaces",)),
    ("SYNCD_NOTIFY_URL", "https://hooks.slack.com:99999/x", ("port",)),
    ("SYNCD_NOTIFY_URL", "   ", ("empty",)),
    ("SYNCD_NOTIFY_AFTER_FAILURES", "0", ()),
    ("SYNCD_NOTIFY_AFTER_FAILURES", "1001", ()),
    ("SYNCD_NOTIFY_AFTER_FAILURES", "two", ()),
    ("SYNCD_NOTIFY_AFTER_FAILURES", "1.5", ()),
    ("SYNCD_NOTIFY_TIMEOUT", "0", ()),
    ("SYNCD_NOTIFY_TIMEOUT", "nan", ()),
    ("SYNCD_NOTIFY_TIMEOUT", "inf", ()),
    ("SYNCD_NOTIFY_TIMEOUT", "301", ()),
]


@pytest.mark.parametrize(
    ("variable", "value", "words"), BAD_VARIABLES, ids=[f"{v}={x!r}" for v, x, _ in BAD_VARIABLES]
)
def test_bad_variable_is_one_line_exit_2(
    env: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    variable: str,
    value: str,
    words: tuple[str, ...],
) -> None:
    env.setenv("SYNCD_SEGMENTS", FILE_MAPPING)
    env.setenv(variable, value)
    line = run_config_error(["check"], capsys)
    assert variable in line
    for word in words:
        assert word in line


def _missing(folder: Path) -> str:
    return str(folder / "missing")


def _directory(folder: Path) -> str:
    return str(folder)


def _empty_file(folder: Path) -> str:
    path = folder / "empty"
    path.write_text("\n", encoding="utf-8")
    return str(path)


def _blank(_: Path) -> str:
    return ""


PathMaker = Callable[[Path], str]
BAD_PATHS: list[tuple[str, PathMaker]] = [
    ("SYNCD_CA_BUNDLE", _missing),
    ("SYNCD_CA_BUNDLE", _directory),
    ("SYNCD_CA_BUNDLE", _blank),
    ("SYNCD_WORK_DIR", _missing),
    ("SYNCD_WORK_DIR", _empty_file),
    ("SYNCD_WALKME_CLIENT_SECRET_FILE", _missing),
    ("SYNCD_WALKME_CLIENT_SECRET_FILE", _directory),
    ("SYNCD_WALKME_CLIENT_SECRET_FILE", _empty_file),
    ("SYNCD_WALKME_CLIENT_SECRET_FILE", _blank),
    ("SYNCD_HEAP_WEBHOOK_SECRET_FILE", _missing),
    ("SYNCD_HEAP_WEBHOOK_SECRET_FILE", _empty_file),
    ("SYNCD_NOTIFY_URL_FILE", _missing),
    ("SYNCD_NOTIFY_URL_FILE", _directory),
    ("SYNCD_NOTIFY_URL_FILE", _empty_file),
    ("SYNCD_NOTIFY_URL_FILE", _blank),
    ("SYNCD_SEGMENTS_FILE", _missing),
    ("SYNCD_SEGMENTS_FILE", _directory),
    ("SYNCD_SEGMENTS_FILE", _empty_file),
]


@pytest.mark.parametrize(
    ("variable", "make"), BAD_PATHS, ids=[f"{v}:{m.__name__[1:]}" for v, m in BAD_PATHS]
)
def test_bad_path_is_one_line_exit_2(
    env: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
    variable: str,
    make: PathMaker,
) -> None:
    folder = tmp_path / "given"
    folder.mkdir()
    if variable != "SYNCD_SEGMENTS_FILE":
        env.setenv("SYNCD_SEGMENTS", FILE_MAPPING)
    if variable == "SYNCD_WALKME_CLIENT_SECRET_FILE":
        env.delenv("SYNCD_WALKME_CLIENT_SECRET")  # else the variable wins over the file
    env.setenv(variable, make(folder))
    assert variable in run_config_error(["check"], capsys)


def _file(name: str = "vip", **extra: object) -> dict[str, object]:
    return {"name": name, "source": {"type": "file", "path": "ids.txt"}, **extra}


def _heap(heap_segment_id: object) -> dict[str, object]:
    return {"name": "heap", "source": {"type": "heap_webhook", "heap_segment_id": heap_segment_id}}


# (mappings, words the line must hold besides SYNCD_SEGMENTS)
BAD_MAPPINGS: list[tuple[str, object, tuple[str, ...]]] = [
    ("newline in name", [_file("two\nlines")], ("name", "U+000A")),
    ("ESC in name", [_file("red\x1b[31m")], ("name", "U+001B")),
    ("NUL in name", [_file("nul\x00")], ("name", "U+0000")),
    ("bidi override in name", [_file("abc\u202egpj.exe")], ("name", "U+202E")),
    ("zero-width space in name", [_file("vip\u200b")], ("name", "U+200B")),
    ("line separator in name", [_file("a\u2028b")], ("name", "U+2028")),
    ("whitespace-only name", [_file("   ")], ("name",)),
    ("empty name", [_file("")], ("name",)),
    ("name of 201 characters", [_file("n" * 201)], ("name",)),
    ("name ending in a space", [_file("N" * 199 + " ")], ("name",)),
    ("name not a string", [_file(5)], ("name",)),  # type: ignore[arg-type]
    ("ESC in external_id", [_file(external_id="x\x1b")], ("external_id",)),
    ("external_id of 101 characters", [_file(external_id="e" * 101)], ("external_id",)),
    ("external_id with spaces around", [_file(external_id=" e ")], ("external_id",)),
    ("duplicate names", [_file("a"), _file("a")], ("twice",)),
    (
        "duplicate external ids",
        [_file("a", external_id="x"), _file("b", external_id="x")],
        ("external_id",),
    ),
    (
        "duplicate segment guids",
        [_file("a", segment_guid=GUID), _file("b", segment_guid=GUID.upper())],
        ("segment_guid",),
    ),
    ("bad segment_guid", [_file(segment_guid="nope")], ("segment_guid",)),
    ("bad system_guid", [_file(system_guid=OTHER_GUID + "0")], ("system_guid",)),
    ("unknown field", [_file(colour="red")], ("colour",)),
    ("max_remove_fraction true", [_file(max_remove_fraction=True)], ("max_remove_fraction",)),
    ("max_remove_fraction NaN", [_file(max_remove_fraction=float("nan"))], ("max_remove",)),
    ("max_remove_fraction 2", [_file(max_remove_fraction=2)], ("max_remove_fraction",)),
    ("heap_segment_id true", [_heap(True)], ("heap_segment_id",)),
    ("heap_segment_id text", [_heap("12")], ("heap_segment_id",)),
    ("heap_segment_id negative", [_heap(-1)], ("heap_segment_id",)),
    ("heap_segment_id over 64 bits", [_heap(2**63)], ("heap_segment_id",)),
    ("heap_segment_id fractional", [_heap(1.5)], ("heap_segment_id",)),
    (
        "empty source path",
        [{"name": "p", "source": {"type": "file", "path": ""}}],
        ("source.path",),
    ),
    (
        "NUL in source path",
        [{"name": "p", "source": {"type": "file", "path": "a\x00b"}}],
        ("source.path",),
    ),
    (
        "empty CSV column",
        [{"name": "p", "source": {"type": "file", "path": "a.csv", "column": ""}}],
        ("source.column",),
    ),
    ("not an array", {"name": "vip"}, ("array",)),
    ("no mappings", [], ("no mappings",)),
]


@pytest.mark.parametrize(
    ("mappings", "words"), [case[1:] for case in BAD_MAPPINGS], ids=[c[0] for c in BAD_MAPPINGS]
)
def test_bad_mapping_is_one_line_exit_2(
    env: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    mappings: object,
    words: tuple[str, ...],
) -> None:
    env.setenv("SYNCD_SEGMENTS", json.dumps(mappings))
    line = run_config_error(["check"], capsys)
    assert "SYNCD_SEGMENTS" in line
    for word in words:
        assert word in line
    assert "\x1b" not in line
    assert "\x00" not in line


@pytest.mark.parametrize(
    ("suffix", "text"),
    [
        (".json", "not json"),
        (".toml", "[[segments]]\nname = 'a'\nname = 'b'\n"),
        (".toml", "[[segments]]\nname = 'a'\nsource = {type = 'file', path = 'x', extra = 1}\n"),
        (".json", "[" + " " * (17 * 2**20) + "]"),
    ],
    ids=["not JSON", "TOML duplicate key", "TOML unknown field", "larger than 16 MiB"],
)
def test_bad_mappings_file_is_one_line_exit_2(
    env: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
    suffix: str,
    text: str,
) -> None:
    path = tmp_path / f"segments{suffix}"
    path.write_text(text, encoding="utf-8")
    env.setenv("SYNCD_SEGMENTS_FILE", str(path))
    assert "SYNCD_SEGMENTS_FILE" in run_config_error(["check"], capsys)


def test_admin_and_webhook_on_one_port_is_one_line_exit_2(
    env: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    env.setenv("SYNCD_SEGMENTS", FILE_MAPPING)
    env.setenv("SYNCD_HEAP_WEBHOOK_SECRET", "webhook-secret")
    env.setenv("SYNCD_ADMIN_PORT", "9191")
    env.setenv("SYNCD_WEBHOOK_PORT", "9191")
    line = run_config_error(["check"], capsys)
    assert "SYNCD_ADMIN_PORT" in line
    assert "SYNCD_WEBHOOK_PORT" in line


NOTIFY_TOKEN = "xoxb-hook-7d2e9f0a1b"  # the part of a webhook URL that is its credential


@pytest.mark.parametrize("command", ["check", "run", "sync"])
def test_a_bad_notify_url_stops_the_command_without_showing_it(
    env: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], command: str
) -> None:
    env.setenv("SYNCD_SEGMENTS", FILE_MAPPING)
    env.setenv("SYNCD_NOTIFY_URL", f"hooks.slack.com/services/{NOTIFY_TOKEN}")
    line = run_config_error([command], capsys)
    assert "SYNCD_NOTIFY_URL" in line
    assert NOTIFY_TOKEN not in line


@pytest.mark.parametrize("command", ["check", "status"])
def test_a_bad_url_in_the_notify_url_file_names_the_file_not_the_url(
    env: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path, command: str
) -> None:
    path = tmp_path / "notify-url"
    path.write_text(f"ftp://hooks.slack.com/services/{NOTIFY_TOKEN}\n", encoding="utf-8")
    env.setenv("SYNCD_SEGMENTS", FILE_MAPPING)
    env.setenv("SYNCD_NOTIFY_URL_FILE", str(path))
    line = run_config_error([command], capsys)
    assert f"SYNCD_NOTIFY_URL_FILE: {path}: not an http(s) URL" in line
    assert NOTIFY_TOKEN not in line
