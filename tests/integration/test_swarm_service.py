"""The swarm service over gRPC with a real registry: the guide's 5.1-5.3,
signed votes and hive writes, watch streams, compare-and-set, flocks,
durability across restarts, and every bad input."""

from __future__ import annotations

import asyncio
import math

import grpc
import pytest

from agent2028.swarm.v1 import swarm_pb2
from clients import errors
from clients.channel import create_channel
from clients.swarm import SwarmClient, belief_request, vote_request
from services.common.crypto import Identity
from services.common.timeutil import to_duration
from tests.support import eventually
from tests.swarm_tier import register, start_swarm

DECIDED = swarm_pb2.POOL_STATUS_DECIDED


@pytest.fixture
async def agents(registry_server):  # type: ignore[no-untyped-def]
    return await register(registry_server.address, "agent-001", "agent-002", "agent-003")


@pytest.fixture
async def swarm(registry_server, tmp_path):  # type: ignore[no-untyped-def]
    host, app = await start_swarm(
        str(tmp_path), registry_server.address, {"SWARM_MAX_BOIDS": "500"}
    )
    client = SwarmClient(host.address)
    try:
        yield client, app
    finally:
        await client.close()
        await host.stop(grace_s=0.5)


async def guide_vote(client: SwarmClient, agents: dict[str, Identity]) -> swarm_pb2.Pool:
    pool = await client.create_pool("scale_infrastructure", threshold="super", duration_s=3600)
    await client.vote(agents["agent-001"], pool.pool_id, "approve", 0.9, 1.0)
    await client.vote(agents["agent-002"], pool.pool_id, "approve", 0.8, 1.0)
    await client.vote(agents["agent-003"], pool.pool_id, "reject", 0.6, 1.0)
    return pool


async def test_guide_5_1_and_5_2_a_vote_updates_the_hive(swarm, agents) -> None:  # type: ignore[no-untyped-def]
    client, _ = swarm
    pool = await guide_vote(client, agents)
    result = await client.get_consensus(pool.pool_id)
    assert result.decision == "approve" and result.confidence > 0.7
    assert round(result.confidence, 3) == 0.739 and result.status == DECIDED
    assert result.vote_count == 3 and not result.closed

    writer = agents["agent-001"]
    for name, confidence in (
        ("system_overloaded", 0.7),
        ("scale_up_needed", 0.8),
        ("cost_acceptable", 0.6),
    ):
        await client.propose_belief(writer, name, confidence)
    for intention in ("increase_capacity_by_20%", "notify_admin", "notify_admin"):
        await client.propose_intention(writer, intention)
    state = await client.get_hive()
    assert state.generation == 5
    assert [i.text for i in state.intentions] == ["increase_capacity_by_20%", "notify_admin"]

    adopted = await client.update_from_vote(pool.pool_id)
    new_state = await client.get_hive()
    assert new_state.generation > state.generation
    assert adopted.changed and adopted.generation == new_state.generation
    assert adopted.decision.decision == "approve"
    belief = {b.name: b for b in new_state.beliefs}["scale_infrastructure:approve"]
    assert belief.confidence == pytest.approx(1.7 / 2.3) and belief.source == f"pool:{pool.pool_id}"
    again = await client.update_from_vote(pool.pool_id)
    assert not again.changed and again.generation == new_state.generation


async def test_revotes_replace_closed_pools_refuse_and_votes_are_signed(
    swarm, agents, registry_server
) -> None:  # type: ignore[no-untyped-def]
    client, _ = swarm
    pool = await client.create_pool("deploy", threshold="simple", duration_s=0.6)
    first = await client.vote(agents["agent-001"], pool.pool_id, "reject", 1.0)
    replaced = await client.vote(agents["agent-001"], pool.pool_id, "approve", 0.8)
    assert not first.replaced and replaced.replaced
    assert replaced.pool.vote_count == 1 and replaced.pool.decision == "approve"
    retried = vote_request(agents["agent-002"], pool.pool_id, "approve", 0.5)
    assert not (await client._unary(client.stub.Vote, retried)).duplicate
    assert (await client._unary(client.stub.Vote, retried)).duplicate

    with pytest.raises(errors.NotFound) as unknown:
        await client.vote(Identity.generate("nobody"), pool.pool_id, "approve", 1.0)
    assert unknown.value.field == "agent_id"
    with pytest.raises(errors.Unauthenticated) as forged:
        await client.vote(Identity.generate("agent-003"), pool.pool_id, "reject", 1.0)
    assert forged.value.field == "signature"
    tampered = vote_request(agents["agent-003"], pool.pool_id, "reject", 0.1)
    tampered.weight = 1000.0
    with pytest.raises(errors.Unauthenticated):
        await client._unary(client.stub.Vote, tampered)

    async def closed() -> bool:
        return (await client.get_pool(pool.pool_id)).closed

    await eventually(closed, timeout_s=10, what="the pool closing")
    with pytest.raises(errors.FailedPrecondition) as late:
        await client.vote(agents["agent-003"], pool.pool_id, "reject", 1.0)
    assert (late.value.field, late.value.reason) == ("pool_id", "POOL_CLOSED")
    final = await client.get_pool(pool.pool_id)
    assert final.status == DECIDED and final.closed
    first_page = await client.list_votes(pool.pool_id, page_size=1)
    second_page = await client.list_votes(
        pool.pool_id, page_size=1, page_token=first_page.next_page_token
    )
    assert first_page.total_size == 2 and not second_page.next_page_token
    votes = [*first_page.votes, *second_page.votes]
    assert [(v.agent_id, v.decision, v.confidence) for v in votes] == [
        ("agent-001", "approve", 0.8),
        ("agent-002", "approve", 0.5),
    ]


async def test_compare_and_set_and_the_hive_watch(swarm, agents) -> None:  # type: ignore[no-untyped-def]
    client, _ = swarm
    responses: list[swarm_pb2.WatchHiveResponse] = []

    async def watch() -> None:
        async for response in client.watch_hive():
            responses.append(response)

    watcher = asyncio.create_task(watch())
    await eventually(lambda: responses, what="the hive snapshot")
    assert responses[0].HasField("snapshot") and responses[0].snapshot.generation == 0
    a, b = agents["agent-001"], agents["agent-002"]
    first = await client.propose_belief(a, "x", 0.3, expected_generation=0)
    assert first.generation == 1 and first.changed
    with pytest.raises(errors.Aborted) as conflict:
        await client.propose_belief(b, "x", 0.9, expected_generation=0)
    assert conflict.value.reason == "GENERATION_MISMATCH"
    assert conflict.value.metadata["current_generation"] == "1"
    with pytest.raises(errors.Aborted):
        await client.propose_intention(b, "scale", expected_generation=0)
    assert (await client.propose_intention(b, "scale", expected_generation=1)).generation == 2
    unchanged = await client.propose_belief(b, "x", 0.3)
    assert not unchanged.changed and unchanged.generation == 2
    replay = belief_request(a, "x", 0.5)
    assert (await client._unary(client.stub.ProposeBelief, replay)).changed
    assert (await client._unary(client.stub.ProposeBelief, replay)).duplicate

    def events() -> list[swarm_pb2.HiveEvent]:
        return [e for r in responses for e in r.events]

    await eventually(lambda: len(events()) == 3, what="three hive events")
    assert [e.generation for e in events()] == [1, 2, 3]
    assert events()[1].intention.text == "scale" and events()[2].belief.confidence == 0.5
    watcher.cancel()
    # A watch resumes from a generation without a snapshot.
    async for response in client.watch_hive(from_generation=1):
        assert not response.HasField("snapshot")
        assert [e.generation for e in response.events] == [2, 3]
        break


async def test_agents_learn_of_pools_from_the_watch_stream(swarm) -> None:  # type: ignore[no-untyped-def]
    client, _ = swarm
    existing = await client.create_pool("early", duration_s=60)
    seen: list[str] = []

    async def watch() -> None:
        async for pool in client.watch_pools():
            seen.append(pool.topic)

    watcher = asyncio.create_task(watch())
    await eventually(lambda: seen == ["early"], what="the open pool")
    await client.create_pool("later", duration_s=60)
    await eventually(lambda: seen == ["early", "later"], what="the new pool")
    watcher.cancel()
    listed = await client.list_pools(page_size=1)
    assert (
        listed.total_size == 2
        and listed.pools[0].pool_id == existing.pool_id
        and listed.next_page_token
    )


@pytest.mark.parametrize(
    ("bad_pool", "field"),
    [
        (swarm_pb2.CreatePoolRequest(topic="t", duration=to_duration(0)), "duration"),
        (swarm_pb2.CreatePoolRequest(topic="t", duration=to_duration(-5)), "duration"),
        (swarm_pb2.CreatePoolRequest(topic="t"), "duration"),
        (swarm_pb2.CreatePoolRequest(topic="", duration=to_duration(5)), "topic"),
        (swarm_pb2.CreatePoolRequest(topic="t", duration=to_duration(5), threshold=7), "threshold"),
        (
            swarm_pb2.CreatePoolRequest(topic="t", duration=to_duration(5), min_votes=-1),
            "min_votes",
        ),
    ],
)
async def test_bad_pools_are_invalid_argument(swarm, bad_pool, field) -> None:  # type: ignore[no-untyped-def]
    client, app = swarm
    with pytest.raises(errors.InvalidArgument) as info:
        await client._unary(client.stub.CreatePool, bad_pool)
    assert info.value.field == field
    assert not app.pools.pools


@pytest.mark.parametrize(
    ("mutate", "field"),
    [
        (lambda r: setattr(r, "confidence", 1.5), "confidence"),
        (lambda r: setattr(r, "confidence", -0.5), "confidence"),
        (lambda r: setattr(r, "confidence", math.nan), "confidence"),
        (lambda r: setattr(r, "weight", -1.0), "weight"),
        (lambda r: setattr(r, "weight", math.inf), "weight"),
        (lambda r: setattr(r, "decision", ""), "decision"),
        (lambda r: r.ClearField("issue_time"), "issue_time"),
        (lambda r: setattr(r, "pool_id", "not a pool id"), "pool_id"),
    ],
)
async def test_bad_votes_are_invalid_argument(swarm, agents, mutate, field) -> None:  # type: ignore[no-untyped-def]
    client, _ = swarm
    pool = await client.create_pool("t", duration_s=60)
    request = vote_request(agents["agent-001"], pool.pool_id, "approve", 0.5)
    mutate(request)
    with pytest.raises(errors.InvalidArgument) as info:
        await client._unary(client.stub.Vote, request)
    assert info.value.field == field
    assert (await client.get_pool(pool.pool_id)).vote_count == 0


async def test_bad_hive_writes_and_unknown_things(swarm, agents) -> None:  # type: ignore[no-untyped-def]
    client, _ = swarm
    writer = agents["agent-001"]
    for call, field in (
        (client.propose_belief(writer, "x", 1.5), "confidence"),
        (client.propose_belief(writer, "x", math.inf), "confidence"),
        (client.propose_belief(writer, "has spaces", 0.5), "name"),
        (client.propose_belief(writer, "x", 0.5, expected_generation=-2), "expected_generation"),
        (client.propose_intention(writer, ""), "intention"),
        (client.watch_hive(from_generation=-1).__anext__(), "from_generation"),
    ):
        with pytest.raises(errors.InvalidArgument) as info:
            await call
        assert info.value.field == field
    with pytest.raises(errors.NotFound) as missing:
        await client.update_from_vote("pool-0000000000000-000000")
    assert missing.value.field == "pool_id"
    pending = await client.create_pool("t", threshold="unanimous", duration_s=60)
    with pytest.raises(errors.FailedPrecondition) as undecided:
        await client.update_from_vote(pending.pool_id)
    assert undecided.value.reason == "POOL_NOT_DECIDED"
    assert (await client.get_hive()).generation == 0
    raw = create_channel(client.target)
    try:
        with pytest.raises(grpc.aio.AioRpcError) as undecodable:
            await raw.unary_unary("/agent2028.swarm.v1.SwarmService/Vote")(b"\x0a\xff", timeout=5)
        assert undecodable.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    finally:
        await raw.close()


async def test_guide_5_3_flock_over_grpc_and_its_limits(swarm) -> None:  # type: ignore[no-untyped-def]
    client, _ = swarm
    flock = await client.create_flock(100, seed=3, world=(250, 250), request_id="flock-1")
    assert flock.boids == 100 and flock.steps == 0 and flock.rules.max_speed == 4.0
    assert flock.rules.separation_distance == 25.0 and flock.rules.max_neighbors == 7
    same = await client.create_flock(100, seed=3, world=(250, 250), request_id="flock-1")
    assert same.flock_id == flock.flock_id
    stepped = await client.step_flock(flock.flock_id, 100, request_id="step-1")
    orders = list(stepped.order_parameters)
    assert len(orders) == 100 and stepped.flock.steps == 100
    assert orders[-1] > max(0.5, 3 * flock.order_parameter)
    retried = await client.step_flock(flock.flock_id, 100, request_id="step-1")
    assert retried.flock.steps == 100 and list(retried.order_parameters) == orders
    full = await client.get_flock(flock.flock_id, include_boids=True)
    assert len(full.boids.x) == 100 and all(0 <= x < 250 for x in full.boids.x)
    assert all(
        math.hypot(vx, vy) <= 4.0 + 1e-4
        for vx, vy in zip(full.boids.vx, full.boids.vy, strict=True)
    )

    for call, field in (
        (client.create_flock(501), "boids"),
        (client.create_flock(0), "boids"),
        (client.create_flock(10, seed=-1), "seed"),
        (client.create_flock(10, world=(0, 100)), "world.width"),
        (client.create_flock(10, rules={"max_speed": -1.0}), "rules.max_speed"),
        (client.create_flock(10, rules={"cohesion_distance": math.nan}), "rules.cohesion_distance"),
        (client.step_flock(flock.flock_id, 0), "steps"),
        (client.step_flock(flock.flock_id, 100_000), "steps"),
    ):
        with pytest.raises(errors.InvalidArgument) as info:
            await call
        assert info.value.field == field
    with pytest.raises(errors.NotFound):
        await client.step_flock("flock-nope", 1)
    await client.delete_flock(flock.flock_id)
    assert (await client.list_flocks()).total_size == 0


async def test_pools_votes_the_hive_and_flocks_survive_a_restart(
    registry_server, tmp_path, agents
) -> None:  # type: ignore[no-untyped-def]
    host, _ = await start_swarm(str(tmp_path), registry_server.address)
    async with SwarmClient(host.address) as client:
        pool = await guide_vote(client, agents)
        await client.propose_belief(agents["agent-002"], "system_overloaded", 0.7)
        await client.propose_intention(agents["agent-002"], "notify_admin")
        adopted = await client.update_from_vote(pool.pool_id)
        flock = await client.create_flock(50, seed=9, world=(200, 200))
        await client.step_flock(flock.flock_id, 30)
        before = await client.get_flock(flock.flock_id, include_boids=True)
        replay = vote_request(agents["agent-001"], pool.pool_id, "reject", 1.0)
        await client._unary(client.stub.Vote, replay)  # agent-001 changes its mind
        await client.vote(agents["agent-001"], pool.pool_id, "approve", 0.9)  # and back
    # kill -9 is the cluster tier's job; here the server stops without its
    # grace period and the next one must find everything acknowledged.
    await host.stop(grace_s=0)
    host, app = await start_swarm(str(tmp_path), registry_server.address)
    try:
        async with SwarmClient(host.address) as client:
            result = await client.get_consensus(pool.pool_id)
            assert (result.decision, round(result.confidence, 3), result.vote_count) == (
                "approve",
                0.739,
                3,
            )
            state = await client.get_hive()
            assert state.generation == adopted.generation
            assert {b.name for b in state.beliefs} == {
                "system_overloaded",
                "scale_infrastructure:approve",
            }
            assert [i.text for i in state.intentions] == ["notify_admin"]
            assert state.decisions[0].pool_id == pool.pool_id
            after = await client.get_flock(flock.flock_id, include_boids=True)
            assert after.flock.steps == 30 and list(after.boids.x) == list(before.boids.x)
            # The replay guard survived too: the old "reject" vote cannot come back.
            with pytest.raises(errors.Aborted):
                await client._unary(client.stub.Vote, replay)
            # And the flock carries on from where it was.
            assert (await client.step_flock(flock.flock_id, 5)).flock.steps == 35
            assert app.hive.generation == adopted.generation
    finally:
        await host.stop(grace_s=0.5)
