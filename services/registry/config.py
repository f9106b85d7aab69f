"""Registry settings from the environment (REGISTRY_*), validated at start."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from services.common.config import ConfigError, env_float, env_int
from services.registry.core import RegistrySettings

DEFAULT_PORT = 50051


@dataclass(frozen=True)
class RegistryConfig:
    settings: RegistrySettings
    # How often the sweeper looks for late and critical agents.
    sweep_interval_s: float
    # Events a watcher may have queued before it is told it fell behind.
    watch_queue: int

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> RegistryConfig:
        settings = RegistrySettings(
            lease_ttl_s=env_float("REGISTRY_LEASE_TTL_S", 10.0, lo=0.2, hi=3600.0, env=env),
            min_lease_ttl_s=env_float("REGISTRY_MIN_LEASE_TTL_S", 1.0, lo=0.1, hi=3600.0, env=env),
            max_lease_ttl_s=env_float(
                "REGISTRY_MAX_LEASE_TTL_S", 3600.0, lo=0.2, hi=86400.0, env=env
            ),
            heartbeat_interval_s=env_float(
                "REGISTRY_HEARTBEAT_INTERVAL_S", 2.0, lo=0.05, hi=600.0, env=env
            ),
            failures_before_critical=env_int(
                "REGISTRY_FAILURES_BEFORE_CRITICAL", 3, lo=1, hi=100, env=env
            ),
            successes_before_passing=env_int(
                "REGISTRY_SUCCESSES_BEFORE_PASSING", 2, lo=1, hi=100, env=env
            ),
            health_threshold=env_float("REGISTRY_HEALTH_THRESHOLD", 0.5, lo=0.0, hi=1.0, env=env),
            deregister_critical_after_s=env_float(
                "REGISTRY_DEREGISTER_CRITICAL_AFTER_S", 30.0, lo=0.0, hi=86400.0, env=env
            ),
            clock_skew_s=env_float("REGISTRY_CLOCK_SKEW_S", 300.0, lo=1.0, hi=86400.0, env=env),
            reliability_prior=env_float("REGISTRY_RELIABILITY_PRIOR", 0.9, lo=0.0, hi=1.0, env=env),
            reliability_alpha=env_float(
                "REGISTRY_RELIABILITY_ALPHA", 0.2, lo=0.001, hi=1.0, env=env
            ),
            latency_alpha=env_float("REGISTRY_LATENCY_ALPHA", 0.3, lo=0.001, hi=1.0, env=env),
            watch_history=env_int("REGISTRY_WATCH_HISTORY", 10_000, lo=10, hi=10_000_000, env=env),
        )
        if settings.heartbeat_interval_s >= settings.lease_ttl_s:
            raise ConfigError(
                f"REGISTRY_HEARTBEAT_INTERVAL_S ({settings.heartbeat_interval_s}) must be shorter than "
                f"REGISTRY_LEASE_TTL_S ({settings.lease_ttl_s})"
            )
        if settings.min_lease_ttl_s > settings.max_lease_ttl_s:
            raise ConfigError("REGISTRY_MIN_LEASE_TTL_S must not exceed REGISTRY_MAX_LEASE_TTL_S")
        default_sweep = min(max(settings.heartbeat_interval_s / 4, 0.02), 1.0)
        return cls(
            settings=settings,
            sweep_interval_s=env_float(
                "REGISTRY_SWEEP_INTERVAL_S", default_sweep, lo=0.01, hi=60.0, env=env
            ),
            watch_queue=env_int("REGISTRY_WATCH_QUEUE", 4096, lo=16, hi=1_000_000, env=env),
        )
