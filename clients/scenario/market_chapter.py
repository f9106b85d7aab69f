"""Chapters about the task market: tasks allocated through the orchestrator
(the agent processes bid, the market auctions, the bridge runs each task on
its winner through the broker and settles it with the signed receipt); tasks
listed directly, which the winners run and report themselves, and the
market's own load spreading them; a lying bidder caught and routed around."""

from __future__ import annotations

import asyncio
import json
from collections import Counter

from agent2028.market.v1 import market_pb2
from clients.market import MarketClient
from clients.scenario.scene import Scene
from clients.trust import TrustClient

SHOWCASE = [
    # task id, requirements, args
    ("fib-90", ["compute"], ["fib", "90"]),
    ("primes-to-1M", ["compute"], ["primes", "1000000"]),
    (
        "top-countries",
        ["database.query"],
        [
            "SELECT country, count(*) AS users FROM users WHERE active = 1 "
            "GROUP BY country ORDER BY users DESC LIMIT 3"
        ],
    ),
    ("classify-iris", ["ml.inference"], ["6.3", "3.3", "6.0", "2.5"]),
    ("say-hello", ["echo"], ["hello", "market"]),
]


def _short(output: str) -> str:
    try:
        value = json.loads(output)
    except ValueError:
        return output[:60]
    if isinstance(value, dict):
        for key in ("value", "primes", "rows", "class", "args", "sum", "waited_ms"):
            if key in value:
                text = json.dumps(value[key])
                return text if len(text) <= 60 else text[:57] + "..."
    return output[:60]


async def _all_completed(client: MarketClient, task_ids: list[str]) -> bool:
    for task_id in task_ids:
        if (await client.get_task(task_id)).state != market_pb2.TASK_STATE_COMPLETED:
            return False
    return True


async def market_auctions(scene: Scene) -> None:
    n = scene.narrator
    n.chapter("Tasks are auctioned and run through the bridge")
    n.say("Each task goes to the orchestrator as an Allocate (swarm tier). The market lists it;")
    n.say("every agent process that holds its requirements bids, signed with its key. When the")
    n.say("bidding window closes the market auctions it: lowest score = price * (1 + 0.1*load)")
    n.say("* (est. s / 1000) / (confidence + 0.1), load being the market's own count. Then the")
    n.say("integration bridge runs the task on the winner through the broker, and the winner's")
    n.say("signed receipt settles the task on the market and goes to trust.")
    assert scene.orchestrator is not None
    orchestrator = scene.orchestrator

    async def allocate(task_id: str, requirements: list[str], args: list[str]) -> object:
        return await orchestrator.allocate(
            requirements, args, task_id=task_id, bidding_window_s=0.5, timeout_s=40
        )

    since = scene.cursor
    with scene.tailing(
        "market.auction_won", "bridge.*", "market.task_completed", "market.task_failed"
    ):
        results = await asyncio.gather(
            *(allocate(task_id, requirements, args) for task_id, requirements, args in SHOWCASE)
        )
    winners = sorted({r.operation.allocate.task.assigned_agent_id for r in results})  # type: ignore[attr-defined]

    def trust_heard() -> bool:
        moved = {
            e.subject
            for e in scene.of("trust.changed", since=since)
            if e.attributes.get("observer_id") == "broker"
        }
        return moved >= set(winners)

    await scene.wait_for(trust_heard, timeout_s=15, what="the receipts reaching trust")
    async with TrustClient(scene.cluster.address("trust")) as trust:
        scores = [(w, (await trust.score("broker", w)).score) for w in winners]
    rows = []
    async with MarketClient(scene.cluster.address("market")) as client:
        for response in results:
            op = response.operation  # type: ignore[attr-defined]
            task = op.allocate.task
            if task.state != market_pb2.TASK_STATE_COMPLETED:
                raise AssertionError(f"{task.task_id} did not complete: {op.message}")
            receipt = op.allocate.receipt
            rows.append(
                [
                    task.task_id,
                    ", ".join(task.requirements),
                    str(len([b async for b in client.iter_bids(task.task_id)])),
                    task.assigned_agent_id,
                    f"{task.winning_bid.score:.4f}",
                    receipt.command_id,
                    _short(task.output),
                ]
            )
    n.table(
        "Auctioned, run through the broker, settled by signed receipts",
        ["task", "requires", "bids", "winner", "score", "receipt", "output"],
        rows,
    )
    n.ok(f"{len(rows)} tasks auctioned, run on their winners through the broker and completed")
    n.ok("each one settled on the market by its winner's signed receipt")
    n.ok(
        "and the same receipts reached trust: broker → "
        + ", ".join(f"{agent_id} {score:.3f}" for agent_id, score in scores)
    )


async def _bids_in(client: MarketClient, task_ids: list[str], at_least: int) -> bool:
    for task_id in task_ids:
        if (await client.list_bids(task_id)).total_size < at_least:
            return False
    return True


async def market_load_balancing(scene: Scene) -> None:
    with scene.tailing():  # the chapter prints each auction itself
        await _market_load_balancing(scene)


async def _market_load_balancing(scene: Scene) -> None:
    n = scene.narrator
    n.chapter("The market spreads the load")
    n.say("Listed on the market directly this time, so each winner runs its task itself and")
    n.say(
        "reports it, signed. Twelve equal compute tasks, auctioned back to back once the compute agents have"
    )
    n.say("bid. Their bids are alike, so the market's own load count decides: each win raises")
    n.say("the winner's score for the next auction.")
    async with MarketClient(scene.cluster.address("market")) as client:
        ids = [f"hash-{i:02d}" for i in range(12)]
        await asyncio.gather(
            *(
                client.list_task(
                    "compute", ["compute"], task_id=task_id, args=["sha256", task_id, "300000"]
                )
                for task_id in ids
            )
        )
        await scene.wait_for(lambda: _bids_in(client, ids, 3), timeout_s=20, what="the bids")
        results = await asyncio.gather(*(client.run_auction(task_id) for task_id in ids))
        for task_id, result in zip(ids, results, strict=True):
            w = result.winning_bid
            n.event("market", f"won  {task_id} → {w.agent_id} (score {w.score:.4f}, load {w.load})")
        wins = Counter(r.winning_bid.agent_id for r in results)
        await scene.wait_for(
            lambda: _all_completed(client, ids), timeout_s=60, what="the hashing tasks"
        )
        loads = {x.agent_id: x async for x in client.iter_agent_loads()}
        n.table(
            "Wins per agent (12 equal tasks)",
            ["agent", "won now", "market load now", "completed in all"],
            [
                [agent_id, str(count), str(loads[agent_id].load), str(loads[agent_id].completed)]
                for agent_id, count in sorted(wins.items())
            ],
        )
        n.ok(f"spread over {len(wins)} compute agents: {sorted(wins.values())}")


async def market_liar(scene: Scene) -> None:
    n = scene.narrator
    n.chapter("A lying bidder")
    n.say("liar-001 joins with the lie-bids fault: it bids 0.01 for 1 s at full confidence on")
    n.say("everything, wins, and never delivers. Its failure is recorded, it is excluded from that")
    n.say("task, and the task is re-listed for the honest agents.")
    await scene.cluster.spawn_agent("liar-001", ["compute"], faults=["lie-bids"])
    async with MarketClient(scene.cluster.address("market")) as client:
        with scene.tailing("market.*", where=lambda e: e.subject == "fib-1000"):
            await client.list_task(
                "compute", ["compute"], task_id="fib-1000", args=["fib", "1000"], max_attempts=3
            )

            async def liar_bid() -> bool:
                bids = [b.agent_id async for b in client.iter_bids("fib-1000")]
                return "liar-001" in bids and len(bids) >= 4

            await scene.wait_for(liar_bid, timeout_s=20, what="the bids on fib-1000")
            await client.run_auction("fib-1000")
            await scene.wait_for(
                lambda: _attempt(client, "fib-1000", 2), timeout_s=20, what="the re-listing"
            )
            await scene.wait_for(
                lambda: _bids_in(client, ["fib-1000"], 3), timeout_s=20, what="new bids"
            )
            await client.run_auction("fib-1000")
            await scene.wait_for(
                lambda: _all_completed(client, ["fib-1000"]), timeout_s=30, what="fib-1000"
            )
        task = await client.get_task("fib-1000")
        n.table(
            "fib-1000, attempt by attempt",
            ["attempt", "agent", "score", "outcome"],
            [
                [
                    str(a.attempt),
                    a.agent_id,
                    f"{a.bid.score:.4f}",
                    {3: "completed", 4: "failed"}.get(a.outcome, str(a.outcome)),
                ]
                for a in task.assignments
            ],
        )
        liar = await client.get_agent_load("liar-001")
        await scene.cluster.terminate("liar-001")
        n.ok(
            f"completed by {task.assigned_agent_id} after the liar failed it "
            f"(liar: {liar.won} won, {liar.failed} failed; excluded: "
            f"{', '.join(task.excluded_agent_ids)})"
        )


async def _attempt(client: MarketClient, task_id: str, attempt: int) -> bool:
    task = await client.get_task(task_id)
    return task.attempt >= attempt and task.state == market_pb2.TASK_STATE_OPEN
