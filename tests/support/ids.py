"""Member ids and the source files that hold them."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any


def make_ids(n: int, prefix: str = "user", start: int = 0) -> list[str]:
    return [f"{prefix}{i:07d}@example.com" for i in range(start, start + n)]


def write_ids(path: Path, ids: Iterable[str]) -> Path:
    """Write a source file atomically: a running daemon never reads half of it."""
    partial = path.with_name(path.name + ".partial")
    partial.write_text("".join(f"{member}\n" for member in ids), encoding="utf-8")
    partial.replace(path)
    return path


def file_mapping(folder: Path, name: str, ids: Iterable[str], **extra: Any) -> dict[str, Any]:
    """A file-source mapping; writes ``ids`` to the segment's source file in ``folder``."""
    path = write_ids(folder / f"{name.replace(' ', '_')}.txt", ids)
    return {"name": name, "source": {"type": "file", "path": str(path)}, **extra}
