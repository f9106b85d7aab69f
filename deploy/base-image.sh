#!/usr/bin/env bash
# Prints the name of a base image for deploy/Dockerfile, making one if needed.
#
# The Dockerfile's default base is the official Python slim image, which users
# with a registry simply pull. Where nothing can be pulled (an engine with no
# registry, as on our CI machines) a Debian bookworm root file system with the
# same Python (3.11) is built with debootstrap from the Debian mirror apt
# already uses and imported as agent2028-base:bookworm. Idempotent: an image
# that is already there is used as it is. Logs go to stderr; stdout carries
# only the image name.
#
# Environment: BASE_IMAGE (use exactly this one, pulling it if missing),
# PYTHON_BASE_IMAGE (python:3.11-slim-bookworm), LOCAL_BASE_IMAGE
# (agent2028-base:bookworm), DEBIAN_MIRROR (default: from apt's sources),
# BASE_PULL=0 (do not try to pull).
set -euo pipefail

OFFICIAL="${PYTHON_BASE_IMAGE:-python:3.11-slim-bookworm}"
LOCAL="${LOCAL_BASE_IMAGE:-agent2028-base:bookworm}"
SUITE=bookworm
PACKAGES=python3,python3-venv,ca-certificates,passwd

log() { echo "base-image: $*" >&2; }
have() { docker image inspect "$1" >/dev/null 2>&1; }
try_pull() {
    [ "${BASE_PULL:-1}" != 0 ] || return 1
    log "pulling $1"
    timeout 300 docker pull --quiet "$1" >&2 2>/dev/null
}

if [ -n "${BASE_IMAGE:-}" ]; then
    if have "$BASE_IMAGE" || try_pull "$BASE_IMAGE"; then
        echo "$BASE_IMAGE"
        exit 0
    fi
    log "BASE_IMAGE=$BASE_IMAGE is neither present nor pullable"
    exit 1
fi
for image in "$OFFICIAL" "$LOCAL"; do
    if have "$image"; then
        log "using $image (already present)"
        echo "$image"
        exit 0
    fi
done
if try_pull "$OFFICIAL"; then
    echo "$OFFICIAL"
    exit 0
fi
log "$OFFICIAL cannot be pulled here; building $LOCAL with debootstrap"

as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }

if ! command -v debootstrap >/dev/null 2>&1; then
    log "installing debootstrap from Debian's packages"
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq debootstrap >/dev/null 2>&1 ||
        { as_root apt-get update -qq >&2 &&
            as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq debootstrap >&2; }
fi

# The mirror apt already uses for Debian's main archive (deb822 .sources files
# or one-line .list entries), so the base comes from where packages come from.
mirror() {
    if [ -n "${DEBIAN_MIRROR:-}" ]; then echo "$DEBIAN_MIRROR"; return; fi
    local found
    found="$(cat /etc/apt/sources.list.d/*.sources 2>/dev/null |
        awk '/^URIs:/ {for (i = 2; i <= NF; i++) print $i}' |
        grep -v -e security -e '^cdrom' | grep -m1 -i debian || true)"
    if [ -z "$found" ]; then
        found="$(cat /etc/apt/sources.list /etc/apt/sources.list.d/*.list 2>/dev/null |
            awk '$1 == "deb" { for (i = 2; i <= NF; i++) if ($i ~ /^(https?|file):/) { print $i; break } }' |
            grep -v security | grep -m1 -i debian || true)"
    fi
    echo "${found:-http://deb.debian.org/debian}"
}

root="$(mktemp -d /var/tmp/agent2028-rootfs.XXXXXX)"
cleanup() {
    # debootstrap mounts /proc and /sys inside the target; unmount before removing.
    if [ -d "$root" ]; then
        awk -v r="$root" '$2 ~ "^"r {print $2}' /proc/mounts | sort -r |
            while read -r m; do as_root umount -l "$m" || true; done
        as_root rm -rf --one-file-system "$root"
    fi
}
trap cleanup EXIT

MIRROR="$(mirror)"
log "debootstrap --variant=minbase $SUITE from $MIRROR"
started=$SECONDS
# debootstrap's log is long; it is shown only when it fails.
bootstrap_log="$(mktemp)"
if ! as_root debootstrap --variant=minbase --include="$PACKAGES" "$SUITE" "$root" "$MIRROR" \
    >"$bootstrap_log" 2>&1; then
    tail -n 40 "$bootstrap_log" >&2
    rm -f "$bootstrap_log"
    log "debootstrap failed"
    exit 1
fi
rm -f "$bootstrap_log"
log "debootstrap took $((SECONDS - started)) s"

# Smaller layers import faster: no package caches, lists or documentation.
as_root rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/* \
    "$root"/usr/share/doc/* "$root"/usr/share/man/* "$root"/usr/share/info/* \
    "$root"/var/log/*.log "$root"/var/log/apt/*
as_root chroot "$root" python3 -c 'import ssl, venv, ensurepip; print("python ok")' >&2

started=$SECONDS
as_root tar --numeric-owner -C "$root" -c . | docker import \
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'ENV LANG=C.UTF-8' \
    --change 'CMD ["python3"]' \
    --change "LABEL org.opencontainers.image.title=agent2028-base org.opencontainers.image.description=\"Debian $SUITE minbase with python3 and python3-venv, built by deploy/base-image.sh\"" \
    - "$LOCAL" >&2
log "imported $LOCAL in $((SECONDS - started)) s"
echo "$LOCAL"
