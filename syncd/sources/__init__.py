"""Sources of segment membership. ``build_source`` turns a mapping's config into one."""

from __future__ import annotations

from syncd.settings import SourceConfig
from syncd.sources.base import Source, SourceError
from syncd.sources.file import FileSource

__all__ = ["Source", "SourceError", "build_source"]


def build_source(config: SourceConfig) -> Source:
    return FileSource(config.path, config.column)
