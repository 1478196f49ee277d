#!/usr/bin/env bash
# Build a local Debian bookworm base image (syncd-base:local) with debootstrap,
# for machines that cannot pull python:3.12-slim from a registry.
#
#   sudo tests/image/build-base.sh            # skip if syncd-base:local exists
#   sudo tests/image/build-base.sh --force    # rebuild anyway
#
# Environment overrides:
#   BASE_TAG      image tag to create            (default syncd-base:local)
#   SUITE         Debian suite                   (default bookworm)
#   MIRROR        Debian mirror                  (default: the first .../debian URI in
#                                                 this host's apt sources, else deb.debian.org)
#   HOST_CA       CA bundle copied into rootfs   (default /etc/ssl/certs/ca-certificates.crt;
#                                                 set HOST_CA= to skip)
#   CACHE_DIR     where downloaded .debs are kept between runs
#                                                (default /var/cache/syncd-debootstrap)
set -euo pipefail

BASE_TAG=${BASE_TAG:-syncd-base:local}
SUITE=${SUITE:-bookworm}
HOST_CA=${HOST_CA-/etc/ssl/certs/ca-certificates.crt}
CACHE_DIR=${CACHE_DIR:-/var/cache/syncd-debootstrap}
PACKAGES=python3,python3-venv,python3-pip,ca-certificates

force=0
for arg in "$@"; do
    case "$arg" in
        --force|-f) force=1 ;;
        -h|--help) sed -n '2,17p' "$0"; exit 0 ;;
        *) echo "unknown argument: $arg" >&2; exit 2 ;;
    esac
done

log() { printf '[build-base] %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

start=$(date +%s)

command -v docker >/dev/null || die "docker not found (apt-get install -y docker.io)"
docker info >/dev/null 2>&1 || die "docker daemon not reachable (start dockerd first)"

if [[ $force -eq 0 ]] && docker image inspect "$BASE_TAG" >/dev/null 2>&1; then
    log "$BASE_TAG already exists; nothing to do (use --force to rebuild)"
    exit 0
fi

[[ $(id -u) -eq 0 ]] || die "must run as root (debootstrap needs it)"
command -v debootstrap >/dev/null || die "debootstrap not found (apt-get install -y debootstrap)"

if [[ -z ${MIRROR:-} ]]; then
    # deb822 "URIs:" lines and one-line "deb URI suite ..." entries; take the main archive.
    MIRROR=$(grep -hsE '^\s*(URIs:|deb\s)' /etc/apt/sources.list /etc/apt/sources.list.d/*.list \
                 /etc/apt/sources.list.d/*.sources 2>/dev/null \
             | grep -oE '(https?|file)://[^ ]*/debian/?( |$)' | head -n1 | tr -d ' ' || true)
    MIRROR=${MIRROR:-http://deb.debian.org/debian}
fi
MIRROR=${MIRROR%/}
SECURITY_MIRROR=${SECURITY_MIRROR:-${MIRROR}-security}

workdir=$(mktemp -d /var/tmp/syncd-base.XXXXXX)
rootfs="$workdir/rootfs"
cleanup() {
    # debootstrap may leave proc/sys mounted if it fails half-way.
    for m in proc sys dev/pts dev; do
        mountpoint -q "$rootfs/$m" 2>/dev/null && umount -l "$rootfs/$m" || true
    done
    rm -rf "$workdir"
}
trap cleanup EXIT

mkdir -p "$CACHE_DIR" "$rootfs/etc/dpkg/dpkg.cfg.d"
# Keep docs/man pages/non-English locales out of the image from the very first package.
cat >"$rootfs/etc/dpkg/dpkg.cfg.d/01-nodoc" <<'EOF'
path-exclude=/usr/share/doc/*
path-include=/usr/share/doc/*/copyright
path-exclude=/usr/share/man/*
path-exclude=/usr/share/info/*
path-exclude=/usr/share/groff/*
path-exclude=/usr/share/lintian/*
path-exclude=/usr/share/linda/*
path-exclude=/usr/share/locale/*
path-include=/usr/share/locale/locale.alias
EOF

log "debootstrap $SUITE (minbase + $PACKAGES) from $MIRROR"
debootstrap --variant=minbase --include="$PACKAGES" --cache-dir="$CACHE_DIR" \
    "$SUITE" "$rootfs" "$MIRROR" >"$workdir/debootstrap.log" 2>&1 \
    || { tail -n 40 "$workdir/debootstrap.log" >&2; die "debootstrap failed"; }

# apt sources for anyone extending the image later.
cat >"$rootfs/etc/apt/sources.list" <<EOF
deb $MIRROR $SUITE main
deb $MIRROR $SUITE-updates main
deb $SECURITY_MIRROR $SUITE-security main
EOF

# Container-friendly apt: no recommends, no caches left behind.
cat >"$rootfs/etc/apt/apt.conf.d/90container" <<'EOF'
APT::Install-Recommends "false";
APT::Install-Suggests "false";
DPkg::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };
Acquire::GzipIndexes "true";
EOF

# `python` must resolve like it does in python:3.12-slim.
if [[ ! -e $rootfs/usr/bin/python ]]; then
    ln -s python3 "$rootfs/usr/bin/python"
fi

# pip inside builds from this base must trust whatever this host trusts
# (e.g. a TLS-intercepting egress proxy).
if [[ -n $HOST_CA ]]; then
    [[ -r $HOST_CA ]] || die "HOST_CA=$HOST_CA not readable"
    install -m 0644 "$HOST_CA" "$rootfs/etc/ssl/certs/ca-certificates.crt"
fi

# Slim down.
chroot "$rootfs" apt-get clean
rm -rf "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/cache/apt/*.bin \
       "$rootfs"/var/cache/debconf/*-old "$rootfs"/var/lib/dpkg/*-old \
       "$rootfs"/var/log/*.log "$rootfs"/var/log/apt/* "$rootfs"/tmp/* \
       "$rootfs"/usr/share/doc/*/[!c]* "$rootfs"/usr/share/man/* "$rootfs"/usr/share/info/*
find "$rootfs/usr/share/locale" -mindepth 1 -maxdepth 1 ! -name locale.alias -exec rm -rf {} + 2>/dev/null || true
: >"$rootfs/etc/resolv.conf"
echo "$SUITE-syncd-base" >"$rootfs/etc/hostname"

log "importing rootfs as $BASE_TAG"
tar --numeric-owner -C "$rootfs" \
    --exclude='./dev/*' --exclude='./proc/*' --exclude='./sys/*' -c . \
  | docker import \
      --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
      --change 'ENV LANG=C.UTF-8' \
      --change 'CMD ["python3"]' \
      --message "debootstrap $SUITE minbase + $PACKAGES" \
      - "$BASE_TAG" >/dev/null

docker run --rm --network none "$BASE_TAG" python -c 'import sys, venv, ssl; print("python", sys.version.split()[0])' >&2 \
    || die "smoke test of $BASE_TAG failed"

size=$(docker image inspect -f '{{.Size}}' "$BASE_TAG")
log "built $BASE_TAG ($((size / 1024 / 1024)) MiB) in $(( $(date +%s) - start ))s"
