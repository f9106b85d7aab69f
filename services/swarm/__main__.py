"""python -m services.swarm: serve voting pools, the hive mind and flocks."""

from services.common.bootstrap import run
from services.swarm.config import DEFAULT_PORT
from services.swarm.servicer import build

if __name__ == "__main__":
    run("swarm", DEFAULT_PORT, build)
