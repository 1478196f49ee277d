"""Shared fixtures for the unit tests: a clean ``SYNCD_*`` environment."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import structlog

SYSTEM_GUID = "5a1d0c2e-3b4f-4e6a-8c7d-9e0f1a2b3c4d"
SECRET = "TOPSECRET-9f8e7d6c5b4a"
FILE_MAPPING = '[{"name": "vip", "source": {"type": "file", "path": "ids.txt"}}]'


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """No ``SYNCD_*`` variable from the outside; the working directory is a tmp dir."""
    for name in list(os.environ):
        if name.startswith("SYNCD_"):
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.fixture
def env(clean_env: Path, monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    """The three required variables set to valid values."""
    monkeypatch.setenv("SYNCD_WALKME_CLIENT_ID", "client-1")
    monkeypatch.setenv("SYNCD_WALKME_CLIENT_SECRET", SECRET)
    monkeypatch.setenv("SYNCD_WALKME_SYSTEM_GUID", SYSTEM_GUID)
    return monkeypatch


@pytest.fixture
def restore_logging() -> Iterator[None]:
    """The CLI configures structlog and the root logger; undo that after the test."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    try:
        yield
    finally:
        structlog.reset_defaults()
        root.handlers[:] = handlers
        root.setLevel(level)
