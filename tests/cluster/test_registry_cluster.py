"""The registry with ten agent processes: lookup, failure detection, soft-state
recovery after a registry restart, and graceful SIGTERM."""

from __future__ import annotations

import asyncio
import signal
import time

from agent2028.registry.v1 import registry_pb2
from clients.registry import RegistryClient
from tests.support import eventually

INTERVAL_S = 0.5
TTL_S = 3.0
GRACE_S = 2.0
ENV = {
    "REGISTRY_HEARTBEAT_INTERVAL_S": str(INTERVAL_S),
    "REGISTRY_LEASE_TTL_S": str(TTL_S),
    "REGISTRY_DEREGISTER_CRITICAL_AFTER_S": str(GRACE_S),
}
MIX = [["database.query"], ["ml.inference"], ["database.query", "ml.inference"]]


async def test_ten_agents_register_fail_and_recover(make_cluster) -> None:  # type: ignore[no-untyped-def]
    cluster = make_cluster(ENV)
    await cluster.start()
    procs = await cluster.spawn_agents(10, MIX)
    async with RegistryClient(cluster.address("registry")) as client:
        # Register and find: agent i holds MIX[i % 3].
        everyone = [a async for a in client.iter_agents()]
        assert sorted(a.card.agent_id for a in everyone) == sorted(p.name for p in procs)
        db = await client.find_by_capability("database.query", top_k=100)
        expected_db = {p.name for p in procs if "database.query" in p.capabilities}
        assert {a.card.agent_id for a in db.agents} == expected_db
        assert all(db.scores[i] >= db.scores[i + 1] for i in range(len(db.scores) - 1))

        # kill -9 two agents: critical, then gone within TTL + grace.
        victims = [procs[1].name, procs[4].name]
        seen: list[registry_pb2.WatchEvent] = []

        async def watch() -> None:
            async for response in client.watch(from_index=0):
                if not response.snapshot:
                    seen.extend(response.events)

        watcher = asyncio.create_task(watch())
        killed_at = time.monotonic()
        for name in victims:
            await cluster.kill(name)

        def expired() -> bool:
            gone = {
                e.agent.card.agent_id for e in seen if e.type == registry_pb2.EVENT_TYPE_EXPIRED
            }
            return set(victims) <= gone

        await eventually(expired, timeout_s=TTL_S + GRACE_S + 3.0, what="killed agents expiring")
        took = time.monotonic() - killed_at
        assert took <= TTL_S + GRACE_S + 1.0, f"took {took:.1f}s"
        for name in victims:
            statuses = [
                e.agent.status
                for e in seen
                if e.agent.card.agent_id == name
                and e.type == registry_pb2.EVENT_TYPE_HEALTH_CHANGED
            ]
            assert 3 in statuses, f"{name} never went critical: {statuses}"
        watcher.cancel()
        survivors = {p.name for p in procs} - set(victims)
        assert {a.card.agent_id async for a in client.iter_agents()} == survivors

    # Restart the registry (kill -9, same port): every live agent registers
    # again by itself within two heartbeat intervals of it serving again.
    await cluster.kill("registry")
    await cluster.restart_service("registry")
    back_at = time.monotonic()
    async with RegistryClient(cluster.address("registry")) as client:

        async def all_back() -> bool:
            return {a.card.agent_id async for a in client.iter_agents()} == survivors

        await eventually(all_back, timeout_s=10, interval_s=0.02, what="agents re-registering")
        took = time.monotonic() - back_at
        assert took <= 2 * INTERVAL_S + 0.25, f"re-registration took {took:.2f}s"


async def test_sigterm_drains_and_exits_zero(make_cluster) -> None:  # type: ignore[no-untyped-def]
    cluster = make_cluster(ENV)
    await cluster.start()
    await cluster.spawn_agents(3, [["compute"]])
    async with RegistryClient(cluster.address("registry")) as client:
        watch = client.watch(from_index=0, resume=False)
        assert (await anext(watch)).snapshot
        # An agent told to stop deregisters and exits 0.
        assert await cluster.terminate("agent-001") == 0
        event = (await anext(watch)).events[0]
        assert (
            event.type == registry_pb2.EVENT_TYPE_DEREGISTERED
            and event.agent.card.agent_id == "agent-001"
        )
        # The registry drains (its watch ends) and exits 0 well within its grace.
        started = time.monotonic()
        cluster.signal("registry", signal.SIGTERM)
        code = await cluster.wait_exit("registry", timeout_s=15)
        assert code == 0
        assert time.monotonic() - started < 5.0
    log = cluster.log_tail("registry", 50)
    assert "draining" in log and "registry stopped" in log


async def test_bad_configuration_exits_2_naming_the_variable(make_cluster) -> None:  # type: ignore[no-untyped-def]
    cluster = make_cluster({"REGISTRY_LEASE_TTL_S": "banana"})
    try:
        await cluster.start(timeout_s=10)
    except Exception as exc:
        assert "REGISTRY_LEASE_TTL_S" in str(exc)
    else:
        raise AssertionError("the registry started with a malformed setting")
    assert await cluster.wait_exit("registry", timeout_s=5) == 2
