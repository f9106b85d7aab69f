#!/usr/bin/env bash
# Fills deploy/wheels with binary wheels for the image's Python (CPython 3.11
# on manylinux x86_64 or aarch64, whatever the host's own Python is): the
# project's runtime dependencies and what the build stage needs (grpcio-tools,
# the build backend). The image build then needs no network. Idempotent: a
# stamp of the requirements skips the download when nothing changed.
set -euo pipefail
cd "$(dirname "$0")/.."

PIP="${PIP:-pip}"
PY_VERSION="${IMAGE_PYTHON_VERSION:-3.11}"
DEST=deploy/wheels
arch="$(uname -m)"
case "$arch" in
    x86_64 | aarch64) ;;
    *) echo "wheelhouse: no manylinux wheels for $arch; the image will install from PyPI" >&2; exit 0 ;;
esac

reqs="$(python3 deploy/requirements.py runtime; python3 deploy/requirements.py build)"
stamp="$(printf '%s\n%s %s\n' "$reqs" "$PY_VERSION" "$arch" | sha256sum | cut -d' ' -f1)"
if [ -f "$DEST/.stamp" ] && [ "$(cat "$DEST/.stamp")" = "$stamp" ] && ls "$DEST"/*.whl >/dev/null 2>&1; then
    echo "wheelhouse: $(ls "$DEST"/*.whl | wc -l) wheels up to date in $DEST"
    exit 0
fi

rm -f "$DEST"/*.whl "$DEST/.stamp"
platforms=()
for tag in manylinux_2_36 manylinux_2_28 manylinux_2_17 manylinux2014 manylinux_2_5 manylinux1; do
    platforms+=(--platform "${tag}_${arch}")
done
# shellcheck disable=SC2086
"$PIP" download --quiet --only-binary=:all: --dest "$DEST" \
    --python-version "$PY_VERSION" --implementation cp --abi "cp${PY_VERSION/./}" --abi abi3 --abi none \
    "${platforms[@]}" --platform any $(echo "$reqs" | tr '\n' ' ')
echo "$stamp" >"$DEST/.stamp"
echo "wheelhouse: $(ls "$DEST"/*.whl | wc -l) wheels in $DEST"
