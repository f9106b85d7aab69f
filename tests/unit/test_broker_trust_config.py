"""Broker and trust settings from the environment: defaults, and a bad value
stops the service naming the variable."""

from __future__ import annotations

import pytest

from services.broker.config import BrokerConfig
from services.common.config import ConfigError
from services.common.crypto import Identity
from services.trust.config import TrustConfig
from services.trust.core import ONE_SUCCESS_PRIOR_WEIGHT


def test_trust_defaults_and_roots() -> None:
    config = TrustConfig.from_env(env={})
    assert config.settings.roots == ("broker", "consensus")
    assert config.settings.prior_weight == ONE_SUCCESS_PRIOR_WEIGHT
    assert config.settings.half_life_days == 0.0
    key = Identity.generate("broker").public_key
    pinned = TrustConfig.from_env(env={"TRUST_ROOTS": f"broker={key.hex()},consensus"})
    assert pinned.settings.roots == ("broker", "consensus")
    assert pinned.settings.pinned_keys == {"broker": key}


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("TRUST_ROOTS", "not an id"),
        ("TRUST_ROOTS", "broker=zz"),
        ("TRUST_PRIOR_WEIGHT", "0"),
        ("TRUST_DECAY_FACTOR", "1.5"),
        ("TRUST_HALF_LIFE_DAYS", "nan"),
        ("TRUST_STANDING_DEPTH", "0"),
        ("DB_SYNCHRONOUS", "SOMETIMES"),
    ],
)
def test_bad_trust_settings_name_the_variable(name: str, value: str) -> None:
    with pytest.raises(ConfigError) as info:
        TrustConfig.from_env(env={name: value})
    assert name in str(info.value)


def test_broker_defaults(tmp_path) -> None:  # type: ignore[no-untyped-def]
    config = BrokerConfig.from_env(str(tmp_path), env={})
    assert config.registry_addr == "127.0.0.1:50051"
    assert config.trust_addr == "127.0.0.1:50054"
    assert config.settings.broker_id == "broker" and config.settings.max_attempts == 3
    assert config.key_file == str(tmp_path / "broker.key")


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("REGISTRY_ADDR", "nowhere"),
        ("TRUST_ADDR", "host:99999"),
        ("BROKER_ID", "bad id"),
        ("BROKER_MAX_ATTEMPTS", "0"),
        ("BROKER_DEFAULT_DEADLINE_S", "-1"),
        ("BROKER_CANDIDATE_TTL_S", "x"),
    ],
)
def test_bad_broker_settings_name_the_variable(tmp_path, name: str, value: str) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ConfigError) as info:
        BrokerConfig.from_env(str(tmp_path), env={name: value})
    assert name in str(info.value)
