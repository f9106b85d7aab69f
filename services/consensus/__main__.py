"""python -m services.consensus: serve consensus (settings from the environment)."""

from services.common.bootstrap import run
from services.consensus.config import DEFAULT_PORT
from services.consensus.servicer import build

if __name__ == "__main__":
    run("consensus", DEFAULT_PORT, build)
