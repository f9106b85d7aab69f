"""Fixtures of the market's integration tests (see support.py)."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator

import pytest

from clients.registry import RegistryClient
from services.common.bootstrap import Host
from services.registry.config import RegistryConfig
from services.registry.servicer import RegistryApp
from tests.integration.market.support import (
    CALM_REGISTRY,
    RunningMarket,
    TrustApp,
    TrustDouble,
)
from tests.support import serve


@pytest.fixture
async def calm_registry(tmp_path) -> AsyncIterator[Host]:  # type: ignore[no-untyped-def]
    app = RegistryApp(
        RegistryConfig(settings=CALM_REGISTRY, sweep_interval_s=0.05, watch_queue=4096)
    )
    host = await serve(app, os.path.join(str(tmp_path), "registry"))
    try:
        yield host
    finally:
        await host.stop(grace_s=0.5)


@pytest.fixture
async def trust_double(tmp_path) -> AsyncIterator[tuple[Host, TrustDouble]]:  # type: ignore[no-untyped-def]
    app = TrustApp()
    host = await serve(app, os.path.join(str(tmp_path), "trust"))
    try:
        yield host, app.servicer
    finally:
        await host.stop(grace_s=0.2)


@pytest.fixture
async def market(tmp_path, calm_registry, trust_double) -> AsyncIterator[RunningMarket]:  # type: ignore[no-untyped-def]
    running = RunningMarket(
        os.path.join(str(tmp_path), "market"), calm_registry.address, trust_double[0].address
    )
    await running.start()
    try:
        yield running
    finally:
        await running.stop()


@pytest.fixture
async def registry(calm_registry) -> AsyncIterator[RegistryClient]:  # type: ignore[no-untyped-def]
    async with RegistryClient(calm_registry.address) as client:
        yield client
