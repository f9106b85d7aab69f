"""Prints the requirements the image installs, read from pyproject.toml.

``runtime``: the project's dependencies; ``build``: what the build stage needs
besides them (grpcio-tools at the version pinned for development, so generated
code matches grpcio, and the build backend). One source of truth for
deploy/wheelhouse.sh and deploy/Dockerfile.
"""

from __future__ import annotations

import sys
import tomllib
from pathlib import Path


def requirements(kind: str, pyproject: Path) -> list[str]:
    data = tomllib.loads(pyproject.read_text(encoding="utf-8"))
    if kind == "runtime":
        return list(data["project"]["dependencies"])
    if kind == "build":
        dev = data["project"]["optional-dependencies"]["dev"]
        tools = [r for r in dev if r.replace(" ", "").startswith("grpcio-tools")]
        return tools + list(data["build-system"]["requires"]) + ["wheel"]
    raise SystemExit(f"usage: requirements.py runtime|build [pyproject.toml], not {kind!r}")


if __name__ == "__main__":
    kind = sys.argv[1] if len(sys.argv) > 1 else ""
    path = Path(sys.argv[2] if len(sys.argv) > 2 else "pyproject.toml")
    print("\n".join(requirements(kind, path)))
