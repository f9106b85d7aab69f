"""Fixtures shared by the unit, integration and cluster tiers."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator

import pytest

from services.registry.config import RegistryConfig
from services.registry.core import RegistrySettings
from services.registry.servicer import RegistryApp
from tests.support import serve

FAST_REGISTRY = RegistrySettings(
    heartbeat_interval_s=0.2,
    lease_ttl_s=1.0,
    deregister_critical_after_s=0.5,
    failures_before_critical=3,
    successes_before_passing=2,
)


class RunningRegistry:
    def __init__(self, host, app: RegistryApp) -> None:  # type: ignore[no-untyped-def]
        self.host = host
        self.app = app
        self.core = app.core
        self.address = host.address


@pytest.fixture
async def registry_server(tmp_path) -> AsyncIterator[RunningRegistry]:  # type: ignore[no-untyped-def]
    """A real registry server in this process on port 0, with fast timings."""
    # The server's message limit is 1 MiB (tests.support.server_config).
    app = RegistryApp(
        RegistryConfig(settings=FAST_REGISTRY, sweep_interval_s=0.02, watch_queue=64),
        max_message_bytes=1024 * 1024,
    )
    host = await serve(app, str(tmp_path))
    try:
        yield RunningRegistry(host, app)
    finally:
        await host.stop(grace_s=0.5)


@pytest.fixture
def data_dir(tmp_path) -> str:  # type: ignore[no-untyped-def]
    path = os.path.join(str(tmp_path), "data")
    os.makedirs(path, exist_ok=True)
    return path
