"""python -m services.registry: serve the registry (settings from the environment)."""

from services.common.bootstrap import run
from services.registry.config import DEFAULT_PORT
from services.registry.servicer import build

if __name__ == "__main__":
    run("registry", DEFAULT_PORT, build)
