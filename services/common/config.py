"""Configuration from environment variables, validated once at start.

Every server reads the same base settings (``ServerConfig``); each service adds
its own in its ``config.py`` with the ``env_*`` helpers here. A bad value stops
the process at start with a message naming the variable, never later.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field

from services.common.validation import require_address


class ConfigError(Exception):
    """A setting is missing or malformed; the message names the variable."""


def _raw(env: Mapping[str, str] | None, name: str) -> str | None:
    value = (env if env is not None else os.environ).get(name)
    if value is None or value.strip() == "":
        return None
    return value.strip()


def env_str(
    name: str,
    default: str | None = None,
    *,
    env: Mapping[str, str] | None = None,
    choices: tuple[str, ...] | None = None,
) -> str | None:
    value = _raw(env, name)
    if value is None:
        return default
    if choices and value not in choices:
        raise ConfigError(f"{name}={value!r}: expected one of {', '.join(choices)}")
    return value


def env_int(
    name: str, default: int, *, lo: int, hi: int, env: Mapping[str, str] | None = None
) -> int:
    value = _raw(env, name)
    if value is None:
        return default
    try:
        number = int(value)
    except ValueError:
        raise ConfigError(f"{name}={value!r}: expected an integer") from None
    if not lo <= number <= hi:
        raise ConfigError(f"{name}={number}: expected {lo}..{hi}")
    return number


def env_float(
    name: str, default: float, *, lo: float, hi: float, env: Mapping[str, str] | None = None
) -> float:
    value = _raw(env, name)
    if value is None:
        return default
    try:
        number = float(value)
    except ValueError:
        raise ConfigError(f"{name}={value!r}: expected a number") from None
    if not math.isfinite(number) or not lo <= number <= hi:
        raise ConfigError(f"{name}={value}: expected a finite number in [{lo}, {hi}]")
    return number


def env_bool(name: str, default: bool, *, env: Mapping[str, str] | None = None) -> bool:
    value = _raw(env, name)
    if value is None:
        return default
    lowered = value.lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise ConfigError(f"{name}={value!r}: expected true or false")


def env_addr(name: str, default: str, *, env: Mapping[str, str] | None = None) -> str:
    """A peer address ``host:port`` (the ``<PEER>_ADDR`` convention)."""
    value = _raw(env, name) or default
    try:
        return require_address(value, name)
    except Exception as exc:  # InvalidArgument: re-raised as a start-up error
        raise ConfigError(f"{name}={value!r}: {exc}") from None


@dataclass(frozen=True)
class TlsConfig:
    """Optional (m)TLS: a certificate and key to serve with, and a CA that
    clients (and, for mTLS, servers) verify peers against."""

    cert_file: str | None
    key_file: str | None
    ca_file: str | None
    require_client_auth: bool

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> TlsConfig | None:
        cert = env_str("TLS_CERT_FILE", env=env)
        key = env_str("TLS_KEY_FILE", env=env)
        ca = env_str("TLS_CA_FILE", env=env)
        if not (cert or key or ca):
            return None
        if bool(cert) != bool(key):
            raise ConfigError("TLS_CERT_FILE and TLS_KEY_FILE must be set together")
        for name, path in (("TLS_CERT_FILE", cert), ("TLS_KEY_FILE", key), ("TLS_CA_FILE", ca)):
            if path and not os.path.isfile(path):
                raise ConfigError(f"{name}={path!r}: no such file")
        return cls(
            cert_file=cert,
            key_file=key,
            ca_file=ca,
            require_client_auth=env_bool("TLS_REQUIRE_CLIENT_AUTH", bool(ca), env=env),
        )

    @staticmethod
    def read(path: str | None) -> bytes | None:
        if not path:
            return None
        with open(path, "rb") as fh:
            return fh.read()


@dataclass(frozen=True)
class ServerConfig:
    """Settings every server shares.

    PORT (0 binds an ephemeral port, reported in READY_FILE), BIND_HOST,
    METRICS_PORT (-1 disables; default PORT+1000, or ephemeral when PORT=0),
    GRACE_PERIOD_S, DRAIN_DELAY_S, MAX_MESSAGE_BYTES, LOG_LEVEL, DATA_DIR,
    READY_FILE, AGENT2028_PARENT_PID (exit when that process is gone), TLS_*.
    """

    service: str
    host: str
    port: int
    metrics_port: int
    grace_s: float
    drain_delay_s: float
    max_message_bytes: int
    log_level: str
    data_dir: str
    ready_file: str | None
    parent_pid: int | None
    tls: TlsConfig | None = field(default=None)

    @classmethod
    def from_env(
        cls, service: str, default_port: int, env: Mapping[str, str] | None = None
    ) -> ServerConfig:
        port = env_int("PORT", default_port, lo=0, hi=65535, env=env)
        default_metrics = 0 if port == 0 else (port + 1000 if port + 1000 <= 65535 else 0)
        parent = env_int("AGENT2028_PARENT_PID", 0, lo=0, hi=2**31 - 1, env=env)
        return cls(
            service=service,
            host=env_str("BIND_HOST", "127.0.0.1", env=env) or "127.0.0.1",
            port=port,
            metrics_port=env_int("METRICS_PORT", default_metrics, lo=-1, hi=65535, env=env),
            grace_s=env_float("GRACE_PERIOD_S", 5.0, lo=0.0, hi=600.0, env=env),
            drain_delay_s=env_float("DRAIN_DELAY_S", 0.0, lo=0.0, hi=120.0, env=env),
            max_message_bytes=env_int(
                "MAX_MESSAGE_BYTES", 4 * 1024 * 1024, lo=4096, hi=64 * 1024 * 1024, env=env
            ),
            log_level=env_str(
                "LOG_LEVEL", "INFO", env=env, choices=("DEBUG", "INFO", "WARNING", "ERROR")
            )
            or "INFO",
            data_dir=env_str("DATA_DIR", os.path.join(".agent2028", "data", service), env=env)
            or ".",
            ready_file=env_str("READY_FILE", env=env),
            parent_pid=parent or None,
            tls=TlsConfig.from_env(env),
        )
