#!/usr/bin/env bash
# Remake docs/prometheus-graph.png, the README's picture of the key series: the
# dashboard test's real `syncd run` against the sandbox, scraped by a real Prometheus,
# and Prometheus's graph page taken by headless Chromium.
#
#   apt-get install -y prometheus chromium
#   bash docs/screenshot.sh
set -euo pipefail
cd "$(dirname "$0")/.."
DASHBOARD_SCREENSHOT=docs/prometheus-graph.png \
    .venv/bin/pytest -q tests/integration/test_dashboard.py \
    -k test_every_dashboard_and_alert_expression_evaluates_to_data
ls -l docs/prometheus-graph.png
