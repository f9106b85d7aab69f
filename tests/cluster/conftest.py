"""Cluster tier: every process is a real OS process on loopback."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Callable

import pytest

from clients.launcher import LocalCluster

pytestmark = pytest.mark.cluster


@pytest.fixture
async def make_cluster(tmp_path) -> AsyncIterator[Callable[..., LocalCluster]]:  # type: ignore[no-untyped-def]
    """Builds LocalClusters in a temp dir; every process is stopped afterwards,
    and a failing test prints the logs' tails."""
    clusters: list[LocalCluster] = []

    def make(env: dict[str, str] | None = None, **kwargs: object) -> LocalCluster:
        cluster = LocalCluster(
            os.path.join(str(tmp_path), f"cluster-{len(clusters)}"), env=env or {}, **kwargs
        )  # type: ignore[arg-type]
        clusters.append(cluster)
        return cluster

    yield make
    for cluster in clusters:
        await cluster.stop(timeout_s=10)
        leftovers = [p.name for p in cluster.procs.values() if p.alive()]
        assert not leftovers, f"processes left running: {leftovers}"


def dump_logs(cluster: LocalCluster) -> str:
    return "\n".join(f"--- {name}\n{cluster.log_tail(name, 15)}" for name in cluster.procs)
