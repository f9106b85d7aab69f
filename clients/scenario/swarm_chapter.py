"""Chapters about the swarm tier: a vote that updates the hive mind, a
pheromone trail laid by walking agents, and a flock that aligns."""

from __future__ import annotations

import asyncio
import os

import numpy as np

from clients.cli.heatmap import bar, flock_picture, heatmap
from clients.scenario.scene import Scene
from clients.stigmergy import StigmergyClient, deposit_request, region
from clients.swarm import STATUS_NAMES, SwarmClient
from services.common.crypto import Identity

# The guide's 5.1 voters and 5.2 proposals, one agent process each.
VOTERS = [
    ("voter-1", "approve:0.9", ["--belief", "system_overloaded=0.7"]),
    ("voter-2", "approve:0.8", ["--belief", "scale_up_needed=0.8", "--intend", "notify_admin"]),
    (
        "voter-3",
        "reject:0.6",
        ["--belief", "cost_acceptable=0.6", "--intend", "increase_capacity_by_20%"],
    ),
]
WALKERS = 5
TRAIL = "success_trail"
GOAL = "food_source"
# Walkers move fast so the trail forms within seconds.
WALKER_ENV = {"AGENT_FIELD_STEP_S": "0.02", "AGENT_FIELD_SPEED": "20"}


async def swarm_vote(scene: Scene) -> None:
    n = scene.narrator
    n.chapter("A swarm vote updates the hive mind")
    assert scene.orchestrator is not None
    n.say("A CollectiveDecision goes to the orchestrator (swarm tier): it opens the pool")
    n.say("scale_infrastructure (super majority, 2/3, at least 3 votes) and asks for the result")
    n.say("to be adopted by the hive mind. Three agent processes see the pool on their watch")
    n.say("stream and vote, each signing its vote; they also propose the guide's beliefs and")
    n.say("intentions.")
    async with SwarmClient(scene.cluster.address("swarm")) as swarm:
        before = await swarm.get_hive()
        deciding = asyncio.create_task(
            scene.orchestrator.collective_decision(
                "scale_infrastructure",
                threshold="super",
                duration_s=8,
                min_votes=len(VOTERS),
                adopt=True,
                settle_early=True,
                timeout_s=30,
            )
        )
        await _spawn_voters(scene)
        response = await deciding
        op = response.operation
        result = op.collective_decision
        pool = result.pool
        assert pool.decision == "approve" and pool.status == 2, f"unexpected result {op.message}"
        n.table(
            "Tally",
            ["decision", "score (confidence x weight)", "votes"],
            [[t.decision, f"{t.score:.2f}", str(t.votes)] for t in pool.tallies],
        )
        n.ok(
            f"consensus: {pool.decision} with confidence {pool.confidence:.3f} "
            f"({STATUS_NAMES[pool.status]})"
        )

        async def beliefs_in() -> bool:
            return len((await swarm.get_hive()).beliefs) > len(VOTERS)

        await scene.wait_for(beliefs_in, timeout_s=30, what="the voters' beliefs")
        after = await swarm.get_hive()
        assert result.hive_generation > before.generation, "the hive's generation did not move"
        adopted = result.adopted
        n.ok(
            f"the bridge adopted it (UpdateFromVote): hive generation {before.generation} -> "
            f"{result.hive_generation}; belief {adopted.topic}:{adopted.decision} = "
            f"{adopted.confidence:.3f}"
        )
        n.table(
            f"Hive mind at generation {after.generation}",
            ["belief", "confidence", "from"],
            [[b.name, f"{b.confidence:.3f}", b.source] for b in after.beliefs],
        )
        n.say("Intentions: " + ", ".join(i.text for i in after.intentions))


async def _spawn_voters(scene: Scene) -> None:
    for agent_id, vote, extra in VOTERS:
        await scene.cluster.spawn_agent(
            agent_id, ["compute"], extra_args=["--pool-vote", vote, *extra], wait=False
        )


async def _mark_the_goal(scene: Scene) -> None:
    """walker-1 marks its goal with a signed Signal through the orchestrator."""
    assert scene.orchestrator is not None
    ready = os.path.join(scene.cluster.state_dir, "run", "walker-1.ready.json")
    await scene.wait_for(lambda: os.path.exists(ready), timeout_s=20, what="walker-1 registering")
    key = os.path.join(scene.cluster.state_dir, "agents", "walker-1", "agent.key")
    identity = Identity.load_or_create("walker-1", key)
    response = await scene.orchestrator.signal(
        deposit_request(identity, 999, 999, GOAL, 50.0, request_id="walker-1-goal")
    )
    scene.narrator.ok(f"Signal (swarm tier): {response.operation.message}")


async def pheromone_trail(scene: Scene) -> None:
    n = scene.narrator
    n.chapter("A pheromone trail forms")
    n.say(
        f"{WALKERS} walker processes go from (0, 0) toward (999, 999). Each step follows the "
        f"{TRAIL} gradient"
    )
    n.say(
        "under its feet plus its heading, and deposits a signed trace; the field decays and "
        "diffuses every tick."
    )
    with scene.tailing("stigmergy.*", "operation.*"):
        await _pheromone_trail(scene)


async def _pheromone_trail(scene: Scene) -> None:
    n = scene.narrator
    async with StigmergyClient(scene.cluster.address("stigmergy")) as field:
        for i in range(1, WALKERS + 1):
            await scene.cluster.spawn_agent(
                f"walker-{i}",
                ["compute"],
                extra_args=["--field", f"walk:{TRAIL}@0,0>999,999"],
                env=WALKER_ENV,
                wait=False,
            )
        await _mark_the_goal(scene)

        async def trail_formed() -> bool:
            view = await field.sense(TRAIL, columns=10, rows=10, aggregation="max")
            values = np.array(view.values).reshape(10, 10)
            return bool((np.diag(values) > 0).all())

        took = await scene.wait_for(trail_formed, timeout_s=60, what="a trail to the far corner")
        view = await field.sense(TRAIL, columns=64, rows=24, aggregation="max")
        n.console.print(heatmap(list(view.values), view.columns, view.rows))
        on_path = await field.sense(
            TRAIL, area=region(0, 0, 1000, 1000), columns=50, rows=50, aggregation="mean"
        )
        cells = np.array(on_path.values).reshape(50, 50)
        diagonal = float(np.mean([cells[i, i] for i in range(50)]))
        off = float(cells[np.abs(np.subtract.outer(range(50), range(50))) > 5].mean())
        assert diagonal > 100 * off, f"no trail: {diagonal} on the path, {off} elsewhere"
        n.ok(
            f"trail from (0, 0) to (999, 999) after {took:.1f}s: mean intensity along the path "
            f"{diagonal:.3g}, away from it {off:.2g}"
        )
        g = await field.gradient(600, 500, TRAIL)
        n.say(
            f"An agent at (600, 500) senses the trail: gradient ({g.dx:.2f}, {g.dy:.2f}), "
            "back toward the path."
        )


async def flock_aligns(scene: Scene) -> None:
    n = scene.narrator
    n.chapter("A flock aligns")
    n.say(
        "150 boids at random positions and headings in a 300 x 300 torus, with the guide's "
        "rules (separation 25, alignment and cohesion 50)."
    )
    n.say("Order parameter: |mean of unit velocities|, about 0.1 at random, 1 when aligned.")
    async with SwarmClient(scene.cluster.address("swarm")) as swarm:
        flock = await swarm.create_flock(150, seed=8, world=(300, 300))
        first = await swarm.get_flock(flock.flock_id, include_boids=True)
        b = first.boids
        n.console.print(flock_picture(b.x, b.y, b.vx, b.vy, 300, 300, columns=60, rows=12))
        n.say(f"step   0  {bar(flock.order_parameter)} {flock.order_parameter:.3f}")
        order = flock.order_parameter
        for _ in range(10):
            stepped = await swarm.step_flock(flock.flock_id, 20)
            order = stepped.flock.order_parameter
            n.say(f"step {stepped.flock.steps:>3}  {bar(order)} {order:.3f}")
        assert order > max(0.5, 3 * flock.order_parameter), f"the flock did not align ({order})"
        last = await swarm.get_flock(flock.flock_id, include_boids=True)
        b = last.boids
        n.console.print(flock_picture(b.x, b.y, b.vx, b.vy, 300, 300, columns=60, rows=12))
        n.ok(
            f"order parameter {flock.order_parameter:.3f} -> {order:.3f} after "
            f"{last.flock.steps} steps: the flock aligned"
        )
