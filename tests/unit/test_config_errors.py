"""Every bad setting or mapping: ``syncd check`` exits 2 with one line naming the
variable (or the mapping and field) and what is accepted, and no traceback."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Iterable
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization

from syncd.cli import main
from tests.support.snowflake import new_rsa_key, pkcs8_pem
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


def refused_line(
    env: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    variable: str,
    value: str,
    words: Iterable[str] = (),
    command: str = "check",
) -> str:
    """``syncd <command>`` with one file mapping and ``variable`` set to ``value`` (it may
    be SYNCD_SEGMENTS itself): its one-line configuration error, holding each of ``words``."""
    env.setenv("SYNCD_SEGMENTS", FILE_MAPPING)
    env.setenv(variable, value)
    line = run_config_error([command], capsys)
    for word in words:
        assert word in line
    return line


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
    line = refused_line(env, capsys, variable, value, words)
    assert variable in line


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
    ("transform not a list", [_file(transform="lower")], ("transform", "list of steps")),
    ("transform step not text", [_file(transform=[1])], ("transform", "list of steps")),
    ("unknown transform step", [_file(transform=["lower", "trim"])], ("step 2", "'trim'")),
    ("bad regex", [_file(transform=["regex:user-(\\d+"])], ("vip", "step 1", "regular exp")),
    ("regex without a group", [_file(transform=["regex:user-\\d+"])], ("0 capturing",)),
    ("regex with two groups", [_file(transform=["regex:(a)(b)"])], ("2 capturing",)),
    ("strip_prefix without text", [_file(transform=["strip_prefix:"])], ("needs the text",)),
    ("add_prefix starting blank", [_file(transform=["add_prefix: x"])], ("whitespace",)),
    ("lower with text", [_file(transform=["lower:x"])], ("no text",)),
    ("ESC in a transform step", [_file(transform=["add_prefix:\x1b"])], ("step 1", "U+001B")),
    ("too many transform steps", [_file(transform=["lower"] * 17)], ("at most 16",)),
    ("schedule zero", [_file(schedule="0s")], ("schedule", "longer than 0")),
    ("schedule of 367 days", [_file(schedule="367d")], ("schedule", "at most")),
    ("schedule not cron", [_file(schedule="nightly")], ("schedule", "'nightly'")),
    ("schedule never fires", [_file(schedule="0 0 31 2 *")], ("schedule", "never fires")),
    ("schedule a number", [_file(schedule=60)], ("schedule",)),
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
    line = refused_line(env, capsys, "SYNCD_SEGMENTS", json.dumps(mappings), words)
    assert "SYNCD_SEGMENTS" in line
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


# ------------------------------------------------------------ Snowflake URLs and keys

SNOWFLAKE_PASSWORD = "Sn0w-pw-4b3c2d1e"  # distinctive: never in any line printed
SNOWFLAKE = f"snowflake://reader:{SNOWFLAKE_PASSWORD}@heapco/HEAP/MAIN_PRODUCTION"
KEYLESS = "snowflake://reader@heapco/HEAP/MAIN_PRODUCTION"
PASSPHRASE = "pass-phrase-0d9c8b7a"

# (URL, words the one line must hold)
BAD_SNOWFLAKE_URLS: list[tuple[str, tuple[str, ...]]] = [
    (f"{SNOWFLAKE}?warehous=W", ("unknown parameter 'warehous'", "accepted: warehouse")),
    (f"{SNOWFLAKE}?warehouse=W&warehouse=V", ("warehouse is given twice",)),
    (f"{SNOWFLAKE}?role=", ("role is empty",)),
    (f"{SNOWFLAKE}?warehouse", ("name=value",)),
    (f"{SNOWFLAKE}?port=0&host=127.0.0.1", ("port= is a number",)),
    (f"{SNOWFLAKE}?port=http", ("port= is a number",)),
    (f"{SNOWFLAKE}?protocol=ftp", ("protocol= is https",)),
    (f"{SNOWFLAKE}?protocol=http", ("protocol=http only with host=127.0.0.1",)),
    (f"{SNOWFLAKE}?protocol=http&host=db.example.com", ("unencrypted",)),
    (f"{SNOWFLAKE}?host=a%20b", ("host=",)),
    (f"snowflake://reader:{SNOWFLAKE_PASSWORD}@heapco:443/HEAP", ("?port=N",)),
    (f"snowflake://reader:{SNOWFLAKE_PASSWORD}@heapco/HEAP/MAIN/EXTRA", ("/database/schema",)),
    (f"snowflake://:{SNOWFLAKE_PASSWORD}@heapco/HEAP", ("names no user",)),
    (f"snowflake://reader:{SNOWFLAKE_PASSWORD}@/HEAP", ("names no account",)),
    (KEYLESS, ("needs a password", "private_key_file")),
    (f"{SNOWFLAKE}?private_key_file=/k.p8", ("not both",)),
    (f"{KEYLESS}?private_key_passphrase_file=/p", ("private_key_passphrase_file is for",)),
]


@pytest.mark.parametrize(
    ("url", "words"), BAD_SNOWFLAKE_URLS, ids=[words[0] for _, words in BAD_SNOWFLAKE_URLS]
)
def test_bad_snowflake_url_is_one_line_exit_2(
    env: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], url: str, words: tuple[str, ...]
) -> None:
    line = refused_line(env, capsys, "SYNCD_WAREHOUSE_URL", url, words)
    assert line.startswith("syncd: configuration error: SYNCD_WAREHOUSE_URL: "), line
    assert SNOWFLAKE_PASSWORD not in line


def _key_file(folder: Path, passphrase: str | None = None) -> Path:
    path = folder / "rsa_key.p8"
    path.write_bytes(pkcs8_pem(new_rsa_key(), passphrase))
    return path


def _passphrase_file(folder: Path, text: str = PASSPHRASE) -> Path:
    path = folder / "passphrase"
    path.write_text(text + "\n", encoding="utf-8")
    return path


def _missing_key(folder: Path) -> tuple[Path, Path | None]:
    return folder / "no_such_key.p8", None


def _key_is_a_directory(folder: Path) -> tuple[Path, Path | None]:
    return folder, None


def _key_below_a_file(folder: Path) -> tuple[Path, Path | None]:
    return _key_file(folder) / "key.p8", None  # ENOTDIR: unreadable even for root


def _not_a_key(folder: Path) -> tuple[Path, Path | None]:
    path = folder / "cert.pem"
    path.write_text("-----BEGIN CERTIFICATE-----\nMIIBszCCAVmgAwIBAgIU\n", encoding="utf-8")
    return path, None


def _public_key_only(folder: Path) -> tuple[Path, Path | None]:
    path = folder / "rsa_key.pub"
    path.write_bytes(
        new_rsa_key()
        .public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    return path, None


def _empty_key(folder: Path) -> tuple[Path, Path | None]:
    path = folder / "empty.p8"
    path.write_text("\n", encoding="utf-8")
    return path, None


def _encrypted_without_passphrase(folder: Path) -> tuple[Path, Path | None]:
    return _key_file(folder, PASSPHRASE), None


def _wrong_passphrase(folder: Path) -> tuple[Path, Path | None]:
    return _key_file(folder, PASSPHRASE), _passphrase_file(folder, "not-the-passphrase")


def _passphrase_for_a_plain_key(folder: Path) -> tuple[Path, Path | None]:
    return _key_file(folder), _passphrase_file(folder)


def _missing_passphrase_file(folder: Path) -> tuple[Path, Path | None]:
    return _key_file(folder, PASSPHRASE), folder / "no_such_passphrase"


KeyMaker = Callable[[Path], tuple[Path, Path | None]]
BAD_KEYS: list[tuple[KeyMaker, tuple[str, ...]]] = [
    (_missing_key, ("cannot read private_key_file", "No such file")),
    (_key_is_a_directory, ("is a directory",)),
    (_key_below_a_file, ("cannot read private_key_file", "Not a directory")),
    (_not_a_key, ("holds no private key",)),
    (_public_key_only, ("holds no private key",)),
    (_empty_key, ("is empty",)),
    (_encrypted_without_passphrase, ("is encrypted", "private_key_passphrase_file=")),
    (_wrong_passphrase, ("cannot be decrypted with the passphrase in",)),
    (_passphrase_for_a_plain_key, ("is not encrypted",)),
    (_missing_passphrase_file, ("cannot read private_key_passphrase_file",)),
]


@pytest.mark.parametrize(
    ("make", "words"), BAD_KEYS, ids=[make.__name__[1:] for make, _ in BAD_KEYS]
)
def test_bad_snowflake_private_key_is_one_line_exit_2(
    env: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
    make: KeyMaker,
    words: tuple[str, ...],
) -> None:
    """Found at start, named with its path, and never a byte of the key printed."""
    key, passphrase = make(tmp_path)
    url = f"{KEYLESS}?private_key_file={key}"
    if passphrase is not None:
        url += f"&private_key_passphrase_file={passphrase}"
    line = refused_line(env, capsys, "SYNCD_WAREHOUSE_URL", url, words)
    assert line.startswith("syncd: configuration error: SYNCD_WAREHOUSE_URL: "), line
    assert PASSPHRASE not in line
    for path in tmp_path.rglob("*"):
        if path.is_file():
            for key_line in path.read_text(encoding="utf-8").splitlines():
                if len(key_line) > 16 and not key_line.startswith("-----"):
                    assert key_line not in line


def test_a_good_snowflake_key_passes_the_start_up_checks(
    env: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """The other side of the checks above: a readable key (with its passphrase) is
    accepted, so `check` goes on to WalkMe (unreachable here: exit 1, not 2)."""
    key, passphrase = _key_file(tmp_path, PASSPHRASE), _passphrase_file(tmp_path)
    url = f"{KEYLESS}?private_key_file={key}&private_key_passphrase_file={passphrase}"
    env.setenv("SYNCD_SEGMENTS", FILE_MAPPING)
    env.setenv("SYNCD_WAREHOUSE_URL", url + "&warehouse=W&role=R")
    assert main(["check"]) == 1
    captured = capsys.readouterr()
    assert "configuration error" not in captured.err
    assert PASSPHRASE not in captured.out + captured.err


def test_snowflake_without_its_driver_is_one_line_exit_2(
    env: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Found at start, rather than as every run's failure."""
    env.setitem(sys.modules, "snowflake.connector", None)  # what an import then fails on
    line = refused_line(env, capsys, "SYNCD_WAREHOUSE_URL", SNOWFLAKE)
    assert line.endswith("snowflake:// needs the Snowflake driver: pip install 'syncd[snowflake]'")


NOTIFY_TOKEN = "xoxb-hook-7d2e9f0a1b"  # the part of a webhook URL that is its credential


@pytest.mark.parametrize("command", ["check", "run", "sync"])
def test_a_bad_notify_url_stops_the_command_without_showing_it(
    env: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], command: str
) -> None:
    url = f"hooks.slack.com/services/{NOTIFY_TOKEN}"
    line = refused_line(env, capsys, "SYNCD_NOTIFY_URL", url, command=command)
    assert "SYNCD_NOTIFY_URL" in line
    assert NOTIFY_TOKEN not in line


@pytest.mark.parametrize("command", ["check", "status"])
def test_a_bad_url_in_the_notify_url_file_names_the_file_not_the_url(
    env: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path, command: str
) -> None:
    path = tmp_path / "notify-url"
    path.write_text(f"ftp://hooks.slack.com/services/{NOTIFY_TOKEN}\n", encoding="utf-8")
    line = refused_line(env, capsys, "SYNCD_NOTIFY_URL_FILE", str(path), command=command)
    assert f"SYNCD_NOTIFY_URL_FILE: {path}: not an http(s) URL" in line
    assert NOTIFY_TOKEN not in line
