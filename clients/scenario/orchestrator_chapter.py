"""The last chapter: what the orchestrator's event stream saw of the whole
story, resuming from a cursor, and the topology behind the front door."""

from __future__ import annotations

import asyncio
from collections import Counter

from clients.orchestrator import KIND_NAMES, SERVING_NAMES, STATUS_NAMES, TIER_NAMES
from clients.scenario.scene import Scene

# Namespaces in the order the story met them.
NAMESPACES = [
    ("agent", "agents joining, failing, leaving"),
    ("tier", "services going down and up"),
    ("operation", "operations through the front door"),
    ("trust", "trust moving with every receipt"),
    ("consensus", "proposals, signed votes, decisions"),
    ("market", "tasks listed, bid on, won, completed"),
    ("bridge", "tasks run by the bridge, pools adopted"),
    ("swarm", "voting pools opening and deciding"),
    ("hive", "the hive mind changing"),
    ("stigmergy", "pheromone layers and signals"),
]


async def event_stream(scene: Scene) -> None:
    n = scene.narrator
    n.chapter("The event stream shows it all")
    assert scene.orchestrator is not None
    orchestrator = scene.orchestrator
    # Wait for the last pool to close and be reported (it closes on its own clock).
    await scene.wait_for(
        lambda: bool(scene.of("swarm.pool_decided")), timeout_s=20, what="the pool closing"
    )
    counts = Counter(e.type.split(".", 1)[0] for e in scene.events)
    kinds = Counter(e.type for e in scene.events)

    def frequent(namespace: str) -> str:
        top = [(t, c) for t, c in kinds.most_common() if t.startswith(namespace + ".")]
        return ", ".join(f"{t.split('.', 1)[1]} {c}" for t, c in top[:3])

    n.table(
        f"{len(scene.events)} events through the orchestrator's Subscribe, by namespace",
        ["namespace", "events", "what", "most frequent"],
        [
            [namespace, str(counts.get(namespace, 0)), what, frequent(namespace)]
            for namespace, what in NAMESPACES
        ],
    )
    missing = [ns for ns, _ in NAMESPACES if not counts.get(ns)]
    if missing:
        raise AssertionError(f"no events from {', '.join(missing)}")
    n.ok(
        f"{len(scene.events)} events through the orchestrator's Subscribe, from every service, "
        "in one cursor order"
    )
    # A subscriber that went away resumes from its cursor: the decisions of
    # the consensus chapter again, from the cursor just before them.
    first = scene.of("consensus.proposed")[0]
    replayed = []
    async with asyncio.timeout(10):
        async for response in orchestrator.subscribe(
            ["consensus.reached", "consensus.equivocation", "bridge.adopted"],
            from_cursor=first.cursor - 1,
        ):
            replayed.extend(response.events)
            if response.caught_up:
                break
    for event in replayed:
        n.event(f"replay @{event.cursor}", event.summary)
    n.ok(
        f"resumed from cursor {first.cursor - 1}: {len(replayed)} of the decisions since then "
        "replayed in order, from the bus's durable history"
    )
    topology = await orchestrator.topology()
    n.table(
        "Topology behind the front door",
        ["service", "tier", "address", "health"],
        [
            [
                s.name,
                TIER_NAMES.get(s.tier, "front door"),
                s.address or scene.cluster.address("orchestrator"),
                SERVING_NAMES.get(s.status, "?"),
            ]
            for s in topology.services
        ],
    )
    page = await orchestrator.list_operations(page_size=1000)
    by_kind = Counter(
        (KIND_NAMES.get(op.kind, "?"), STATUS_NAMES.get(op.status, "?")) for op in page.operations
    )
    n.say(
        "Operations: "
        + ", ".join(
            f"{kind} {status} x{count}" for (kind, status), count in sorted(by_kind.items())
        )
    )
