"""Stigmergy settings from the environment (STIGMERGY_*), validated at start."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from services.common.config import ConfigError, env_addr, env_float, env_int, env_str
from services.stigmergy.core import TYPE_RE, FieldSettings

DEFAULT_PORT = 50056
# Cells per layer; each costs 12 bytes (the layer, its spare, the scratch).
MAX_CELLS = 16_000_000


@dataclass(frozen=True)
class StigmergyConfig:
    settings: FieldSettings
    registry_addr: str
    # Seconds between ticks; 0 turns the background tick off (a static field).
    tick_interval_s: float
    # Seconds between snapshots of the field to DATA_DIR; 0 saves only on shutdown.
    snapshot_interval_s: float
    key_cache_ttl_s: float

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> StigmergyConfig:
        width = env_int("STIGMERGY_WIDTH", 1000, lo=1, hi=20_000, env=env)
        height = env_int("STIGMERGY_HEIGHT", 1000, lo=1, hi=20_000, env=env)
        if width * height > MAX_CELLS:
            raise ConfigError(
                f"STIGMERGY_WIDTH x STIGMERGY_HEIGHT = {width * height} cells; at most {MAX_CELLS}"
            )
        raw_types = env_str("STIGMERGY_TYPES", "", env=env) or ""
        types = tuple(dict.fromkeys(t.strip() for t in raw_types.split(",") if t.strip()))
        for name in types:
            if not TYPE_RE.fullmatch(name) or len(name) > 64:
                raise ConfigError(
                    f"STIGMERGY_TYPES: {name!r} is not a lowercase word of [a-z0-9_-]"
                )
        max_types = env_int("STIGMERGY_MAX_TYPES", 16, lo=1, hi=256, env=env)
        if len(types) > max_types:
            raise ConfigError(
                f"STIGMERGY_TYPES declares {len(types)} types; STIGMERGY_MAX_TYPES is {max_types}"
            )
        max_radius = env_int("STIGMERGY_MAX_SENSE_RADIUS", 500, lo=1, hi=5000, env=env)
        default_radius = env_int("STIGMERGY_SENSE_RADIUS", 150, lo=1, hi=5000, env=env)
        if default_radius > max_radius:
            raise ConfigError(
                f"STIGMERGY_SENSE_RADIUS ({default_radius}) must not exceed "
                f"STIGMERGY_MAX_SENSE_RADIUS ({max_radius})"
            )
        max_intensity = env_float("STIGMERGY_MAX_INTENSITY", 1000.0, lo=1e-6, hi=1e30, env=env)
        settings = FieldSettings(
            width=width,
            height=height,
            types=types,
            max_types=max_types,
            decay_rate=env_float("STIGMERGY_DECAY_RATE", 0.1, lo=0.0, hi=0.999999, env=env),
            diffusion_rate=env_float("STIGMERGY_DIFFUSION_RATE", 0.05, lo=0.0, hi=1.0, env=env),
            max_intensity=max_intensity,
            min_intensity=env_float("STIGMERGY_MIN_INTENSITY", 1e-4, lo=0.0, hi=1e30, env=env),
            default_amount=min(
                env_float("STIGMERGY_DEFAULT_AMOUNT", 1.0, lo=1e-9, hi=1e30, env=env),
                max_intensity,
            ),
            deposit_rate=env_float("STIGMERGY_DEPOSIT_RATE", 50.0, lo=0.001, hi=1e9, env=env),
            deposit_burst=env_float("STIGMERGY_DEPOSIT_BURST", 100.0, lo=1.0, hi=1e9, env=env),
            clock_skew_s=env_float("STIGMERGY_CLOCK_SKEW_S", 300.0, lo=1.0, hi=86400.0, env=env),
            default_sense_radius=default_radius,
            max_sense_radius=max_radius,
        )
        return cls(
            settings=settings,
            registry_addr=env_addr("REGISTRY_ADDR", "127.0.0.1:50051", env=env),
            tick_interval_s=env_float(
                "STIGMERGY_TICK_INTERVAL_S", 1.0, lo=0.0, hi=86400.0, env=env
            ),
            snapshot_interval_s=env_float(
                "STIGMERGY_SNAPSHOT_INTERVAL_S", 10.0, lo=0.0, hi=86400.0, env=env
            ),
            key_cache_ttl_s=env_float(
                "STIGMERGY_KEY_CACHE_TTL_S", 30.0, lo=0.0, hi=86400.0, env=env
            ),
        )
