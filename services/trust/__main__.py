"""python -m services.trust: serve the trust service (settings from the environment)."""

from services.common.bootstrap import run
from services.trust.config import DEFAULT_PORT
from services.trust.servicer import build

if __name__ == "__main__":
    run("trust", DEFAULT_PORT, build)
