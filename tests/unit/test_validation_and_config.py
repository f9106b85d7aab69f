"""Request validation helpers and environment configuration."""

from __future__ import annotations

import pytest

from services.common.config import (
    ConfigError,
    ServerConfig,
    TlsConfig,
    env_addr,
    env_bool,
    env_float,
    env_int,
)
from services.common.errors import InvalidArgument
from services.common.validation import (
    decode_page_token,
    encode_page_token,
    page_size,
    require_address,
    require_capability,
    require_finite,
    require_id,
)
from services.registry.config import RegistryConfig


@pytest.mark.parametrize("value", ["agent-1", "A.b_c:d-9", "x" * 128])
def test_good_ids(value: str) -> None:
    assert require_id(value, "id") == value


@pytest.mark.parametrize("value", ["", "x" * 129, "-lead", "has space", "ünï", "a/b"])
def test_bad_ids_name_the_field(value: str) -> None:
    with pytest.raises(InvalidArgument) as err:
        require_id(value, "card.agent_id")
    assert err.value.field == "card.agent_id"
    assert err.value.metadata["field"] == "card.agent_id"


@pytest.mark.parametrize(
    "value", ["localhost:1", "10.0.0.1:50051", "[::1]:8080", "agent-7.swarm.svc:65535"]
)
def test_good_addresses(value: str) -> None:
    assert require_address(value, "address") == value


@pytest.mark.parametrize(
    "value", ["", "nohost", ":80", "host:0", "host:65536", "host:http", "[zz::1]:80", "bad_host!:1"]
)
def test_bad_addresses(value: str) -> None:
    with pytest.raises(InvalidArgument):
        require_address(value, "address")


@pytest.mark.parametrize(
    "value", ["database.query", "ml.inference", "gpu", "test.command", "a-b.c_d2"]
)
def test_good_capabilities(value: str) -> None:
    assert require_capability(value, "c") == value


@pytest.mark.parametrize(
    "value", ["", "Database.query", "db..query", ".db", "db.", "db query", "x" * 65]
)
def test_bad_capabilities(value: str) -> None:
    with pytest.raises(InvalidArgument):
        require_capability(value, "c")


def test_finite_numbers() -> None:
    assert require_finite(0.5, "x", lo=0, hi=1) == 0.5
    for bad in (float("nan"), float("inf"), -0.1, 1.1):
        with pytest.raises(InvalidArgument):
            require_finite(bad, "x", lo=0, hi=1)
    with pytest.raises(InvalidArgument):
        require_finite(0.0, "x", lo=0, lo_open=True)


def test_page_size_and_tokens() -> None:
    assert page_size(0) == 100
    assert page_size(5000) == 1000
    with pytest.raises(InvalidArgument):
        page_size(-1)
    token = encode_page_token({"after": "agent-9"})
    assert decode_page_token(token) == {"after": "agent-9"}
    assert decode_page_token("") == {}
    for bad in ("%%%", "bm90IGpzb24", "W10"):
        with pytest.raises(InvalidArgument):
            decode_page_token(bad)


def test_env_helpers_reject_bad_values() -> None:
    assert env_int("N", 3, lo=1, hi=5, env={}) == 3
    assert env_int("N", 3, lo=1, hi=5, env={"N": "4"}) == 4
    with pytest.raises(ConfigError, match="N=9"):
        env_int("N", 3, lo=1, hi=5, env={"N": "9"})
    with pytest.raises(ConfigError, match="integer"):
        env_int("N", 3, lo=1, hi=5, env={"N": "four"})
    with pytest.raises(ConfigError):
        env_float("F", 1.0, lo=0, hi=2, env={"F": "nan"})
    with pytest.raises(ConfigError):
        env_bool("B", False, env={"B": "maybe"})
    with pytest.raises(ConfigError, match="REGISTRY_ADDR"):
        env_addr("REGISTRY_ADDR", "127.0.0.1:1", env={"REGISTRY_ADDR": "not an address"})


def test_server_config_from_env() -> None:
    config = ServerConfig.from_env("registry", 50051, env={"PORT": "6000", "GRACE_PERIOD_S": "2"})
    assert config.port == 6000 and config.metrics_port == 7000 and config.grace_s == 2.0
    assert ServerConfig.from_env("registry", 50051, env={"PORT": "0"}).metrics_port == 0
    with pytest.raises(ConfigError, match="LOG_LEVEL"):
        ServerConfig.from_env("registry", 50051, env={"LOG_LEVEL": "LOUD"})
    with pytest.raises(ConfigError, match="TLS_CERT_FILE"):
        TlsConfig.from_env({"TLS_CERT_FILE": "/nonexistent"})


def test_registry_config_cross_checks() -> None:
    with pytest.raises(ConfigError, match="shorter than"):
        RegistryConfig.from_env({"REGISTRY_HEARTBEAT_INTERVAL_S": "5", "REGISTRY_LEASE_TTL_S": "5"})
    config = RegistryConfig.from_env({"REGISTRY_HEARTBEAT_INTERVAL_S": "0.5"})
    assert config.sweep_interval_s == pytest.approx(0.125)
