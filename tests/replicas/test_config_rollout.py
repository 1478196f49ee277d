"""Replicas running different segment mappings, as during a rolling deploy, on one
PostgreSQL: none marks or deletes a segment another live replica maps, each says
once what differs, and a segment becomes an orphan only after its last replica
stopped and its last run is out of the in-use window."""

from __future__ import annotations

import json
import socket
from pathlib import Path
from typing import Any

from syncd.engine import IN_USE_INTERVALS
from syncd.sandbox import Faults
from tests.support.processes import run_cli
from tests.support.replicas import Replica, recording_sandbox, replica_env
from tests.support.waiting import wait_until

SCHEDULE_S = 1


def events(replica: Replica, event: str) -> list[dict[str, Any]]:
    return [entry for entry in replica.events() if entry.get("event") == event]


def test_replicas_mapping_different_segments_never_orphan_or_delete_each_others(
    fresh_database: str, tmp_path: Path
) -> None:
    url = fresh_database
    sources = {}
    for name in ("Shared", "OnlyOld", "OnlyNew"):
        sources[name] = tmp_path / f"{name}.txt"
        sources[name].write_text("".join(f"{name}-{i}@x.com\n" for i in range(20)))

    def segments_file(label: str, names: list[str]) -> Path:
        path = tmp_path / f"segments-{label}.json"
        mappings = [{"name": n, "source": {"type": "file", "path": str(sources[n])}} for n in names]
        path.write_text(json.dumps(mappings), encoding="utf-8")
        return path

    configurations = {
        "old": segments_file("old", ["Shared", "OnlyOld"]),
        "new": segments_file("new", ["Shared", "OnlyNew"]),
    }
    with recording_sandbox(2, Faults()) as sandbox:
        replicas: dict[str, Replica] = {}
        try:
            for (label, path), api_port in zip(configurations.items(), sandbox.ports, strict=True):
                env = replica_env(
                    api_port=api_port,
                    state_url=url,
                    segments_file=path,
                    work_dir=tmp_path / f"work-{label}",
                    schedule=f"{SCHEDULE_S}s",
                    lease_ttl="3",
                )
                replica = Replica.start(len(replicas), tmp_path / label, env, api_port, 0)
                replicas[label] = replica
            old, new = replicas["old"], replicas["new"]
            wait_until(
                lambda: all(len(events(r, "cycle.finished")) >= 5 for r in (old, new)),
                60,
                "five cycles of each replica",
            )
            host = socket.gethostname()

            # Each says once, naming the other, what only it and only the other maps.
            for replica, other, here, there in (
                (old, new, "OnlyOld", "OnlyNew"),
                (new, old, "OnlyNew", "OnlyOld"),
            ):
                differs = events(replica, "replicas.config_differs")
                assert [(e["replica"], e["only_here"], e["only_there"]) for e in differs] == [
                    (f"{host}:{other.pid}", [here], [there])
                ], replica.tail()
                assert differs[0]["level"] == "warning"
                # ...and never calls the other's segment an orphan.
                assert events(replica, "segment.orphaned") == [], replica.tail()

            # Pruning with the old configuration keeps what the new replica maps.
            pruned = run_cli("prune", "--yes", env=old.env, cwd=tmp_path, timeout=60)
            assert pruned.returncode == 0, pruned.stdout + pruned.stderr
            assert "'OnlyNew'" in pruned.stdout
            # The new replica is named: as mapping it, or as syncing it right now.
            named_new = (
                f"mapped by live replica {host}:{new.pid}",
                f"being synced now by {host}:{new.pid}",
            )
            assert any(reason in pruned.stdout for reason in named_new), pruned.stdout
            refused = run_cli(
                "delete", "--segment", "OnlyNew", "--yes", env=old.env, cwd=tmp_path, timeout=60
            )
            assert refused.returncode == 1, refused.stdout + refused.stderr
            assert any(reason in refused.stdout for reason in named_new), refused.stdout
            assert "Traceback" not in refused.stdout + refused.stderr
            assert sandbox.count("delete") == 0

            # The rollout finishes the other way round: the new replica stops. Its
            # segment stays in use for IN_USE_INTERVALS schedule intervals after its
            # last run, then the old replica reports it and prune deletes it.
            assert new.terminate(30) == 0
            orphaned_before = len(events(old, "segment.orphaned"))
            assert orphaned_before == 0
            wait_until(
                lambda: bool(events(old, "segment.orphaned")),
                IN_USE_INTERVALS * SCHEDULE_S + 10,
                "the old replica to report OnlyNew as an orphan",
            )
            assert [e["segment"] for e in events(old, "segment.orphaned")][:1] == ["OnlyNew"]
            pruned = run_cli("prune", "--yes", env=old.env, cwd=tmp_path, timeout=60)
            assert pruned.returncode == 0, pruned.stdout + pruned.stderr
            [deleted] = [line for line in pruned.stdout.splitlines() if "'OnlyNew'" in line]
            assert deleted.endswith(": deleted"), pruned.stdout
            assert sandbox.count("delete") == 1
            assert old.terminate(30) == 0
        finally:
            for replica in replicas.values():
                replica.close()
