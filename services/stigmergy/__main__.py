"""python -m services.stigmergy: serve the pheromone field."""

from services.common.bootstrap import run
from services.stigmergy.config import DEFAULT_PORT
from services.stigmergy.servicer import build

if __name__ == "__main__":
    run("stigmergy", DEFAULT_PORT, build)
