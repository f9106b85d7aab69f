"""Market settings from the environment (MARKET_*, REGISTRY_ADDR, TRUST_ADDR),
validated at start."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from services.common.config import env_addr, env_float, env_int, env_str
from services.market.core import MarketSettings

DEFAULT_PORT = 50055


@dataclass(frozen=True)
class MarketConfig:
    settings: MarketSettings
    registry_addr: str
    # None: trust-adjusted auctions are refused (FAILED_PRECONDITION).
    trust_addr: str | None
    registry_timeout_s: float
    trust_timeout_s: float
    # Events a watcher may have queued before it is told it fell behind.
    watch_queue: int
    db_synchronous: str

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> MarketConfig:
        settings = MarketSettings(
            clock_skew_s=env_float("MARKET_CLOCK_SKEW_S", 300.0, lo=1.0, hi=86400.0, env=env),
            max_bids_per_task=env_int(
                "MARKET_MAX_BIDS_PER_TASK", 1000, lo=1, hi=1_000_000, env=env
            ),
            max_open_tasks=env_int("MARKET_MAX_OPEN_TASKS", 100_000, lo=1, hi=100_000_000, env=env),
            watch_history=env_int("MARKET_WATCH_HISTORY", 10_000, lo=10, hi=10_000_000, env=env),
        )
        trust_addr = env_str("TRUST_ADDR", env=env)
        return cls(
            settings=settings,
            registry_addr=env_addr("REGISTRY_ADDR", "127.0.0.1:50051", env=env),
            trust_addr=env_addr("TRUST_ADDR", trust_addr, env=env) if trust_addr else None,
            registry_timeout_s=env_float(
                "MARKET_REGISTRY_TIMEOUT_S", 2.0, lo=0.05, hi=60.0, env=env
            ),
            trust_timeout_s=env_float("MARKET_TRUST_TIMEOUT_S", 2.0, lo=0.05, hi=60.0, env=env),
            watch_queue=env_int("MARKET_WATCH_QUEUE", 4096, lo=16, hi=1_000_000, env=env),
            db_synchronous=env_str(
                "DB_SYNCHRONOUS", "NORMAL", env=env, choices=("NORMAL", "FULL", "EXTRA")
            )
            or "NORMAL",
        )
