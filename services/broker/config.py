"""Broker settings from the environment (BROKER_*, REGISTRY_ADDR, TRUST_ADDR),
validated at start."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

from services.broker.core import BrokerSettings
from services.common.config import ConfigError, env_addr, env_float, env_int, env_str
from services.common.validation import require_id

DEFAULT_PORT = 50052


@dataclass(frozen=True)
class BrokerConfig:
    settings: BrokerSettings
    registry_addr: str
    trust_addr: str
    # The broker's Ed25519 key (a 32-byte hex seed), made on first start.
    key_file: str
    # Deadline of each call to the registry and the trust service.
    peer_timeout_s: float
    synchronous: str
    outbox_batch: int
    outbox_max_backoff_s: float
    outbox_linger_s: float

    @classmethod
    def from_env(cls, data_dir: str, env: Mapping[str, str] | None = None) -> BrokerConfig:
        broker_id = env_str("BROKER_ID", "broker", env=env) or "broker"
        try:
            require_id(broker_id, "BROKER_ID")
        except Exception as exc:
            raise ConfigError(f"BROKER_ID={broker_id!r}: {exc}") from None
        settings = BrokerSettings(
            broker_id=broker_id,
            max_attempts=env_int("BROKER_MAX_ATTEMPTS", 3, lo=1, hi=10, env=env),
            default_deadline_s=env_float(
                "BROKER_DEFAULT_DEADLINE_S", 30.0, lo=0.01, hi=3600.0, env=env
            ),
            min_deadline_s=env_float("BROKER_MIN_DEADLINE_MS", 10.0, lo=0.0, hi=60_000.0, env=env)
            / 1000.0,
            max_deadline_s=env_float("BROKER_MAX_DEADLINE_S", 3600.0, lo=1.0, hi=86_400.0, env=env),
            candidates=env_int("BROKER_CANDIDATES", 16, lo=1, hi=1000, env=env),
            candidate_ttl_s=env_float("BROKER_CANDIDATE_TTL_S", 0.25, lo=0.0, hi=60.0, env=env),
            stale_candidates_s=env_float(
                "BROKER_STALE_CANDIDATES_S", 10.0, lo=0.0, hi=3600.0, env=env
            ),
            suspect_s=env_float("BROKER_SUSPECT_S", 5.0, lo=0.0, hi=3600.0, env=env),
        )
        if settings.default_deadline_s > settings.max_deadline_s:
            raise ConfigError("BROKER_DEFAULT_DEADLINE_S must not exceed BROKER_MAX_DEADLINE_S")
        return cls(
            settings=settings,
            registry_addr=env_addr("REGISTRY_ADDR", "127.0.0.1:50051", env=env),
            trust_addr=env_addr("TRUST_ADDR", "127.0.0.1:50054", env=env),
            key_file=env_str("BROKER_KEY_FILE", os.path.join(data_dir, "broker.key"), env=env)
            or os.path.join(data_dir, "broker.key"),
            peer_timeout_s=env_float("BROKER_PEER_TIMEOUT_S", 2.0, lo=0.05, hi=60.0, env=env),
            synchronous=env_str(
                "DB_SYNCHRONOUS", "NORMAL", env=env, choices=("NORMAL", "FULL", "EXTRA")
            )
            or "NORMAL",
            outbox_batch=env_int("BROKER_OUTBOX_BATCH", 32, lo=1, hi=1000, env=env),
            outbox_max_backoff_s=env_float(
                "BROKER_OUTBOX_MAX_BACKOFF_S", 5.0, lo=0.01, hi=600.0, env=env
            ),
            outbox_linger_s=env_float("BROKER_OUTBOX_LINGER_MS", 20.0, lo=0.0, hi=10_000.0, env=env)
            / 1000.0,
        )


def database_path(data_dir: str) -> str:
    return os.path.join(data_dir, "broker.db")
