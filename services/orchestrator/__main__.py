"""python -m services.orchestrator: serve the orchestrator (settings from the environment)."""

from services.common.bootstrap import run
from services.orchestrator.config import DEFAULT_PORT
from services.orchestrator.servicer import build

if __name__ == "__main__":
    run("orchestrator", DEFAULT_PORT, build)
