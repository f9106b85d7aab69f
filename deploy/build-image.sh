#!/usr/bin/env bash
# `make image`: the project image (agent2028:latest) from deploy/Dockerfile.
#
# 1. a base image: the official Python slim one when present or pullable,
#    else one built locally (deploy/base-image.sh);
# 2. a wheelhouse, so the build installs without PyPI (deploy/wheelhouse.sh);
# 3. docker build, whose layer cache makes a rebuild of unchanged code quick.
# Idempotent; one build at a time on a machine (a lock), since a second one
# would only redo the same work.
set -euo pipefail
cd "$(dirname "$0")/.."

IMAGE="${IMAGE:-agent2028:latest}"
log() { echo "image: $*" >&2; }

exec 9>"${TMPDIR:-/tmp}/agent2028-image.lock"
flock 9

started=$SECONDS
base="$(bash deploy/base-image.sh)"
log "base $base ready after $((SECONDS - started)) s"

bash deploy/wheelhouse.sh

mkdir -p deploy/.build
build_log=deploy/.build/image.log
BUILD_STAGE="${IMAGE%%:*}-build:latest"
previous="$(docker image inspect -f '{{.Id}}' "$IMAGE" "$BUILD_STAGE" 2>/dev/null || true)"
started=$SECONDS
log "building $IMAGE from deploy/Dockerfile (log: $build_log)"
# The build stage is tagged too (agent2028-build), so the layer cache it holds
# has a name and the one it replaces can be removed like the image's.
if ! { docker build --force-rm -f deploy/Dockerfile --build-arg "BASE_IMAGE=$base" \
    --target build -t "$BUILD_STAGE" . &&
    docker build --force-rm -f deploy/Dockerfile --build-arg "BASE_IMAGE=$base" \
        --label "org.opencontainers.image.title=agent2028" -t "$IMAGE" .; } >"$build_log" 2>&1; then
    tail -n 40 "$build_log" >&2
    log "docker build failed"
    exit 1
fi
# What this build replaced, if nothing else names or runs it, is only disk
# now (the dependency layers are shared with the new images).
for old in $previous; do
    if [ "$(docker image inspect -f '{{len .RepoTags}}' "$old" 2>/dev/null)" = 0 ] &&
        [ -z "$(docker ps -aq --filter "ancestor=$old")" ]; then
        docker rmi "$old" >/dev/null 2>&1 || true
    fi
done
log "$IMAGE built in $((SECONDS - started)) s ($(docker image inspect -f '{{.Size}}' "$IMAGE" | awk '{printf "%d MB", $1 / 1e6}'))"
