"""A fake WalkMe Segments API server for integration tests, demos and benchmarks.

``server`` is the fake API itself (with its public fault hooks), ``faults`` the
seeded random faults, ``thread`` a runner for callers without an event loop, and
``cli`` the ``python -m syncd.sandbox`` command. Everything a caller may use is
importable from here; the modules' private names are not an API.
"""

from syncd.sandbox.cli import main
from syncd.sandbox.faults import Faults
from syncd.sandbox.server import (
    DEFAULT_CLIENT_ID,
    DEFAULT_CLIENT_SECRET,
    MAX_BODY_BYTES,
    SANDBOX_SYSTEM_GUID,
    SEGMENT_PATH,
    SEGMENTS_PATH,
    TOKEN_PATH,
    AppliedChange,
    ListShape,
    RequestKind,
    RequestRecord,
    SegmentRecord,
    WalkMeSandbox,
)
from syncd.sandbox.thread import run_sandbox_in_thread, serve_in_thread

__all__ = [
    "DEFAULT_CLIENT_ID",
    "DEFAULT_CLIENT_SECRET",
    "MAX_BODY_BYTES",
    "SANDBOX_SYSTEM_GUID",
    "SEGMENTS_PATH",
    "SEGMENT_PATH",
    "TOKEN_PATH",
    "AppliedChange",
    "Faults",
    "ListShape",
    "RequestKind",
    "RequestRecord",
    "SegmentRecord",
    "WalkMeSandbox",
    "main",
    "run_sandbox_in_thread",
    "serve_in_thread",
]
