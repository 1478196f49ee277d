"""Liveness of other processes on this host: leases and spill folders of dead
syncd processes are reclaimed at once instead of waiting for them to expire."""

from __future__ import annotations

import os


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # signal 0: a check, nothing is sent
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, belongs to someone else
    return True
