"""Benchmarks of ``syncd sync`` against the sandbox WalkMe.

Not pytest tests: run them with ``python -m tests.benchmarks`` (``--help`` for the
options; ``--quick`` is a smoke check of about a minute, ``--write`` also saves
the table as ``tests/benchmarks/last_run.md``). Each measured file-source cycle is
a whole ``python -m syncd sync`` process, the daemon's own sync path, talking HTTP
to ``python -m syncd.sandbox`` on 127.0.0.1 and keeping its snapshot in a fresh
SQLite file or PostgreSQL database per case (``SYNCD_TEST_POSTGRES_URL`` names the
server); the same cycles run by a hand-written peer script, and a ``syncd run``
daemon fed Heap webhook tasks, are measured beside it.

Modules: ``run`` (cases, targets, report), ``data`` (source files, the floor),
``harness`` (sandbox, stores, measured processes, the webhook daemon), ``peer``
(the hand-written script syncd is compared with), ``launcher`` (the process that
measures one command), ``pyspy`` (summaries of ``--profile DIR`` recordings:
``python -m tests.benchmarks.pyspy DIR/*.txt``).
"""
