"""Chapters about the closed loop: commands come in through the orchestrator's
front door (Execute, the individual tier), the broker routes them by strategy
and returns receipts signed by agent and broker; the outcomes move trust and
fitness, and those move the next routing decision."""

from __future__ import annotations

import asyncio
import json

from agent2028.orchestrator.v1 import orchestrator_pb2 as pb
from clients.broker import (
    BrokerClient,
    verify_agent_signature,
    verify_broker_signature,
)
from clients.errors import ClientError, NotFound
from clients.registry import RegistryClient
from clients.scenario.scene import Scene
from clients.trust import TrustClient

# Spawned for these chapters and stopped at their end: real differences for
# the strategies to see.
SLOW = "db-slow"
FLAKY = "db-flaky"
QUERY = "SELECT country, count(*) FROM users WHERE active = 1 GROUP BY country"


async def execute(
    scene: Scene, capability: str, args: list[str], strategy: str
) -> pb.ExecuteResult:
    """One command through the orchestrator (which routes it to the broker)."""
    assert scene.orchestrator is not None
    response = await scene.orchestrator.execute(
        capability, args, strategy=strategy, session_id="make-run"
    )
    return response.operation.execute


def _clients(scene: Scene) -> tuple[BrokerClient, TrustClient, RegistryClient]:
    cluster = scene.cluster
    return (
        BrokerClient(cluster.address("broker")),
        TrustClient(cluster.address("trust")),
        RegistryClient(cluster.address("registry")),
    )


async def strategies_and_receipts(scene: Scene) -> None:
    with scene.tailing("agent.*", "tier.*"):
        await _strategies_and_receipts(scene)


async def _strategies_and_receipts(scene: Scene) -> None:
    n = scene.narrator
    n.chapter("The broker routes by strategy and signs receipts")
    n.say(f"Two more database.query agents join with real faults: {SLOW} takes 120 ms per")
    n.say(f"command, {FLAKY} fails every command (and signs a receipt saying so).")
    await scene.cluster.spawn_agent(SLOW, ["database.query"], faults=["slow:120"])
    await scene.cluster.spawn_agent(FLAKY, ["database.query"], faults=["fail"])
    broker, trust, registry = _clients(scene)
    try:
        identity = await broker.identity()
        n.say("Commands enter through the orchestrator (an Execute operation, routed to the")
        n.say(
            f"individual tier); the broker signs as {identity.broker_id!r} "
            f"(key {identity.public_key.hex()[:16]}...). Four commands in turn (ROUND_ROBIN):"
        )
        rows = []
        reached: set[str] = set()
        for _ in range(4):
            response = await execute(scene, "database.query", [QUERY], "round_robin")
            r = response.receipt
            reached.add(r.agent_id)
            agent_key = (await registry.get_agent(r.agent_id)).card.public_key
            rows.append(
                [
                    r.command_id[-12:],
                    r.agent_id,
                    "success" if r.success else f"failure: {r.error}",
                    f"{r.duration_ms:.1f}",
                    "✓" if verify_agent_signature(r, agent_key) else "✗",
                    "✓" if verify_broker_signature(r, identity.public_key) else "✗",
                ]
            )
        n.table(
            "Signed receipts (session make-run)",
            ["command", "agent", "result", "ms", "agent sig", "broker sig"],
            rows,
        )
        n.ok("every receipt carries the agent's signature and the broker's, and both verify")

        async def measured() -> bool:
            agents = [a async for a in registry.iter_agents(capability="database.query")]
            return all(a.outcomes_observed > 0 for a in agents if a.card.agent_id in reached)

        await scene.wait_for(measured, timeout_s=10, what="receipts reaching the registry")
        n.say("The registry now measures latency and reliability from those receipts.")
        for strategy in ("min_latency", "max_reliability", "best_fit"):
            route = await broker.route("database.query", strategy=strategy)
            n.say(f"  {strategy:<15} → [bold]{route.chosen.agent.agent_id}[/bold]: {route.reason}")
        await least_loaded(scene, broker)
        response = await execute(scene, "database.query", [QUERY], "best_fit")
        n.say(
            f"One receipt in full: {response.receipt.agent_id} answered "
            f"{json.loads(response.output)['rows']} in {response.receipt.agent_receipt.duration_ms:.2f} ms "
            f"(round trip through the broker {response.receipt.duration_ms:.2f} ms)."
        )
        listed = [r async for r in broker.iter_receipts(session_id="make-run")]
        n.ok(f"{len(listed)} receipts of session make-run are stored and queryable")
    finally:
        for client in (broker, trust, registry):
            await client.close()


async def least_loaded(scene: Scene, broker: BrokerClient) -> None:
    """Long commands keep some compute agents busy; the next goes to a free one."""
    n = scene.narrator
    holders = len((await broker.route("compute", strategy="least_loaded")).ranking)
    busy = min(2, holders - 1)
    if busy < 1:
        n.say("(LEAST_LOADED needs two compute agents to show a choice; skipped)")
        return
    n.say(f"LEAST_LOADED counts the broker's own commands in flight: {busy} long computation(s)")
    n.say("start, and the next command goes to an agent with nothing running.")
    long_calls = [
        asyncio.create_task(execute(scene, "compute", ["wait", "800"], "least_loaded"))
        for _ in range(busy)
    ]

    async def all_busy() -> bool:
        route = await broker.route("compute", strategy="least_loaded")
        return sum(c.broker_inflight for c in route.ranking) == busy

    await scene.wait_for(all_busy, timeout_s=5, what="the long commands in flight")
    route = await broker.route("compute", strategy="least_loaded")
    loads = ", ".join(
        f"{c.agent.agent_id} {c.broker_inflight}/{c.max_concurrency}" for c in route.ranking
    )
    n.say(f"  least_loaded    → [bold]{route.chosen.agent.agent_id}[/bold] ({loads})")
    done = await asyncio.gather(*long_calls)
    assert route.chosen.agent.agent_id not in {d.receipt.agent_id for d in done}
    n.ok(
        "the long commands ran on "
        + " and ".join(d.receipt.agent_id for d in done)
        + f"; {route.chosen.agent.agent_id} was free"
    )


async def trust_moves(scene: Scene) -> None:
    # The bus shows trust moving for the failing agent as each receipt lands.
    with scene.tailing(
        "agent.*", "trust.changed", where=lambda e: e.type != "trust.changed" or e.subject == FLAKY
    ):
        await _trust_moves(scene)


async def _trust_moves(scene: Scene) -> None:
    n = scene.narrator
    n.chapter("Failures move trust and fitness, and routing follows")
    broker, trust, registry = _clients(scene)
    watched = [a.card.agent_id async for a in registry.iter_agents(capability="database.query")]

    async def snapshot() -> list[list[str]]:
        rows = []
        for agent_id in watched:
            score = await trust.score("broker", agent_id)
            conservative = await trust.conservative_score(agent_id)
            try:
                agent = await registry.get_agent(agent_id)
                status = {1: "passing", 2: "warning", 3: "critical"}.get(agent.status, "?")
                numbers = [f"{agent.reliability:.3f}", f"{agent.fitness:.3f}", status]
            except ClientError:
                numbers = ["-", "-", "gone"]
            rows.append(
                [
                    agent_id,
                    f"{score.score:.3f}",
                    f"{conservative.lower_bound:.3f}",
                    str(score.observations),
                    *numbers,
                ]
            )
        return rows

    columns = ["agent", "trust", "conservative", "observed", "reliability", "fitness", "status"]
    try:
        n.table("Before: trust (broker → agent) and registry fitness", columns, await snapshot())
        before = await trust.score("broker", FLAKY)
        before_agent = await registry.get_agent(FLAKY)
        n.say(f"More commands in turn; every one that lands on {FLAKY} fails.")
        failures = 0
        for _ in range(16):
            response = await execute(scene, "database.query", [QUERY], "round_robin")
            failures += response.receipt.agent_id == FLAKY
            if failures >= 3:
                break

        async def settled() -> bool:
            # Every failure has reached trust and the registry (the broker
            # reports them in the background).
            score = await trust.score("broker", FLAKY)
            try:
                outcomes = (await registry.get_agent(FLAKY)).outcomes_observed
            except NotFound:  # expired already: the registry forgot it
                outcomes = before_agent.outcomes_observed + failures
            return (
                score.observations >= before.observations + failures
                and outcomes >= before_agent.outcomes_observed + failures
            )

        await scene.wait_for(settled, timeout_s=10, what="trust hearing of the failures")
        after_rows = await snapshot()
        n.table("After: the receipts reached trust and the registry", columns, after_rows)
        after = await trust.score("broker", FLAKY)
        moved = f"trust in {FLAKY} fell {before.score:.3f} → {after.score:.3f} (confidence {after.confidence:.2f})"
        try:
            after_agent = await registry.get_agent(FLAKY)
            moved += (
                f"; its measured reliability {before_agent.reliability:.3f} → "
                f"{after_agent.reliability:.3f}, fitness {before_agent.fitness:.3f} → "
                f"{after_agent.fitness:.3f}"
            )
        except NotFound:
            moved += "; the registry has already removed it"
        n.ok(moved)
        route = await broker.route("database.query", strategy="best_fit")
        ranking = [c.agent.agent_id for c in route.ranking]
        place = f"ranked last of {len(ranking)}" if ranking[-1] == FLAKY else "no longer passing"
        if FLAKY in ranking and ranking[-1] != FLAKY:
            place = f"ranked {ranking.index(FLAKY) + 1} of {len(ranking)}"
        n.ok(f"BEST_FIT now picks {route.chosen.agent.agent_id}; {FLAKY} is {place}")
        top = await trust.top_trusted(capability="database.query", k=3)
        n.say(
            "Most trusted for database.query (conservative score): "
            + ", ".join(f"{s.subject_id} {s.lower_bound:.3f}" for s in top.subjects)
        )
    finally:
        for client in (broker, trust, registry):
            await client.close()
        for name in (SLOW, FLAKY):
            if name in scene.cluster.procs and scene.cluster.procs[name].alive():
                await scene.cluster.terminate(name)
