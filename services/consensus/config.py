"""Consensus settings from the environment (CONSENSUS_*, REGISTRY_ADDR,
TRUST_ADDR, DB_SYNCHRONOUS), validated at start."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from services.common.config import ConfigError, env_addr, env_float, env_int, env_str
from services.common.errors import InvalidArgument
from services.common.validation import require_id
from services.consensus.core import ConsensusSettings

DEFAULT_PORT = 50053


@dataclass(frozen=True)
class ConsensusConfig:
    settings: ConsensusSettings
    registry_addr: str
    # None: evidence reports wait in the outbox until trust is configured.
    trust_addr: str | None
    # Who trust records as having observed an equivocation; reports are signed
    # with this identity's key (CONSENSUS_KEY_FILE, default DATA_DIR/consensus.key)
    # so trust can give the service the standing of a root.
    observer_id: str
    # Processes verifying signatures; 0 verifies on the event loop.
    verify_workers: int
    # Events a watcher may have queued before it is told it fell behind.
    watch_queue: int
    # Bound on the registry calls that resolve an electorate.
    registry_timeout_s: float
    db_synchronous: str
    # None: DATA_DIR/consensus.key.
    key_file: str | None = None

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> ConsensusConfig:
        settings = ConsensusSettings(
            default_voting_period_s=env_float(
                "CONSENSUS_DEFAULT_VOTING_PERIOD_S", 30.0, lo=0.01, hi=30 * 86400.0, env=env
            ),
            max_voting_period_s=env_float(
                "CONSENSUS_MAX_VOTING_PERIOD_S", 7 * 86400.0, lo=0.01, hi=365 * 86400.0, env=env
            ),
            max_electorate=env_int("CONSENSUS_MAX_ELECTORATE", 5000, lo=1, hi=10_000, env=env),
            max_open_proposals=env_int(
                "CONSENSUS_MAX_OPEN_PROPOSALS", 10_000, lo=1, hi=1_000_000, env=env
            ),
        )
        if settings.default_voting_period_s > settings.max_voting_period_s:
            raise ConfigError(
                "CONSENSUS_DEFAULT_VOTING_PERIOD_S must not exceed CONSENSUS_MAX_VOTING_PERIOD_S"
            )
        observer = env_str("CONSENSUS_TRUST_OBSERVER_ID", "consensus", env=env) or "consensus"
        try:
            require_id(observer, "CONSENSUS_TRUST_OBSERVER_ID")
        except InvalidArgument as exc:
            raise ConfigError(f"CONSENSUS_TRUST_OBSERVER_ID={observer!r}: {exc}") from None
        trust = env_str("TRUST_ADDR", env=env)
        return cls(
            settings=settings,
            registry_addr=env_addr("REGISTRY_ADDR", "127.0.0.1:50051", env=env),
            trust_addr=env_addr("TRUST_ADDR", trust, env=env) if trust else None,
            observer_id=observer,
            key_file=env_str("CONSENSUS_KEY_FILE", env=env),
            verify_workers=env_int("CONSENSUS_VERIFY_WORKERS", 1, lo=0, hi=64, env=env),
            watch_queue=env_int("CONSENSUS_WATCH_QUEUE", 4096, lo=16, hi=1_000_000, env=env),
            registry_timeout_s=env_float(
                "CONSENSUS_REGISTRY_TIMEOUT_S", 5.0, lo=0.1, hi=300.0, env=env
            ),
            db_synchronous=env_str(
                "DB_SYNCHRONOUS", "NORMAL", env=env, choices=("NORMAL", "FULL", "EXTRA")
            )
            or "NORMAL",
        )
