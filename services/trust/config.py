"""Trust settings from the environment (TRUST_*), validated at start."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

from services.common.config import ConfigError, env_float, env_int, env_str
from services.trust.core import ONE_SUCCESS_PRIOR_WEIGHT, TrustSettings, parse_roots

DEFAULT_PORT = 50054


@dataclass(frozen=True)
class TrustConfig:
    settings: TrustSettings
    # SQLite synchronous mode: NORMAL survives kill -9, FULL survives power loss.
    synchronous: str
    # Changes a watcher may have queued before it is told it fell behind.
    watch_queue: int

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> TrustConfig:
        # The cluster's own observers of agents: the broker (receipts) and
        # consensus (equivocation evidence). Both sign what they report.
        raw_roots = env_str("TRUST_ROOTS", "broker,consensus", env=env) or ""
        try:
            roots, pinned = parse_roots(r for r in raw_roots.split(",") if r.strip())
        except Exception as exc:  # InvalidArgument or ValueError from a malformed entry
            raise ConfigError(f"TRUST_ROOTS={raw_roots!r}: {exc}") from None
        settings = TrustSettings(
            base_rate=env_float("TRUST_BASE_RATE", 0.5, lo=0.01, hi=0.99, env=env),
            prior_weight=env_float(
                "TRUST_PRIOR_WEIGHT", ONE_SUCCESS_PRIOR_WEIGHT, lo=0.01, hi=100.0, env=env
            ),
            confidence_evidence=env_float(
                "TRUST_CONFIDENCE_EVIDENCE", 2.0, lo=0.01, hi=1000.0, env=env
            ),
            half_life_days=env_float("TRUST_HALF_LIFE_DAYS", 0.0, lo=0.0, hi=36_500.0, env=env),
            decay_factor=env_float("TRUST_DECAY_FACTOR", 0.5, lo=0.0, hi=0.999, env=env),
            roots=roots,
            pinned_keys=pinned,
            unvouched_cap=env_float("TRUST_UNVOUCHED_CAP", 0.5, lo=0.0, hi=1000.0, env=env),
            standing_depth=env_int("TRUST_STANDING_DEPTH", 2, lo=1, hi=8, env=env),
            credible_level=env_float("TRUST_CREDIBLE_LEVEL", 0.95, lo=0.5, hi=0.999, env=env),
            max_future_skew_s=env_float("TRUST_CLOCK_SKEW_S", 60.0, lo=0.0, hi=86_400.0, env=env),
            watch_history=env_int("TRUST_WATCH_HISTORY", 10_000, lo=10, hi=10_000_000, env=env),
        )
        return cls(
            settings=settings,
            synchronous=env_str(
                "DB_SYNCHRONOUS", "NORMAL", env=env, choices=("NORMAL", "FULL", "EXTRA")
            )
            or "NORMAL",
            watch_queue=env_int("TRUST_WATCH_QUEUE", 4096, lo=16, hi=1_000_000, env=env),
        )


def database_path(data_dir: str) -> str:
    return os.path.join(data_dir, "trust.db")
