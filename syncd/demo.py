"""``syncd demo``: the whole pipeline against a local sandbox WalkMe, in under a minute.

Nothing here is special-cased: the demo builds ordinary settings pointing at
the sandbox and runs the same engine ``syncd run`` runs.
"""

from __future__ import annotations

import json
import random
import tempfile
from pathlib import Path

from syncd.app import open_runtime
from syncd.logs import configure_logging
from syncd.reports import print_status
from syncd.sandbox import SANDBOX_SYSTEM_GUID, Faults, WalkMeSandbox
from syncd.settings import load_settings

CLIENT_ID, CLIENT_SECRET = "demo-client", "demo-secret-not-real"


def _write_sources(folder: Path, cycle: int) -> None:
    """Membership that changes between cycles, like a real Heap segment."""
    rng = random.Random(cycle)
    trial = [f"trial{n}@example.com" for n in range(1_000 + 40 * cycle)]
    rng.shuffle(trial)
    trial = trial[100 * cycle :]  # some users leave...
    trial.append("x" * 120)  # ...and one id is too long for WalkMe: skipped, reported
    (folder / "trial.txt").write_text("\n".join(trial) + "\n", encoding="utf-8")
    customers = ["email,plan"] + [
        f"customer{n}@example.com,{'pro' if n % 3 else 'basic'}"
        for n in range(cycle * 500, 30_000 + cycle * 500)
    ]
    (folder / "customers.csv").write_text("\n".join(customers) + "\n", encoding="utf-8")


def _banner(text: str) -> None:
    print(f"\n=== {text} ===", flush=True)


async def run_demo(cycles: int = 3) -> int:
    configure_logging("console", "info")
    # A little weather: throttling and short-lived tokens, as WalkMe may do.
    faults = Faults(seed=7, throttle_rate=0.1, retry_after=0.5)
    async with WalkMeSandbox(
        client_id=CLIENT_ID, client_secret=CLIENT_SECRET, token_lifetime=20.0, faults=faults
    ) as sandbox:
        with tempfile.TemporaryDirectory(prefix="syncd-demo-") as tmp:
            folder = Path(tmp)
            mappings = [
                {
                    "name": "Trial users",
                    "source": {"type": "file", "path": str(folder / "trial.txt")},
                },
                {
                    "name": "Customers",
                    "external_id": "heap-42",
                    "source": {
                        "type": "file",
                        "path": str(folder / "customers.csv"),
                        "column": "email",
                    },
                },
            ]
            settings = load_settings(
                walkme_client_id=CLIENT_ID,
                walkme_client_secret=CLIENT_SECRET,
                walkme_system_guid=SANDBOX_SYSTEM_GUID,
                walkme_api_url=sandbox.url,
                walkme_token_url=None,
                segments=json.dumps(mappings),
                segments_file=None,
                state_url=f"sqlite:///{folder / 'syncd.db'}",
                batch_size=25_000,
                retry_max_wait=2.0,
                log_format="console",
            )
            _banner(f"sandbox WalkMe at {sandbox.url}; files in {folder}")
            parsed = settings.mappings()
            async with open_runtime(settings, parsed) as runtime:
                for cycle in range(cycles):
                    _write_sources(folder, min(cycle, cycles - 2))
                    _banner(f"cycle {cycle + 1} of {cycles}")
                    await runtime.engine.sync_all()
            _banner("sandbox WalkMe now holds")
            for record in sandbox.state()["segments"]:
                print(f"  {record['name']!r}: {record['size']} members", flush=True)
            _banner("syncd status")
            await print_status(settings, parsed)
    print(
        "\nThe last cycle had no changes, so it sent no segment request."
        "\nNext: set SYNCD_* for your WalkMe account (see config/syncd.env) and run `syncd check`.",
        flush=True,
    )
    return 0
