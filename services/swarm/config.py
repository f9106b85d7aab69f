"""Swarm settings from the environment (SWARM_*), validated at start."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from services.common.config import env_addr, env_float, env_int, env_str
from services.swarm.core import SwarmSettings
from services.swarm.flock import FlockSettings

DEFAULT_PORT = 50057


@dataclass(frozen=True)
class SwarmConfig:
    settings: SwarmSettings
    flocks: FlockSettings
    registry_addr: str
    # How long a registered agent's public key is trusted without asking again.
    key_cache_ttl_s: float
    # How often closed pools are announced and expired ones forgotten.
    sweep_interval_s: float
    # Events a watcher may have queued before it is told it fell behind.
    watch_queue: int
    db_synchronous: str

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> SwarmConfig:
        settings = SwarmSettings(
            clock_skew_s=env_float("SWARM_CLOCK_SKEW_S", 300.0, lo=1.0, hi=86400.0, env=env),
            max_open_pools=env_int("SWARM_MAX_OPEN_POOLS", 10_000, lo=1, hi=10_000_000, env=env),
            max_votes_per_pool=env_int(
                "SWARM_MAX_VOTES_PER_POOL", 100_000, lo=1, hi=10_000_000, env=env
            ),
            pool_retention_s=env_float(
                "SWARM_POOL_RETENTION_S", 7 * 86400.0, lo=0.0, hi=3650 * 86400.0, env=env
            ),
            max_beliefs=env_int("SWARM_MAX_BELIEFS", 5_000, lo=1, hi=10_000, env=env),
            max_intentions=env_int("SWARM_MAX_INTENTIONS", 1_000, lo=1, hi=5_000, env=env),
            hive_history=env_int("SWARM_HIVE_HISTORY", 10_000, lo=10, hi=10_000_000, env=env),
        )
        flocks = FlockSettings(
            # GetFlock returns every boid in one answer: 16 bytes each.
            max_boids=env_int("SWARM_MAX_BOIDS", 20_000, lo=1, hi=100_000, env=env),
            max_total_boids=env_int(
                "SWARM_MAX_TOTAL_BOIDS", 200_000, lo=1, hi=100_000_000, env=env
            ),
            max_flocks=env_int("SWARM_MAX_FLOCKS", 64, lo=1, hi=100_000, env=env),
            max_step_work=env_int(
                "SWARM_MAX_STEP_WORK", 5_000_000, lo=1, hi=10_000_000_000, env=env
            ),
        )
        return cls(
            settings=settings,
            flocks=flocks,
            registry_addr=env_addr("REGISTRY_ADDR", "127.0.0.1:50051", env=env),
            key_cache_ttl_s=env_float("SWARM_KEY_CACHE_TTL_S", 30.0, lo=0.0, hi=86400.0, env=env),
            sweep_interval_s=env_float("SWARM_SWEEP_INTERVAL_S", 1.0, lo=0.01, hi=3600.0, env=env),
            watch_queue=env_int("SWARM_WATCH_QUEUE", 4096, lo=16, hi=1_000_000, env=env),
            db_synchronous=env_str(
                "DB_SYNCHRONOUS", "NORMAL", env=env, choices=("NORMAL", "FULL", "EXTRA")
            )
            or "NORMAL",
        )
