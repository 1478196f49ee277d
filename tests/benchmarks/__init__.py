"""Benchmarks of ``syncd sync`` against the sandbox WalkMe.

Not pytest tests: run them with ``python -m tests.benchmarks`` (``--help`` for the
options; ``--quick`` is a smoke check of under a minute, ``--write`` also saves
the table as ``tests/benchmarks/last_run.md``). Each measured cycle is a whole
``python -m syncd sync`` process, the daemon's own sync path, talking HTTP to
``python -m syncd.sandbox`` on 127.0.0.1 and keeping its snapshot in a fresh SQLite
file or PostgreSQL database per case (``SYNCD_TEST_POSTGRES_URL`` names the server).

Modules: ``run`` (cases, targets, report), ``data`` (source files, the floor),
``harness`` (sandbox, stores, measured processes), ``launcher`` (the process that
measures one command), ``pyspy`` (summaries of ``--profile DIR`` recordings:
``python -m tests.benchmarks.pyspy DIR/*.txt``).
"""
