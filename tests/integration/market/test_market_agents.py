"""Agents that bid, in this process against a real registry and market:
they watch the open tasks they qualify for, bid signed bids by their policy,
run what they win through their own handlers and report it; a lying bidder
wins, fails, is excluded, and its tasks end up done by honest agents."""

from __future__ import annotations

import json
import os

import pytest

from agent2028.market.v1 import market_pb2
from clients.agent import Agent, FaultPlan
from clients.agent.bidding import MarketBehaviour
from clients.agent.handlers import fibonacci
from tests.integration.market.support import RunningMarket
from tests.support import eventually


@pytest.fixture
async def bidding_agents(market: RunningMarket, calm_registry, tmp_path):  # type: ignore[no-untyped-def]
    started: list[tuple[Agent, MarketBehaviour]] = []

    async def start(agent_id: str, caps: list[str], **kwargs) -> tuple[Agent, MarketBehaviour]:  # type: ignore[no-untyped-def]
        agent = Agent(
            agent_id,
            registry=calm_registry.address,
            capabilities=caps,
            data_dir=os.path.join(str(tmp_path), agent_id),
            **kwargs,
        )
        behaviour = MarketBehaviour(market.host.address)  # type: ignore[union-attr]
        agent.add_behaviour(behaviour)
        await agent.start()
        started.append((agent, behaviour))
        return agent, behaviour

    yield start
    for agent, _ in started:
        await agent.stop()


async def test_agents_bid_win_run_and_complete(market: RunningMarket, bidding_agents) -> None:  # type: ignore[no-untyped-def]
    client = market.client
    assert client is not None
    honest = [await bidding_agents(f"worker-{i}", ["compute", "echo"]) for i in range(3)]
    _liar, liar_behaviour = await bidding_agents(
        "liar", ["compute"], faults=FaultPlan(lie_bids=True)
    )
    await bidding_agents("ml-only", ["ml.inference"])  # qualifies for none of these
    await eventually(
        lambda: market.core.events.listeners >= 5, timeout_s=10, what="agents watching"
    )
    for i in range(12):
        await client.list_task(
            "compute",
            ["compute"],
            task_id=f"fib-{i}",
            args=["fib", str(20 + i)],
            bidding_window_s=0.3,
            max_attempts=3,
        )

    async def all_completed() -> bool:
        tasks = [t async for t in client.iter_tasks()]
        return all(t.state == market_pb2.TASK_STATE_COMPLETED for t in tasks)

    await eventually(all_completed, timeout_s=30, what="every task completed")
    for i in range(12):
        task = await client.get_task(f"fib-{i}")
        assert json.loads(task.output)["value"] == str(fibonacci(20 + i))
        completed = [a for a in task.assignments if a.outcome == market_pb2.TASK_STATE_COMPLETED]
        assert len(completed) == 1 and completed[0].agent_id.startswith("worker-")
        # Every earlier attempt was the liar's, which is excluded afterwards.
        assert all(a.agent_id == "liar" for a in task.assignments[:-1])
        if len(task.assignments) > 1:
            assert "liar" in task.excluded_agent_ids
    # The liar's bid (0.01 for 1 s at full confidence) won everything it bid on first.
    assert liar_behaviour.won >= 1 and liar_behaviour.failed == liar_behaviour.won
    assert liar_behaviour.completed == 0
    liar_load = await client.get_agent_load("liar")
    assert liar_load.completed == 0 and liar_load.failed == liar_behaviour.won
    assert sum(b.completed for _, b in honest) == 12
    for agent, _ in honest:
        assert (await client.get_agent_load(agent.agent_id)).load == 0
    bids = [b async for b in client.iter_bids("fib-0", attempt=1)]
    assert "ml-only" not in {b.agent_id for b in bids}
    assert {b.agent_id for b in bids} >= {"worker-0", "worker-1", "worker-2"}


async def test_an_agent_reconnects_after_a_market_restart(
    market: RunningMarket, bidding_agents
) -> None:  # type: ignore[no-untyped-def]
    _, behaviour = await bidding_agents("worker", ["compute"])
    await eventually(lambda: market.core.events.listeners >= 1, timeout_s=10, what="watching")
    await market.restart()
    client = market.client
    assert client is not None
    await client.list_task(
        "compute", ["compute"], task_id="after", args=["sum", "1", "2", "3"], bidding_window_s=0.2
    )

    async def done() -> bool:
        return (await client.get_task("after")).state == market_pb2.TASK_STATE_COMPLETED

    await eventually(done, timeout_s=20, what="the task done after the restart")
    assert json.loads((await client.get_task("after")).output)["sum"] == 6.0
    assert behaviour.completed == 1
