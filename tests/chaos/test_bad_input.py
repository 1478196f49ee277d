"""Bad input: a broken mapping file stops start-up with one line and
exit 2; a bad source fails (or skips ids of) its own segment with a clear message
while the other segments sync; a corrupt state file or an unwritable state
directory is a clear error that changes nothing, in the file or in WalkMe."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from tests.support.chaos import CLIENT_SECRET, ScenarioFactory
from tests.support.ids import make_ids
from tests.support.logs import named, parse_events

SEED = 404


def one_line_error(stderr: str) -> str:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, f"expected one line on stderr, got:\n{stderr}"
    assert "Traceback" not in stderr
    return lines[0]


@pytest.mark.parametrize("command", [("run",), ("sync",), ("check",)])
def test_malformed_mapping_file_exits_2_with_one_line(
    make_scenario: ScenarioFactory, command: tuple[str, ...]
) -> None:
    scenario = make_scenario()
    mappings = scenario.folder / "segments.json"
    mappings.write_text('[{"name": "Broken", "source": {"type": "file", "path": ', "utf-8")
    env = scenario.env(segments=None, segments_file=mappings)
    result = scenario.syncd(*command, env=env, timeout=30)
    assert result.returncode == 2, result.stdout + result.stderr
    line = one_line_error(result.stderr)
    assert "SYNCD_SEGMENTS_FILE" in line
    assert "JSON" in line
    assert scenario.sandbox.request_counts()["total"] == 0


def test_bad_sources_fail_alone_and_the_others_sync(make_scenario: ScenarioFactory) -> None:
    rng = random.Random(SEED)
    scenario = make_scenario()
    sandbox = scenario.sandbox
    folder = scenario.folder
    good = make_ids(1_200, "good")
    scenario.add_segment("Good", good)

    def mapping(name: str, path: Path, column: str | None = None) -> None:
        source: dict[str, str] = {"type": "file", "path": str(path)}
        if column is not None:
            source["column"] = column
        scenario.mappings.append({"name": name, "source": source})

    directory = folder / "a-directory"
    directory.mkdir()
    mapping("Directory", directory)  # unreadable: a directory, not a file
    mapping("Missing", folder / "no-such-file.txt")
    csv_path = folder / "people.csv"
    csv_path.write_text("email,plan\na@example.com,pro\nb@example.com,free\n", "utf-8")
    mapping("No column", csv_path, column="user_id")
    junk = folder / "junk.bin"
    junk.write_bytes(b"ok@example.com\n" + bytes(rng.randrange(256) for _ in range(4096)))
    mapping("Binary", junk)
    latin = folder / "latin1.txt"
    latin.write_bytes(b"a@example.com\nb@example.com\nJos\xe9@example.com\nc@example.com\n")
    mapping("Not UTF-8", latin)
    controls = [
        "clean1@example.com",
        "bell\x07@example.com",
        "esc\x1b[31m@example.com",
        "del\x7f@example.com",
        "clean2@example.com",
        "nul-free\x01x@example.com",
    ]
    control_path = folder / "controls.txt"
    control_path.write_text("\n".join(controls) + "\n", "utf-8")
    mapping("Controls", control_path)
    also_good = make_ids(700, "also")
    scenario.add_segment("Also good", also_good)
    env = scenario.env()

    result = scenario.syncd("sync", env=env)
    assert result.returncode == 1, result.stdout[-3000:] + result.stderr[-3000:]
    assert "Traceback" not in result.stdout + result.stderr, result.stderr
    events = parse_events(result.stderr)
    failed = {e["segment"]: e["error"] for e in events if e["event"] == "segment.failed"}
    synced = {e["segment"] for e in events if e["event"] == "segment.synced"}

    # The other segments synced, the control characters only cost their ids.
    assert synced == {"Good", "Also good", "Controls"}, (synced, failed)
    clean = {"clean1@example.com", "clean2@example.com"}
    scenario.assert_converged({"Good": set(good), "Also good": set(also_good), "Controls": clean})
    rows = scenario.status(env)
    assert rows["Controls"]["skipped"] == 4
    assert len(rows["Controls"]["skipped_examples"]) == 4
    assert all("control character" in x for x in rows["Controls"]["skipped_examples"])
    skipped = named(events, "segment.ids_skipped")
    assert [e["segment"] for e in skipped] == ["Controls"]

    # Each bad source failed its own segment with a message naming the file.
    expectations = {
        "Directory": (str(directory), None),
        "Missing": (str(folder / "no-such-file.txt"), None),
        "No column": (str(csv_path), "user_id"),
        "Binary": (str(junk), "line"),
        "Not UTF-8": (str(latin), "line 3"),
    }
    assert set(failed) == set(expectations), failed
    for name, (path, detail) in expectations.items():
        error = failed[name]
        assert path in error, (name, error)
        if detail is not None:
            assert detail in error, (name, error)
        assert rows[name]["last_result"] == "failed"
        assert rows[name]["last_error"] == error
        assert rows[name]["segment_guid"] is None
        assert not scenario.named(name), f"{name}: a WalkMe segment was created"
    print("\nbad sources:\n  " + "\n  ".join(f"{k}: {v}" for k, v in failed.items()))
    assert sandbox.count("create") == 3


@pytest.mark.parametrize("command", [("sync",), ("run",), ("status",)])
def test_corrupt_state_file_is_a_clear_error_and_left_untouched(
    make_scenario: ScenarioFactory, command: tuple[str, ...]
) -> None:
    rng = random.Random(SEED)
    scenario = make_scenario()
    scenario.add_segment("Untouched", make_ids(100, "u"))
    junk = b"not a database\n" + bytes(rng.randrange(256) for _ in range(8192))
    scenario.db_path.write_bytes(junk)
    env = scenario.env()
    before = sorted(p.name for p in scenario.folder.iterdir())

    result = scenario.syncd(*command, env=env, timeout=30)
    assert result.returncode != 0, result.stdout + result.stderr
    line = one_line_error(result.stderr)
    assert str(scenario.db_path) in line
    assert "database" in line
    print(f"\ncorrupt state file ({' '.join(command)}): {line}")
    assert scenario.db_path.read_bytes() == junk, "the corrupt state file was changed"
    assert sorted(p.name for p in scenario.folder.iterdir()) == before
    assert scenario.sandbox.state()["segments"] == []
    assert scenario.sandbox.count("create") + scenario.sandbox.count("update") == 0


def unwritable_directory() -> Path:
    """A directory nobody can create files in, root included: /proc/self."""
    path = Path("/proc/self")
    probe = path / "chaos-probe"
    try:
        probe.write_text("x")
    except OSError:
        return path
    probe.unlink()
    raise AssertionError("/proc/self is writable here: no unwritable directory found")


@pytest.mark.parametrize("command", [("sync",), ("run",)])
def test_unwritable_state_directory_is_a_clear_error(
    make_scenario: ScenarioFactory, command: tuple[str, ...]
) -> None:
    scenario = make_scenario()
    scenario.add_segment("Nowhere", make_ids(100, "n"))
    directory = unwritable_directory()
    env = scenario.env(state_url="sqlite:///" + str(directory / "state.db"))
    result = scenario.syncd(*command, env=env, timeout=30)
    assert result.returncode != 0, result.stdout + result.stderr
    line = one_line_error(result.stderr)
    print(f"\nunwritable state directory ({' '.join(command)}): {line}")
    assert str(directory / "state.db") in line
    assert CLIENT_SECRET not in line
    assert scenario.sandbox.count("create") + scenario.sandbox.count("update") == 0
    # Clear: it says what to fix (the directory cannot be written), rather than
    # suggesting the file is not a syncd state file (there is no file at all).
    assert any(word in line.lower() for word in ("writ", "permission", "read-only")), line
