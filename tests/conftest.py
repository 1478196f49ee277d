"""Suite-wide hooks: the timed suites' xdist groups, and the ``postgres`` marker's
skip-or-fail rule."""

from __future__ import annotations

import pytest

from tests.support.postgres import REQUIRE_VARIABLE, postgres_required, unreachable_reason

# Suites timed against what syncd does: each runs on one xdist worker (its group),
# one test after another, in file order (chaos's test_zz_secrets last).
TIMED_SUITES = frozenset({"chaos", "replicas"})
# Tests using one of these fixtures need the server, marked or not.
POSTGRES_FIXTURES = frozenset({"pg_url", "fresh_database", "postgres", "pg_receiver"})
_REASON = pytest.StashKey[str | None]()
_SKIP_PREFIX = "NO POSTGRESQL, NOT TESTED: "


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "postgres: needs the PostgreSQL server of SYNCD_TEST_POSTGRES_URL; skipped loudly"
        f" without one, failed instead when {REQUIRE_VARIABLE}=1",
    )


@pytest.hookimpl(tryfirst=True)  # before -m selects by markers, and xdist by groups
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    tests = config.rootpath / "tests"
    for item in items:
        suite = item.path.relative_to(tests).parts[0] if item.path.is_relative_to(tests) else ""
        if suite in TIMED_SUITES:
            item.add_marker(pytest.mark.xdist_group(suite))
        callspec = getattr(item, "callspec", None)
        on_postgres = callspec is not None and "postgresql" in callspec.params.values()
        if on_postgres or POSTGRES_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.postgres)


def pytest_runtest_setup(item: pytest.Item) -> None:
    if item.get_closest_marker("postgres") is None:
        return
    stash = item.config.stash
    if _REASON not in stash:
        stash[_REASON] = unreachable_reason()
    reason = stash[_REASON]
    if reason is None:
        return
    if postgres_required():
        pytest.fail(f"{reason} ({REQUIRE_VARIABLE} is set: this run needs it)", pytrace=False)
    pytest.skip(_SKIP_PREFIX + reason)


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """Say it at the end, in red: a run without PostgreSQL tested less than it seems.
    (Counted from the reports, so xdist workers' skips are included.)"""
    skipped = [
        report
        for report in terminalreporter.stats.get("skipped", [])
        if _SKIP_PREFIX in str(getattr(report, "longrepr", ""))
    ]
    if skipped:
        terminalreporter.section("PostgreSQL tests NOT RUN", sep="!", red=True, bold=True)
        terminalreporter.write_line(
            f"{len(skipped)} tests need PostgreSQL and were SKIPPED; set"
            f" SYNCD_TEST_POSTGRES_URL to a server to run them",
            red=True,
            bold=True,
        )
