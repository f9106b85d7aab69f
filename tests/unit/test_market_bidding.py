"""The agents' side of the market without sockets: bid policies, which
capability a task is run with, the lie-bids fault, and the market's config."""

from __future__ import annotations

import pytest

from agent2028.market.v1 import market_pb2
from clients.agent import Agent, FaultPlan
from clients.agent.bidding import BidPolicy, MarketBehaviour, runnable_capability
from services.common.config import ConfigError
from services.market.config import MarketConfig
from services.market.core import auction_score


def test_balanced_bids_rise_with_load_and_stay_above_the_score_floor() -> None:
    policy = BidPolicy("balanced")
    idle = policy.price("compute", 0, 8)
    busy = policy.price("compute", 4, 8)
    assert busy == pytest.approx(idle * 1.5)
    assert policy.completion_s(5.0, 0, 8) == 1.0  # at least a second
    assert policy.completion_s(3000.0, 8, 8) == 6.0
    # The cheapest honest bid on a one-second task still scores above the
    # 0.01 floor, so the market's load term can separate bidders.
    cheapest = min(policy.price(c, 0, 8) for c in ("compute", "database.query", "echo", "other"))
    assert auction_score(cheapest, 0, 1.0, 1.0) > 0.01
    assert auction_score(cheapest, 0, 1.0, 1.0) < auction_score(cheapest, 1, 1.0, 1.0)


def test_greedy_ignores_load_and_confidence_is_the_success_rate() -> None:
    greedy = BidPolicy("greedy")
    assert greedy.price("ml.inference", 7, 8) == greedy.price("ml.inference", 0, 8)
    assert BidPolicy.confidence(0.8123456) == 0.8123
    assert BidPolicy.confidence(1.7) == 1.0 and BidPolicy.confidence(-1) == 0.0
    with pytest.raises(ValueError):
        BidPolicy("generous")
    with pytest.raises(ValueError):
        MarketBehaviour("127.0.0.1:1", "nope")


def test_the_capability_a_task_runs_with(tmp_path) -> None:  # type: ignore[no-untyped-def]
    agent = Agent(
        "a", registry="127.0.0.1:1", capabilities=["gpu", "ml.inference"], data_dir=str(tmp_path)
    )
    # "gpu" is a trait (no handler): the task runs with the first requirement
    # the agent can execute, or with the one the lister named.
    task = market_pb2.Task(requirements=["gpu", "ml.inference"])
    assert runnable_capability(task, agent) == "ml.inference"
    task.capability = "gpu"
    assert runnable_capability(task, agent) is None
    assert runnable_capability(market_pb2.Task(requirements=["gpu"]), agent) is None


def test_lie_bids_is_a_fault_mode() -> None:
    assert FaultPlan.parse(["lie-bids"]).lie_bids
    assert FaultPlan.parse(["lie-bids"]).active
    assert not FaultPlan.parse([]).lie_bids


def test_market_config_from_the_environment() -> None:
    config = MarketConfig.from_env({"REGISTRY_ADDR": "10.0.0.1:50051"})
    assert config.registry_addr == "10.0.0.1:50051" and config.trust_addr is None
    assert config.settings.clock_skew_s == 300.0
    with_trust = MarketConfig.from_env({"TRUST_ADDR": "trust:50054"})
    assert with_trust.trust_addr == "trust:50054"
    for env, name in (
        ({"TRUST_ADDR": "no-port"}, "TRUST_ADDR"),
        ({"MARKET_MAX_BIDS_PER_TASK": "0"}, "MARKET_MAX_BIDS_PER_TASK"),
        ({"MARKET_CLOCK_SKEW_S": "soon"}, "MARKET_CLOCK_SKEW_S"),
        ({"DB_SYNCHRONOUS": "OFF"}, "DB_SYNCHRONOUS"),
    ):
        with pytest.raises(ConfigError) as err:
            MarketConfig.from_env(env)
        assert name in str(err.value)
