"""The market as a process with ten agent processes bidding: fifty tasks end
completed exactly once, the load spreads, and a kill -9 of the market loses
no acknowledged bid. Then the market CLI against a detached cluster."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from collections import Counter

from agent2028.market.v1 import market_pb2
from clients import errors
from clients.market import MarketClient
from clients.registry import RegistryClient
from services.common.crypto import Identity
from tests.cluster.conftest import dump_logs
from tests.support import eventually

AGENTS = 10
TASKS = 50
# About a tenth of a second of hashing per task: long enough that the first
# auctions all happen while their winners are still busy.
ROUNDS = 150_000


async def _bid_counts(client: MarketClient, task_ids: list[str]) -> list[int]:
    return [(await client.list_bids(t)).total_size for t in task_ids]


async def test_ten_agents_complete_fifty_tasks_exactly_once_across_a_market_kill(
    make_cluster,
) -> None:  # type: ignore[no-untyped-def]
    cluster = make_cluster({"LOG_LEVEL": "WARNING"}, services=["registry", "market"])
    await cluster.start()
    procs = await cluster.spawn_agents(AGENTS, [["compute"]], prefix="worker")
    names = sorted(p.name for p in procs)
    task_ids = [f"job-{i:02d}" for i in range(TASKS)]
    client = MarketClient(cluster.address("market"), timeout_s=10)
    try:
        # Listed without a bidding window: the test runs the auctions, after
        # the market has been killed and restarted.
        for i, task_id in enumerate(task_ids):
            await client.list_task(
                "compute", ["compute"], task_id=task_id, args=["sha256", task_id, str(ROUNDS + i)]
            )

        async def all_bid() -> bool:
            return await _bid_counts(client, task_ids) == [AGENTS] * TASKS

        await eventually(all_bid, timeout_s=60, interval_s=0.2, what="every agent bidding")

        # A bidder of our own keeps placing bids while the market is killed:
        # every bid it was told was accepted must be there afterwards.
        probe_tasks = [f"probe-{i:03d}" for i in range(400)]
        for task_id in probe_tasks:
            await client.list_task("probe", ["probe"], task_id=task_id)
        # Registered last: it sends no heartbeats, so it only stays passing
        # for a few heartbeat intervals.
        probe = Identity.generate("probe")
        async with RegistryClient(cluster.address("registry")) as registry:
            await registry.register(probe, address="127.0.0.1:9", capabilities=["probe"])
        acknowledged: dict[str, float] = {}
        queue = list(reversed(probe_tasks))

        async def bidder() -> None:
            while queue:
                task_id = queue.pop()
                try:
                    await client.place_bid(
                        probe,
                        task_id,
                        price=float(len(acknowledged) + 1),
                        estimated_completion_s=5.0,
                        confidence=0.5,
                        timeout_s=2.0,
                    )
                except errors.ClientError:
                    return
                acknowledged[task_id] = 1.0

        bidders = [asyncio.create_task(bidder()) for _ in range(8)]
        await eventually(lambda: len(acknowledged) >= 60, timeout_s=30, what="probe bids")
        await cluster.kill("market")
        await asyncio.gather(*bidders)
        assert 60 <= len(acknowledged) < len(probe_tasks), "the kill did not land mid-stream"
        await cluster.restart_service("market")

        async def reachable() -> bool:
            # This client's channel may still be backing off from the kill.
            try:
                await client.get_task(task_ids[0])
            except errors.Unavailable:
                return False
            return True

        await eventually(reachable, timeout_s=10, what="the restarted market answering")
        for task_id in acknowledged:
            bids = (await client.list_bids(task_id)).bids
            assert [b.agent_id for b in bids] == ["probe"], f"acknowledged bid on {task_id} lost"
        assert await _bid_counts(client, task_ids) == [AGENTS] * TASKS

        # Auction the fifty; the agents' task streams reconnect by themselves
        # and they run what they won. The bids are alike, so each winner is
        # an agent with the least load the market counts, and after i
        # assignments that least load is at most i // AGENTS (fewer if some
        # finished): a market that ignored its own load would pile tasks on
        # the earliest bidder instead.
        winners = []
        for i, task_id in enumerate(task_ids):
            won = (await client.run_auction(task_id)).winning_bid
            assert won.load <= i // AGENTS, (i, won.agent_id, won.load)
            winners.append(won.agent_id)

        async def all_completed() -> bool:
            states = [t.state async for t in client.iter_tasks(task_type="compute")]
            return states == [market_pb2.TASK_STATE_COMPLETED] * TASKS

        try:
            await eventually(all_completed, timeout_s=90, interval_s=0.25, what="all completed")
        except AssertionError:
            raise AssertionError(dump_logs(cluster)) from None
        for task_id, winner in zip(task_ids, winners, strict=True):
            task = await client.get_task(task_id)
            assert [(a.agent_id, a.outcome) for a in task.assignments] == [
                (winner, market_pb2.TASK_STATE_COMPLETED)
            ]
            assert json.loads(task.output)["rounds"] == ROUNDS + task_ids.index(task_id)
        loads = {x.agent_id: x async for x in client.iter_agent_loads()}
        assert sorted(loads) == names
        assert sum(x.completed for x in loads.values()) == TASKS
        assert all(x.load == 0 and x.failed == 0 for x in loads.values())
        wins = Counter(winners)
        assert set(wins) == set(names), f"some agent never won: {wins}"
    finally:
        await client.close()


def cli(state_dir: str, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, AGENT2028_STATE_DIR=state_dir, COLUMNS="200")
    env.pop("MARKET_ADDR", None)
    env.pop("REGISTRY_ADDR", None)
    return subprocess.run(
        [sys.executable, "-m", "clients.cli.main", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_market_through_the_cli(tmp_path) -> None:  # type: ignore[no-untyped-def]
    state = os.path.join(str(tmp_path), "state")
    up = cli(state, "cluster", "up", "--detach", "--agents", "4", "--ephemeral-ports")
    try:
        assert up.returncode == 0, up.stderr + up.stdout
        listed = cli(
            state,
            "market",
            "list-task",
            "cli-fib",
            "--type",
            "compute",
            "--requirement",
            "compute",
            "--arg",
            "fib",
            "--arg",
            "30",
            "--deadline",
            "5m",
            "--json",
        )
        assert listed.returncode == 0, listed.stderr
        assert json.loads(listed.stdout)["task"]["state"] == "TASK_STATE_OPEN"
        # The default mix gives compute to agent-001, agent-002 and agent-004.
        compute_agents = {"agent-001", "agent-002", "agent-004"}
        deadline_polls = 0
        while True:
            bids = json.loads(cli(state, "market", "bids", "cli-fib", "--json").stdout)
            if {b["agent_id"] for b in bids} == compute_agents or deadline_polls > 100:
                break
            deadline_polls += 1
        assert {b["agent_id"] for b in bids} == compute_agents
        auction = cli(state, "market", "auction", "cli-fib", "--json")
        assert auction.returncode == 0, auction.stderr
        winner = json.loads(auction.stdout)["winning_bid"]["agent_id"]
        assert winner in compute_agents
        again = cli(state, "market", "auction", "cli-fib")
        assert again.returncode == 1 and "FAILED_PRECONDITION" in again.stderr

        polls = 0
        while polls < 200:
            task = json.loads(cli(state, "market", "task", "cli-fib", "--json").stdout)
            if task["state"] == "TASK_STATE_COMPLETED":
                break
            polls += 1
        assert task["state"] == "TASK_STATE_COMPLETED", task
        assert json.loads(task["output"])["value"] == "832040"
        tasks = json.loads(cli(state, "market", "tasks", "--state", "completed", "--json").stdout)
        assert [t["task_id"] for t in tasks] == ["cli-fib"]
        loads = json.loads(cli(state, "market", "load", "--json").stdout)
        assert [(x["agent_id"], x["completed"]) for x in loads] == [(winner, "1")]
        bad = cli(state, "market", "list-task", "x", "--requirement", "Not Valid")
        assert bad.returncode == 1 and "INVALID_ARGUMENT" in bad.stderr
        assert "requirements" in bad.stderr
    finally:
        down = cli(state, "cluster", "down")
    assert down.returncode == 0, down.stderr


async def test_bad_market_configuration_exits_2_naming_the_variable(make_cluster) -> None:  # type: ignore[no-untyped-def]
    cluster = make_cluster({"MARKET_CLOCK_SKEW_S": "banana"}, services=["registry", "market"])
    try:
        await cluster.start(timeout_s=20)
    except Exception as exc:
        assert "MARKET_CLOCK_SKEW_S" in str(exc)
    else:
        raise AssertionError("the market started with a malformed setting")
    assert await cluster.wait_exit("market", timeout_s=10) == 2
