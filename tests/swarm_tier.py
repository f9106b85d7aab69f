"""Helpers for the swarm-tier tests: in-process stigmergy and swarm servers
and registered agent identities."""

from __future__ import annotations

import os
from dataclasses import replace

from clients.registry import RegistryClient
from services.common.bootstrap import Host
from services.common.crypto import Identity
from services.stigmergy.config import StigmergyConfig
from services.stigmergy.core import FieldSettings
from services.stigmergy.servicer import StigmergyApp
from services.swarm.config import SwarmConfig
from services.swarm.servicer import SwarmApp
from tests.support import serve


async def register(registry_addr: str, *agent_ids: str) -> dict[str, Identity]:
    """Registers a fresh identity per id (no agent process behind it: the
    lease is long enough for a test)."""
    identities = {agent_id: Identity.generate(agent_id) for agent_id in agent_ids}
    async with RegistryClient(registry_addr) as client:
        for i, identity in enumerate(identities.values()):
            await client.register(
                identity,
                address=f"127.0.0.1:{20000 + i}",
                capabilities=["compute"],
                lease_ttl_s=600,
            )
    return identities


def stigmergy_config(
    registry_addr: str, *, tick_interval_s: float = 0.0, **settings: object
) -> StigmergyConfig:
    base = StigmergyConfig.from_env({"REGISTRY_ADDR": registry_addr})
    return replace(
        base,
        settings=replace(base.settings, **settings) if settings else base.settings,  # type: ignore[arg-type]
        tick_interval_s=tick_interval_s,
        snapshot_interval_s=0.0,
    )


async def start_stigmergy(
    data_dir: str, registry_addr: str, *, tick_interval_s: float = 0.0, **settings: object
) -> tuple[Host, StigmergyApp]:
    app = StigmergyApp(
        stigmergy_config(registry_addr, tick_interval_s=tick_interval_s, **settings),
        os.path.join(data_dir, "stigmergy"),
    )
    return await serve(app, data_dir), app


async def start_swarm(
    data_dir: str, registry_addr: str, env: dict[str, str] | None = None
) -> tuple[Host, SwarmApp]:
    config = SwarmConfig.from_env(
        {"REGISTRY_ADDR": registry_addr, "SWARM_SWEEP_INTERVAL_S": "0.05", **(env or {})}
    )
    app = SwarmApp(config, os.path.join(data_dir, "swarm"))
    return await serve(app, data_dir), app


__all__ = ["FieldSettings", "register", "start_stigmergy", "start_swarm", "stigmergy_config"]
