"""Benchmarks of ``syncd sync`` against the sandbox WalkMe (issue 6, section 4).

Not pytest tests: run them with ``python -m tests.benchmarks`` (``--help`` for the
options). Each measured cycle is a whole ``python -m syncd sync`` process, the
daemon's own sync path, talking HTTP to ``python -m syncd.sandbox`` on 127.0.0.1
and keeping its snapshot in a fresh SQLite file or PostgreSQL database per case.
"""
