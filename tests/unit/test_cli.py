"""``syncd.cli.main``: configuration errors end with exit code 2 and one line on stderr."""

from __future__ import annotations

import asyncio
import base64
import json
from pathlib import Path
from urllib.parse import quote

import pytest

from syncd.cli import EXIT_CONFIG, main
from syncd.ids import SkippedIds
from syncd.state import open_store
from tests.support.stores import create_store
from tests.unit.conftest import FILE_MAPPING, SECRET, SYSTEM_GUID

pytestmark = pytest.mark.usefixtures("restore_logging")


def run_config_error(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    code = main(argv)
    captured = capsys.readouterr()
    assert code == EXIT_CONFIG == 2, (captured.out, captured.err)
    line = captured.err.strip()
    assert line, "a configuration error must be explained on stderr"
    assert "\n" not in line, f"more than one line: {captured.err!r}"
    assert "Traceback" not in captured.err + captured.out
    assert SECRET not in captured.err + captured.out
    return line


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("SYNCD_BATCH_SIZE", "0"),
        ("SYNCD_BATCH_SIZE", "25001"),
        ("SYNCD_SCHEDULE", "every now and then"),
        ("SYNCD_WALKME_SYSTEM_GUID", "nope"),
        ("SYNCD_WALKME_API_URL", "walkme"),
        ("SYNCD_LOG_FORMAT", "xml"),
        ("SYNCD_CONCURRENCY", "0"),
        ("SYNCD_ADMIN_PORT", "99999"),
        ("SYNCD_STATE_URL", "syncd.db"),
    ],
)
def test_bad_variable(
    env: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], variable: str, value: str
) -> None:
    env.setenv("SYNCD_SEGMENTS", FILE_MAPPING)
    env.setenv(variable, value)
    assert variable in run_config_error(["sync"], capsys)


def test_missing_required_variable(
    env: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    env.setenv("SYNCD_SEGMENTS", FILE_MAPPING)
    env.delenv("SYNCD_WALKME_CLIENT_ID")
    assert "SYNCD_WALKME_CLIENT_ID" in run_config_error(["sync"], capsys)


def test_no_segments(env: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    assert "SYNCD_SEGMENTS" in run_config_error(["sync"], capsys)


def test_bad_mapping(env: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    env.setenv("SYNCD_SEGMENTS", json.dumps([{"name": "vip", "source": {"type": "file"}}]))
    line = run_config_error(["sync"], capsys)
    assert "vip" in line
    assert "source.path" in line


def test_missing_secret_file(
    env: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    env.setenv("SYNCD_SEGMENTS", FILE_MAPPING)
    env.delenv("SYNCD_WALKME_CLIENT_SECRET")
    env.setenv("SYNCD_WALKME_CLIENT_SECRET_FILE", str(tmp_path / "missing-secret"))
    assert "SYNCD_WALKME_CLIENT_SECRET_FILE" in run_config_error(["sync"], capsys)


def test_unknown_segment(env: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    env.setenv("SYNCD_SEGMENTS", FILE_MAPPING)
    line = run_config_error(["sync", "--segment", "unknown"], capsys)
    assert "unknown" in line
    assert "vip" in line  # the configured names are listed


@pytest.mark.parametrize(
    "argv",
    [
        ["run"],
        ["check"],
        ["status"],
        ["reset", "--segment", "vip"],
        ["sync", "--dry-run"],
        ["explain", "--id", "a"],
    ],
)
def test_every_command_checks_configuration(
    env: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], argv: list[str]
) -> None:
    env.setenv("SYNCD_SEGMENTS", FILE_MAPPING)
    env.setenv("SYNCD_BATCH_SIZE", "-1")
    assert "SYNCD_BATCH_SIZE" in run_config_error(argv, capsys)


def test_secret_not_shown_on_config_error(
    env: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    env.setenv("SYNCD_SEGMENTS", FILE_MAPPING)
    env.setenv("SYNCD_WALKME_SYSTEM_GUID", "not-a-guid")
    assert "SYNCD_WALKME_SYSTEM_GUID" in run_config_error(["sync"], capsys)


def test_unknown_command_is_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["frobnicate"])
    assert info.value.code == 2
    assert "Traceback" not in capsys.readouterr().err


@pytest.mark.parametrize("variable", ["SYNCD_WAREHOUSE_URL", "SYNCD_STATE_URL"])
def test_a_database_url_with_a_raw_question_mark_in_its_password_exits_2(
    env: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], variable: str
) -> None:
    env.setenv("SYNCD_SEGMENTS", FILE_MAPPING)
    env.setenv(variable, "postgresql://syncd:Kq9?Lm2Qz@127.0.0.1:5432/postgres")
    line = run_config_error(["sync"], capsys)
    assert line.startswith(f"syncd: configuration error: {variable}: cannot be parsed;")
    assert "percent-encode" in line
    assert "Kq9" not in line
    assert "Lm2Qz" not in line


def test_status_and_history_mask_every_configured_secret_in_stored_texts(
    env: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], clean_env: Path
) -> None:
    """A stored error holding secrets (written by an older syncd, or echoed by a
    server) is printed masked: the printing process knows every configured secret."""
    secret, webhook, password = "cli-S3cret/only-here", "whsec-9a8b7c6d5e", "pw/with:odd@chars"
    encoded = quote(password, safe="")
    env.setenv("SYNCD_WALKME_CLIENT_SECRET", secret)
    env.setenv("SYNCD_HEAP_WEBHOOK_SECRET", webhook)
    env.setenv("SYNCD_WAREHOUSE_URL", f"postgresql://reader:{encoded}@127.0.0.1/heap")
    env.setenv("SYNCD_SEGMENTS", FILE_MAPPING)
    env.setenv("SYNCD_STATE_URL", "sqlite:///state.db")
    basic = base64.b64encode(f"client-1:{secret}".encode()).decode()
    forms = [secret, quote(secret, safe=""), basic, webhook, password, encoded]
    # An access token only the process that stored the text knew.
    stored = " ".join(forms) + " Authorization: Bearer tok-77aa99bb"

    async def store_a_failed_run() -> None:
        store = await open_store("sqlite:///state.db")
        try:
            await store.begin_run("vip", "r1", SYSTEM_GUID, None)
            await store.finish_run("vip", "r1", "failed", stored, SkippedIds(), 1, 0)
        finally:
            await store.close()

    asyncio.run(store_a_failed_run())
    printed = ""
    for argv in (
        ["status"],
        ["status", "--json"],
        ["history", "--segment", "vip"],
        ["history", "--segment", "vip", "--json"],
    ):
        assert main(argv) == 0
        captured = capsys.readouterr()
        printed += captured.out + captured.err
    assert "[redacted]" in printed
    assert [form for form in forms if form in printed] == []
    assert "tok-77aa99bb" not in printed


def test_every_missing_variable_is_named_at_once(
    clean_env: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    line = run_config_error(["check"], capsys)
    for variable in (
        "SYNCD_WALKME_CLIENT_ID",
        "SYNCD_WALKME_CLIENT_SECRET",
        "SYNCD_WALKME_SYSTEM_GUID",
    ):
        assert variable in line, line


def test_a_bad_guid_is_explained_not_shown_as_a_pattern(
    env: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    env.setenv("SYNCD_SEGMENTS", FILE_MAPPING)
    env.setenv("SYNCD_WALKME_SYSTEM_GUID", "1234")
    line = run_config_error(["check"], capsys)
    assert "not a GUID" in line, line
    assert "8-4-4-4-12" in line, line
    assert "[0-9a-fA-F]" not in line, line
    assert "pattern" not in line, line


@pytest.mark.parametrize("argv", [["sync"], ["run"], ["status"]])
def test_a_start_up_error_is_one_json_line_when_logs_are_json(
    env: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], argv: list[str]
) -> None:
    env.setenv("SYNCD_SEGMENTS", FILE_MAPPING)
    env.setenv("SYNCD_LOG_FORMAT", "json")
    env.setenv("SYNCD_BATCH_SIZE", "0")
    event = json.loads(run_config_error(argv, capsys))
    assert event["event"] == "config.invalid"
    assert event["level"] == "error"
    assert "SYNCD_BATCH_SIZE" in event["error"]
    assert "timestamp" in event


@pytest.fixture
def empty_state(clean_env: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An empty state database, named by SYNCD_STATE_URL; no other setting."""
    url = f"sqlite:///{clean_env / 'state.db'}"
    asyncio.run(create_store(url))
    monkeypatch.setenv("SYNCD_STATE_URL", url)


@pytest.mark.usefixtures("empty_state")
def test_status_and_history_start_without_walkme_settings(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["status", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == {"segments": [], "orphans": []}
    assert main(["history", "--segment", "vip"]) == 0
    assert "no runs recorded for 'vip'" in capsys.readouterr().out


@pytest.mark.usefixtures("empty_state")
def test_explain_needs_the_mappings(capsys: pytest.CaptureFixture[str]) -> None:
    assert "SYNCD_SEGMENTS" in run_config_error(["explain", "--id", "a"], capsys)


@pytest.mark.parametrize(
    "command",
    ["run", "sync", "check", "status", "history", "explain", "reset", "delete", "prune", "demo"],
)
def test_every_command_help_lists_its_exit_statuses(
    capsys: pytest.CaptureFixture[str], command: str
) -> None:
    with pytest.raises(SystemExit) as info:
        main([command, "--help"])
    assert info.value.code == 0
    text = capsys.readouterr().out
    assert "exit status: 0" in text, text
    if command not in ("demo",):
        assert "2 bad configuration" in text, text
    if command == "sync":
        assert "3 (--dry-run only)" in text, text
