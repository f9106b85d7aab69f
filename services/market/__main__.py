"""python -m services.market: serve the task market (settings from the environment)."""

from services.common.bootstrap import run
from services.market.config import DEFAULT_PORT
from services.market.servicer import build

if __name__ == "__main__":
    run("market", DEFAULT_PORT, build)
