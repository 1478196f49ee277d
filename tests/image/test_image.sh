#!/usr/bin/env bash
# End-to-end test of the container image, as a product: build it, run it the way the
# README says (read-only root, /tmp tmpfs, state in a named volume, configuration in
# environment variables only) against a WalkMe sandbox on the host, and check that it
# syncs, stays healthy, logs JSON, runs as non-root, keeps its state across a restart
# and stops cleanly.
#
#   sudo tests/image/test_image.sh
#
# Needs root on a fresh machine (apt-get, dockerd, debootstrap). Expects the project
# venv at .venv with the project installed (`.ci/run` makes it); the sandbox WalkMe
# runs from it on the host. Idempotent: names are unique per run and everything it
# creates (container, volume, sandbox, temp files) is removed on exit; dockerd, the
# base image and the built image are kept for the next run.
#
# Environment overrides:
#   IMAGE          tag to build and test                 (default syncd:local)
#   BASE_IMAGE     base image, built by build-base.sh    (default syncd-base:local)
#   DOCKER         docker client                         (default /usr/bin/docker if present)
#   DOCKER_BUILDKIT  1 builds with BuildKit               (default 0: the legacy builder)
#   PYTHON         host python with syncd installed      (default .venv/bin/python)
#   TIMEOUT        seconds allowed for each wait         (default 90)
#   STOP_TIMEOUT   seconds `docker stop` may take        (default 30)
#   SKIP_BUILD=1   test $IMAGE as it is
set -euo pipefail

script_start=$(date +%s.%N)
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
root=$(cd "$here/../.." && pwd)

IMAGE=${IMAGE:-syncd:local}
BASE_IMAGE=${BASE_IMAGE:-syncd-base:local}
PYTHON=${PYTHON:-$root/.venv/bin/python}
TIMEOUT=${TIMEOUT:-90}
STOP_TIMEOUT=${STOP_TIMEOUT:-30}
SKIP_BUILD=${SKIP_BUILD:-0}
BUILDKIT=${DOCKER_BUILDKIT:-0}
VERSION=$(sed -n 's/^version = "\(.*\)"$/\1/p' "$root/pyproject.toml" | head -n 1)
REVISION=$(git -C "$root" rev-parse HEAD 2>/dev/null || echo unknown)

SEGMENT_NAME="Image test users"
MEMBERS=2500        # ids in the file
BATCH_SIZE=1000     # so the first sync is create + 2 updates, not a single request
SCHEDULE=5s

log() { printf '[test-image] %s\n' "$*" >&2; }
die() { printf '[test-image] FAIL: %s\n' "$*" >&2; exit 1; }
now() { date +%s.%N; }
since() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.2f", b - a }'; }

run_id="$$-$(date +%s)"
container="syncd-image-test-$run_id"
volume="syncd-image-test-$run_id"
work=$(mktemp -d /tmp/syncd-image-test.XXXXXX)
sandbox_pid=""
container_started=0

cleanup() {
    local status=$?
    trap - EXIT INT TERM
    set +e
    if [[ $status -ne 0 ]]; then
        if [[ $container_started -eq 1 ]]; then
            log "last container log lines (stdout+stderr):"
            "$DOCKER" logs --tail 15 "$container" 2>&1 | cut -c1-600 | sed 's/^/    /' >&2
        fi
        if [[ -s $work/sandbox.log ]]; then
            log "sandbox log:"
            tail -n 20 "$work/sandbox.log" | sed 's/^/    /' >&2
        fi
    fi
    if [[ -n ${DOCKER:-} ]]; then
        "$DOCKER" rm -f "$container" >/dev/null 2>&1
        "$DOCKER" volume rm -f "$volume" >/dev/null 2>&1
    fi
    if [[ -n $sandbox_pid ]]; then
        kill "$sandbox_pid" 2>/dev/null && wait "$sandbox_pid" 2>/dev/null
    fi
    rm -rf "$work"
    if [[ $status -eq 0 ]]; then
        log "PASS (total $(since "$script_start")s)"
    else
        log "FAILED (exit $status, after $(since "$script_start")s)"
    fi
    exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# ------------------------------------------------------------------ prerequisites

# Any docker client: the Dockerfile builds with or without BuildKit, and this test
# builds with the legacy builder (DOCKER_BUILDKIT=0) unless DOCKER_BUILDKIT=1 is set.
pick_docker() {
    local candidate
    for candidate in ${DOCKER:-} /usr/bin/docker "$(command -v docker || true)"; do
        if [[ -n $candidate && -x $candidate ]]; then
            echo "$candidate"
            return 0
        fi
    done
    return 1
}

need_root() { [[ $(id -u) -eq 0 ]] || die "$1 needs root: run as root (sudo $0)"; }

missing=()
DOCKER=$(pick_docker || true)
[[ -n $DOCKER ]] && command -v dockerd >/dev/null || missing+=(docker.io)
command -v debootstrap >/dev/null || missing+=(debootstrap)
if [[ ${#missing[@]} -gt 0 ]]; then
    need_root "installing ${missing[*]}"
    log "installing ${missing[*]} with apt-get"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >/dev/null || die "apt-get update failed"
    apt-get install -y -qq "${missing[@]}" >/dev/null || die "apt-get install ${missing[*]} failed"
    DOCKER=$(pick_docker) || die "no docker client after installing docker.io"
fi
log "docker client: $DOCKER ($("$DOCKER" version --format '{{.Client.Version}}' 2>/dev/null))"

# build-base.sh calls plain `docker`: make that the same client.
mkdir -p "$work/bin"
ln -s "$DOCKER" "$work/bin/docker"
export PATH="$work/bin:$PATH"

if ! "$DOCKER" info >/dev/null 2>&1; then
    need_root "starting dockerd"
    log "starting dockerd (--bridge=none --iptables=false, log /var/log/dockerd.log); it is left running"
    setsid dockerd --bridge=none --iptables=false </dev/null >>/var/log/dockerd.log 2>&1 &
    deadline=$((SECONDS + 60))
    until "$DOCKER" info >/dev/null 2>&1; do
        ((SECONDS < deadline)) || { tail -n 20 /var/log/dockerd.log >&2; die "dockerd did not come up within 60s"; }
        sleep 0.5
    done
fi

[[ -x $PYTHON ]] || die "$PYTHON not found: create the project venv first (.ci/run does: python3 -m venv .venv && .venv/bin/pip install -e '.[dev]')"
"$PYTHON" -c 'import syncd.sandbox' 2>/dev/null || die "$PYTHON cannot import syncd.sandbox: install the project into it (pip install -e .)"

# ------------------------------------------------------------------ build

build_start=$(now)
if [[ $SKIP_BUILD == 1 ]]; then
    log "SKIP_BUILD=1: testing $IMAGE as it is"
    "$DOCKER" image inspect "$IMAGE" >/dev/null 2>&1 || die "$IMAGE does not exist"
else
    if [[ $BASE_IMAGE == syncd-base:local ]]; then
        BASE_TAG=$BASE_IMAGE bash "$here/build-base.sh" || die "build-base.sh failed"
    fi
    build_args=(--network host --build-arg "BASE_IMAGE=$BASE_IMAGE" -t "$IMAGE"
        --build-arg "VERSION=$VERSION" --build-arg "REVISION=$REVISION")
    log "building $IMAGE from $root/Dockerfile (base $BASE_IMAGE, DOCKER_BUILDKIT=$BUILDKIT)"
    DOCKER_BUILDKIT=$BUILDKIT "$DOCKER" build "${build_args[@]}" "$root" \
        >"$work/build.log" 2>&1 \
        || { tail -n 40 "$work/build.log" >&2; die "docker build failed"; }
    log "built $IMAGE in $(since "$build_start")s"
fi
# OCI labels name the source, version and commit.
for label in source version revision; do
    value=$("$DOCKER" image inspect -f "{{index .Config.Labels \"org.opencontainers.image.$label\"}}" "$IMAGE")
    [[ -n $value && $value != "<no value>" ]] || die "image label org.opencontainers.image.$label is missing"
done
labelled=$("$DOCKER" image inspect -f '{{index .Config.Labels "org.opencontainers.image.version"}} {{index .Config.Labels "org.opencontainers.image.revision"}}' "$IMAGE")
[[ $SKIP_BUILD == 1 || $labelled == "$VERSION $REVISION" ]] || die "image labels say '$labelled', expected '$VERSION $REVISION'"
# The image holds exactly the locked dependency set.
"$DOCKER" run --rm --network none --entrypoint /opt/syncd/bin/python "$IMAGE" -c '
import importlib.metadata as m
for d in sorted(m.distributions(), key=lambda d: d.metadata["Name"].lower()):
    print(d.metadata["Name"].lower().replace("_", "-") + "==" + d.version)
' | grep -v '^syncd==' >"$work/installed.txt"
sort -o "$work/installed.txt" "$work/installed.txt"
# Locked packages with an environment marker (tzdata on Windows...) may be absent.
grep -E '^[a-z0-9_.-]+==' "$root/requirements.lock" | sed 's/ *\\$//' >"$work/lock-lines.txt"
grep -v ';' "$work/lock-lines.txt" | tr '_' '-' | sort >"$work/locked.txt"
sed 's/ *;.*//' "$work/lock-lines.txt" | tr '_' '-' | sort >"$work/lockable.txt"
extra=$(comm -13 "$work/lockable.txt" "$work/installed.txt")
absent=$(comm -23 "$work/locked.txt" "$work/installed.txt")
[[ -z $extra && -z $absent ]] \
    || die "the image's packages differ from requirements.lock: not locked: ${extra:-none}; missing: ${absent:-none}"
log "labels: version $VERSION, revision ${REVISION:0:12}; packages = requirements.lock ($(wc -l <"$work/locked.txt"))"

image_size=$("$DOCKER" image inspect -f '{{.Size}}' "$IMAGE")
image_user=$("$DOCKER" image inspect -f '{{.Config.User}}' "$IMAGE")
[[ ${image_user%%:*} == 10001 ]] || die "image USER is '$image_user', expected 10001"

# ------------------------------------------------------------------ helpers (python)

# HTTP polling and JSON checks, with the host venv's python (stdlib only).
cat >"$work/probe.py" <<'PY'
import json
import subprocess
import sys
import time
import urllib.error
import urllib.request

# Never go through a proxy: everything here is on 127.0.0.1.
OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def get(url: str) -> tuple[int, bytes]:
    try:
        with OPENER.open(url, timeout=5) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def fail(message: str) -> None:
    print(message, file=sys.stderr)
    sys.exit(1)


def running(docker: str, container: str) -> None:
    """Fail at once, rather than at the timeout, when the container has exited."""
    out = subprocess.run(
        [docker, "inspect", "-f", "{{.State.Running}} {{.State.ExitCode}}", container],
        capture_output=True, text=True, check=False,
    ).stdout.split()
    if out and out[0] == "false":
        fail(f"container {container} exited with status {out[1]} before answering")


def wait_ok(url: str, timeout: float, t0: float, docker: str = "", container: str = "") -> None:
    """Poll until 200; print seconds since t0 (a time.time() value)."""
    deadline = time.time() + timeout
    last = "no answer"
    checked = time.time()
    while time.time() < deadline:
        if container and time.time() - checked > 1:
            running(docker, container)
            checked = time.time()
        try:
            status, body = get(url)
            if status == 200:
                print(f"{time.time() - t0:.2f}")
                return
            last = f"HTTP {status}: {body[:200]!r}"
        except OSError as exc:
            last = str(exc)
        time.sleep(0.02)
    fail(f"{url} did not answer 200 within {timeout:.0f}s (last: {last})")


def state(sandbox: str) -> dict:
    status, body = get(f"{sandbox}/_sandbox/state?members=1")
    if status != 200:
        fail(f"sandbox state: HTTP {status}")
    return json.loads(body)


def no_failed_runs(docker: str, container: str) -> None:
    """Nothing here should ever fail: stop at the first segment.failed line."""
    logs = subprocess.run(
        [docker, "logs", container], capture_output=True, text=True, check=False
    ).stdout
    for line in logs.splitlines():
        if '"segment.failed"' in line or '"segment.internal_error"' in line:
            record = json.loads(line)
            fail(f"a run failed: {record.get('error') or record.get('exception')}")


def wait_segment(
    sandbox: str, name: str, path: str, timeout: float, docker: str = "", container: str = ""
) -> None:
    """Poll until the sandbox holds exactly one segment, named `name`, equal to the file."""
    with open(path, encoding="utf-8") as f:
        want = {line.strip() for line in f if line.strip()}
    deadline = time.time() + timeout
    summary = "no segment yet"
    while time.time() < deadline:
        if container:
            no_failed_runs(docker, container)
        doc = state(sandbox)
        segments = doc["segments"]
        found = [s for s in segments if s["name"] == name]
        if found:
            got = set(found[0]["members"])
            summary = (
                f"{len(segments)} segment(s); {name!r} has {len(got)} members,"
                f" {len(want - got)} missing, {len(got - want)} extra"
            )
            if got == want and len(segments) == 1:
                print(json.dumps({"guid": found[0]["guid"], "size": len(got)}))
                return
        time.sleep(0.2)
    fail(f"segment never matched the file within {timeout:.0f}s: {summary}")


def metrics(url: str, segment: str) -> None:
    """/metrics is Prometheus text with the series the alert rules use, for the segment."""
    status, body = get(url)
    if status != 200:
        fail(f"{url}: HTTP {status}")
    label = 'segment="%s"' % segment
    series: dict[str, list[str]] = {}
    for line in body.decode().splitlines():
        name, brace, rest = line.partition("{")
        if brace and label in rest.split("}", 1)[0]:
            series.setdefault(name, []).append(line)
    for name in ("syncd_last_success_timestamp_seconds", "syncd_segment_runs_total"):
        if name not in series:
            fail(f"{url} has no {name}{{{label}}} series")
    if not any('result="synced"' in line for line in series["syncd_segment_runs_total"]):
        fail(f"{url}: no synced run counted: {series['syncd_segment_runs_total']}")
    (line,) = series["syncd_last_success_timestamp_seconds"]
    age = time.time() - float(line.rsplit(" ", 1)[1])
    if not 0 <= age < 120:
        fail(f"syncd_last_success_timestamp_seconds is {age:.0f}s old: {line}")
    print(f"{age:.1f}")


def counts(sandbox: str) -> None:
    """Segment requests by kind (token/list/create/update/delete), one JSON line."""
    print(json.dumps(state(sandbox)["requests"]["byKind"], sort_keys=True))


def check_logs(path: str) -> None:
    """Every stdout line is a JSON object with an event; print the event counts."""
    seen: dict[str, int] = {}
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                fail(f"stdout line {number} is not JSON: {line[:200]!r}")
            if not isinstance(record, dict) or not isinstance(record.get("event"), str):
                fail(f"stdout line {number} has no 'event': {line[:200]!r}")
            for key in ("timestamp", "level"):
                if key not in record:
                    fail(f"stdout line {number} has no {key!r}: {line[:200]!r}")
            if record["event"] in ("segment.failed", "segment.internal_error", "segment.held"):
                fail(f"stdout line {number}: {line[:600]}")
            seen[record["event"]] = seen.get(record["event"], 0) + 1
    if not seen:
        fail("no log lines on stdout")
    print(json.dumps(seen, sort_keys=True))


def synced(path: str, skip: int) -> None:
    """The segment.synced lines after the first `skip` lines, as 'added removed' pairs."""
    with open(path, encoding="utf-8") as f:
        for line in list(f)[skip:]:
            record = json.loads(line)
            if record.get("event") == "segment.synced":
                print(record.get("added"), record.get("removed"))


command, *args = sys.argv[1:]
if command == "wait-ok":
    wait_ok(args[0], float(args[1]), float(args[2]), *args[3:5])
elif command == "metrics":
    metrics(args[0], args[1])
elif command == "wait-segment":
    wait_segment(args[0], args[1], args[2], float(args[3]), *args[4:6])
elif command == "counts":
    counts(args[0])
elif command == "check-logs":
    check_logs(args[0])
elif command == "synced":
    synced(args[0], int(args[1]))
else:
    fail(f"unknown probe command {command}")
PY
probe() { "$PYTHON" "$work/probe.py" "$@"; }
json_get() { "$PYTHON" -c 'import json, sys; print(json.loads(sys.argv[1]).get(sys.argv[2], 0))' "$1" "$2"; }

free_port() {
    "$PYTHON" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

stdout_log() { "$DOCKER" logs "$container" 2>/dev/null; }
stdout_lines() { stdout_log | wc -l; }

# Wait until the container's stdout has at least $1 segment.synced lines after line $2.
wait_synced() {
    local want=$1 skip=$2 deadline=$((SECONDS + TIMEOUT)) n
    while :; do
        stdout_log >"$work/stdout.log"
        probe check-logs "$work/stdout.log" >/dev/null || die "stdout is not clean JSON lines"
        n=$(probe synced "$work/stdout.log" "$skip" | wc -l)
        ((n >= want)) && return 0
        ((SECONDS < deadline)) || die "only $n segment.synced line(s) after line $skip within ${TIMEOUT}s (wanted $want)"
        [[ $("$DOCKER" inspect -f '{{.State.Running}}' "$container") == true ]] \
            || die "container stopped unexpectedly (exit $("$DOCKER" inspect -f '{{.State.ExitCode}}' "$container"))"
        sleep 0.5
    done
}

# ------------------------------------------------------------------ sandbox WalkMe

log "starting the WalkMe sandbox on the host"
"$PYTHON" -u -m syncd.sandbox --host 127.0.0.1 --port 0 >"$work/sandbox.log" 2>&1 &
sandbox_pid=$!
sandbox_url=""
for _ in $(seq 1 100); do
    sandbox_url=$(sed -n 's/^sandbox listening on \(http[^ ]*\).*/\1/p' "$work/sandbox.log" | head -n1)
    [[ -n $sandbox_url ]] && break
    kill -0 "$sandbox_pid" 2>/dev/null || die "the sandbox exited: $(cat "$work/sandbox.log")"
    sleep 0.1
done
[[ -n $sandbox_url ]] || die "the sandbox did not report its URL within 10s"
sandbox_url=${sandbox_url%/}
system_guid=$("$PYTHON" -c 'from syncd.sandbox import SANDBOX_SYSTEM_GUID as g; print(g)')
client_id=$("$PYTHON" -c 'from syncd.sandbox import DEFAULT_CLIENT_ID as v; print(v)')
client_secret=$("$PYTHON" -c 'from syncd.sandbox import DEFAULT_CLIENT_SECRET as v; print(v)')
log "sandbox at $sandbox_url"

# ------------------------------------------------------------------ the volume and its file

seq -f 'user-%05g@example.com' 1 "$MEMBERS" >"$work/members.txt"
"$DOCKER" volume create "$volume" >/dev/null
# A throw-away container of the image itself writes the file, as uid 10001, into the
# volume (which Docker first fills from the image's /data, owner included).
"$DOCKER" run --rm -i --network none --read-only -v "$volume:/data" --entrypoint sh "$IMAGE" \
    -c 'cat >/data/members.txt' <"$work/members.txt" \
    || die "could not write the members file into volume $volume"

# ------------------------------------------------------------------ run

admin_port=$(free_port)
segments_json=$(printf '[{"name": "%s", "source": {"type": "file", "path": "/data/members.txt"}}]' "$SEGMENT_NAME")
export SYNCD_WALKME_CLIENT_ID=$client_id
export SYNCD_WALKME_CLIENT_SECRET=$client_secret
export SYNCD_WALKME_SYSTEM_GUID=$system_guid
export SYNCD_WALKME_API_URL=$sandbox_url
export SYNCD_SEGMENTS=$segments_json
export SYNCD_ADMIN_PORT=$admin_port
export SYNCD_SCHEDULE=$SCHEDULE
export SYNCD_BATCH_SIZE=$BATCH_SIZE
env_args=()
for name in SYNCD_WALKME_CLIENT_ID SYNCD_WALKME_CLIENT_SECRET SYNCD_WALKME_SYSTEM_GUID \
            SYNCD_WALKME_API_URL SYNCD_SEGMENTS SYNCD_ADMIN_PORT SYNCD_SCHEDULE SYNCD_BATCH_SIZE; do
    env_args+=(-e "$name")   # value from this environment: no secret on the command line
done

log "running $IMAGE as $container (admin port $admin_port, schedule $SCHEDULE)"
t0=$("$PYTHON" -c 'import time; print(time.time())')
"$DOCKER" run -d --name "$container" --network host --read-only --tmpfs /tmp \
    -v "$volume:/data" "${env_args[@]}" "$IMAGE" >/dev/null \
    || die "docker run failed"
container_started=1
startup_s=$(probe wait-ok "http://127.0.0.1:$admin_port/healthz" "$TIMEOUT" "$t0" "$DOCKER" "$container") \
    || die "/healthz never answered 200"
log "/healthz answered 200 ${startup_s}s after docker run"
ready_s=$(probe wait-ok "http://127.0.0.1:$admin_port/readyz" "$TIMEOUT" "$t0" "$DOCKER" "$container") \
    || die "/readyz never answered 200"
log "/readyz answered 200 ${ready_s}s after docker run"

# 1. The WalkMe segment equals the file.
segment=$(probe wait-segment "$sandbox_url" "$SEGMENT_NAME" "$work/members.txt" "$TIMEOUT" \
              "$DOCKER" "$container") \
    || die "the sandbox segment does not equal the file"
log "segment synced: $segment"

# 2. Non-root, read-only root, state in the volume.
uid=$("$DOCKER" exec "$container" id -u) || die "docker exec id -u failed"
[[ $uid == 10001 ]] || die "the daemon runs as uid $uid, expected 10001"
if "$DOCKER" exec -u 0 "$container" sh -c ': >/.write-test' 2>/dev/null; then
    die "the root filesystem is writable (even root could write /)"
fi
"$DOCKER" exec "$container" test -s /data/syncd.db || die "no state file /data/syncd.db in the volume"
log "runs as uid $uid, root filesystem read-only, state in /data/syncd.db"

# 3. A later cycle with the file unchanged sends nothing; stdout is JSON lines.
wait_synced 2 0
stdout_log >"$work/stdout.log"
events=$(probe check-logs "$work/stdout.log") || die "stdout is not JSON lines with an event"
[[ $(json_get "$events" daemon.started) -ge 1 ]] || die "no daemon.started line: $events"
# The first run adds every id; each later one must be "0 0" (added removed).
changes=$(probe synced "$work/stdout.log" 0 | tail -n +2 | grep -v '^0 0$' || true)
[[ -z $changes ]] || die "a later cycle changed something with the file unchanged: $changes"
stderr_lines=$("$DOCKER" logs "$container" 2>&1 >/dev/null | wc -l)
log "stdout: $(wc -l <"$work/stdout.log") JSON lines, events $events; stderr: $stderr_lines line(s)"
metrics_age=$(probe metrics "http://127.0.0.1:$admin_port/metrics" "$SEGMENT_NAME") \
    || die "/metrics lacks what the alert rules need"
log "/metrics: syncd_last_success_timestamp_seconds for the segment is ${metrics_age}s old"
memory=$("$DOCKER" stats --no-stream --format '{{.MemUsage}}' "$container" 2>/dev/null || echo unknown)
log "container memory after the first syncs: $memory"
before=$(probe counts "$sandbox_url")
log "sandbox requests by kind before restart: $before"
[[ $(json_get "$before" create) -eq 1 ]] || die "expected exactly 1 create request, got $before"
expected_updates=$(((MEMBERS + BATCH_SIZE - 1) / BATCH_SIZE - 1))
[[ $(json_get "$before" update) -eq $expected_updates ]] \
    || die "expected $expected_updates update requests ($MEMBERS ids, batches of $BATCH_SIZE), got $before"

# 4. docker restart: the snapshot survives, so the next syncs send no segment request.
lines_before=$(stdout_lines)
restart_t0=$("$PYTHON" -c 'import time; print(time.time())')
"$DOCKER" restart -t "$STOP_TIMEOUT" "$container" >/dev/null || die "docker restart failed"
restart_s=$(probe wait-ok "http://127.0.0.1:$admin_port/healthz" "$TIMEOUT" "$restart_t0" "$DOCKER" "$container") \
    || die "/healthz did not come back after docker restart"
wait_synced 2 "$lines_before"
after=$(probe counts "$sandbox_url")
log "sandbox requests by kind after restart:  $after"
for kind in create update delete; do
    [[ $(json_get "$after" "$kind") -eq $(json_get "$before" "$kind") ]] \
        || die "after restart syncd sent $kind requests (before $before, after $after): state was lost"
done
stdout_log >"$work/stdout.log"
changes=$(probe synced "$work/stdout.log" "$lines_before" | grep -v '^0 0$' || true)
[[ -z $changes ]] || die "a sync after restart changed something (added removed): $changes"
probe wait-segment "$sandbox_url" "$SEGMENT_NAME" "$work/members.txt" 5 >/dev/null \
    || die "the segment changed after restart"
log "restart: state kept, no create/update/delete sent (healthz back in ${restart_s}s)"

# 5. docker stop: SIGTERM, clean exit 0 with daemon.stopped, within the timeout.
stop_t0=$(now)
"$DOCKER" stop -t "$STOP_TIMEOUT" "$container" >/dev/null || die "docker stop failed"
stop_s=$(since "$stop_t0")
exit_code=$("$DOCKER" inspect -f '{{.State.ExitCode}}' "$container")
[[ $exit_code -eq 0 ]] || die "container exited $exit_code on docker stop (137 = killed after ${STOP_TIMEOUT}s)"
awk -v s="$stop_s" -v t="$STOP_TIMEOUT" 'BEGIN { exit !(s < t) }' \
    || die "docker stop took ${stop_s}s (timeout ${STOP_TIMEOUT}s)"
stdout_log >"$work/stdout.log"
tail -n +"$((lines_before + 1))" "$work/stdout.log" >"$work/stdout-after-restart.log"
probe check-logs "$work/stdout.log" >/dev/null || die "stdout is not JSON lines with an event"
grep -q '"event": *"daemon.stopped"' "$work/stdout-after-restart.log" \
    || die "no daemon.stopped log line after docker stop"
log "docker stop: exit 0 with daemon.stopped in ${stop_s}s"

# ------------------------------------------------------------------ report

size_mib=$(awk -v b="$image_size" 'BEGIN { printf "%.1f", b / 1048576 }')
cat >&2 <<EOF
[test-image] ----------------------------------------------------------------
[test-image] image        $IMAGE: $image_size bytes ($size_mib MiB)
[test-image] start-up     docker run -> /healthz 200: ${startup_s}s (/readyz 200: ${ready_s}s)
[test-image] memory       after the first syncs ($MEMBERS ids): $memory
[test-image] restart      docker restart -> /healthz 200: ${restart_s}s
[test-image] stop         docker stop -> exit 0: ${stop_s}s
[test-image] ----------------------------------------------------------------
EOF
