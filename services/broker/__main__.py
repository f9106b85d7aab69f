"""python -m services.broker: serve the broker (settings from the environment)."""

from services.broker.config import DEFAULT_PORT
from services.broker.servicer import build
from services.common.bootstrap import run

if __name__ == "__main__":
    run("broker", DEFAULT_PORT, build)
