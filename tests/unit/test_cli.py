"""``syncd.cli.main``: configuration errors end with exit code 2 and one line on stderr."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from syncd.cli import EXIT_CONFIG, main
from tests.unit.conftest import FILE_MAPPING, SECRET

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
    "argv", [["run"], ["check"], ["status"], ["reset", "--segment", "vip"], ["sync", "--dry-run"]]
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
