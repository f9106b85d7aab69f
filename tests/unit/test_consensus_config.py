"""Consensus settings from the environment: defaults, and bad values named."""

from __future__ import annotations

import pytest

from services.common.config import ConfigError
from services.consensus.config import ConsensusConfig


def test_defaults() -> None:
    config = ConsensusConfig.from_env({})
    assert config.registry_addr == "127.0.0.1:50051" and config.trust_addr is None
    assert config.verify_workers == 1 and config.observer_id == "consensus"
    assert config.settings.default_voting_period_s == 30.0
    assert config.settings.max_electorate == 5000
    set_ = ConsensusConfig.from_env(
        {"TRUST_ADDR": "trust:50054", "CONSENSUS_VERIFY_WORKERS": "0", "DB_SYNCHRONOUS": "FULL"}
    )
    assert set_.trust_addr == "trust:50054" and set_.verify_workers == 0
    assert set_.db_synchronous == "FULL"


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("CONSENSUS_DEFAULT_VOTING_PERIOD_S", "soon"),
        ("CONSENSUS_DEFAULT_VOTING_PERIOD_S", "nan"),
        ("CONSENSUS_MAX_ELECTORATE", "0"),
        ("CONSENSUS_MAX_OPEN_PROPOSALS", "-3"),
        ("CONSENSUS_VERIFY_WORKERS", "many"),
        ("CONSENSUS_TRUST_OBSERVER_ID", "not an id"),
        ("TRUST_ADDR", "nowhere"),
        ("REGISTRY_ADDR", "host:99999"),
        ("DB_SYNCHRONOUS", "OFF"),
    ],
)
def test_bad_values_name_the_variable(name: str, value: str) -> None:
    with pytest.raises(ConfigError) as err:
        ConsensusConfig.from_env({name: value})
    assert name in str(err.value)


def test_default_period_must_fit_the_maximum() -> None:
    with pytest.raises(ConfigError) as err:
        ConsensusConfig.from_env(
            {"CONSENSUS_DEFAULT_VOTING_PERIOD_S": "100", "CONSENSUS_MAX_VOTING_PERIOD_S": "10"}
        )
    assert "CONSENSUS_DEFAULT_VOTING_PERIOD_S" in str(err.value)
