"""The Grafana dashboard (config/grafana/syncd.json) and the alert rules
(config/kubernetes/prometheus-rules.yaml) query what a real ``syncd run`` exports.

One ``syncd run`` syncs against the sandbox while a real Prometheus (the Debian
``prometheus`` binary) scrapes it every 2 s; then every dashboard expression,
and every alert rule's signal, must evaluate to data. Without the binary that part
is skipped, loudly (``.ci/run`` installs it).

With DASHBOARD_SCREENSHOT=<file.png>, headless Chromium also takes a picture
of Prometheus's graph page for the key series from that same run (docs/screenshot.sh).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, get_args

import pytest
import yaml

from syncd.sandbox import WalkMeSandbox
from syncd.walkme import RetryReason
from tests.integration.test_daemon import StartDaemon
from tests.support.harness import cli_env
from tests.support.ids import make_ids, write_ids
from tests.support.net import free_port
from tests.support.processes import REPO_ROOT, DaemonProcess
from tests.support.waiting import wait_until

DASHBOARD = REPO_ROOT / "config" / "grafana" / "syncd.json"
RULES = REPO_ROOT / "config" / "kubernetes" / "prometheus-rules.yaml"
# Grafana's variables, as "All" and a short range would set them.
TEMPLATE_VALUES = {"$__rate_interval": "1m", "$segment": ".+", "$job": ".+"}
METRIC_NAME = re.compile(r"\b((?:syncd|process)_[a-z_]+)\b")
# The key series in the README's picture of Prometheus's graph page.
PICTURED = (
    "syncd_segment_members",
    "sum by (segment, action) (increase(syncd_segment_ids_total[1m]))",
    "time() - syncd_last_success_timestamp_seconds",
)


def dashboard_expressions() -> list[tuple[str, str]]:
    """(panel title, PromQL with Grafana's variables filled in) for every target."""
    document = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    found = []
    for panel in document["panels"]:
        for target in panel["targets"]:
            expr = target["expr"]
            for variable, value in TEMPLATE_VALUES.items():
                expr = expr.replace(variable, value)
            assert "$" not in expr, f"{panel['title']}: unknown variable in {expr}"
            found.append((panel["title"], expr))
    return found


def alert_expressions() -> list[tuple[str, str]]:
    document = yaml.safe_load(RULES.read_text(encoding="utf-8"))
    return [
        (rule["alert"], rule["expr"].strip())
        for group in document["spec"]["groups"]
        for rule in group["rules"]
    ]


def alert_signals(expr: str) -> list[str]:
    """What an alert watches: each ``or`` branch without its threshold, and the inside
    of ``absent(...)``. A healthy run fires no alert, but each signal must have data."""
    signals = []
    for branch in re.split(r"\n\s*or\s*\n", expr):
        branch = re.sub(r"\s*(?:[<>]=?|[!=]=)\s*[0-9.]+\s*$", "", branch.strip())
        absent = re.fullmatch(r"absent\((.*)\)", branch, re.DOTALL)
        signals.append(absent.group(1) if absent else branch)
    return signals


def test_the_dashboard_covers_what_operators_ask_for() -> None:
    queried = " ".join(expr for _, expr in dashboard_expressions())
    for metric in (
        "syncd_last_success_timestamp_seconds",
        "syncd_segment_members",
        "syncd_segment_runs_total",
        "syncd_segment_ids_total",
        "syncd_walkme_request_duration_seconds_bucket",
        "syncd_walkme_retries_total",
        "syncd_heap_webhook_pages_total",
        "syncd_build_info",
    ):
        assert metric in queried, f"no dashboard panel shows {metric}"


@dataclass
class LiveRun:
    daemon: DaemonProcess
    admin: str  # http://127.0.0.1:<port>
    source: Path

    def metrics_text(self) -> str:
        with urllib.request.urlopen(f"{self.admin}/metrics", timeout=5) as answer:  # noqa: S310
            text: str = answer.read().decode()
            return text


@pytest.fixture
def live_run(live_sandbox: WalkMeSandbox, tmp_path: Path, daemons: StartDaemon) -> LiveRun:
    """``syncd run`` every 2 s, two file segments synced against the sandbox."""
    trial = write_ids(tmp_path / "trial.txt", make_ids(1_500, "t"))
    customers = write_ids(tmp_path / "customers.txt", make_ids(700, "c"))
    mappings = [
        {"name": "Trial users", "source": {"type": "file", "path": str(trial)}},
        {"name": "Customers", "source": {"type": "file", "path": str(customers)}},
    ]
    port = free_port()
    env = cli_env(live_sandbox.url, tmp_path, mappings, admin_port=port, schedule="2s")
    daemon = daemons(env)
    daemon.wait_for("segment.synced", count=2, timeout=60)
    return LiveRun(daemon, f"http://127.0.0.1:{port}", trial)


def exported_names(text: str) -> set[str]:
    return {line.split("{")[0].split(" ")[0] for line in text.splitlines() if line[:1].isalpha()}


def test_every_metric_queried_is_exported_by_a_real_run(live_run: LiveRun) -> None:
    exported = exported_names(live_run.metrics_text())
    queries = [expr for _, expr in dashboard_expressions() + alert_expressions()]
    queried = {name for expr in queries for name in METRIC_NAME.findall(expr)}
    missing = sorted(queried - exported)
    assert not missing, f"queried but not in /metrics: {missing}"
    # What an operator reads first: the build, and the process itself.
    assert "syncd_build_info" in exported
    assert {"process_resident_memory_bytes", "process_cpu_seconds_total"} <= exported


def test_retry_reasons_are_a_closed_set(live_run: LiveRun) -> None:
    reasons = set(
        re.findall(r'syncd_walkme_retries_total\{reason="([^"]+)"\}', live_run.metrics_text())
    )
    assert reasons == set(get_args(RetryReason))


@pytest.fixture
def prometheus(live_run: LiveRun, tmp_path: Path) -> Iterator[str]:
    """A real Prometheus scraping the daemon every 2 s; yields its URL."""
    binary = shutil.which("prometheus")
    if binary is None:
        pytest.skip(
            "NOT TESTED: the dashboard's and alert rules' PromQL need the `prometheus`"
            " binary (apt-get install prometheus; .ci/run installs it)"
        )
    port = free_port()
    config = tmp_path / "prometheus.yml"
    target = live_run.admin.removeprefix("http://")
    config.write_text(
        "global: {scrape_interval: 2s, scrape_timeout: 2s, evaluation_interval: 2s}\n"
        f"scrape_configs: [{{job_name: syncd, static_configs: [{{targets: ['{target}']}}]}}]\n",
        encoding="utf-8",
    )
    log = (tmp_path / "prometheus.log").open("w")
    process = subprocess.Popen(
        [
            binary,
            f"--config.file={config}",
            f"--storage.tsdb.path={tmp_path / 'tsdb'}",
            f"--web.listen-address=127.0.0.1:{port}",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until(lambda: _ready(url), 60, "Prometheus to be ready")
        yield url
    finally:
        process.terminate()
        process.wait(30)
        log.close()


def _ready(prometheus: str) -> bool:
    """Prometheus answers queries (it listens, then answers 503 until its TSDB is open)."""
    try:
        with urllib.request.urlopen(f"{prometheus}/-/ready", timeout=5) as answer:  # noqa: S310
            return bool(answer.status == 200)
    except OSError:
        return False


def query(prometheus: str, expr: str) -> list[dict[str, Any]]:
    url = f"{prometheus}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
    with urllib.request.urlopen(url, timeout=10) as answer:  # noqa: S310 - http://127.0.0.1
        document = json.load(answer)
    assert document["status"] == "success", (expr, document)
    result: list[dict[str, Any]] = document["data"]["result"]
    return result


def test_every_dashboard_and_alert_expression_evaluates_to_data(
    live_run: LiveRun, prometheus: str, tmp_path: Path
) -> None:
    # Enough scrapes for rate() and increase(), and a change synced while scraping.
    # Generous waits: on a loaded machine a scrape or a cycle may take seconds.
    wait_until(lambda: bool(query(prometheus, 'up{job="syncd"} == 1')), 60, "the first scrape")
    synced = live_run.daemon.count("segment.synced")
    write_ids(live_run.source, [*make_ids(1400, "t", start=100), "new@example.com"])
    live_run.daemon.wait_for("segment.synced", count=synced + 4, timeout=120)
    wait_until(
        lambda: bool(query(prometheus, "count_over_time(syncd_build_info[1m]) >= 10")),
        120,
        "ten scrapes",
    )

    empty = [
        f"{title}: {expr}" for title, expr in dashboard_expressions() if not query(prometheus, expr)
    ]
    for alert, expr in alert_expressions():
        query(prometheus, expr)  # the rule itself is valid PromQL (status success)
        empty += [f"alert {alert}: {s}" for s in alert_signals(expr) if not query(prometheus, s)]
    assert not empty, "no data for:\n" + "\n".join(empty)

    picture = os.environ.get("DASHBOARD_SCREENSHOT")
    if picture:
        screenshot(prometheus, Path(picture), tmp_path)


def screenshot(prometheus: str, picture: Path, tmp_path: Path) -> None:
    """Prometheus's graph page for the key series, taken by headless Chromium."""
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    assert browser, "DASHBOARD_SCREENSHOT needs chromium (apt-get install chromium)"
    params: dict[str, str] = {}
    for index, expr in enumerate(PICTURED):
        params |= {
            f"g{index}.expr": expr,
            f"g{index}.tab": "0",
            f"g{index}.range_input": "30s",
            f"g{index}.stacked": "0",
            f"g{index}.show_exemplars": "0",
        }
    url = f"{prometheus}/graph?" + urllib.parse.urlencode(params)
    time.sleep(2)  # one more scrape on the right edge of the graphs
    subprocess.run(
        [
            browser,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--hide-scrollbars",
            f"--user-data-dir={tmp_path / 'chromium'}",
            "--window-size=1000,2050",
            "--virtual-time-budget=8000",
            f"--screenshot={picture.absolute()}",
            url,
        ],
        check=True,
        capture_output=True,
        timeout=120,
    )
    assert picture.stat().st_size > 10_000, "the picture is (nearly) blank"
