"""No secret in any output.

Named to run last: besides its own chaos run (faults, short-lived and revoked
tokens, the webhook receiver hit with bad requests, a warehouse that refuses
connections, `/metrics`, `status`, `status --json`, `check`, `history` and a
configuration error), it searches the output of every chaos run of
this session: none may hold the WalkMe client secret (nor the Basic credentials
built from it), any access token a sandbox issued, the Heap webhook secret or
the password in SYNCD_WAREHOUSE_URL.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request

from tests.support.chaos import (
    CLIENT_SECRET,
    PG_PASSWORD,
    WEBHOOK_SECRET,
    ScenarioFactory,
    Transcript,
    basic_auth,
    storm,
)
from tests.support.ids import make_ids
from tests.support.net import fetch_text, free_port
from tests.support.waiting import wait_until

WRONG_SECRET = "chaos-wrong-S3cret-0b5e2d77"  # a rotated-away secret: refused, never shown


def post(url: str, body: bytes, headers: dict[str, str]) -> int:
    request = urllib.request.Request(url, data=body, headers=headers, method="POST")  # noqa: S310
    try:
        with urllib.request.urlopen(request, timeout=5) as response:  # noqa: S310 - 127.0.0.1
            status: int = response.status
            return status
    except urllib.error.HTTPError as exc:
        return exc.code


def test_no_secret_in_any_output(make_scenario: ScenarioFactory, transcript: Transcript) -> None:
    faults = storm(31_337, retry_after=0.3, drop_rate=0.1)
    scenario = make_scenario(token_lifetime=2.0, faults=faults)
    sandbox = scenario.sandbox
    source = make_ids(6_000, "s")
    scenario.add_segment("Secret file", source)
    scenario.mappings.append(
        {"name": "Secret warehouse", "source": {"type": "warehouse", "query": "SELECT 1"}}
    )
    admin, webhook = free_port(), free_port()
    env = scenario.env(
        schedule="1s", batch_size=1_000, admin_port=admin, webhook_port=webhook, log_level="debug"
    )
    daemon = scenario.daemon(env)
    daemon.wait_for("segment.failed", segment="Secret warehouse", timeout=60)
    wait_until(lambda: scenario.converged({"Secret file": set(source)}), 60, "the first sync")
    sandbox.revoke_tokens()
    source = source[500:] + make_ids(800, "s2")
    scenario.source("Secret file", source)
    wait_until(lambda: scenario.converged({"Secret file": set(source)}), 60, "the change")

    url = f"http://127.0.0.1:{webhook}/heap/webhook"
    body = json.dumps({"action_type": "segment.users.sync", "data": {}}).encode()
    assert post(url, body, {"Heap-Hash": "ts:1,hmac:AAAA"}) == 401
    assert post(url, b"{not json", {"Heap-Hash": "nonsense"}) == 400
    for path in ("/metrics", "/readyz", "/healthz"):
        status, text = fetch_text(f"http://127.0.0.1:{admin}{path}")
        assert status == 200, (path, text)
        transcript.add(f"GET {path}", text)
    code, _ = daemon.timed_terminate(30)
    assert code == 0

    for args in (
        ("status",),
        ("status", "--json"),
        ("check",),
        ("history", "--segment", "Secret warehouse"),
    ):
        scenario.syncd(*args, env=env)
    # The API key refused; a warehouse URL of the wrong scheme: errors, no secrets.
    refused = scenario.syncd("check", env={**env, "SYNCD_WALKME_CLIENT_SECRET": WRONG_SECRET})
    assert refused.returncode == 1, refused.stdout + refused.stderr
    bad_url = f"mysql://heapreader:{PG_PASSWORD}@127.0.0.1/heap"
    config = scenario.syncd("status", env={**env, "SYNCD_WAREHOUSE_URL": bad_url})
    assert config.returncode == 2, config.stdout + config.stderr

    secrets = {
        "client secret": CLIENT_SECRET,
        "Basic credentials": basic_auth(),
        "refused client secret": WRONG_SECRET,
        "webhook secret": WEBHOOK_SECRET,
        "warehouse password": PG_PASSWORD,
    }
    tokens = transcript.tokens()
    assert sandbox.tokens_issued >= 3
    assert set(sandbox.issued_tokens) <= set(tokens)
    texts = transcript.everything()
    leaks: list[str] = []
    for label, text in texts:
        for what, secret in secrets.items():
            if secret in text:
                leaks.append(f"{what} in {label}")
        leaks += [f"access token {token[:6]}... in {label}" for token in tokens if token in text]
    # The search covered real output: logs of runs, of token refreshes, the metrics.
    everything = "".join(text for _, text in texts)
    for sign in ("walkme.token_refreshed", "walkme.retry", "segment.failed", "syncd_walkme_"):
        assert sign in everything, f"no {sign} in the transcript"
    size = len(everything)
    print(
        f"\nsecrets: searched {len(texts)} outputs ({size:,} characters) of"
        f" {len(transcript.daemons)} daemons and {len(transcript.sandboxes)} sandboxes"
        f" for {len(secrets)} secrets and {len(tokens)} access tokens: {len(leaks)} leaks"
    )
    assert not leaks, "\n".join(leaks[:50])
