"""Chapters about membership: agents register, are found, fail and come back."""

from __future__ import annotations

import asyncio
import json

from clients.agent_client import AgentClient, verify_receipt
from clients.errors import Unavailable
from clients.scenario.scene import Scene

AGENT_MIX = [
    ["database.query", "compute"],
    ["ml.inference", "compute"],
    ["database.query", "ml.inference"],
    ["compute", "echo"],
    ["database.query", "echo"],
]


async def agents_register(scene: Scene) -> None:
    n = scene.narrator
    n.chapter("Agents spawn and register")
    n.say(
        "Starting 5 agent processes. Each makes an Ed25519 key, serves AgentService on a free port,"
    )
    n.say("and registers that address with a proof that it holds the key. The tail below is")
    n.say("the orchestrator's event bus: every service's watch stream, one Subscribe.")
    since = scene.cursor
    procs = await scene.cluster.spawn_agents(len(AGENT_MIX), AGENT_MIX)
    await scene.wait_for(
        lambda: len(scene.of("agent.joined", since=since)) >= len(procs),
        timeout_s=15,
        what="registration events",
    )
    assert scene.registry is not None
    page = await scene.registry.list_agents()
    n.table(
        "Registered agents",
        ["agent", "pid", "address", "capabilities", "status"],
        [
            [
                a.card.agent_id,
                str(scene.cluster.procs[a.card.agent_id].pid),
                a.card.address,
                ", ".join(a.card.capabilities),
                "passing" if a.status == 1 else str(a.status),
            ]
            for a in page.agents
        ],
    )
    n.ok(f"{len(page.agents)} agents registered and heartbeating")


async def capability_lookup(scene: Scene) -> None:
    n = scene.narrator
    n.chapter("Capability discovery")
    assert scene.registry is not None
    for order in ("fitness", "load"):
        found = await scene.registry.find_by_capability("database.query", order=order, top_k=3)
        n.say(
            f"Best database.query agents by {order}: "
            + ", ".join(
                f"{a.card.agent_id} ({s:.3f})"
                for a, s in zip(found.agents, found.scores, strict=True)
            )
        )
    best = (await scene.registry.find_by_capability("database.query", top_k=1)).agents[0]
    n.say(f"Asking {best.card.agent_id} directly to run a real query on its SQLite database...")
    async with AgentClient(best.card.address) as agent:
        response = await agent.execute(
            "database.query",
            [
                "SELECT country, count(*) AS users FROM users WHERE active = 1 GROUP BY country ORDER BY users DESC LIMIT 3"
            ],
            command_id="demo-query-1",
            session_id="demo",
            timeout_s=5,
        )
    rows = json.loads(response.output)["rows"]
    signed = verify_receipt(response, best.card.public_key)
    n.ok(
        f"{response.receipt.agent_id} answered in {response.receipt.duration_ms:.2f} ms: {rows}; receipt signature {'verifies' if signed else 'DOES NOT verify'}"
    )


async def failure_detection(scene: Scene) -> None:
    n = scene.narrator
    n.chapter("Failure detection")
    victim = "agent-003"
    n.say(f"kill -9 {victim}. Its heartbeats stop; the registry marks it warning, then critical,")
    n.say(
        "then removes it after the grace period (hysteresis keeps one late heartbeat from flapping it)."
    )
    since = scene.cursor
    await scene.cluster.kill(victim)
    took = await scene.wait_for(
        lambda: any(e.subject == victim for e in scene.of("agent.expired", since=since)),
        timeout_s=20,
        what=f"{victim} expiring",
    )
    n.ok(f"{victim} removed {took:.1f}s after it died")
    assert scene.registry is not None
    found = await scene.registry.find_by_capability("database.query", top_k=5)
    n.say("database.query is now served by: " + ", ".join(a.card.agent_id for a in found.agents))


async def registry_restart(scene: Scene) -> None:
    n = scene.narrator
    n.chapter("The registry is soft state")
    n.say("kill -9 the registry and start it again on the same port: it comes back empty,")
    n.say("and every agent notices its lease is gone and registers again by itself. The")
    n.say("orchestrator sees the registry go down and come back on its health stream.")
    since = scene.cursor
    with scene.tailing("tier.*"):
        await scene.cluster.kill("registry")
        await scene.cluster.restart_service("registry")
        assert scene.registry is not None
        alive = [p.name for p in scene.cluster.agents if p.alive()]

        async def all_back() -> bool:
            try:
                page = await scene.registry.list_agents()  # type: ignore[union-attr]
            except Unavailable:
                return False  # our channel may still be in its reconnect backoff
            return {a.card.agent_id for a in page.agents} >= set(alive)

        took = await scene.wait_for(all_back, timeout_s=20, what="agents re-registering")
        await scene.wait_for(
            lambda: any(e.subject == "registry" for e in scene.of("tier.up", since=since)),
            timeout_s=20,
            what="the orchestrator seeing the registry serve again",
        )
    n.ok(f"all {len(alive)} live agents re-registered {took:.1f}s after the restart")
    await asyncio.sleep(0)
