"""Compose tier: the cluster as containers (docker-compose.yml), driven by
testcontainers. Where no Docker engine, `docker compose` or image is present
the tier skips and says why; AGENT2028_REQUIRE_DOCKER=1 (set by .ci/run)
turns that skip into a failure."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from tests.compose.testnet import Manifest, Testnet, docker_problem, remove_stale_projects

REQUIRED = os.environ.get("AGENT2028_REQUIRE_DOCKER", "") == "1"
# How long things took (bring-up, convergence after each perturbation),
# printed at the end of the run: the numbers are measured, never asserted
# beyond the invariants' bounds.
TIMINGS: list[str] = []


@pytest.fixture
def notes(request: pytest.FixtureRequest) -> Iterator[list[str]]:
    lines: list[str] = []
    yield lines
    TIMINGS.extend(f"{request.node.name}: {line}" for line in lines)


def pytest_terminal_summary(terminalreporter) -> None:  # type: ignore[no-untyped-def]
    if TIMINGS:
        terminalreporter.section("compose testnet")
        for line in TIMINGS:
            terminalreporter.write_line(line)


@pytest.fixture(scope="session")
def manifest() -> Manifest:
    return Manifest.load()


@pytest.fixture(scope="session")
def testnet(manifest: Manifest) -> Iterator[Testnet]:
    """One cluster for the whole tier (bringing it up is the slow part);
    the tests run in file order against it. Removed with its volumes and
    network at the end."""
    problem = docker_problem()
    if problem:
        if REQUIRED:
            pytest.fail(f"compose tier required (AGENT2028_REQUIRE_DOCKER=1) but {problem}")
        pytest.skip(f"compose tier skipped: {problem}")
    remove_stale_projects()
    net = Testnet(manifest)
    net.start()
    try:
        yield net
    finally:
        net.stop()
