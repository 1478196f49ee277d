"""Prometheus metrics, served at ``/metrics`` on the admin port.

Labels are segment names, request kinds, status codes and reasons: never an id
and never a secret.
"""

from __future__ import annotations

import platform

from prometheus_client import (
    PLATFORM_COLLECTOR,
    PROCESS_COLLECTOR,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
    disable_created_metrics,
)

from syncd import __version__

disable_created_metrics()  # type: ignore[no-untyped-call]  # the *_created series only double the scrape size
REGISTRY = CollectorRegistry(auto_describe=True)
# process_* (CPU, memory, open files, start time) and python_info, as every
# prometheus-client exporter has them.
REGISTRY.register(PROCESS_COLLECTOR)
REGISTRY.register(PLATFORM_COLLECTOR)

build_info = Info("syncd_build", "The running syncd: its version and Python's.", registry=REGISTRY)
build_info.info({"version": __version__, "python": platform.python_version()})

segment_runs = Counter(
    "syncd_segment_runs",
    "Segment runs by result (synced, failed, held).",
    ["segment", "result"],
    registry=REGISTRY,
)
segment_ids = Counter(
    "syncd_segment_ids",
    "Ids by what happened to them: added, removed, skipped, quarantined.",
    ["segment", "action"],
    registry=REGISTRY,
)
segment_members = Gauge(
    "syncd_segment_members",
    "Members delivered to WalkMe (the snapshot's size).",
    ["segment"],
    registry=REGISTRY,
)
last_success = Gauge(
    "syncd_last_success_timestamp_seconds",
    "Unix time of the segment's last successful sync; alert when it gets old.",
    ["segment"],
    registry=REGISTRY,
)
walkme_requests = Counter(
    "syncd_walkme_requests",
    "Requests to WalkMe by kind (token, create, update, list, delete) and HTTP status"
    " ('error' when no answer came).",
    ["kind", "status"],
    registry=REGISTRY,
)
walkme_latency = Histogram(
    "syncd_walkme_request_duration_seconds",
    "Latency of WalkMe requests.",
    ["kind"],
    buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
    registry=REGISTRY,
)
walkme_retries = Counter(
    "syncd_walkme_retries",
    "WalkMe calls retried, by reason.",
    ["reason"],
    registry=REGISTRY,
)
token_refreshes = Counter(
    "syncd_walkme_token_refreshes",
    "Access tokens obtained.",
    registry=REGISTRY,
)
webhook_pages = Counter(
    "syncd_heap_webhook_pages",
    "Heap webhook requests by result (stored, duplicate, ignored, rejected_<status>, not_stored).",
    ["result"],
    registry=REGISTRY,
)
notifications = Counter(
    "syncd_notifications",
    "Messages for a person (SYNCD_NOTIFY_URL) by event and result (sent, failed).",
    ["event", "result"],
    registry=REGISTRY,
)
for _result in ("stored", "duplicate", "ignored", "not_stored"):
    webhook_pages.labels(_result)  # the series exist from the start, at 0
