"""Sources of segment membership. ``build_source`` turns a mapping's config into one."""

from __future__ import annotations

from syncd.settings import FileSourceConfig, HeapWebhookSourceConfig, Settings, SourceConfig
from syncd.sources.base import Source, SourceError
from syncd.sources.file import FileSource
from syncd.sources.heap_webhook import HeapWebhookSource
from syncd.sources.warehouse import WarehouseSource
from syncd.state import StateStore

__all__ = ["Source", "SourceError", "build_source"]


def build_source(config: SourceConfig, settings: Settings, store: StateStore) -> Source:
    if isinstance(config, FileSourceConfig):
        return FileSource(config.path, config.column)
    if isinstance(config, HeapWebhookSourceConfig):
        return HeapWebhookSource(store, config.heap_segment_id)
    url = settings.warehouse_url
    if url is None:  # settings.mappings() refuses this; kept for type narrowing
        raise SourceError("SYNCD_WAREHOUSE_URL is not set")
    return WarehouseSource(url.get_secret_value(), config.query)
