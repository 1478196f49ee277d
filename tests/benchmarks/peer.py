"""The benchmarks' peer: a careful hand-written sync script, the baseline syncd is
compared with.

``python tests/benchmarks/peer.py --name NAME --source FILE --snapshot FILE.json``

It does what a competent engineer would write in an afternoon instead of syncd:
read the source file into a set, load the snapshot (a JSON file of what WalkMe
acknowledged) into another, diff the two with set operations, and send the
difference as ``remove`` then ``add`` batches of 25,000 ids (a new segment is
created with its first batch), with urllib. It is careful: nothing is sent when
nothing changed, and after each acknowledged batch the snapshot file is rewritten
whole (a temporary file, fsync, rename), so a crash loses at most the batch in
flight. It has no fingerprint shortcut: an untouched file is read and diffed again.

WalkMe is reached with syncd's own variables: ``SYNCD_WALKME_API_URL``,
``SYNCD_WALKME_CLIENT_ID``, ``SYNCD_WALKME_CLIENT_SECRET``, ``SYNCD_WALKME_SYSTEM_GUID``
(an OAuth client-credentials token from ``<API_URL>/accounts/connect/token``).

Standard library only: it runs as a script, outside the ``tests`` package, so its
process pays no import but its own.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

BATCH = 25_000  # WalkMe's limit of ids per request
ATTEMPTS = 5  # per call, on 429, 5xx and dropped connections
TIMEOUT_S = 60.0


class PeerError(Exception):
    """A call failed for good: the script stops, the snapshot holds what was acknowledged."""


class WalkMe:
    """The four things the script needs from WalkMe: a token, create, add, remove."""

    def __init__(self, api_url: str, client_id: str, client_secret: str, system: str) -> None:
        self._api = api_url.rstrip("/")
        self._basic = base64.b64encode(f"{client_id}:{client_secret}".encode()).decode()
        self._segments = f"{self._api}/public/v1/user/system/{system}/segment"
        self._token: str | None = None

    def _request(self, request: urllib.request.Request) -> Any:
        for attempt in range(1, ATTEMPTS + 1):
            try:
                with urllib.request.urlopen(request, timeout=TIMEOUT_S) as answer:  # noqa: S310
                    body = answer.read()
                return json.loads(body) if body else {}
            except urllib.error.HTTPError as exc:
                if (exc.code != 429 and exc.code < 500) or attempt == ATTEMPTS:
                    detail = exc.read()[:300].decode(errors="replace")
                    raise PeerError(
                        f"{request.get_method()} {request.full_url}: HTTP {exc.code}: {detail}"
                    ) from None
            except (urllib.error.URLError, OSError) as exc:
                if attempt == ATTEMPTS:
                    raise PeerError(f"{request.get_method()} {request.full_url}: {exc}") from None
            time.sleep(min(2.0**attempt / 10, 5.0))
        raise AssertionError("unreachable")

    def _token_header(self) -> str:
        if self._token is None:
            form = urllib.parse.urlencode({"grant_type": "client_credentials"}).encode()
            request = urllib.request.Request(  # noqa: S310 - the configured API URL
                f"{self._api}/accounts/connect/token",
                data=form,
                method="POST",
                headers={"Authorization": f"Basic {self._basic}", "Accept": "application/json"},
            )
            self._token = str(self._request(request)["access_token"])
        return f"Bearer {self._token}"

    def _send(self, method: str, url: str, body: dict[str, Any]) -> Any:
        request = urllib.request.Request(  # noqa: S310 - the configured API URL
            url,
            data=json.dumps(body, separators=(",", ":")).encode(),
            method=method,
            headers={
                "Authorization": self._token_header(),
                "Content-Type": "application/json",
                "Accept": "application/json",
            },
        )
        return self._request(request)

    def create(self, name: str, user_ids: list[str]) -> str:
        answer = self._send("POST", self._segments, {"name": name, "userIds": user_ids})
        for key in ("segmentGuid", "guid", "id"):
            if isinstance(answer, dict) and isinstance(answer.get(key), str):
                return str(answer[key])
        raise PeerError(f"create answered without a segment GUID: {str(answer)[:300]}")

    def update(self, guid: str, action: str, user_ids: list[str]) -> None:
        self._send("PUT", f"{self._segments}/{guid}", {"action": action, "userIds": user_ids})


def read_source(path: Path) -> set[str]:
    """One id per line, surrounding whitespace stripped, empty lines dropped."""
    with path.open(encoding="utf-8-sig") as handle:
        return {line.strip() for line in handle} - {""}


def load_snapshot(path: Path) -> tuple[str | None, set[str]]:
    """The segment's GUID and what WalkMe acknowledged; nothing before the first sync."""
    if not path.exists():
        return None, set()
    document = json.loads(path.read_text(encoding="utf-8"))
    return document["segment_guid"], set(document["members"])


def save_snapshot(path: Path, guid: str, members: set[str]) -> None:
    """Rewrite the whole snapshot atomically: a crash leaves the old or the new one."""
    scratch = path.with_name(path.name + ".tmp")
    with scratch.open("w", encoding="utf-8") as handle:
        json.dump({"segment_guid": guid, "members": list(members)}, handle)
        handle.flush()
        os.fsync(handle.fileno())
    scratch.replace(path)


def batches(ids: Iterable[str], size: int) -> Iterable[list[str]]:
    batch: list[str] = []
    for member in ids:
        batch.append(member)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def sync(walkme: WalkMe, name: str, source: Path, snapshot: Path, size: int) -> tuple[int, int]:
    """Make the WalkMe segment ``name`` hold the ids of ``source``; (added, removed)."""
    wanted = read_source(source)
    guid, acknowledged = load_snapshot(snapshot)
    adds, removes = wanted - acknowledged, acknowledged - wanted
    counts = len(adds), len(removes)
    if guid is None:
        first = next(iter(batches(adds, size)), [])  # a new segment, even an empty one
        guid = walkme.create(name, first)
        acknowledged.update(first)
        save_snapshot(snapshot, guid, acknowledged)
        adds.difference_update(first)
    for action, members in (("remove", removes), ("add", adds)):
        for batch in batches(members, size):
            walkme.update(guid, action, batch)
            if action == "remove":
                acknowledged.difference_update(batch)
            else:
                acknowledged.update(batch)
            save_snapshot(snapshot, guid, acknowledged)
    return counts


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="peer.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--name", required=True, help="the WalkMe segment's name")
    parser.add_argument("--source", required=True, type=Path, help="one id per line")
    parser.add_argument("--snapshot", required=True, type=Path, help="the JSON snapshot file")
    parser.add_argument("--batch", type=int, default=BATCH)
    args = parser.parse_args(argv)
    try:
        walkme = WalkMe(
            os.environ["SYNCD_WALKME_API_URL"],
            os.environ["SYNCD_WALKME_CLIENT_ID"],
            os.environ["SYNCD_WALKME_CLIENT_SECRET"],
            os.environ["SYNCD_WALKME_SYSTEM_GUID"],
        )
    except KeyError as exc:
        print(f"peer: set {exc.args[0]}", file=sys.stderr)
        return 2
    try:
        added, removed = sync(walkme, args.name, args.source, args.snapshot, args.batch)
    except (PeerError, OSError, ValueError, KeyError) as exc:
        print(f"peer: failed: {exc}", file=sys.stderr)
        return 1
    print(f"peer: {args.name}: added {added}, removed {removed}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
