"""Agents taking part in the swarm tier (the runtime in this process, the
registry, stigmergy and swarm servers on port 0): voting by policy, proposing
to the hive, following a gradient, foraging where work was found, walking a
trail, and the flags that turn it all on."""

from __future__ import annotations

import math
import os

import pytest

from clients.agent import Agent
from clients.agent import __main__ as agent_main
from clients.agent.hive import behaviour as hive_behaviour
from clients.agent.pheromones import FieldPolicy
from clients.agent.pheromones import behaviour as field_behaviour
from clients.agent.swarm_voting import VotePolicy
from clients.agent.swarm_voting import behaviour as vote_behaviour
from clients.agent_client import AgentClient
from clients.stigmergy import StigmergyClient
from clients.swarm import SwarmClient
from tests.support import eventually
from tests.swarm_tier import register, start_stigmergy, start_swarm


@pytest.fixture
async def tier(registry_server, tmp_path):  # type: ignore[no-untyped-def]
    stigmergy_host, _ = await start_stigmergy(str(tmp_path), registry_server.address)
    swarm_host, _ = await start_swarm(str(tmp_path), registry_server.address)
    started: list[Agent] = []

    async def agent(agent_id: str, *behaviours, capabilities=("compute",)) -> Agent:  # type: ignore[no-untyped-def]
        a = Agent(
            agent_id,
            registry=registry_server.address,
            capabilities=list(capabilities),
            data_dir=os.path.join(str(tmp_path), agent_id),
        )
        for b in behaviours:
            a.add_behaviour(b)
        await a.start()
        started.append(a)
        return a

    try:
        yield agent, stigmergy_host.address, swarm_host.address
    finally:
        for a in started:
            await a.stop()
        await swarm_host.stop(grace_s=0.5)
        await stigmergy_host.stop(grace_s=0.5)


async def test_agents_vote_by_policy_and_propose_to_the_hive(tier) -> None:  # type: ignore[no-untyped-def]
    agent, _, swarm_addr = tier
    async with SwarmClient(swarm_addr) as swarm:
        pool = await swarm.create_pool("scale_infrastructure", threshold="super", duration_s=600)
        for agent_id, spec in (
            ("voter-1", "approve:0.9"),
            ("voter-2", "approve:0.8"),
            ("voter-3", "reject:0.6"),
        ):
            await agent(agent_id, vote_behaviour(VotePolicy.parse(spec), swarm_addr))
        await agent(
            "believer",
            hive_behaviour(
                [("system_overloaded", 0.7), ("scale_up_needed", 0.8)], ["notify_admin"], swarm_addr
            ),
        )

        async def voted() -> bool:
            return (await swarm.get_consensus(pool.pool_id)).vote_count == 3

        await eventually(voted, timeout_s=15, what="three agents voting")
        result = await swarm.get_consensus(pool.pool_id)
        assert (result.decision, round(result.confidence, 3)) == ("approve", 0.739)
        # A pool opened later reaches them through the watch stream.
        later = await swarm.create_pool("second_question", duration_s=600)

        async def voted_later() -> bool:
            return (await swarm.get_consensus(later.pool_id)).vote_count == 3

        await eventually(voted_later, timeout_s=15, what="votes in the new pool")

        async def believed() -> bool:
            return (await swarm.get_hive()).generation >= 3

        await eventually(believed, timeout_s=15, what="the hive proposals")
        state = await swarm.get_hive()
        assert {b.name: b.source for b in state.beliefs} == {
            "system_overloaded": "believer",
            "scale_up_needed": "believer",
        }
        assert [i.text for i in state.intentions] == ["notify_admin"]
        assert (await swarm.update_from_vote(pool.pool_id)).generation == state.generation + 1


async def test_followers_climb_to_the_food_and_leave_a_trail(tier, registry_server) -> None:  # type: ignore[no-untyped-def]
    agent, stigmergy_addr, _ = tier
    scout = (await register(registry_server.address, "scout"))["scout"]
    async with StigmergyClient(stigmergy_addr) as field:
        await field.deposit(scout, 500, 500, "food", 5.0)
        starts = [(440.0, 500.0), (560.0, 470.0), (500.0, 420.0)]
        followers = [
            await agent(
                f"follower-{i}",
                field_behaviour(
                    FieldPolicy.parse(f"follow:food@{x},{y}", step_s=0.02, speed=4.0),
                    stigmergy_addr,
                ),
            )
            for i, (x, y) in enumerate(starts)
        ]

        def arrived() -> bool:
            return all(
                hasattr(f, "walker") and math.hypot(f.walker.x - 500.5, f.walker.y - 500.5) < 5
                for f in followers
            )

        await eventually(arrived, timeout_s=30, what="followers reaching the food")
        # Their paths show in the trail layer: near the start and at the food.
        for x, y in starts:
            assert (await field.find_nearest(x, y, "trail", radius=5)).found
        assert (await field.find_nearest(500, 500, "trail", radius=5)).found


async def test_foragers_mark_where_they_found_work(tier) -> None:  # type: ignore[no-untyped-def]
    agent, stigmergy_addr, _ = tier
    forager = await agent(
        "forager",
        field_behaviour(
            FieldPolicy.parse("forage@300,300", step_s=0.02, speed=1.0), stigmergy_addr
        ),
        capabilities=("compute",),
    )
    await eventually(
        lambda: hasattr(forager, "walker") and forager.walker.steps > 2, what="foraging"
    )
    async with StigmergyClient(stigmergy_addr) as field:
        assert (await field.sense("work", columns=10, rows=10)).total == 0
        async with AgentClient(forager.address) as client:
            for i in range(3):
                response = await client.execute(
                    "compute", ["sum", "1", "2"], command_id=f"c-{i}", timeout_s=5
                )
                assert response.receipt.success

        async def marked() -> bool:
            return (await field.sense("work", columns=10, rows=10)).total >= 3.0

        await eventually(marked, timeout_s=10, what="work deposits")
        # One unit per command that succeeded, no more (a few steps later, still 3).
        steps = forager.walker.steps
        await eventually(lambda: forager.walker.steps > steps + 3, what="more steps")
        assert (await field.sense("work", columns=10, rows=10)).total == pytest.approx(3.0)
        near = await field.find_nearest(forager.walker.x, forager.walker.y, "work", radius=50)
        assert near.found and math.hypot(near.x - 300, near.y - 300) < 50


async def test_walkers_lay_a_trail_toward_their_target(tier) -> None:  # type: ignore[no-untyped-def]
    agent, stigmergy_addr, _ = tier
    for i in range(3):
        await agent(
            f"walker-{i}",
            field_behaviour(
                FieldPolicy.parse("walk:success_trail@0,0>999,999", step_s=0.01, speed=20.0),
                stigmergy_addr,
            ),
        )
    async with StigmergyClient(stigmergy_addr) as field:

        async def reached_far_corner() -> bool:
            return (await field.find_nearest(990, 990, "success_trail", radius=40)).found

        await eventually(reached_far_corner, timeout_s=30, what="the trail reaching the corner")
        view = await field.sense("success_trail", columns=10, rows=10, aggregation="max")
        cells = [view.values[r * 10 + c] for r in range(10) for c in range(10)]
        diagonal = [cells[i * 10 + i] for i in range(10)]
        off_diagonal = [cells[r * 10 + c] for r in range(10) for c in range(10) if abs(r - c) > 1]
        assert all(v > 0 for v in diagonal)
        assert max(off_diagonal) == 0


def test_the_agent_flags_turn_behaviours_on_and_refuse_bad_specs(tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setenv("AGENT_FIELD_STEP_S", "0.5")
    args = agent_main.parse_args(
        [
            "--id", "a1",
            "--field", "walk:trail@0,0>10,10",
            "--pool-vote", "approve:0.9:2",
            "--belief", "hot=0.5",
            "--intend", "cool down",
        ]
    )  # fmt: skip
    agent = Agent("a1", registry="127.0.0.1:1", data_dir=str(tmp_path))
    agent_main.add_swarm_tier(agent, args)
    assert len(agent._behaviours) == 3
    assert FieldPolicy.parse("walk:trail@0,0>10,10").target == (10.0, 10.0)
    assert VotePolicy.parse("approve:0.9:2") == VotePolicy("approve", 0.9, 2.0)
    assert VotePolicy.parse("random").choose("a", "p") == VotePolicy.parse("random").choose(
        "a", "p"
    )
    for spec in ("fly:food", "walk:food", "follow", "follow:Food", "walk:x@1,2>nan,3", "forage@1"):
        with pytest.raises(ValueError):
            FieldPolicy.parse(spec)
    for spec in ("approve:1.5", "approve:x", "approve:0.5:-1", "", "a b"):
        with pytest.raises(ValueError):
            VotePolicy.parse(spec)
    bad = agent_main.parse_args(["--id", "a2", "--belief", "hot=2"])
    with pytest.raises(ValueError):
        agent_main.add_swarm_tier(Agent("a2", registry="127.0.0.1:1", data_dir=str(tmp_path)), bad)
