"""The id rules end to end."""

from __future__ import annotations

from tests.support.harness import Harness, cli_env, parse_status, segment_requests
from tests.support.processes import run_cli_async

TOO_LONG = "L" * 101
LONGEST = "M" * 100


async def test_id_rules_end_to_end(harness: Harness) -> None:
    sandbox = harness.sandbox
    raw = [
        "  alice@example.com  ",
        "\tbob@example.com",
        "alice@example.com",  # duplicate after trimming
        "bob@example.com   ",
        "",
        "   ",
        TOO_LONG,
        LONGEST,
        "carol@example.com",
        "carol@example.com",
        "bell\x07@example.com",  # a control character cannot be a user id
    ]
    path = harness.folder / "ids.txt"
    path.write_text("\n".join(raw) + "\n", encoding="utf-8")
    mapping = {"name": "Rules", "source": {"type": "file", "path": str(path)}}
    settings = harness.settings([mapping])

    outcome = await harness.sync_one(settings)
    assert outcome.result == "synced", outcome.error
    expected = {"alice@example.com", "bob@example.com", LONGEST, "carol@example.com"}
    assert sandbox.members(harness.guid("Rules")) == expected
    assert outcome.added == len(expected)
    assert outcome.skipped.count == 2
    assert any("101" in example for example in outcome.skipped.examples)
    # What was sent: each id once, trimmed, none over 100 characters.
    sent = segment_requests(sandbox)
    assert len(sent) == 1
    assert sent[0].n_ids == len(expected)
    assert sandbox.count(status=400) == 0

    # `syncd status --json` reports the skipped ids.
    env = cli_env(sandbox.url, harness.folder, [mapping])
    code, out, err = await run_cli_async("status", "--json", env=env)
    assert code == 0, err
    rows = parse_status(out)
    assert rows["Rules"]["skipped"] == 2
    assert rows["Rules"]["members"] == len(expected)
    assert rows["Rules"]["last_result"] == "synced"
    assert any("101" in example for example in rows["Rules"]["skipped_examples"])

    # Skipped ids stay skipped: the next run sends nothing and still counts them.
    sandbox.clear_requests()
    again = await harness.sync_one(settings)
    assert again.result == "synced"
    assert segment_requests(sandbox) == []
    assert again.skipped.count == 2


async def test_csv_column_source(harness: Harness) -> None:
    sandbox = harness.sandbox
    path = harness.folder / "people.csv"
    path.write_text(
        "email,plan\n a@example.com ,pro\nb@example.com,basic\n,basic\na@example.com,pro\n",
        encoding="utf-8",
    )
    mapping = {"name": "CSV", "source": {"type": "file", "path": str(path), "column": "email"}}
    outcome = await harness.sync_one(harness.settings([mapping]))
    assert outcome.result == "synced", outcome.error
    assert sandbox.members(harness.guid("CSV")) == {"a@example.com", "b@example.com"}
