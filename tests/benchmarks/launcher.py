"""Run one command and write its wall time, CPU time and peak RSS as JSON.

``python tests/benchmarks/launcher.py RESULT.json TIMEOUT_S -- COMMAND...``

Why a separate small process: on Linux a child's ``ru_maxrss`` also counts the
memory it had before ``exec``, that is, a copy (or, with vfork, the very mapping)
of its parent. Started straight from the benchmark process, which holds millions
of ids after timing a floor, every ``syncd sync`` would report the benchmark's
size. Started from this launcher, that baseline is this launcher's few MB.

Standard library only: it runs as a script, outside the ``tests`` package.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time


def main(argv: list[str]) -> int:
    result, timeout, separator, *command = argv
    if separator != "--" or not command:
        print("usage: launcher.py RESULT.json TIMEOUT_S -- COMMAND...", file=sys.stderr)
        return 2
    started = time.monotonic()
    proc = subprocess.Popen(command)
    timer = threading.Timer(float(timeout), proc.kill)
    timer.start()
    try:
        _, status, usage = os.wait4(proc.pid, 0)
    finally:
        timer.cancel()
    wall = time.monotonic() - started
    proc.returncode = os.waitstatus_to_exitcode(status)
    with open(result, "w", encoding="utf-8") as out:
        json.dump(
            {
                "wall_s": wall,
                "cpu_s": usage.ru_utime + usage.ru_stime,
                "peak_rss_kb": usage.ru_maxrss,  # kilobytes on Linux
                "exit_code": proc.returncode,
            },
            out,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
